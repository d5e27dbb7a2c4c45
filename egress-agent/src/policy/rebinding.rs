//! DNS rebinding guard: a permitted name that resolves to a link-local, cloud metadata,
//! loopback or unspecified address does not make that address reachable (loopback holds local
//! proxies and container engines' TCP ports; `0.0.0.0` and `::` reach loopback too). Only a `cidr:`/`ip:` rule can allow such an
//! address (through the static CIDR map, which this guard never touches).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Cloud metadata services outside the link-local ranges.
const METADATA: [IpAddr; 3] = [
    // Alibaba Cloud.
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    // AWS over IPv6.
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    // Oracle Cloud's alternative address.
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
];

/// Whether DNS must not grant `ip`: link-local (169.254.0.0/16, fe80::/10, which hold the
/// usual 169.254.169.254 metadata service), a known metadata address, loopback (127.0.0.0/8,
/// ::1) or unspecified (0.0.0.0, ::), IPv4-mapped forms included.
pub fn is_guarded(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if METADATA.contains(&ip) || ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> bool {
        is_guarded(s.parse().unwrap())
    }

    #[test]
    fn link_local_and_metadata_are_guarded() {
        assert!(g("169.254.169.254"));
        assert!(g("169.254.0.1"));
        assert!(g("::ffff:169.254.169.254"));
        assert!(g("fe80::1"));
        assert!(g("febf::1"));
        assert!(g("fd00:ec2::254"));
        assert!(g("100.100.100.200"));
    }

    #[test]
    fn loopback_and_unspecified_are_guarded() {
        assert!(g("127.0.0.1"));
        assert!(g("127.1.2.3"));
        assert!(g("::1"));
        assert!(g("::ffff:127.0.0.1"));
        assert!(g("0.0.0.0"));
        assert!(g("::"));
    }

    #[test]
    fn ordinary_addresses_are_not() {
        assert!(!g("198.51.100.10"));
        assert!(!g("2001:db8::1"));
        assert!(!g("fec0::1"));
        assert!(!g("169.253.255.255"));
    }
}
