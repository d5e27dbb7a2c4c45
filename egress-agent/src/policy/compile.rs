//! Rules to kernel values: the port/protocol union of a set of rules, and the entries of the
//! static CIDR trie.

use std::collections::HashMap;

use egress_common::{
    Addr, AllowValue, PortRange,
    consts::{MAX_PORT_RANGES, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    consts::{PROTO_NAMED, PROTO_NAMED_UDP},
    keys::{V4_MAPPED_PREFIX, is_v4_mapped},
    names::{NameBytes, name_key},
    rules::TooManyRanges,
};

use super::{
    HostPattern, Net, Policy, PolicyError, Protocol, Rule, Target, error::Location, net::mask_key,
    ports,
};

/// The ports allowed per protocol: two sets of sorted, disjoint, non-touching ranges, and
/// whether ICMP is allowed (it has no ports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    tcp: Vec<(u16, u16)>,
    udp: Vec<(u16, u16)>,
    icmp: bool,
    /// TCP ports of host rules that check names (`name_check`): where no rule in `tcp`
    /// also allows them, their stretches carry `PROTO_NAMED`.
    tcp_named: Vec<(u16, u16)>,
    /// The same for UDP (`PROTO_NAMED_UDP`: QUIC long headers refused).
    udp_named: Vec<(u16, u16)>,
}

/// The range ICMP is written with: every port, so that whatever port a hook reports for an
/// ICMP destination (the programs use 0) matches.
const ICMP_RANGE: PortRange = PortRange {
    lo: 0,
    hi: u16::MAX,
    protos: PROTO_ICMP,
    _pad: 0,
};

impl PortSet {
    /// Adds `ranges` for `protocol` (ICMP ignores them).
    pub fn add(&mut self, ranges: &[(u16, u16)], protocol: Protocol) {
        let bits = protocol.bits();
        if bits & PROTO_ICMP != 0 {
            self.icmp = true;
        }
        if bits & PROTO_TCP != 0 {
            self.tcp.extend_from_slice(ranges);
            ports::merge(&mut self.tcp);
        }
        if bits & PROTO_UDP != 0 {
            self.udp.extend_from_slice(ranges);
            ports::merge(&mut self.udp);
        }
    }

    /// Adds a rule's ports: a host rule that checks names adds its TCP ports as name-bound.
    pub fn add_rule(&mut self, rule: &Rule) {
        let bits = rule.protocol.bits();
        if !rule.name_check || bits & (PROTO_TCP | PROTO_UDP) == 0 {
            self.add(&rule.ports, rule.protocol);
            return;
        }
        if bits & PROTO_TCP != 0 {
            self.tcp_named.extend_from_slice(&rule.ports);
            ports::merge(&mut self.tcp_named);
        }
        if bits & PROTO_UDP != 0 {
            self.udp_named.extend_from_slice(&rule.ports);
            ports::merge(&mut self.udp_named);
        }
    }

    /// Adds everything `other` allows.
    pub fn union(&mut self, other: &PortSet) {
        self.tcp_named.extend_from_slice(&other.tcp_named);
        ports::merge(&mut self.tcp_named);
        self.udp_named.extend_from_slice(&other.udp_named);
        ports::merge(&mut self.udp_named);
        self.tcp.extend_from_slice(&other.tcp);
        ports::merge(&mut self.tcp);
        self.udp.extend_from_slice(&other.udp);
        ports::merge(&mut self.udp);
        self.icmp |= other.icmp;
    }

    /// Whether ICMP is allowed.
    pub fn icmp(&self) -> bool {
        self.icmp
    }

