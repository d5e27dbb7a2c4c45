//! DNS rebinding guard: a permitted name that resolves to an address of the machine itself or
//! of its local network does not make that address reachable. Guarded always: loopback
//! (127.0.0.0/8, ::1), unspecified (0.0.0.0/8, ::, which reach the local host too),
//! link-local (169.254.0.0/16, fe80::/10, which hold the usual 169.254.169.254 metadata
//! service) and known metadata addresses; with `dns: {block_private: true}` also the private
//! ranges (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7). IPv4-mapped
//! (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) forms are judged as the IPv4 address
//! they carry. Only a `cidr:`/`ip:` rule can allow such an address (through the static CIDR
//! map, which this guard never touches).

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

/// Why DNS must not grant `ip` (a phrase for the warning), or `None` when it may.
/// `block_private` adds the private ranges.
pub fn guarded(ip: IpAddr, block_private: bool) -> Option<&'static str> {
    let ip = match ip.to_canonical() {
        // IPv4-compatible (::a.b.c.d, deprecated): the kernel routes it over IPv6, but judge
        // it as the IPv4 address it spells, so ::127.0.0.1 is not a way around the guard.
        IpAddr::V6(v6)
            if v6.segments()[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() =>
        {
            IpAddr::V4(Ipv4Addr::from(
                v6.octets()[12..16].try_into().unwrap_or([0; 4]),
            ))
        }
        other => other,
    };
    if METADATA.contains(&ip) {
        return Some("a cloud metadata address");
    }
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if o[0] == 0 {
                Some("an unspecified (this host) address")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else if block_private && (v4.is_private() || (o[0] == 100 && o[1] & 0xc0 == 64)) {
                Some("a private address (dns.block_private)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s0 = v6.segments()[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("an unspecified (this host) address")
            } else if s0 & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if block_private && s0 & 0xfe00 == 0xfc00 {
                Some("a private address (dns.block_private)")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> bool {
        guarded(s.parse().unwrap(), false).is_some()
    }

    fn p(s: &str) -> bool {
        guarded(s.parse().unwrap(), true).is_some()
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
    fn loopback_and_unspecified_are_guarded_in_every_form() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "127.255.255.255",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::ffff:0.0.0.0",
        ] {
            assert!(g(ip), "{ip}");
            assert!(p(ip), "{ip}");
        }
    }

    #[test]
    fn private_ranges_only_by_option() {
        for ip in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "fc00::1",
            "fdff::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(!g(ip), "{ip} is guarded without the option");
            assert!(p(ip), "{ip} is not guarded with the option");
        }
    }

    #[test]
    fn ordinary_addresses_are_not() {
        for ip in [
            "198.51.100.10",
            "2001:db8::1",
            "fec0::1",
            "169.253.255.255",
            "172.32.0.1",
            "172.15.255.255",
            "100.128.0.1",
            "100.63.255.255",
            "1.0.0.1",
            "128.0.0.1",
            "fe00::1",
        ] {
            assert!(!g(ip), "{ip}");
            assert!(!p(ip), "{ip}");
        }
    }
}
