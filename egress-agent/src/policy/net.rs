//! Networks of `cidr:` and `ip:` rules.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egress_common::{Addr, keys::V4_MAPPED_PREFIX};
use serde::Deserialize;

use super::yaml::quoted;

/// An IPv4 or IPv6 network: an address without host bits and a prefix length.
///
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d/(96+n)`) is always held as IPv4 (`a.b.c.d/n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Net {
    addr: IpAddr,
    prefix_len: u8,
}

impl Net {
    /// The network of `addr` and `prefix_len`, or the network `addr` would be in if it has
    /// host bits set (the error). `None` if `prefix_len` is too long for the family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Result<Self, Self>> {
        let (addr, prefix_len) = normalize(addr, prefix_len);
        if prefix_len > max_len(addr) {
            return None;
        }
        let net = Self {
            addr: mask(addr, prefix_len),
            prefix_len,
        };
        Some(if net.addr == addr { Ok(net) } else { Err(net) })
    }

    /// A single address: `/32` or `/128`.
    pub fn host(addr: IpAddr) -> Self {
        let (addr, _) = normalize(addr, max_len(addr));
        Self {
            addr,
            prefix_len: max_len(addr),
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in the address's family (0-32 or 0-128).
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether this is a single address (`/32` or `/128`).
    pub fn is_host(&self) -> bool {
        self.prefix_len == max_len(self.addr)
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (ip, _) = normalize(ip, 128);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// The LPM-trie key: the 16-byte address (IPv4 mapped) and the prefix length in that
    /// 128-bit space (an IPv4 `/n` is `/(96+n)`).
    pub fn key(&self) -> (Addr, u32) {
        let addr = egress_common::keys::addr_from_ip(self.addr);
        let len = match self.addr {
            IpAddr::V4(_) => V4_MAPPED_PREFIX + u32::from(self.prefix_len),
            IpAddr::V6(_) => u32::from(self.prefix_len),
        };
        (addr, len)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Net {
    type Err = String;

    /// Parses `addr/len`; the error says what is wrong and, for host bits, what was meant.
    fn from_str(s: &str) -> Result<Self, String> {
        let not = || format!("{} is not a CIDR", quoted(s));
        let Some((addr, len)) = s.split_once('/') else {
            return Err(if s.parse::<IpAddr>().is_ok() {
                format!(
                    "{} is an address, not a CIDR (addr/len); use ip: for a single address",
                    quoted(s)
                )
            } else {
                not()
            });
        };
        let addr: IpAddr = addr.parse().map_err(|_| not())?;
        let len: u8 = match len.parse() {
            Ok(n) if len.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(not()),
        };
        match Net::new(addr, len) {
            Some(Ok(net)) => Ok(net),
            Some(Err(net)) => Err(format!(
                "{} has host bits set; did you mean {net}",
                quoted(s)
            )),
            None => Err(format!(
                "{} is not a CIDR: the prefix length is longer than {}",
                quoted(s),
                max_len(addr)
            )),
        }
    }
}

/// A `cidr:` value.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr(pub Net);

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.trim().parse().map(Cidr)
    }
}

/// An `ip:` value.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub struct SingleIp(pub Net);

impl TryFrom<String> for SingleIp {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        match t.parse::<IpAddr>() {
            Ok(ip) => Ok(SingleIp(Net::host(ip))),
            Err(_) if t.contains('/') => Err(format!(
                "{} is a network, not an IP address; use cidr: instead",
                quoted(&s)
            )),
            Err(_) => Err(format!("{} is not an IP address", quoted(&s))),
        }
    }
}

/// An `inbound:` value: a CIDR, or a single address (a `/32` or `/128`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
pub struct InboundNet(pub Net);

impl TryFrom<String> for InboundNet {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if t.contains('/') {
            return t.parse().map(InboundNet);
        }
        match t.parse::<IpAddr>() {
            Ok(ip) => Ok(InboundNet(Net::host(ip))),
            Err(_) => Err(format!(
                "{} is neither a CIDR nor an IP address",
                quoted(&s)
            )),
        }
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// IPv4-mapped IPv6 with a prefix covering at least the mapped part becomes IPv4.
fn normalize(addr: IpAddr, prefix_len: u8) -> (IpAddr, u8) {
    match addr {
        IpAddr::V6(v6) if u32::from(prefix_len) >= V4_MAPPED_PREFIX => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), prefix_len - V4_MAPPED_PREFIX as u8),
            None => (addr, prefix_len),
        },
        _ => (addr, prefix_len),
    }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// `addr` (16 bytes, network order) with all but the first `len` bits cleared.
