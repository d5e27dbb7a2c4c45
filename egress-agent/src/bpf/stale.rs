//! Pins whose cgroup is gone. A deleted pod takes its cgroup with it, but not what its agent
//! pinned under `/sys/fs/bpf/egress/<name>/`: maps (kernel memory) and links that enforce
//! nothing any more. When a cgroup is removed the kernel releases its links
//! (`cgroup_bpf_release` clears each link's cgroup), and the link's info then reports cgroup
//! id 0 (`bpf_cgroup_link_fill_link_info`). A pin directory is stale when it holds at least one
//! cgroup link and every one of them reports 0 (the tripwire's raw tracepoint links, of no
//! cgroup, go with them); one with no links yet (an agent between pinning its maps and its
//! links) is never touched.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::Context as _;

/// `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_CGROUP`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The attribute of `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The attribute of `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf(cmd, attr, sizeof attr)`; its non-negative result.
fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid attribute of `cmd` (the callers' `repr(C)` structs), of the
    // size given; any pointer in it is valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The cgroup id a pinned cgroup link is attached to (0: its cgroup is gone); `None` for a
/// pin that is not a cgroup link.
fn link_cgroup_id(pin: &Path) -> io::Result<Option<u64>> {
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // The attribute names a NUL-terminated path that outlives the call.
    let fd = i32::try_from(sys_bpf(BPF_OBJ_GET, &get)?).map_err(io::Error::other)?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // `struct bpf_link_info`: type, id, prog_id (u32 each), then a union aligned to 8 whose
    // cgroup member starts with the u64 cgroup id. Zeroed, larger than the kernel's struct.
    let mut info = [0u64; 32];
    let attr = InfoByFd {
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(io::Error::other)?,
        info_len: u32::try_from(size_of_val(&info)).map_err(io::Error::other)?,
        info: info.as_mut_ptr() as u64,
    };
    // The kernel writes at most `info_len` bytes into `info`, which outlives the call.
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let link_type = (info[0] & 0xffff_ffff) as u32;
    Ok((link_type == BPF_LINK_TYPE_CGROUP).then_some(info[2]))
}

/// Whether the pin directory `dir` is stale: it holds at least one cgroup link, and every
/// cgroup link's cgroup is gone. Links of no cgroup (the packet-socket tripwire's raw
/// tracepoints, which run for every task on the machine until released) go with them.
pub fn is_stale(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir.join("links")) else {
        return false;
    };
    let mut cgroup_links = 0;
    for e in entries.flatten() {
        match link_cgroup_id(&e.path()) {
            Ok(Some(0)) => cgroup_links += 1,
            Ok(None) => {}
            _ => return false,
        }
    }
    cgroup_links > 0
}

/// The names of the agents under `root` (`/sys/fs/bpf/egress`) whose pins are stale
/// ([`is_stale`]), except `keep`.
pub fn stale_names(root: &Path, keep: Option<&str>) -> anyhow::Result<Vec<String>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", root.display())),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| is_stale(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| Some(n.as_str()) != keep)
        .collect();
    names.sort();
    Ok(names)
}
