//! The static rule maps (`ALLOW_CIDR`, its exact entries again in `ALLOW_EXACT`,
//! `ALLOW_INBOUND`) changed as one transaction: after a policy change, successful or not, they
//! hold exactly one compiled policy, the new one or the previous one whole.
//!
//! `ALLOW_EXACT` holds a copy of the trie's `/128` entries (IPv4 `/32`s are mapped `/128`s),
//! the first of them in key order up to the hash's capacity, with the same values: the
//! programs look an address up there first and walk the trie only on a miss. The trie is written first and emptied of stale keys before the copy is, so
//! at every moment an address found in the copy has its old or its new value, never another.
//!
//! The maps are read in full before each change (never a remembered key set: a key an earlier
//! agent wrote, or a write that failed halfway, is seen as it is), the new entries are written
//! before stale ones are removed (an address both policies allow never sees a gap), every
//! remove error but "already gone" fails the change, and the result is read back and compared.
//! A failure at any step writes the previous contents back and checks them the same way.
//!
//! Debug builds read `EGRESS_FAULT_FILE` (see [`Faults`]) to fail chosen steps on purpose, so
//! the kernel tests can prove the rollback; release builds never read it.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use anyhow::{Context as _, anyhow, bail};
use aya::maps::{
    Array, HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use egress_common::{
    Addr, AllowValue, Config,
    config::{FLAG_AUDIT, FLAG_ICMP},
    consts::{
        DEFAULT_EXACT_CAPACITY, MAP_ALLOW_CIDR, MAP_ALLOW_DNS, MAP_ALLOW_EXACT, MAP_ALLOW_INBOUND,
        MAP_CONFIG,
    },
};

use crate::policy::{self, CidrEntry, Mode, Policy};

/// A static rule trie.
pub type Trie = LpmTrie<MapData, Addr, AllowValue>;

/// The hash of exact entries beside the CIDR trie.
pub type Exact = HashMap<MapData, Addr, AllowValue>;

/// What a rule map holds: (address, prefix length) to value (length 128 for every entry of
/// the exact hash).
pub type Contents = BTreeMap<(Addr, u32), AllowValue>;

/// A map of static rules: a trie, or the hash of exact entries.
pub trait RuleMap {
    /// Every entry; any unreadable entry fails the read (an entry that cannot be read cannot
    /// be proven to belong to the policy).
    fn read(&self, what: &str) -> anyhow::Result<Contents>;
    /// Writes one entry.
    fn put(&mut self, key: (Addr, u32), value: AllowValue) -> anyhow::Result<()>;
    /// Removes one entry.
    fn remove_key(&mut self, key: (Addr, u32)) -> Result<(), MapError>;
}

impl RuleMap for Trie {
    fn read(&self, what: &str) -> anyhow::Result<Contents> {
        contents(self, what)
    }

    fn put(&mut self, (addr, len): (Addr, u32), value: AllowValue) -> anyhow::Result<()> {
        Ok(self.insert(&Key::new(len, addr), value, 0)?)
    }

    fn remove_key(&mut self, (addr, len): (Addr, u32)) -> Result<(), MapError> {
        self.remove(&Key::new(len, addr))
    }
}

impl RuleMap for Exact {
    fn read(&self, what: &str) -> anyhow::Result<Contents> {
        let mut out = Contents::new();
        for item in self.iter() {
            let (k, v) = item.with_context(|| format!("cannot read the {what} map"))?;
            out.insert((k, EXACT_LEN), v);
        }
        Ok(out)
    }

    fn put(&mut self, (addr, len): (Addr, u32), value: AllowValue) -> anyhow::Result<()> {
        if len != EXACT_LEN {
            bail!("/{len} is not an exact key");
        }
        Ok(self.insert(addr, value, 0)?)
    }

    fn remove_key(&mut self, (addr, _): (Addr, u32)) -> Result<(), MapError> {
        self.remove(&addr)
    }
}

/// The prefix length of an exact entry (an IPv6 address, or a mapped IPv4 one).
const EXACT_LEN: u32 = 128;

/// The part of the trie's contents `cidr` that the exact hash holds too: its `/128` entries,
/// the first `capacity` of them in key order (the rest are found by the trie walk alone).
pub fn exact_of(cidr: &Contents, capacity: u32) -> Contents {
    cidr.iter()
        .filter(|((_, len), _)| *len == EXACT_LEN)
        .take(capacity as usize)
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// Why a policy change failed, and what the maps hold after it.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}{}", if *.rolled_back { " (the previous policy is kept whole)" } else { " (the maps could not be restored: they match no policy)" })]
pub struct ApplyError {
    /// The step that failed.
    pub error: anyhow::Error,
    /// Whether the maps hold the previous policy exactly again.
    pub rolled_back: bool,
}

/// Reads every entry of `trie`; any unreadable entry fails the read (an entry that cannot be
/// read cannot be proven to belong to the policy).
pub fn contents(trie: &Trie, what: &str) -> anyhow::Result<Contents> {
    let mut out = Contents::new();
    for item in trie.iter() {
        let (k, v) = item.with_context(|| format!("cannot read the {what} map"))?;
        out.insert((k.data(), k.prefix_len()), v);
    }
    Ok(out)
}

/// The contents compiled entries stand for.
pub fn target(entries: &[CidrEntry]) -> Contents {
    entries
        .iter()
        .map(|e| ((e.addr, e.prefix_len), e.value))
        .collect()
}

/// The config flags of `policy`: its mode, and whether ping sockets may be created (only
/// while some rule allows ICMP; a reload that drops the last ICMP rule refuses new ones
/// again: sockets already open stay, but their echo requests are judged per packet by the
/// backstop and find no ICMP entry).
pub fn flags(policy: &Policy) -> u32 {
    let mode = match policy.mode {
        // Ask denies in the kernel like enforce: only the resolver holds.
        Mode::Enforce | Mode::Ask => 0,
        Mode::Audit => FLAG_AUDIT,
    };
    mode | if policy.allows_icmp() { FLAG_ICMP } else { 0 }
}

/// What the static rule maps hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The CIDR trie.
    pub cidr: Contents,
    /// The exact hash (the trie's exact entries again, up to its capacity).
    pub exact: Contents,
    /// The inbound trie.
    pub inbound: Contents,
    /// The config flags.
    pub flags: u32,
}

/// What `policy` compiles to, with the exact hash at its default capacity.
pub fn compiled(policy: &Policy) -> anyhow::Result<Rules> {
    let cidr = target(&policy::cidr_entries(policy)?);
    Ok(Rules {
        exact: exact_of(&cidr, DEFAULT_EXACT_CAPACITY),
        cidr,
        inbound: target(&policy::inbound_entries(policy)?),
        flags: flags(policy),
    })
}

/// What the maps pinned under `pin_dir` (`/sys/fs/bpf/egress/<name>`) hold, read from the
/// kernel (to check them against [`compiled`]).
pub fn read_pinned(pin_dir: &Path) -> anyhow::Result<Rules> {
    let maps = pin_dir.join("maps");
    let open = |m: &str| {
        MapData::from_pin(maps.join(m)).with_context(|| format!("cannot open pinned map {m}"))
    };
    let cidr: Trie = LpmTrie::try_from(Map::LpmTrie(open(MAP_ALLOW_CIDR)?))?;
    let exact: Exact = HashMap::try_from(Map::HashMap(open(MAP_ALLOW_EXACT)?))?;
    let inbound: Trie = LpmTrie::try_from(Map::LpmTrie(open(MAP_ALLOW_INBOUND)?))?;
    let config: Array<MapData, Config> = Array::try_from(Map::Array(open(MAP_CONFIG)?))?;
    Ok(Rules {
        cidr: contents(&cidr, "CIDR rules")?,
        exact: exact.read("exact rules")?,
        inbound: contents(&inbound, "inbound rules")?,
        // Name binding's flag is how the programs were attached, not part of the policy.
        flags: config.get(&0, 0)?.flags & !egress_common::config::FLAG_NAME_BIND,
    })
}

/// Reads every DNS-derived entry of the pinned DNS map under `pin_dir` (any unreadable
/// entry fails; the copies of static entries, see [`super::copies`], are left out).
pub fn read_pinned_dns(pin_dir: &Path) -> anyhow::Result<BTreeMap<IpAddr, AllowValue>> {
    read_pinned_dns_where(pin_dir, |v| !super::copies::is_copy(v))
}

/// The entries of the pinned DNS map under `pin_dir` whose value `keep` accepts, by address
/// (any unreadable entry fails).
pub fn read_pinned_dns_where(
    pin_dir: &Path,
    keep: impl Fn(&AllowValue) -> bool,
) -> anyhow::Result<BTreeMap<IpAddr, AllowValue>> {
    let path = pin_dir.join("maps").join(MAP_ALLOW_DNS);
    let map = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    let dns: HashMap<MapData, Addr, AllowValue> = HashMap::try_from(Map::HashMap(map))?;
    let mut out = BTreeMap::new();
    for item in dns.iter() {
        let (k, v) = item.context("cannot read the DNS map")?;
        if keep(&v) {
            out.insert(egress_common::keys::ip_from_addr(&k), v);
        }
    }
    Ok(out)
}

/// Makes `map`, which holds `have`, hold exactly `want`: new and changed entries first, then
/// the removal of keys `want` lacks. Stops at the first error.
pub fn converge(
    map: &mut impl RuleMap,
    have: &Contents,
    want: &Contents,
    what: &'static str,
    faults: &mut Faults,
) -> anyhow::Result<()> {
    for (&(addr, len), value) in want {
        if have.get(&(addr, len)) == Some(value) {
            continue;
        }
        let len = match faults.on_insert(what) {
            Some(Fault::Full) => bail!("cannot write the {what} map: injected fault (map full)"),
            // A key the kernel itself refuses (EINVAL): a prefix longer than the key.
            Some(Fault::Invalid) => 129,
            _ => len,
        };
        map.put((addr, len), *value)
            .with_context(|| format!("cannot write the {what} map (is it full?)"))?;
    }
    for &(addr, len) in have.keys() {
        if want.contains_key(&(addr, len)) {
            continue;
        }
        if faults.on_remove(what) {
            bail!("cannot remove a stale entry from the {what} map: injected fault");
        }
        match map.remove_key((addr, len)) {
            Ok(()) => {}
            Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(anyhow!(e))
                    .with_context(|| format!("cannot remove a stale entry from the {what} map"));
            }
        }
    }
    Ok(())
}