pub(super) fn mask_key(addr: &Addr, len: u32) -> Addr {
    let bits = u128::from_be_bytes(*addr);
    let m = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    (bits & m).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Result<Net, String> {
        s.parse()
    }

    #[test]
    fn parses_v4_and_v6() {
        assert_eq!(n("192.0.2.0/24").unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(n("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(n("0.0.0.0/0").unwrap().prefix_len(), 0);
        assert_eq!(n("::/0").unwrap().to_string(), "::/0");
        assert!(n("10.0.0.1/32").unwrap().is_host());
    }

    #[test]
    fn ipv4_mapped_becomes_ipv4() {
        assert_eq!(n("::ffff:10.0.0.0/104").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(n("::ffff:0:0/96").unwrap().to_string(), "0.0.0.0/0");
        // Shorter than the mapped prefix: it cannot be IPv4, it stays IPv6.
        assert_eq!(
            n("::ffff:0:0/95").unwrap_err(),
            r#""::ffff:0:0/95" has host bits set; did you mean ::fffe:0:0/95"#
        );
        assert_eq!(n("::/80").unwrap().to_string(), "::/80");
        let ip = SingleIp::try_from("::ffff:127.0.0.1".to_string())
            .unwrap()
            .0;
        assert_eq!(ip.to_string(), "127.0.0.1/32");
        assert_eq!(ip, Net::host("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn host_bits_suggest_the_network() {
        assert_eq!(
            n("10.1.2.3/8").unwrap_err(),
            r#""10.1.2.3/8" has host bits set; did you mean 10.0.0.0/8"#
        );
        assert_eq!(
            n("2001:db8::1/32").unwrap_err(),
            r#""2001:db8::1/32" has host bits set; did you mean 2001:db8::/32"#
        );
    }

    #[test]
    fn bad_cidrs() {
        assert_eq!(
            n("10.0.0.300/8").unwrap_err(),
            r#""10.0.0.300/8" is not a CIDR"#
        );
        assert_eq!(n("10.0.0.0/").unwrap_err(), r#""10.0.0.0/" is not a CIDR"#);
        assert_eq!(
            n("10.0.0.0/+8").unwrap_err(),
            r#""10.0.0.0/+8" is not a CIDR"#
        );
        assert_eq!(
            n("10.0.0.0/ 8").unwrap_err(),
            r#""10.0.0.0/ 8" is not a CIDR"#
        );
        assert_eq!(
            n("10.0.0.0/33").unwrap_err(),
            r#""10.0.0.0/33" is not a CIDR: the prefix length is longer than 32"#
        );
        assert_eq!(
            n("10.0.0.1").unwrap_err(),
            r#""10.0.0.1" is an address, not a CIDR (addr/len); use ip: for a single address"#
        );
        assert_eq!(
            n("example.com").unwrap_err(),
            r#""example.com" is not a CIDR"#
        );
    }

    #[test]
    fn keys_live_in_the_mapped_space() {
        let (addr, len) = n("10.0.0.0/8").unwrap().key();
        assert_eq!(len, 104);
        assert_eq!(&addr[10..13], &[0xff, 0xff, 10]);
        assert_eq!(n("2001:db8::/32").unwrap().key().1, 32);
        assert_eq!(mask_key(&addr, 96)[12], 0);
    }

    #[test]
    fn contains() {
        let net = n("10.0.0.0/8").unwrap();
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.200.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!n("::/0").unwrap().contains("10.0.0.1".parse().unwrap()));
    }
}
