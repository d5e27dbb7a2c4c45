//! Allow entries: which ports and protocols an address (or prefix) may be reached on.

use crate::consts::{MAX_PORT_RANGES, PROTO_NAMED, PROTO_NAMED_UDP, PROTO_TCP, PROTO_UDP};

/// An inclusive port range and the protocols it applies to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    /// First port, host byte order.
    pub lo: u16,
    /// Last port (inclusive), host byte order.
    pub hi: u16,
    /// Protocol bits (`PROTO_TCP`, `PROTO_UDP`, `PROTO_ICMP`).
    pub protos: u8,
    /// Always zero.
    pub _pad: u8,
}

/// The value of an allow entry, static (CIDR trie) or DNS-derived (hash).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowValue {
    /// Expiry in `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`), host byte order;
    /// 0 means never (static rules).
    pub expires_ns: u64,
    /// Number of meaningful entries in `ranges`, host byte order.
    pub len: u32,
    /// Always zero.
    pub _pad: u32,
    /// Allowed port ranges; only the first `len` count.
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

const _: () = assert!(core::mem::size_of::<PortRange>() == 6);
const _: () = assert!(core::mem::size_of::<AllowValue>() == 16 + 6 * MAX_PORT_RANGES);

impl AllowValue {
    /// An entry that allows nothing and never expires.
    pub const EMPTY: Self = Self {
        expires_ns: 0,
        len: 0,
        _pad: 0,
        ranges: [PortRange {
            lo: 0,
            hi: 0,
            protos: 0,
            _pad: 0,
        }; MAX_PORT_RANGES],
    };

    /// Whether `port` (host order) over protocol bit `proto` is allowed.
    #[inline(always)]
    pub fn permits(&self, port: u16, proto: u8) -> bool {
        self.permitting(port, proto).is_some()
    }

    /// The `protos` of the first range that permits `proto` to `port`, which decides (the
    /// agent writes disjoint stretches): whether it is name-bound ([`PROTO_NAMED`],
    /// [`PROTO_NAMED_UDP`]) is read from the same scan.
    #[inline(always)]
    pub fn permitting(&self, port: u16, proto: u8) -> Option<u8> {
        let mut i = 0;
        while i < MAX_PORT_RANGES {
            if i as u32 >= self.len {
                return None;
            }
            let r = &self.ranges[i];
            if r.protos & proto != 0 && r.lo <= port && port <= r.hi {
                return Some(r.protos);
            }
            i += 1;
        }
        None
    }

    /// Whether TCP to `port` is admitted by this entry only as name-bound: the range that
    /// permits it carries [`PROTO_NAMED`]. The agent writes disjoint stretches, so the first
    /// range that permits the port decides.
    #[inline(always)]
    pub fn named_tcp(&self, port: u16) -> bool {
        self.named(port, PROTO_TCP, PROTO_NAMED)
    }

    /// Whether UDP to `port` is admitted only by host rules that check names
    /// ([`PROTO_NAMED_UDP`]): QUIC long-header packets are refused there.
    #[inline(always)]
    pub fn named_udp(&self, port: u16) -> bool {
        self.named(port, PROTO_UDP, PROTO_NAMED_UDP)
    }

    #[inline(always)]
    fn named(&self, port: u16, proto: u8, flag: u8) -> bool {
        self.permitting(port, proto)
            .is_some_and(|protos| protos & flag != 0)
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{AllowValue, PortRange};
    use crate::consts::MAX_PORT_RANGES;

    // SAFETY: plain old data with no padding holes (checked by the size asserts above).
    unsafe impl aya::Pod for AllowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortRange {}

    /// More distinct port ranges than one entry holds.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TooManyRanges(pub usize);

    impl AllowValue {
        /// An entry holding the union of `ranges`, merged so that overlapping or adjacent
        /// ranges of the same protocols take one slot.
        pub fn from_ranges(
            ranges: impl IntoIterator<Item = PortRange>,
            expires_ns: u64,
        ) -> Result<Self, TooManyRanges> {
            let mut merged: [PortRange; 64] = [PortRange::default(); 64];
            let mut all: [(u8, u16, u16); 256] = [(0, 0, 0); 256];
            let mut n = 0usize;
            for r in ranges {
                if n == all.len() {
                    return Err(TooManyRanges(n + 1));
                }
                all[n] = (r.protos, r.lo, r.hi);
                n += 1;
            }
            let all = &mut all[..n];
            all.sort_unstable();
            let mut m = 0usize;
            for &(protos, lo, hi) in all.iter() {
                if m > 0 {
                    let last = &mut merged[m - 1];
                    if last.protos == protos && (lo as u32) <= last.hi as u32 + 1 {
                        if hi > last.hi {
                            last.hi = hi;
                        }
                        continue;
                    }
                }
                if m == merged.len() {
                    return Err(TooManyRanges(m + 1));
                }
                merged[m] = PortRange {
                    lo,
                    hi,
                    protos,
                    _pad: 0,
                };
                m += 1;
            }
            if m > MAX_PORT_RANGES {
                return Err(TooManyRanges(m));
            }
            let mut v = AllowValue::EMPTY;
            v.expires_ns = expires_ns;
            v.len = m as u32;
            v.ranges[..m].copy_from_slice(&merged[..m]);
            Ok(v)
        }

        /// The meaningful ranges.
        pub fn ranges(&self) -> &[PortRange] {
            &self.ranges[..(self.len as usize).min(MAX_PORT_RANGES)]
        }
    }
}

#[cfg(feature = "user")]
pub use user::TooManyRanges;

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use crate::consts::{PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

    fn r(lo: u16, hi: u16, protos: u8) -> PortRange {
        PortRange {
            lo,
            hi,
            protos,
            _pad: 0,
        }
    }

    #[test]
    fn permits_matches_port_and_protocol() {
        let v =
            AllowValue::from_ranges([r(443, 443, PROTO_TCP), r(8000, 8080, PROTO_ANY)], 0).unwrap();
        assert!(v.permits(443, PROTO_TCP));
        assert!(!v.permits(443, PROTO_UDP));
        assert!(v.permits(8000, PROTO_UDP));
        assert!(v.permits(8080, PROTO_TCP));
        assert!(!v.permits(8081, PROTO_TCP));
        assert!(!v.permits(80, PROTO_TCP));
    }

    #[test]
    fn icmp_is_its_own_bit() {
        let v = AllowValue::from_ranges([r(0, u16::MAX, PROTO_ICMP), r(443, 443, PROTO_ANY)], 0)
            .unwrap();
        assert!(v.permits(0, PROTO_ICMP));
        assert!(v.permits(443, PROTO_TCP));
        assert!(!v.permits(80, PROTO_TCP));
        let tcp_udp = AllowValue::from_ranges([r(0, u16::MAX, PROTO_ANY)], 0).unwrap();
        assert!(!tcp_udp.permits(0, PROTO_ICMP));
    }

    #[test]
    fn empty_permits_nothing() {
        assert!(!AllowValue::EMPTY.permits(443, PROTO_TCP));
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let v = AllowValue::from_ranges(
            [
                r(80, 90, PROTO_TCP),
                r(91, 100, PROTO_TCP),
                r(85, 95, PROTO_TCP),
            ],
            0,
        )
        .unwrap();
        assert_eq!(v.ranges(), &[r(80, 100, PROTO_TCP)]);
    }

    #[test]
    fn too_many_ranges_is_an_error() {
        let many = (0..17u16).map(|i| r(i * 10, i * 10, PROTO_TCP));
        assert_eq!(AllowValue::from_ranges(many, 0), Err(TooManyRanges(17)));
    }
}
