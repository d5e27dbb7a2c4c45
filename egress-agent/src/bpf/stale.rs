//! Pins of instances whose cgroup is gone. An `attach` agent (a pod's sidecar) leaves its
//! pins on purpose when it stops, so that a restarted agent adopts them and the pod stays
//! closed meanwhile. When the pod is deleted, its cgroup goes, and the kernel detaches the
//! programs from it (the pinned cgroup links turn defunct: their cgroup id reads 0); but the
//! pins still hold the links, programs and maps. Every `attach` removes such instances at
//! start, so that a node's deleted pods leave nothing behind once another sidecar starts.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// `union bpf_attr` for `BPF_OBJ_GET` (the fields up to `file_flags`).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Whether the link pinned at `pin` is a cgroup link whose cgroup is gone.
pub fn defunct_cgroup_link(pin: &Path) -> io::Result<bool> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) reads the attr we own and the NUL-terminated path it points to.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut get,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose
    // cgroup member starts with cgroup_id (u64, index 2 here). Zeroed beyond what the
    // kernel fills, as it requires of a buffer longer than its struct.
    let mut info = [0u64; 32];
    let mut by_fd = InfoAttr {
        bpf_fd: fd.cast_unsigned(),
        info_len: u32::try_from(std::mem::size_of_val(&info)).unwrap_or(0),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: bpf(2) writes at most info_len bytes into `info`, which we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut by_fd,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    let err = io::Error::last_os_error();
    drop(owned);
    if rc != 0 {
        return Err(err);
    }
    let link_type = (info[0] & 0xffff_ffff) as u32;
    Ok(link_type == BPF_LINK_TYPE_CGROUP && info[2] == 0)
}

/// Removes every instance directory under `root` (`/sys/fs/bpf/egress`) but `keep` whose
/// pinned links are all cgroup links of a cgroup that is gone; returns their names.
pub fn remove_stale(root: &Path, keep: &str) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == keep {
            continue;
        }
        let dir = entry.path();
        let Ok(links) = fs::read_dir(dir.join("links")) else {
            continue;
        };
        let pins: Vec<_> = links.flatten().map(|l| l.path()).collect();
        let stale =
            !pins.is_empty() && pins.iter().all(|p| defunct_cgroup_link(p).unwrap_or(false));
        if stale && fs::remove_dir_all(&dir).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}
