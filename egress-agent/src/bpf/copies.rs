//! Copies of the exact static entries in the DNS-derived hash (`ALLOW_DNS`), so that an `ip:`
//! destination, like a DNS-derived one, is decided by one hash lookup.
//!
//! The programs look `ALLOW_DNS` up first and the static rules (`ALLOW_EXACT`, then the trie)
//! only when that entry does not permit. Without a copy, every connect to an `ip:` destination
//! paid a miss in `ALLOW_DNS` before its exact hit: two hash lookups against the one of any
//! bare cgroup-BPF filter. With one, the first lookup finds the static value itself.
//!
//! A copy is an entry that never expires (`expires_ns` 0): a DNS-derived entry always has an
//! expiry, so the zero marks a copy in the map itself, for a restarted agent too. It holds
//! exactly the value of the address's `ALLOW_EXACT` entry, so the verdict is the same as
//! without it: a port the copy does not permit falls through to that same static entry, and a
//! copy carries no name-checked range (a static rule admits by address). The rules:
//!
//! - **Only where no DNS-derived entry is.** A copy is written with `BPF_NOEXIST`; a DNS
//!   answer for that address overwrites it (the static entry still decides its own ports
//!   after the DNS entry), and when that entry is removed the copy is written back.
//! - **Never broader than the static rules in force.** After a policy change has written and
//!   checked the static maps, copies of removed or changed entries are removed or rewritten;
//!   a copy that cannot be removed fails the change, which then rolls back. Between the
//!   static removal and the copy's, the address is still allowed as the old policy allowed it,
//!   as an exact entry outlived its trie entry before (`super::rules`).
//! - **A cache, second to DNS.** At most a quarter of `ALLOW_DNS`'s capacity; when a DNS
//!   answer finds the map full, copies are evicted for it. An address without a copy is
//!   judged as before, with one lookup more.
//!
//! Every write happens under the enforcer's lock, which every writer of `ALLOW_DNS` holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, anyhow};
use aya::maps::{HashMap, MapData, MapError};
use egress_common::{Addr, AllowValue};

use super::rules::Contents;

/// The DNS-derived hash.
pub type DnsMap = HashMap<MapData, Addr, AllowValue>;

/// `BPF_NOEXIST`: create only.
const NOEXIST: u64 = 1;

/// Whether `value`, found in `ALLOW_DNS`, is a copy of a static entry (it never expires).
pub fn is_copy(value: &AllowValue) -> bool {
    value.expires_ns == 0
}

/// The copies in the pinned DNS map under `pin_dir` (any unreadable entry fails).
pub fn read_pinned(pin_dir: &Path) -> anyhow::Result<BTreeMap<IpAddr, AllowValue>> {
    super::rules::read_pinned_dns_where(pin_dir, is_copy)
}

/// The copies written, and what they copy.
#[derive(Debug, Default)]
pub struct Copies {
    /// The value a copy at each address holds: the exact static entries, the first in key
    /// order up to the cap.
    source: BTreeMap<Addr, AllowValue>,
    /// The addresses whose `ALLOW_DNS` entry is a copy.
    held: BTreeSet<Addr>,
    /// The most copies written.
    cap: usize,
}

/// What a change of source does to the copies held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Copies whose static entry is gone (or beyond the cap now).
    pub remove: Vec<Addr>,
    /// Copies whose static entry has another value now.
    pub rewrite: Vec<(Addr, AllowValue)>,
    /// Static entries without a copy, to add where no DNS-derived entry is.
    pub add: Vec<(Addr, AllowValue)>,
}

/// The source of the copies for `exact` (the exact hash's contents): the first `cap`
/// entries in key order.
pub fn source_of(exact: &Contents, cap: usize) -> BTreeMap<Addr, AllowValue> {
    exact
        .iter()
        .take(cap)
        .map(|(&(addr, _), &v)| (addr, v))
        .collect()
}

/// What to change so the copies `held` follow `new` (removals first in use).
pub fn plan(
    held: &BTreeSet<Addr>,
    new: &BTreeMap<Addr, AllowValue>,
    old: &BTreeMap<Addr, AllowValue>,
) -> Plan {
    let mut p = Plan::default();
    for addr in held {
        match new.get(addr) {
            None => p.remove.push(*addr),
            Some(v) if old.get(addr) != Some(v) => p.rewrite.push((*addr, *v)),
            Some(_) => {}
        }
    }
    p.add = new
        .iter()
        .filter(|(a, _)| !held.contains(*a))
        .map(|(a, v)| (*a, *v))
        .collect();
    p
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

fn gone(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound) || errno(e) == Some(libc::ENOENT)
}

impl Copies {
    /// No copies yet, at most a quarter of `dns_capacity` of them.
    pub fn new(dns_capacity: u32) -> Self {
        Self {
            cap: (dns_capacity / 4) as usize,
            ..Self::default()
        }
    }

