//! Which process sent a DNS query: the client's socket is found by an exact `sock_diag`
//! lookup of the datagram's (or connection's) addresses (see [`crate::sys::sockdiag`]; the agent
//! shares the client's network namespace), then its owner among the processes of the enforced
//! cgroup by their file descriptors. Only refused queries pay for this lookup; the client is
//! still waiting for its answer, so its socket is still open. Owners are remembered by socket
//! inode (unique while the socket lives), so a client that keeps asking from one socket costs
//! one hash lookup in the kernel per query, not a walk over every process's descriptors.
//!
//! Where the kernel has no `sock_diag` handler for the protocol (no `udp_diag`/`tcp_diag`),
//! the socket is found by its local port in `/proc/net/{udp,tcp}{,6}` instead: a walk over
//! every socket of the namespace per query.

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    path::Path,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU8, Ordering},
    },
};

use super::upstream::Transport;
use crate::sys::sockdiag;

/// The process behind a query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// Real user id.
    pub uid: u32,
}

/// Finds the owner of the socket that sent a query (`transport`) from `client` to the
/// resolver's `local` address, among the processes in the cgroup tree at `cgroup`.
pub fn owner_of(
    transport: Transport,
    local: SocketAddr,
    client: SocketAddr,
    cgroup: &Path,
) -> Option<Owner> {
    let inodes = match diag_inode(transport, local, client) {
        Some(found) => Vec::from_iter(found),
        None => proc_inodes(transport, client.port()),
    };
    if inodes.is_empty() {
        return None;
    }
    if let Some(owner) = KNOWN.remembered(&inodes) {
        return Some(owner);
    }
    let (inode, owner) = search(cgroup, &inodes)?;
    KNOWN.remember(inode, owner.clone());
    Some(owner)
}

/// Whether `sock_diag` answers for a protocol: not yet known, yes, no.
const UNKNOWN: u8 = 0;
const WORKS: u8 = 1;
const ABSENT: u8 = 2;
/// Per transport (UDP, TCP).
static DIAG: [AtomicU8; 2] = [AtomicU8::new(UNKNOWN), AtomicU8::new(UNKNOWN)];

/// The client socket's inode by `sock_diag`: `Some(None)` when the kernel has no such socket,
/// `None` when `sock_diag` cannot tell (use `/proc/net`).
fn diag_inode(transport: Transport, local: SocketAddr, client: SocketAddr) -> Option<Option<u64>> {
    let state = &DIAG[match transport {
        Transport::Udp => 0,
        Transport::Tcp => 1,
    }];
    if state.load(Ordering::Relaxed) == ABSENT {
        return None;
    }
    match sockdiag::find(transport, client, local) {
        Ok(Some(found)) => {
            state.store(WORKS, Ordering::Relaxed);
            Some(Some(found.inode))
        }
        Ok(None) if state.load(Ordering::Relaxed) == WORKS => Some(None),
        Ok(None) => {
            // ENOENT is also the answer of a kernel without a diag handler for the protocol
            // (no udp_diag module): the resolver's own socket surely exists, ask for it.
            match sockdiag::exists(transport, local, client) {
                Ok(true) => {
                    state.store(WORKS, Ordering::Relaxed);
                    Some(None)
                }
                Ok(false) => {
                    state.store(ABSENT, Ordering::Relaxed);
                    tracing::info!(
                        "dns: no sock_diag for {transport:?} sockets in this kernel: refused \
                         queries are attributed through /proc/net (slower)"
                    );
                    None
                }
                Err(e) => {
                    tracing::debug!("dns: sock_diag lookup failed: {e}");
                    None
                }
            }
        }
        Err(e) => {
            tracing::debug!("dns: sock_diag lookup failed: {e}");
            None
        }
    }
}

/// The inodes of the sockets bound to local `port` (`transport`), from `/proc/net`.
fn proc_inodes(transport: Transport, port: u16) -> Vec<u64> {
    let tables: [&str; 2] = match transport {
        Transport::Udp => ["/proc/net/udp", "/proc/net/udp6"],
        Transport::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
    };
    let mut inodes = Vec::new();
    for t in tables {
        if let Ok(text) = fs::read_to_string(t) {
            inodes.extend(socket_inodes(&text, port));
        }
    }
    inodes
}

/// Owners already found, by socket inode.
static KNOWN: Known = Known(Mutex::new(None));

/// How many owners [`KNOWN`] holds before it starts over.
const KNOWN_CAPACITY: usize = 1024;

struct Known(Mutex<Option<HashMap<u64, Owner>>>);

impl Known {
    /// The owner of one of `inodes`, if found before and still alive.
    fn remembered(&self, inodes: &[u64]) -> Option<Owner> {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let map = known.as_mut()?;
        let (&inode, owner) = inodes.iter().find_map(|i| map.get_key_value(i))?;
        if Path::new(&format!("/proc/{}", owner.pid)).exists() {
            return Some(owner.clone());
        }
        map.remove(&inode);
        None
    }

    fn remember(&self, inode: u64, owner: Owner) {
        let mut known = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let map = known.get_or_insert_with(HashMap::new);
        if map.len() >= KNOWN_CAPACITY {
            map.clear();
        }
        map.insert(inode, owner);
    }
}

/// The process (in the cgroup tree at `cgroup`) holding one of the sockets `inodes`.
fn search(cgroup: &Path, inodes: &[u64]) -> Option<(u64, Owner)> {
    let mut pids = Vec::new();
    collect_pids(cgroup, &mut pids, 0);
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if inodes.contains(&inode) {
                return Some((inode, describe(pid)));
            }
        }
    }
    None
}

fn describe(pid: u32) -> Owner {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default();
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().next().and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX);
    Owner { pid, comm, uid }
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>, depth: usize) {
    if depth > 16 {
        return;
    }
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out, depth + 1);
            }
        }
    }
}

/// Inodes of the sockets whose local port is `port` in a `/proc/net/{udp,tcp}` table.
fn socket_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let (_, p) = local.rsplit_once(':')?;
            if u16::from_str_radix(p, 16).ok()? != port {
                return None;
            }
            f.get(9)?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tables_parse() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                 1234: 0100007F:D431 3500007F:0035 01 00000000:00000000 00:00000000 00000000  1000        0 987654 2 0000000000000000 0\n\
                 1235: 0100007F:0050 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 111 2 0000000000000000 0\n";
        assert_eq!(socket_inodes(t, 0xD431), vec![987654]);
        assert_eq!(socket_inodes(t, 80), vec![111]);
        assert!(socket_inodes(t, 53).is_empty());
    }
}
