//! `ports:` and `protocol:` values.

use std::fmt;

use egress_common::consts::{PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use serde::{
    Deserialize, Deserializer,
    de::{self, SeqAccess, Visitor},
};

use super::yaml::quoted;

/// Every port: what a rule without `ports:` allows.
pub const ALL_PORTS: (u16, u16) = (0, u16::MAX);

/// The protocols a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP (the default). Never ICMP: that takes a rule of its own.
    #[default]
    Any,
    /// ICMP echo (ping) from ICMP datagram sockets, IPv4 and IPv6; no ports.
    Icmp,
}

impl Protocol {
    /// The `PROTO_*` bits of `egress_common::PortRange::protos`.
    pub fn bits(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Any => PROTO_ANY,
            Self::Icmp => PROTO_ICMP,
        }
    }

    /// Whether ports mean anything for this protocol (not for ICMP).
    pub fn has_ports(self) -> bool {
        self != Self::Icmp
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Any => "any",
            Self::Icmp => "icmp",
        })
    }
}

/// A `ports:` value: one port or range, or a non-empty list of them. Held as sorted,
/// merged inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(pub Vec<(u16, u16)>);

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortsVisitor)
    }
}

/// Sorts `ranges` and merges those that overlap or touch.
pub fn merge(ranges: &mut Vec<(u16, u16)>) {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    *ranges = out;
}

fn not_a_port(text: &str) -> String {
    format!("{} is not a port (1-65535)", quoted(text))
}

fn port(text: &str) -> Option<u16> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<u16>().ok().filter(|&p| p != 0)
}

/// One list item: `443`, `"443"` or `"8000-8080"`.
fn parse_item(text: &str) -> Result<(u16, u16), String> {
    match text.split_once('-').filter(|(lo, _)| !lo.trim().is_empty()) {
        Some((lo, hi)) => match (port(lo), port(hi)) {
            (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
            _ => Err(format!(
                "{} is not a port range (a-b with 1 <= a <= b <= 65535)",
                quoted(text)
            )),
        },
        None => port(text).map(|p| (p, p)).ok_or_else(|| not_a_port(text)),
    }
}

fn number<E: de::Error>(text: String) -> Result<(u16, u16), E> {
    parse_item(&text).map_err(E::custom)
}

const EXPECTING: &str = "a port, a range like \"8000-8080\", or a list of them";
const EMPTY: &str = "no ports given; leave ports out to allow every port";

struct PortsVisitor;

impl<'de> Visitor<'de> for PortsVisitor {
    type Value = Ports;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTING)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Ports, E> {
        number(n.to_string()).map(|r| Ports(vec![r]))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Ports, E> {
        Err(E::custom(not_a_port(&n.to_string())))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Ports, E> {
        Err(E::custom(not_a_port(&x.to_string())))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Ports, E> {
        parse_item(s).map(|r| Ports(vec![r])).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Ports, E> {
        Err(E::custom(EMPTY))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ports, A::Error> {
        let mut ranges = Vec::new();
        while let Some(PortItem(r)) = seq.next_element()? {
            ranges.push(r);
        }
        if ranges.is_empty() {
            return Err(de::Error::custom(EMPTY));
        }
        merge(&mut ranges);
        Ok(Ports(ranges))
    }
}

struct PortItem((u16, u16));

impl<'de> Deserialize<'de> for PortItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor).map(PortItem)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = (u16, u16);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port or a range like \"8000-8080\"")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<(u16, u16), E> {
        number(n.to_string())
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<(u16, u16), E> {
        Err(E::custom(not_a_port(&n.to_string())))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<(u16, u16), E> {
        Err(E::custom(not_a_port(&x.to_string())))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(u16, u16), E> {
        parse_item(s).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items() {
        assert_eq!(parse_item("443"), Ok((443, 443)));
        assert_eq!(parse_item(" 8000 - 8080 "), Ok((8000, 8080)));
        assert_eq!(parse_item("1-65535"), Ok((1, 65535)));
        assert_eq!(parse_item("80-80"), Ok((80, 80)));
        assert_eq!(
            parse_item("0"),
            Err(r#""0" is not a port (1-65535)"#.into())
        );
        assert_eq!(
            parse_item("70000"),
            Err(r#""70000" is not a port (1-65535)"#.into())
        );
        assert_eq!(
            parse_item("-5"),
            Err(r#""-5" is not a port (1-65535)"#.into())
        );
        assert_eq!(
            parse_item("http"),
            Err(r#""http" is not a port (1-65535)"#.into())
        );
        assert_eq!(parse_item(""), Err(r#""" is not a port (1-65535)"#.into()));
        for bad in ["8080-8000", "0-10", "1-70000", "1-", "1-2-3", "a-b"] {
            assert_eq!(
                parse_item(bad),
                Err(format!(
                    "{} is not a port range (a-b with 1 <= a <= b <= 65535)",
                    quoted(bad)
                ))
            );
        }
    }

    #[test]
    fn merging() {
        let mut v = vec![
            (443, 443),
            (80, 80),
            (81, 90),
            (85, 100),
            (1000, 2000),
            (442, 442),
        ];
        merge(&mut v);
        assert_eq!(v, vec![(80, 100), (442, 443), (1000, 2000)]);
        let mut v = vec![(1, 65535), (65535, 65535)];
        merge(&mut v);
        assert_eq!(v, vec![(1, 65535)]);
    }

    #[test]
    fn protocol_bits() {
        assert_eq!(Protocol::Tcp.bits(), PROTO_TCP);
        assert_eq!(Protocol::Udp.bits(), PROTO_UDP);
        assert_eq!(Protocol::default().bits(), PROTO_ANY);
        assert_eq!(Protocol::Icmp.bits(), PROTO_ICMP);
        assert_eq!(Protocol::Any.bits() & PROTO_ICMP, 0);
    }
}
