//! Address keys.
//!
//! Every address, IPv4 included, is stored as 16 bytes in network byte order, IPv4 in its
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`). A connect to `::ffff:a.b.c.d` over an IPv6 socket
//! reaches only connect6/sendmsg6, so storing IPv4 mapped lets one lookup serve both families
//! and judges a mapped address exactly as the IPv4 address it carries.

/// An IPv6 address, or an IPv4 address in mapped form; network byte order.
pub type Addr = [u8; 16];

/// Prefix length of the IPv4-mapped range (`::ffff:0:0/96`): an IPv4 `/n` is an LPM `/(96+n)`.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// The IPv4-mapped form of an IPv4 address given as 4 bytes in network byte order.
///
/// Built from four 32-bit words: as a byte array literal, the BPF backend zeroed the first ten
/// bytes through a `memset` subprogram (a call and a ten-step byte loop) on every verdict.
#[inline(always)]
pub const fn addr_from_v4(octets: [u8; 4]) -> Addr {
    let words: [u32; 4] = [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(octets),
    ];
    // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size, and every bit pattern is a valid
    // byte array; the bytes are the words' in-memory (native) order, as written above.
    unsafe { core::mem::transmute::<[u32; 4], Addr>(words) }
}

/// Whether `addr` is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

#[cfg(feature = "user")]
mod user {
    use super::{Addr, addr_from_v4, is_v4_mapped};
    use core::net::{IpAddr, Ipv6Addr};

    /// The key form of an IP address (IPv4 mapped into IPv6).
    pub fn addr_from_ip(ip: IpAddr) -> Addr {
        match ip {
            IpAddr::V4(v4) => addr_from_v4(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// The IP address a key stands for: mapped addresses come back as IPv4.
    pub fn ip_from_addr(addr: &Addr) -> IpAddr {
        if is_v4_mapped(addr) {
            IpAddr::V4(core::net::Ipv4Addr::new(
                addr[12], addr[13], addr[14], addr[15],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(*addr))
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_from_ip, ip_from_addr};

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::string::ToString as _;

    #[test]
    fn v4_is_stored_mapped() {
        let a = addr_from_ip(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20)));
        assert_eq!(Ipv6Addr::from(a).to_string(), "::ffff:198.51.100.20");
        assert!(is_v4_mapped(&a));
    }

    #[test]
    fn mapped_v6_and_v4_share_a_key() {
        let v4 = addr_from_ip("127.0.0.1".parse().unwrap());
        let mapped = addr_from_ip("::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(v4, mapped);
        assert_eq!(
            ip_from_addr(&mapped),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let a = addr_from_ip(ip);
        assert!(!is_v4_mapped(&a));
        assert_eq!(ip_from_addr(&a), ip);
    }
}