    /// The fewest `PortRange`s that say the same: a stretch open to both protocols is one
    /// `PROTO_ANY` range, so `tcp 443` plus `udp 443` takes one slot, not two. ICMP, when
    /// allowed, is one more range of its own, last.
    pub fn ranges(&self) -> Vec<PortRange> {
        // Boundaries of the elementary stretches, as u32 so that 65535 + 1 fits.
        let mut points: Vec<u32> = self
            .tcp
            .iter()
            .chain(&self.udp)
            .chain(&self.tcp_named)
            .chain(&self.udp_named)
            .flat_map(|&(lo, hi)| [u32::from(lo), u32::from(hi) + 1])
            .collect();
        points.sort_unstable();
        points.dedup();
        let (mut t, mut u, mut nt, mut nu) = (0, 0, 0, 0);
        let mut out: Vec<PortRange> = Vec::new();
        for w in points.windows(2) {
            let (start, end) = (w[0], w[1] - 1);
            while t < self.tcp.len() && u32::from(self.tcp[t].1) < start {
                t += 1;
            }
            while u < self.udp.len() && u32::from(self.udp[u].1) < start {
                u += 1;
            }
            while nt < self.tcp_named.len() && u32::from(self.tcp_named[nt].1) < start {
                nt += 1;
            }
            while nu < self.udp_named.len() && u32::from(self.udp_named[nu].1) < start {
                nu += 1;
            }
            let in_tcp = t < self.tcp.len() && u32::from(self.tcp[t].0) <= start;
            let in_udp = u < self.udp.len() && u32::from(self.udp[u].0) <= start;
            let in_named = nt < self.tcp_named.len() && u32::from(self.tcp_named[nt].0) <= start;
            let in_named_udp =
                nu < self.udp_named.len() && u32::from(self.udp_named[nu].0) <= start;
            let protos = if in_tcp || in_named { PROTO_TCP } else { 0 }
                | if in_udp || in_named_udp { PROTO_UDP } else { 0 }
                | if in_named && !in_tcp { PROTO_NAMED } else { 0 }
                | if in_named_udp && !in_udp {
                    PROTO_NAMED_UDP
                } else {
                    0
                };
            if protos == 0 {
                continue;
            }
            // `start` and `end` are at most 65535 here: only `hi + 1` can be 65536 and it
            // only ever ends a stretch.
            let (lo, hi) = (start as u16, end as u16);
            match out.last_mut() {
                Some(last) if last.protos == protos && u32::from(last.hi) + 1 == start => {
                    last.hi = hi;
                }
                _ => out.push(PortRange {
                    lo,
                    hi,
                    protos,
                    _pad: 0,
                }),
            }
        }
        if self.icmp {
            out.push(ICMP_RANGE);
        }
        out
    }

    /// The kernel value, or how many ranges it would need if that is too many.
    pub fn value(&self, expires_ns: u64) -> Result<AllowValue, TooManyRanges> {
        let ranges = self.ranges();
        if ranges.len() > MAX_PORT_RANGES {
            return Err(TooManyRanges(ranges.len()));
        }
        AllowValue::from_ranges(ranges, expires_ns)
    }
}

/// The value allowing the union of `rules`' ports and protocols, expiring at `expires_ns`
/// (`CLOCK_BOOTTIME` ns, 0 = never).
pub fn rule_value(rules: &[&Rule], expires_ns: u64) -> Result<AllowValue, TooManyRanges> {
    let mut set = PortSet::default();
    for r in rules {
        set.add_rule(r);
    }
    set.value(expires_ns)
}

/// One entry of the names trie (name binding): a host rule's name in key form (see
/// `egress_common::names`) and the ports every host rule covering it permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameEntry {
    /// Prefix length in bits.
    pub prefix_len: u32,
    /// The name, reversed and terminated.
    pub data: NameBytes,
    /// What the name may be used on: its own rules' ports and every broader wildcard's (one
    /// longest-prefix lookup must decide).
    pub value: AllowValue,
}