/// Reads `map` back and fails unless it holds exactly `want`.
pub fn verify(map: &impl RuleMap, want: &Contents, what: &str) -> anyhow::Result<()> {
    let now = map.read(what)?;
    if &now != want {
        let extra = now.keys().filter(|k| !want.contains_key(k)).count();
        let missing = want.keys().filter(|k| !now.contains_key(k)).count();
        bail!(
            "the {what} map does not hold the policy after writing it ({extra} entries too \
             many, {missing} missing, {} differing)",
            want.iter()
                .filter(|(k, v)| now.get(k).is_some_and(|n| n != *v))
                .count()
        );
    }
    Ok(())
}

/// An injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The write fails as if the map were full.
    Full,
    /// The key written is one the kernel refuses.
    Invalid,
    /// A remove fails.
    Remove,
    /// The config write fails.
    Config,
    /// Reading an entry fails.
    Read,
}

/// Failures to inject into one policy change, from the file named by `EGRESS_FAULT_FILE`
/// (debug builds only; read at each change). One per line: `<map> <fault> <n>`, the fault
/// hitting the `n`th operation of its kind on that map (`cidr`, `exact`, `inbound`) during the
/// change (1-based): `cidr full 2` fails the second write into the CIDR trie as if it were
/// full, `inbound invalid 1` writes a key the kernel refuses (in the exact hash: a key of
/// another length, refused before the write), `cidr remove 1` fails the first removal, `config config 1` fails
/// the config write, `dns read 1` fails reading the first adopted DNS entry. Rollbacks run
/// without faults.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<(String, Fault, u32)>,
    inserts: BTreeMap<&'static str, u32>,
    removes: BTreeMap<&'static str, u32>,
    reads: BTreeMap<&'static str, u32>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// The faults the test harness asked for (never any in a release build).
    pub fn from_env() -> Self {
        #[cfg(debug_assertions)]
        if let Some(path) = std::env::var_os("EGRESS_FAULT_FILE")
            && let Ok(text) = std::fs::read_to_string(path)
        {
            return Self::parse(&text);
        }
        Self::none()
    }

    #[cfg_attr(
        not(debug_assertions),
        expect(dead_code, reason = "read only in debug builds")
    )]
    fn parse(text: &str) -> Self {
        let rules = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (map, fault, n) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
                let fault = match fault {
                    "full" => Fault::Full,
                    "invalid" => Fault::Invalid,
                    "remove" => Fault::Remove,
                    "config" => Fault::Config,
                    "read" => Fault::Read,
                    _ => return None,
                };
                Some((map.to_owned(), fault, n))
            })
            .collect();
        Self {
            rules,
            ..Self::default()
        }
    }

    fn hit(&self, map: &str, n: u32, kinds: &[Fault]) -> Option<Fault> {
        self.rules
            .iter()
            .find(|(m, f, at)| m == map && *at == n && kinds.contains(f))
            .map(|r| r.1)
    }

    fn on_insert(&mut self, map: &'static str) -> Option<Fault> {
        let n = self.inserts.entry(map).or_default();
        *n += 1;
        let n = *n;
        self.hit(map_name(map), n, &[Fault::Full, Fault::Invalid])
    }

    fn on_remove(&mut self, map: &'static str) -> bool {
        let n = self.removes.entry(map).or_default();
        *n += 1;
        let n = *n;
        self.hit(map_name(map), n, &[Fault::Remove]).is_some()
    }

    /// Whether reading the next entry of `map` (`dns`) must fail.
    pub fn on_read(&mut self, map: &'static str) -> bool {
        let n = self.reads.entry(map).or_default();
        *n += 1;
        let n = *n;
        self.hit(map, n, &[Fault::Read]).is_some()
    }

    /// Whether the config write must fail.
    pub fn on_config(&self) -> bool {
        self.hit("config", 1, &[Fault::Config]).is_some()
    }
}