    /// The copies an earlier agent left in `dns` (adopted pins): every entry that never
    /// expires. The next [`Copies::follow`] makes them follow the policy in force.
    pub fn adopt(dns: &DnsMap, dns_capacity: u32) -> anyhow::Result<Self> {
        let mut me = Self::new(dns_capacity);
        for item in dns.iter() {
            let (addr, value) = item.context("cannot read the DNS map")?;
            if is_copy(&value) {
                me.held.insert(addr);
                me.source.insert(addr, value);
            }
        }
        Ok(me)
    }

    /// Makes the copies in `dns` follow `exact` (the exact hash just written and checked):
    /// stale ones removed (an error fails the policy change), changed ones rewritten, new
    /// ones added where no DNS-derived entry is (best effort: a cache).
    pub fn follow(&mut self, dns: &mut DnsMap, exact: &Contents) -> anyhow::Result<()> {
        let new = source_of(exact, self.cap);
        let p = plan(&self.held, &new, &self.source);
        for addr in &p.remove {
            match dns.remove(addr) {
                Ok(()) => {}
                Err(e) if gone(&e) => {}
                Err(e) => {
                    return Err(anyhow!(e))
                        .context("cannot remove a stale copy of a static entry from the DNS map");
                }
            }
            self.held.remove(addr);
        }
        for (addr, value) in &p.rewrite {
            dns.insert(addr, value, 0)
                .context("cannot rewrite a copy of a static entry in the DNS map")?;
        }
        self.source = new;
        for (addr, value) in &p.add {
            if self.write(dns, addr, value).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Writes the copy of `addr` unless a DNS-derived entry is there; `Err` when the map is
    /// full.
    fn write(&mut self, dns: &mut DnsMap, addr: &Addr, value: &AllowValue) -> Result<(), ()> {
        match dns.insert(addr, value, NOEXIST) {
            Ok(()) => {
                self.held.insert(*addr);
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::E2BIG) => Err(()),
            // EEXIST: a DNS-derived entry; anything else: no copy, judged without one.
            Err(_) => Ok(()),
        }
    }

    /// A DNS-derived entry was written at `addr` (over its copy, if it had one).
    pub fn replaced(&mut self, addr: &Addr) {
        self.held.remove(addr);
    }

    /// The DNS-derived entry at `addr` was removed: its copy goes back, if it has one.
    pub fn restore(&mut self, dns: &mut DnsMap, addr: &Addr) {
        if let Some(value) = self.source.get(addr).copied() {
            let _ = self.write(dns, addr, &value);
        }
    }

    /// Removes one copy to make room for a DNS-derived entry; false when none is left.
    pub fn evict(&mut self, dns: &mut DnsMap) -> bool {
        let Some(addr) = self.held.pop_last() else {
            return false;
        };
        // Removed from `source` too: not written back by `restore` until the next change.
        self.source.remove(&addr);
        let _ = dns.remove(&addr);
        true
    }

    /// The map was emptied: writes every copy again.
    pub fn refill(&mut self, dns: &mut DnsMap) {
        self.held.clear();
        let source: Vec<_> = self.source.iter().map(|(a, v)| (*a, *v)).collect();
        for (addr, value) in source {
            if self.write(dns, &addr, &value).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> Addr {
        let mut a = [0u8; 16];
        a[15] = last;
        a
    }

    fn value(port: u16) -> AllowValue {
        AllowValue::from_ranges(
            [egress_common::PortRange {
                lo: port,
                hi: port,
                protos: 1,
                _pad: 0,
            }],
            0,
        )
        .unwrap()
    }

    #[test]
    fn a_change_removes_rewrites_and_adds_copies() {
        let old: BTreeMap<_, _> = [
            (addr(1), value(1)),
            (addr(2), value(2)),
            (addr(3), value(3)),
        ]
        .into_iter()
        .collect();
        // 3 has no copy (a DNS-derived entry was there).
        let held: BTreeSet<_> = [addr(1), addr(2)].into_iter().collect();
        let new: BTreeMap<_, _> = [
            (addr(2), value(20)),
            (addr(3), value(3)),
            (addr(4), value(4)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            plan(&held, &new, &old),
            Plan {
                remove: vec![addr(1)],
                rewrite: vec![(addr(2), value(20))],
                add: vec![(addr(3), value(3)), (addr(4), value(4))],
            }
        );
        assert_eq!(plan(&held, &old, &old).remove, Vec::<Addr>::new());
        assert_eq!(plan(&held, &old, &old).rewrite, vec![]);
    }

    #[test]
    fn the_source_is_the_first_exact_entries_up_to_the_cap() {
        let exact: Contents = [
            ((addr(9), 128), value(9)),
            ((addr(3), 128), value(3)),
            ((addr(5), 128), value(5)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            source_of(&exact, 2).into_keys().collect::<Vec<_>>(),
            vec![addr(3), addr(5)]
        );
        assert!(source_of(&exact, 0).is_empty());
    }

    #[test]
    fn only_entries_that_never_expire_are_copies() {
        let mut v = value(1);
        assert!(is_copy(&v));
        v.expires_ns = 1;
        assert!(!is_copy(&v));
    }
}