/// The names trie: one entry per host rule name, holding the union of the rules that cover
/// it (an exact name: every rule that matches it; a wildcard: every wildcard at or above it).
pub fn name_entries(policy: &Policy) -> Vec<NameEntry> {
    let hosts: Vec<(&HostPattern, &Rule)> = policy
        .rules
        .iter()
        .filter_map(|r| match &r.target {
            Target::Host(h) => Some((h, r)),
            _ => None,
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (pattern, _) in &hosts {
        if !seen.insert((*pattern).clone()) {
            continue;
        }
        let (probe, wildcard, name) = match pattern {
            HostPattern::Exact(n) => (n.clone(), false, n),
            HostPattern::Wildcard(s) => (format!("x.{s}"), true, s),
        };
        let covering: Vec<&Rule> = hosts
            .iter()
            .filter(|(p, _)| p.matches(&probe) && (!wildcard || p.is_wildcard()))
            .map(|(_, r)| *r)
            .collect();
        // More ranges than one entry holds (the DNS entries of such a name fail the same
        // way, so no address is admitted for it): the name then passes on every TCP port
        // its address is admitted on.
        let value = rule_value(&covering, 0).unwrap_or_else(|_| {
            let mut v = AllowValue::EMPTY;
            v.len = 1;
            v.ranges[0] = PortRange {
                lo: 0,
                hi: u16::MAX,
                protos: PROTO_TCP,
                _pad: 0,
            };
            v
        });
        let Some((prefix_len, data)) = name_key(name, wildcard) else {
            continue;
        };
        out.push(NameEntry {
            prefix_len,
            data,
            value,
        });
    }
    out
}

/// One entry of the static CIDR trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrEntry {
    /// Network address, 16 bytes in network byte order (IPv4 mapped).
    pub addr: Addr,
    /// Prefix length in the 128-bit key space (an IPv4 `/n` is `96 + n`).
    pub prefix_len: u32,
    /// What the prefix allows, its broader prefixes' rules included.
    pub value: AllowValue,
}

/// The key of the IPv4-mapped range `::ffff:0:0/96`.
const V4_MAPPED_BASE: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];

/// Compiles the `cidr:`/`ip:` rules into LPM-trie entries, sorted by prefix length then
/// address.
///
/// The kernel does one longest-prefix-match lookup, so each entry holds the union of its
/// own rules and those of every broader prefix containing it. An entry's nearest broader
/// prefix already holds the union of its own ancestors, so each entry needs one lookup per
/// shorter length (at most 128), never a scan of the others.
///
/// IPv4 is stored mapped, so an IPv6 rule such as `::/0` would also cover every IPv4
/// address. IPv6 rules do not apply to IPv4: IPv4 entries only inherit from IPv4 prefixes,
/// and when an IPv6 rule covers `::ffff:0:0/96` an entry allowing nothing is added there
/// (unless `0.0.0.0/0` is itself a rule) so that IPv4 addresses stop at it.
pub fn cidr_entries(policy: &Policy) -> Result<Vec<CidrEntry>, PolicyError> {
    trie_entries(policy, |t| match t {
        Target::Net(n) => Some(n),
        _ => None,
    })
}

/// Compiles the `inbound:` rules into the entries of the inbound trie (peer prefix to the
/// local ports it may connect to), merged exactly as [`cidr_entries`] merges its own.
pub fn inbound_entries(policy: &Policy) -> Result<Vec<CidrEntry>, PolicyError> {
    trie_entries(policy, |t| match t {
        Target::Inbound(n) => Some(n),
        _ => None,
    })
}

