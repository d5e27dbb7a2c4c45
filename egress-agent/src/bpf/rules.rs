//! The static rule maps (`ALLOW_CIDR`, `ALLOW_INBOUND`) changed as one transaction: after a
//! policy change, successful or not, they hold exactly one compiled policy, the new one or
//! the previous one whole.
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
    consts::{MAP_ALLOW_CIDR, MAP_ALLOW_DNS, MAP_ALLOW_INBOUND, MAP_CONFIG},
};

use crate::policy::{self, CidrEntry, Mode, Policy};

/// A static rule trie.
pub type Trie = LpmTrie<MapData, Addr, AllowValue>;

/// What a trie holds: (address, prefix length) to value.
pub type Contents = BTreeMap<(Addr, u32), AllowValue>;

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

/// What the static rule maps hold: the CIDR trie, the inbound trie, the config flags.
pub type Rules = (Contents, Contents, u32);

/// What `policy` compiles to.
pub fn compiled(policy: &Policy) -> anyhow::Result<Rules> {
    Ok((
        target(&policy::cidr_entries(policy)?),
        target(&policy::inbound_entries(policy)?),
        flags(policy),
    ))
}

/// What the maps pinned under `pin_dir` (`/sys/fs/bpf/egress/<name>`) hold, read from the
/// kernel (to check them against [`compiled`]).
pub fn read_pinned(pin_dir: &Path) -> anyhow::Result<Rules> {
    let maps = pin_dir.join("maps");
    let open = |m: &str| {
        MapData::from_pin(maps.join(m)).with_context(|| format!("cannot open pinned map {m}"))
    };
    let cidr: Trie = LpmTrie::try_from(Map::LpmTrie(open(MAP_ALLOW_CIDR)?))?;
    let inbound: Trie = LpmTrie::try_from(Map::LpmTrie(open(MAP_ALLOW_INBOUND)?))?;
    let config: Array<MapData, Config> = Array::try_from(Map::Array(open(MAP_CONFIG)?))?;
    Ok((
        contents(&cidr, "CIDR rules")?,
        contents(&inbound, "inbound rules")?,
        // Name binding's flag is how the programs were attached, not part of the policy.
        config.get(&0, 0)?.flags & !egress_common::config::FLAG_NAME_BIND,
    ))
}

/// Reads every entry of the pinned DNS map under `pin_dir` (any unreadable entry fails).
pub fn read_pinned_dns(pin_dir: &Path) -> anyhow::Result<BTreeMap<IpAddr, AllowValue>> {
    let path = pin_dir.join("maps").join(MAP_ALLOW_DNS);
    let map = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    let dns: HashMap<MapData, Addr, AllowValue> = HashMap::try_from(Map::HashMap(map))?;
    dns.iter()
        .map(|item| {
            let (k, v) = item.context("cannot read the DNS map")?;
            Ok((egress_common::keys::ip_from_addr(&k), v))
        })
        .collect()
}

/// Makes `trie`, which holds `have`, hold exactly `want`: new and changed entries first, then
/// the removal of keys `want` lacks. Stops at the first error.
pub fn converge(
    trie: &mut Trie,
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
        trie.insert(&Key::new(len, addr), *value, 0)
            .with_context(|| format!("cannot write the {what} map (is it full?)"))?;
    }
    for &(addr, len) in have.keys() {
        if want.contains_key(&(addr, len)) {
            continue;
        }
        if faults.on_remove(what) {
            bail!("cannot remove a stale entry from the {what} map: injected fault");
        }
        match trie.remove(&Key::new(len, addr)) {
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

/// Reads `trie` back and fails unless it holds exactly `want`.
pub fn verify(trie: &Trie, want: &Contents, what: &str) -> anyhow::Result<()> {
    let now = contents(trie, what)?;
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
/// hitting the `n`th operation of its kind on that map during the change (1-based): `cidr full
/// 2` fails the second write into the CIDR trie as if it were full, `inbound invalid 1` writes
/// a key the kernel refuses, `cidr remove 1` fails the first removal, `config config 1` fails
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
    } else {
        "cidr"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lines_hit_the_nth_operation_of_their_map() {
        let mut f =
            Faults::parse("cidr full 2\ninbound remove 1\nconfig config 1\ndns read 2\nbad line\n");
        assert_eq!(f.on_insert("CIDR rules"), None);
        assert_eq!(f.on_insert("CIDR rules"), Some(Fault::Full));
        assert_eq!(f.on_insert("inbound rules"), None);
        assert!(f.on_remove("inbound rules"));
        assert!(!f.on_remove("CIDR rules"));
        assert!(f.on_config());
        assert!(!Faults::none().on_config());
        assert!(!f.on_read("dns"));
        assert!(f.on_read("dns"));
        assert!(!f.on_read("dns"));
    }
}
