//! `dns:` settings: TTL bounds, grace period and upstream name servers.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, SeqAccess, Visitor},
};

use super::yaml::quoted;

/// Default lower bound applied to answer TTLs.
pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(30);
/// Default upper bound applied to answer TTLs.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);
/// Default time an address stays allowed after its TTL ran out.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Port of a name server given without one.
pub const DNS_PORT: u16 = 53;

/// How the agent treats DNS answers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Answers with a shorter TTL are kept this long.
    pub min_ttl: Duration,
    /// Answers with a longer TTL are kept only this long.
    pub max_ttl: Duration,
    /// How long an address stays allowed after its (bounded) TTL ran out, so that a
    /// connection made just before a re-resolution is not cut.
    pub grace: Duration,
    /// Where queries are forwarded.
    pub upstream: Upstream,
    /// Private ranges too are kept out of DNS-derived entries (the rebinding guard).
    pub block_private: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            min_ttl: DEFAULT_MIN_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            grace: DEFAULT_GRACE,
            upstream: Upstream::System,
            block_private: false,
        }
    }
}

/// The name servers queries go to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Upstream {
    /// Those of the system resolver (`/etc/resolv.conf`).
    #[default]
    System,
    /// These, in order.
    Servers(Vec<SocketAddr>),
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UpstreamVisitor)
    }
}

struct UpstreamVisitor;

impl<'de> Visitor<'de> for UpstreamVisitor {
    type Value = Upstream;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"system\" or a list of name server addresses")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Upstream, E> {
        if s == "system" {
            Ok(Upstream::System)
        } else {
            Err(E::custom(format!(
                "expected \"system\" or a list of name server addresses, found {}",
                quoted(s)
            )))
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Upstream, A::Error> {
        let mut servers = Vec::new();
        while let Some(Server(s)) = seq.next_element()? {
            servers.push(s);
        }
        if servers.is_empty() {
            return Err(de::Error::custom(
                "no name servers given; use upstream: system for the system resolver",
            ));
        }
        Ok(Upstream::Servers(servers))
    }
}

/// One upstream server: `ip`, `ip:port`, `[v6]` or `[v6]:port`.
#[derive(Debug, Clone, Copy)]
struct Server(SocketAddr);

impl<'de> Deserialize<'de> for Server {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_server(&s).map(Server).map_err(de::Error::custom)
    }
}

fn parse_server(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let bracketed = t.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    let addr = if let Ok(ip) = bracketed.unwrap_or(t).parse::<IpAddr>() {
        Some(SocketAddr::new(ip, DNS_PORT))
    } else {
        t.parse::<SocketAddr>().ok()
    };
    match addr {
        Some(a) if a.port() != 0 => Ok(a),
        _ => Err(format!(
            "{} is not a name server address (ip, ip:port or [ipv6]:port)",
            quoted(s)
        )),
    }
}

/// A duration: `500ms`, `30s`, `5m`, `1h`, or a bare integer of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurVisitor)
    }
}

fn not_a_duration(text: &str) -> String {
    format!(
        "{} is not a duration (like 500ms, 30s, 5m, 1h)",
        quoted(text)
    )
}

/// Parses `<digits><unit>` with unit `ms`, `s`, `m` or `h` (or none: seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = match digits.parse() {
        Ok(n) if !digits.is_empty() => n,
        _ => return Err(not_a_duration(text)),
    };
    let per_unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(not_a_duration(text)),
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{} is too long", quoted(text)))
}

/// Formats a duration the way the format writes them.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) && ms > 0 => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) && ms > 0 => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

struct DurVisitor;

impl<'de> Visitor<'de> for DurVisitor {
    type Value = Dur;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration like 500ms, 30s, 5m, 1h")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dur, E> {
        Ok(Dur(Duration::from_secs(n)))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
        Err(E::custom(not_a_duration(&n.to_string())))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Dur, E> {
        Err(E::custom(not_a_duration(&x.to_string())))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
        parse_duration(s).map(Dur).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "s", "30x", "1.5s", "-1s", "1h30m", "30 sec"] {
            assert_eq!(parse_duration(bad), Err(not_a_duration(bad)), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn servers() {
        let p = |s| parse_server(s).map(|a| a.to_string());
        assert_eq!(p("9.9.9.9"), Ok("9.9.9.9:53".into()));
        assert_eq!(p("9.9.9.9:5353"), Ok("9.9.9.9:5353".into()));
        assert_eq!(p("2001:db8::1"), Ok("[2001:db8::1]:53".into()));
        assert_eq!(p("[2001:db8::1]"), Ok("[2001:db8::1]:53".into()));
        assert_eq!(p("[2001:db8::1]:53"), Ok("[2001:db8::1]:53".into()));
        for bad in ["dns.google", "9.9.9.9:0", "9.9.9.9:70000", "[9.9.9.9", ""] {
            assert!(
                p(bad).unwrap_err().contains("is not a name server address"),
                "{bad}"
            );
        }
    }
}