/// The trie entries of the rules whose target `select` maps to a network.
fn trie_entries(
    policy: &Policy,
    select: impl Fn(&Target) -> Option<&Net>,
) -> Result<Vec<CidrEntry>, PolicyError> {
    struct Group<'a> {
        own: PortSet,
        first: &'a Rule,
        net: Net,
    }
    let mut groups: HashMap<(Addr, u32), Group<'_>> = HashMap::new();
    for rule in &policy.rules {
        let Some(net) = select(&rule.target) else {
            continue;
        };
        groups
            .entry(net.key())
            .or_insert_with(|| Group {
                own: PortSet::default(),
                first: rule,
                net: *net,
            })
            .own
            .add(&rule.ports, rule.protocol);
    }

    let mut keys: Vec<(Addr, u32)> = groups.keys().copied().collect();
    let covers_v4 = keys
        .iter()
        .any(|&(addr, len)| len <= V4_MAPPED_PREFIX && mask_key(&V4_MAPPED_BASE, len) == addr);
    let barrier = (V4_MAPPED_BASE, V4_MAPPED_PREFIX);
    let add_barrier = covers_v4 && !groups.contains_key(&barrier);
    if add_barrier {
        keys.push(barrier);
    }
    keys.sort_unstable_by_key(|&(addr, len)| (len, addr));

    let mut acc: HashMap<(Addr, u32), PortSet> = HashMap::with_capacity(keys.len());
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let (addr, len) = key;
        let Some(group) = groups.get(&key) else {
            // The barrier: nothing of its own, and no IPv4 prefix is broader.
            acc.insert(key, PortSet::default());
            out.push(CidrEntry {
                addr,
                prefix_len: len,
                value: AllowValue::EMPTY,
            });
            continue;
        };
        let floor = if is_v4_mapped(&addr) && len >= V4_MAPPED_PREFIX {
            V4_MAPPED_PREFIX
        } else {
            0
        };
        let mut set = group.own.clone();
        let parent = (floor..len)
            .rev()
            .find_map(|l| acc.get(&(mask_key(&addr, l), l)));
        let inherited = parent.is_some_and(|p| {
            let before = set.clone();
            set.union(p);
            set != before
        });
        let value = set.value(0).map_err(|TooManyRanges(count)| {
            let net = group.net;
            let o = &group.first.origin;
            PolicyError::TooManyRanges {
                at: Location {
                    file: o.file.clone(),
                    line: o.line,
                    column: o.column,
                    field: format!("allow[{}]", o.index),
                },
                net,
                count,
                max: MAX_PORT_RANGES,
                inherited,
            }
        })?;
        acc.insert(key, set);
        out.push(CidrEntry {
            addr,
            prefix_len: len,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use egress_common::consts::PROTO_ANY;

    fn r(lo: u16, hi: u16, protos: u8) -> PortRange {
        PortRange {
            lo,
            hi,
            protos,
            _pad: 0,
        }
    }

    #[test]
    fn both_protocols_share_a_range() {
        let mut s = PortSet::default();
        s.add(&[(443, 443)], Protocol::Tcp);
        s.add(&[(443, 443)], Protocol::Udp);
        assert_eq!(s.ranges(), vec![r(443, 443, PROTO_ANY)]);

        let mut s = PortSet::default();
        s.add(&[(80, 90)], Protocol::Tcp);
        s.add(&[(85, 100)], Protocol::Udp);
        s.add(&[(1, 1)], Protocol::Any);
        assert_eq!(
            s.ranges(),
            vec![
                r(1, 1, PROTO_ANY),
                r(80, 84, PROTO_TCP),
                r(85, 90, PROTO_ANY),
                r(91, 100, PROTO_UDP)
            ]
        );
    }

    #[test]
    fn full_range_is_one_slot() {
        let mut s = PortSet::default();
        s.add(&[(0, 65535)], Protocol::Any);
        s.add(&[(53, 53)], Protocol::Udp);
        assert_eq!(s.ranges(), vec![r(0, 65535, PROTO_ANY)]);
        let v = s.value(7).unwrap();
        assert_eq!((v.len, v.expires_ns), (1, 7));
        assert!(v.permits(65535, PROTO_TCP) && v.permits(0, PROTO_UDP));
    }

    #[test]
    fn icmp_is_a_range_of_its_own() {
        let mut s = PortSet::default();
        s.add(&[(443, 443)], Protocol::Any);
        s.add(&[(0, 65535)], Protocol::Icmp);
        assert_eq!(
            s.ranges(),
            vec![r(443, 443, PROTO_ANY), r(0, 65535, PROTO_ICMP)]
        );
        let v = s.value(0).unwrap();
        assert!(v.permits(0, PROTO_ICMP) && v.permits(443, PROTO_TCP));
        assert!(!v.permits(80, PROTO_TCP));

        // `any` is tcp and udp, never icmp.
        let mut s = PortSet::default();
        s.add(&[(0, 65535)], Protocol::Any);
        assert!(!s.value(0).unwrap().permits(0, PROTO_ICMP));

        let mut other = PortSet::default();
        other.add(&[(0, 65535)], Protocol::Icmp);
        s.union(&other);
        assert!(s.icmp() && s.value(0).unwrap().permits(0, PROTO_ICMP));
    }

    #[test]
    fn too_many_ranges_counts_them() {
        let mut s = PortSet::default();
        let many: Vec<(u16, u16)> = (0..20).map(|i| (100 + 2 * i, 100 + 2 * i)).collect();
        s.add(&many, Protocol::Tcp);
        assert_eq!(s.value(0), Err(TooManyRanges(20)));
    }
}
