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
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
/// `BPF_LINK_TYPE_RAW_TRACEPOINT`.
const LINK_RAW_TRACEPOINT: u32 = 1;
/// `BPF_SK_MSG_VERDICT`: the attach type of name binding's `first_flight` on its sockhash.
const BPF_SK_MSG_VERDICT: u32 = 7;

/// The cgroup attach types the bench looks at, with the names the report gives them: every
/// type the agent attaches (`run` adds the unix hooks; where the BPF LSM runs, the family
/// guard is an `lsm_cgroup` program) and the floor's.
const ATTACH_TYPES: [(u32, &str); 16] = [
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
    (22, "setsockopt"),
    (43, "family guard (lsm_cgroup)"),
    (49, "connect_unix"),
    (50, "sendmsg_unix"),
];

/// The agent's programs that are attached to the machine, not to a cgroup: the packet-socket
/// tripwire, armed where the family guard cannot load (docs/KERNEL-NOTES.md). They run for
/// every task's system calls, the control's and the floor's included, so the outside view's
/// Δ does not see them: here they count for egress, over its batches. The names the agent
/// pins their links under (`links/<program>@<generation>`), with the report's names.
const MACHINE_LINKS: [(&str, &str); 2] = [
    ("sys_enter@", "tripwire sys_enter (every task)"),
    ("io_uring_submit_req@", "tripwire io_uring"),
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
    let map = obj_get(pin)?;
    query(
        &map,
        &[(BPF_SK_MSG_VERDICT, "first_flight (sk_msg)")],
        &pin.display().to_string(),
    )
}

/// The programs the agent whose pins are at `pins` attached to the machine (see
/// [`MACHINE_LINKS`]): none where the family guard runs.
pub fn attached_to_machine(pins: &Path) -> Result<Vec<Prog>> {
    let dir = pins.join("links");
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(&(_, hook)) = MACHINE_LINKS.iter().find(|(p, _)| name.starts_with(p)) else {
            continue;
        };
        let link = obj_get(&entry.path())?;
        // `struct bpf_link_info` begins with type, id, prog_id.
        let mut buf = [0u8; 64];
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(buf.len() as u32).to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
            .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD {}", entry.path().display()))?;
        let id = u32::from_ne_bytes(buf[8..12].try_into().unwrap_or_default());
        out.push(Prog {
            hook,
            fd: prog_by_id(id)?,
        });
    }
    Ok(out)
}

/// How many programs are attached to the raw tracepoint `sys_enter` on this machine, by
/// anyone (every link of the machine is looked at).
pub fn sys_enter_programs() -> Result<usize> {
    let mut n = 0;
    let mut id = 0u32;
    loop {
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&id.to_ne_bytes());
        match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            r => r.context("BPF_LINK_GET_NEXT_ID")?,
        };
        id = u32::from_ne_bytes(attr.0[4..8].try_into().unwrap_or_default());
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&id.to_ne_bytes());
        let fd = match bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) {
            // Gone since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            r => r.with_context(|| format!("BPF_LINK_GET_FD_BY_ID {id}"))?,
        };
        // SAFETY: a fresh descriptor the kernel just gave us.
        let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // `struct bpf_link_info`: type, id, prog_id, then (8-aligned) the raw tracepoint's
        // name buffer and its length.
        let mut name = [0u8; 64];
        let mut buf = [0u8; 64];
        buf[16..24].copy_from_slice(&(name.as_mut_ptr() as u64).to_ne_bytes());
        buf[24..28].copy_from_slice(&(name.len() as u32).to_ne_bytes());
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&(buf.len() as u32).to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD (link)")?;
        let ty = u32::from_ne_bytes(buf[..4].try_into().unwrap_or_default());
        if ty == LINK_RAW_TRACEPOINT && name.starts_with(b"sys_enter\0") {
            n += 1;
        }
    }
}

/// The object pinned at `pin`, opened.
fn obj_get(pin: &Path) -> Result<OwnedFd> {
    let c = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = Attr([0; 128]);
    attr.0[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)
        .with_context(|| format!("cannot open pinned object {}", pin.display()))?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The program with this id, opened.
fn prog_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    attr.0[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The programs of each attach type in `types` on `target` (a cgroup or a map descriptor).
/// An attach type this kernel does not know (`EINVAL`: the unix hooks before 6.7, the
/// `lsm_cgroup` type before 6.0) has none.
fn query(target: &OwnedFd, types: &[(u32, &'static str)], what: &str) -> Result<Vec<Prog>> {
    let mut out = Vec::new();
    for &(ty, hook) in types {
        let mut ids = [0u32; 16];
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
        attr.0[4..8].copy_from_slice(&ty.to_ne_bytes());
        attr.0[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        attr.0[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            r => r.with_context(|| format!("BPF_PROG_QUERY {hook} on {what}"))?,
        };
        let n = u32::from_ne_bytes(attr.0[24..28].try_into().unwrap_or_default()) as usize;
        for &id in &ids[..n.min(ids.len())] {
            out.push(Prog {
                hook,
                fd: prog_by_id(id)?,
            });
        }
    }
    Ok(out)
}
