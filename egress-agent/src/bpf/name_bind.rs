//! Name binding (issue 13), the agent's half: loads the cgroup `sock_ops` program that puts
//! name-bound sockets into `BOUND` and the `sk_msg` program that judges their first flight,
//! and writes the names host rules permit into `NAMES`. The kernel half and its limits are
//! described in `egress-ebpf/src/programs/name_bind.rs` and docs/KERNEL-NOTES.md.

use std::{
    collections::HashSet,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{
        MapData, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockopt, SkMsg, SockOps, links::FdLink},
};
use egress_common::{AllowValue, names::NameBytes};

use crate::policy::NameEntry;

/// The cgroup `sock_ops` program.
pub const SOCK_OPS_PROGRAM: &str = "sock_ops";
/// The `sk_msg` program attached to `BOUND`.
pub const SK_MSG_PROGRAM: &str = "first_flight";
/// The cgroup `setsockopt` program that keeps kernel TLS off a socket until its first flight
/// passed.
pub const SETSOCKOPT_PROGRAM: &str = "setsockopt";

/// Key of a `NAMES` entry as the agent tracks it.
pub type NameKey = (NameBytes, u32);

/// `BPF_CGROUP_SETSOCKOPT` (`enum bpf_attach_type`).
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// The cgroup links of name binding.
pub struct Attached {
    /// `setsockopt`'s, created raw (see [`attach`]).
    pub setsockopt: OwnedFd,
    /// `sock_ops`'s.
    pub sock_ops: FdLink,
}

/// Loads `first_flight` and attaches it to `bound`, then attaches `setsockopt` and `sock_ops`
/// to the cgroup (in that order: a socket put into `BOUND` takes the map's programs at that
/// moment, and must not be able to take kernel TLS). Returns the cgroup links.
pub fn attach(
    ebpf: &mut Ebpf,
    bound: &SockHash<MapData, u64>,
    cgroup_dir: &std::fs::File,
) -> anyhow::Result<Attached> {
    let msg: &mut SkMsg = ebpf
        .program_mut(SK_MSG_PROGRAM)
        .ok_or_else(|| anyhow!("program {SK_MSG_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    msg.load()
        .with_context(|| format!("the kernel rejected program {SK_MSG_PROGRAM}"))?;
    let id = msg
        .attach(bound.fd())
        .with_context(|| format!("cannot attach {SK_MSG_PROGRAM} to its sockhash"))?;
    // A map attachment (BPF_PROG_ATTACH) has no bpf_link to pin: the map holds the program.
    // aya detaches when its link is dropped, so the link is forgotten: the program stays
    // attached for as long as the (pinned) map lives, past a killed agent, and the next
    // agent's attach replaces it.
    std::mem::forget(msg.take_link(id)?);
    let opt: &mut CgroupSockopt = ebpf
        .program_mut(SETSOCKOPT_PROGRAM)
        .ok_or_else(|| anyhow!("program {SETSOCKOPT_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    opt.load()
        .with_context(|| format!("the kernel rejected program {SETSOCKOPT_PROGRAM}"))?;
    // aya 0.14 cannot turn a cgroup sockopt link into an `FdLink` (to pin): created here.
    let opt_link = super::unix::link_create(
        opt.fd()?.as_fd(),
        cgroup_dir.as_raw_fd(),
        BPF_CGROUP_SETSOCKOPT,
    )
    .with_context(|| format!("cannot attach {SETSOCKOPT_PROGRAM}"))?;
    let ops: &mut SockOps = ebpf
        .program_mut(SOCK_OPS_PROGRAM)
        .ok_or_else(|| anyhow!("program {SOCK_OPS_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    ops.load()
        .with_context(|| format!("the kernel rejected program {SOCK_OPS_PROGRAM}"))?;
    let id = ops
        .attach(cgroup_dir, CgroupAttachMode::Single)
        .with_context(|| format!("cannot attach {SOCK_OPS_PROGRAM}"))?;
    let ops_link: FdLink = ops
        .take_link(id)?
        .try_into()
        .map_err(|e| anyhow!("{SOCK_OPS_PROGRAM}: not a bpf_link: {e:?}"))?;
    Ok(Attached {
        setsockopt: opt_link,
        sock_ops: ops_link,
    })
}

/// The keys in `NAMES` (an earlier agent's too, so a changed policy removes them).
pub fn keys(trie: &LpmTrie<MapData, NameBytes, AllowValue>) -> HashSet<NameKey> {
    trie.keys()
        .filter_map(Result::ok)
        .map(|k| (k.data(), k.prefix_len()))
        .collect()
}

/// Writes `entries`, then removes the keys of `old` they no longer hold (new first, so a
/// name permitted before and after never sees a gap). Returns the keys.
pub fn sync(
    trie: &mut LpmTrie<MapData, NameBytes, AllowValue>,
    old: &HashSet<NameKey>,
    entries: &[NameEntry],
) -> anyhow::Result<HashSet<NameKey>> {
    let mut now = HashSet::with_capacity(entries.len());
    for e in entries {
        trie.insert(&Key::new(e.prefix_len, e.data), e.value, 0)
            .context("cannot write the names map (is it full?)")?;
        now.insert((e.data, e.prefix_len));
    }
    for (data, len) in old.difference(&now) {
        let _ = trie.remove(&Key::new(*len, *data));
    }
    Ok(now)
}
