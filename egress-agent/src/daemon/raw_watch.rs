//! `attach`: packet sockets and CAP_NET_RAW in the enforced cgroup, watched. A packet socket
//! (AF_PACKET) sends whole frames below IP, past every cgroup program; where the kernel
//! cannot load the BPF LSM family guard nothing refuses one to a holder of CAP_NET_RAW
//! (docs/THREATS.md). `run` refuses the family in its seccomp filter; `attach` cannot filter
//! the enforced processes: the packet-socket tripwire (`programs/tripwire.rs`) kills one that
//! asks for a socket, and this watch is the second line, for what the tripwire never sees
//! being made (a socket opened before the agent attached, a kernel where the tripwire cannot
//! load either). It looks, every [`EVERY`]:
//! - each process of the enforced cgroup (its own cgroup excepted) this agent can see: one
//!   holding CAP_NET_RAW (effective or permitted), and one with an open packet socket (a
//!   descriptor whose socket inode its network namespace's `/proc/<pid>/net/packet` lists);
//! - when the agent runs inside the enforced cgroup (a pod's sidecar, which shares the pod's
//!   network namespace but not its process namespace, so it sees none of the app's
//!   processes), every packet socket of its own network namespace: it opens none itself.
//!
//! Each new finding is a `warning` event; `egress_raw_risks{kind}` counts the current ones;
//! with `--require-no-raw`, `/readyz` answers 503 while any is there.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::{daemon::session, events::EventSink, metrics::Metrics};

/// How often the processes and sockets are looked at.
pub const EVERY: Duration = Duration::from_secs(2);
/// `CAP_NET_RAW`.
const CAP_NET_RAW: u32 = 13;

/// What to watch.
#[derive(Debug, Clone)]
pub struct RawWatch {
    /// The enforced cgroup.
    pub cgroup: PathBuf,
    /// The agent's own cgroup inside it (exempt), if any: its processes are skipped, and its
    /// network namespace is the pod's.
    pub own: Option<PathBuf>,
}

/// One thing found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// A process holding CAP_NET_RAW: pid, command.
    NetRaw(u32, String),
    /// An open packet socket: its inode, and the process holding it when known.
    PacketSocket(u64, Option<(u32, String)>),
}

impl Finding {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NetRaw(..) => "cap_net_raw",
            Self::PacketSocket(..) => "packet_socket",
        }
    }

    /// The warning's text.
    pub fn message(&self) -> String {
        match self {
            Self::NetRaw(pid, comm) => format!(
                "process {pid} ({comm}) in the enforced cgroup holds CAP_NET_RAW: it can open \
                 packet sockets, which bypass every cgroup program on this kernel"
            ),
            Self::PacketSocket(inode, Some((pid, comm))) => format!(
                "process {pid} ({comm}) in the enforced cgroup has an open packet socket \
                 (AF_PACKET, inode {inode}): its frames bypass every cgroup program"
            ),
            Self::PacketSocket(inode, None) => format!(
                "a packet socket (AF_PACKET, inode {inode}) is open in the pod's network \
                 namespace: its frames bypass every cgroup program"
            ),
        }
    }
}

impl RawWatch {
    /// Everything found now.
    pub fn scan(&self) -> BTreeSet<Finding> {
        let mut found = BTreeSet::new();
        let mut attributed = BTreeSet::new();
        for pid in pids_below(&self.cgroup, self.own.as_deref()) {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status"))
                && holds_net_raw(&status)
            {
                found.insert(Finding::NetRaw(pid, comm.clone()));
            }
            let packet = fs::read_to_string(format!("/proc/{pid}/net/packet"))
                .map(|t| packet_inodes(&t))
                .unwrap_or_default();
            if packet.is_empty() {
                continue;
            }
            for inode in socket_inodes(pid) {
                if packet.contains(&inode) {
                    attributed.insert(inode);
                    found.insert(Finding::PacketSocket(inode, Some((pid, comm.clone()))));
                }
            }
        }
        if self.own.is_some()
            && let Ok(t) = fs::read_to_string("/proc/self/net/packet")
        {
            for inode in packet_inodes(&t) {
                if !attributed.contains(&inode) {
                    found.insert(Finding::PacketSocket(inode, None));
                }
            }
        }
        found
    }

    /// Scans every [`EVERY`] until dropped: warns once per new finding, keeps the gauges and
    /// the readiness block (`require`) current.
    pub async fn run(self, sink: Arc<EventSink>, metrics: Arc<Metrics>, require: bool) {
        let mut known = BTreeSet::new();
        loop {
            let watch = self.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || watch.scan()).await else {
                return;
            };
            for f in now.difference(&known) {
                session::warn(&sink, &f.message());
            }
            let count = |kind: &str| now.iter().filter(|f| f.kind() == kind).count() as u64;
            metrics
                .raw_net_raw
                .store(count("cap_net_raw"), Ordering::Relaxed);
            metrics
                .raw_packet_sockets
                .store(count("packet_socket"), Ordering::Relaxed);
            metrics
                .raw_blocks_ready
                .store(require && !now.is_empty(), Ordering::Relaxed);
            known = now;
            tokio::time::sleep(EVERY).await;
        }
    }
}

/// The pids of `cgroup` and its descendants this process can see, `skip` and below left out.
fn pids_below(cgroup: &Path, skip: Option<&Path>) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![(cgroup.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if skip.is_some_and(|s| dir.starts_with(s)) {
            continue;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth >= 16 {
            continue;
        }
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    pids
}

/// Whether a `/proc/<pid>/status` text shows CAP_NET_RAW effective or permitted.
pub fn holds_net_raw(status: &str) -> bool {
    ["CapEff:", "CapPrm:"].iter().any(|field| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_NET_RAW) != 0)
    })
}

/// The socket inodes of a `/proc/net/packet` text (`sk RefCnt Type Proto Iface R Rmem User
/// Inode`, one line per socket after the header).
pub fn packet_inodes(text: &str) -> BTreeSet<u64> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(8)?.parse().ok())
        .collect()
}

/// The inodes of the sockets among `pid`'s descriptors (`socket:[N]` links).
fn socket_inodes(pid: u32) -> Vec<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let target = fs::read_link(e.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_table_inodes_are_read() {
        let text = "sk               RefCnt Type Proto  Iface R Rmem   User   Inode\n\
                    ffff8f0a4c3e1000 3      3    0003   0     1 0      0      52114\n\
                    ffff8f0a4c3e2000 3      2    88cc   2     1 0      65532  52200\n";
        assert_eq!(
            packet_inodes(text).into_iter().collect::<Vec<_>>(),
            [52114, 52200]
        );
        assert!(packet_inodes("sk RefCnt Type Proto Iface R Rmem User Inode\n").is_empty());
    }

    #[test]
    fn net_raw_in_effective_or_permitted_counts() {
        let with = "Name:\tx\nCapPrm:\t0000000000002000\nCapEff:\t0000000000000000\n";
        let eff = "CapPrm:\t0000000000000000\nCapEff:\t0000000000003000\n";
        let without = "CapPrm:\t00000000a80405fb\nCapEff:\t00000000a80405fb\n";
        assert!(holds_net_raw(with));
        assert!(holds_net_raw(eff));
        assert!(!holds_net_raw(without));
    }
}
