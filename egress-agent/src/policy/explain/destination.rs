//! What `explain` is asked about: a destination (a name or an address, maybe a port) and a
//! protocol, parsed from the text a person types.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use egress_common::consts::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use crate::policy::HostPattern;

/// The protocol of one connection or datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo (ping); it has no ports.
    Icmp,
}

impl Transport {
    /// The `PROTO_*` bit of this protocol.
    pub(super) fn bit(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Icmp => PROTO_ICMP,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        })
    }
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            _ => Err(format!("{s:?} is not a protocol (tcp, udp or icmp)")),
        }
    }
}

/// What a destination names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name, lowercased, without the trailing dot.
    Name(String),
    /// An address (IPv4-mapped IPv6 is kept as written and judged as its IPv4 address).
    Ip(IpAddr),
    /// A unix socket: `unix:/path` or `unix:@name` (what `run` lets the command reach).
    Unix(crate::policy::UnixName),
}

/// A destination to explain: a name or an address, and maybe a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The name or address.
    pub host: Host,
    /// The port, if one was given.
    pub port: Option<u16>,
}

impl FromStr for Destination {
    type Err = String;

    /// Parses `name`, `name:port`, `ip`, `ip:port`, `[ipv6]`, `[ipv6]:port`, or a unix
    /// socket as `unix:/path` or `unix:@name`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(u) = t.strip_prefix("unix:") {
            return Ok(Self {
                host: Host::Unix(u.parse()?),
                port: None,
            });
        }
        if t.is_empty() {
            return Err(
                "empty destination: give NAME, NAME:PORT, IP, IP:PORT or [IPV6]:PORT".into(),
            );
        }
        if t.starts_with('/') || t.starts_with('@') {
            return Err(format!(
                "{t:?} is not a destination: write a unix socket as unix:{t}"
            ));
        }
        if t.contains("://") || t.contains('/') {
            return Err(format!(
                "{t:?} is not a destination: give a host name or address and a port, like \
                 api.example.com:443, not a URL or a network"
            ));
        }
        if let Some(rest) = t.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{t:?}: missing ] after the IPv6 address"))?;
            let ip: Ipv6Addr = inside
                .parse()
                .map_err(|_| format!("{inside:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(p) => Some(parse_port(p)?),
                    None => return Err(format!("{t:?}: expected :PORT after ]")),
                },
            };
            return Ok(Self {
                host: Host::Ip(IpAddr::V6(ip)),
                port,
            });
        }
        // A bare IPv6 address has colons of its own: it takes no port without brackets.
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Self {
                host: Host::Ip(ip),
                port: None,
            });
        }
        let (host, port) = match t.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(p)?)),
            None => (t, None),
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_ipv6() {
                return Err(format!(
                    "{t:?}: write an IPv6 address with a port in brackets, like [{ip}]:{}",
                    port.unwrap_or(443)
                ));
            }
            return Ok(Self {
                host: Host::Ip(ip),
                port,
            });
        }
        match host.parse::<HostPattern>()? {
            HostPattern::Exact(name) => Ok(Self {
                host: Host::Name(name),
                port,
            }),
            HostPattern::Wildcard(_) => Err(format!(
                "{host:?} is a wildcard: explain one name, like a.{}",
                host.trim_start_matches("*.")
            )),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("{p:?} is not a port (1-65535)")),
    }
}