/// The name a fault line uses for a map described as `what`.
fn map_name(what: &str) -> &'static str {
    if what.contains("inbound") {
        "inbound"
    } else if what.contains("exact") {
        "exact"
    } else {
        "cidr"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8, len: u32) -> (Addr, u32) {
        let mut a = [0u8; 16];
        a[15] = last;
        (a, len)
    }

    #[test]
    fn the_exact_hash_copies_the_first_exact_entries_up_to_its_capacity() {
        let v = |p: u16| {
            AllowValue::from_ranges(
                [egress_common::PortRange {
                    lo: p,
                    hi: p,
                    protos: 1,
                    _pad: 0,
                }],
                0,
            )
            .unwrap()
        };
        let cidr: Contents = [
            (key(9, 128), v(1)),
            (key(0, 120), v(2)),
            (key(3, 128), v(3)),
            (key(5, 128), v(4)),
        ]
        .into_iter()
        .collect();
        let all = exact_of(&cidr, 10);
        assert_eq!(
            all.into_iter().collect::<Vec<_>>(),
            vec![
                (key(3, 128), v(3)),
                (key(5, 128), v(4)),
                (key(9, 128), v(1))
            ],
            "every /128, with the trie's value; no prefix"
        );
        assert_eq!(
            exact_of(&cidr, 2).into_keys().collect::<Vec<_>>(),
            vec![key(3, 128), key(5, 128)],
            "beyond the capacity the last keys stay in the trie alone"
        );
        assert!(exact_of(&cidr, 0).is_empty());
    }

    #[test]
    fn fault_lines_hit_the_nth_operation_of_their_map() {
        let mut f =
            Faults::parse("cidr full 2\ninbound remove 1\nconfig config 1\ndns read 2\nbad line\n");
        assert_eq!(f.on_insert("CIDR rules"), None);
        assert_eq!(f.on_insert("CIDR rules"), Some(Fault::Full));
        assert_eq!(f.on_insert("inbound rules"), None);
        assert_eq!(map_name("exact rules"), "exact");
        assert!(f.on_remove("inbound rules"));
        assert!(!f.on_remove("CIDR rules"));
        assert!(f.on_config());
        assert!(!Faults::none().on_config());
        assert!(!f.on_read("dns"));
        assert!(f.on_read("dns"));
        assert!(!f.on_read("dns"));
    }
}
