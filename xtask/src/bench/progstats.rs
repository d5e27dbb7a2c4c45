//! Per-program run time from the kernel's BPF statistics (issue 14): `BPF_ENABLE_STATS`
//! (`BPF_STATS_RUN_TIME`) returns a descriptor, and while it is held the kernel adds each
//! program run's duration to the program's `run_time_ns` and counts it in `run_cnt` (read with
//! `BPF_OBJ_GET_INFO_BY_FD`). Only the program's own run is timed, not the hook machinery
//! around it. The `kernel.bpf_stats_enabled` sysctl is never touched: closing the descriptor
//! switches the counting off again.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

use super::maps::{Attr, bpf};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_SK_MSG_VERDICT`: the attach type of name binding's `first_flight` on its sockhash.
const BPF_SK_MSG_VERDICT: u32 = 7;

/// The cgroup attach types the bench looks at, with the names the report gives them.
const ATTACH_TYPES: [(u32, &str); 12] = [
    (2, "sock_create"),
    (3, "sock_ops"),
    (10, "connect4"),
    (11, "connect6"),
    (14, "sendmsg4"),
    (15, "sendmsg6"),
    (19, "recvmsg4"),
    (20, "recvmsg6"),
    (29, "getpeername4"),
    (30, "getpeername6"),
    (1, "egress (cgroup_skb)"),
    (0, "ingress (cgroup_skb)"),
];

/// Run-time statistics switched on for as long as this lives.
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn enable() -> Result<Self> {
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        let fd = bpf(BPF_ENABLE_STATS, &mut attr)
            .context("BPF_ENABLE_STATS failed (Linux 5.8 or newer, root)")?;
        // SAFETY: a fresh descriptor the kernel just gave us.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// A program attached to a cgroup, held open.
pub struct Prog {
    /// The attach point (`connect4`, ...).
    pub hook: &'static str,
    fd: OwnedFd,
}

/// (run_time_ns, run_cnt) of a program.
#[derive(Debug, Clone, Copy, Default)]
pub struct Runs {
    pub ns: u64,
    pub cnt: u64,
}

impl Prog {
    /// Its counters now.
    pub fn runs(&self) -> Result<Runs> {
        let info = info(&self.fd)?;
        let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap_or_default());
        Ok(Runs {
            ns: u64_at(192),
            cnt: u64_at(200),
        })
    }
}

/// `struct bpf_prog_info` (232 bytes on 6.x; older kernels fill less and leave zeros).
fn info(fd: &OwnedFd) -> Result<[u8; 232]> {
    let mut buf = [0u8; 232];
    let mut attr = Attr([0; 128]);
    attr.0[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(buf.len() as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(buf)
}

/// The programs attached directly to `cgroup`, in [`ATTACH_TYPES`] order.
pub fn attached(cgroup: &Path) -> Result<Vec<Prog>> {
    let c = CString::new(cgroup.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path; the descriptor is owned from here on.
    let raw = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot open {}", cgroup.display()));
    }
    // SAFETY: as above.
    let dir = unsafe { OwnedFd::from_raw_fd(raw) };
    query(&dir, &ATTACH_TYPES, &cgroup.display().to_string())
}

/// The `sk_msg` verdict program attached to the sockhash pinned at `pin` (name binding's
/// `first_flight` on `BOUND`: it has no cgroup, the map holds it).
pub fn attached_to_map(pin: &Path) -> Result<Vec<Prog>> {
    let c = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr([0; 128]);
    attr.0[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("cannot open pinned map {}", pin.display()))?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    query(
        &map,
        &[(BPF_SK_MSG_VERDICT, "first_flight (sk_msg)")],
        &pin.display().to_string(),
    )
}

/// The programs of each attach type in `types` on `target` (a cgroup or a map descriptor).
fn query(target: &OwnedFd, types: &[(u32, &'static str)], what: &str) -> Result<Vec<Prog>> {
    let mut out = Vec::new();
    for &(ty, hook) in types {
        let mut ids = [0u32; 16];
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&ty.to_ne_bytes());
        attr.0[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        attr.0[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        bpf(BPF_PROG_QUERY, &mut attr)
            .with_context(|| format!("BPF_PROG_QUERY {hook} on {what}"))?;
        let n = u32::from_ne_bytes(attr.0[24..28].try_into().unwrap_or_default()) as usize;
        for &id in &ids[..n.min(ids.len())] {
            let mut attr = Attr([0; 128]);
            attr.0[..4].copy_from_slice(&id.to_ne_bytes());
            let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
                .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
            // SAFETY: a fresh descriptor the kernel just gave us.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            out.push(Prog { hook, fd });
        }
    }
    Ok(out)
}
