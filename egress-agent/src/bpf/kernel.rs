//! The kernel range: Linux 5.8 or newer (BPF ring buffer, `bpf_ktime_get_boot_ns`, cgroup
//! `getpeername` hooks, cgroup `bpf_link`). Checked at start so an older kernel gets a clear
//! message instead of an obscure load error.

use anyhow::bail;

/// The oldest kernel the programs are built for.
pub const MINIMUM: (u32, u32) = (5, 8);

/// `(major, minor)` from a release string like `6.18.44-fc-v657`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails on kernels older than [`MINIMUM`].
pub fn check() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match parse_release(&release) {
        Some(v) if v < MINIMUM => bail!(
            "this kernel is {} but egress needs Linux {}.{} or newer (BPF ring buffer, \
             bpf_ktime_get_boot_ns, cgroup getpeername hooks)",
            release.trim(),
            MINIMUM.0,
            MINIMUM.1
        ),
        _ => Ok(()),
    }
}

/// Whether the BPF LSM is among the active LSMs (`None`: cannot tell). Read from
/// securityfs; where it is not mounted (as on some VMs and in containers), a short-lived
/// child mounts it in a mount namespace of its own, which needs `CAP_SYS_ADMIN`.
pub fn bpf_lsm_active() -> Option<bool> {
    let list = std::fs::read_to_string(LSM_LIST)
        .ok()
        .or_else(lsm_list_from_private_mount)?;
    Some(lsm_list_has_bpf(&list))
}

const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether a securityfs `lsm` list (`lockdown,capability,landlock,bpf`) names the BPF LSM.
pub fn lsm_list_has_bpf(list: &str) -> bool {
    list.trim().split(',').any(|l| l == "bpf")
}

/// Forks a child that mounts securityfs in a private mount namespace and sends back the list.
/// The child calls only async-signal-safe functions (it may be forked from a threaded
/// process) and ends with `_exit`.
fn lsm_list_from_private_mount() -> Option<String> {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls on our own descriptors; the child does no allocation.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        let pid = libc::fork();
        if pid < 0 {
            libc::close(fds[0]);
            libc::close(fds[1]);
            return None;
        }
        if pid == 0 {
            libc::close(fds[0]);
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    c"securityfs".as_ptr(),
                    c"/sys/kernel/security".as_ptr(),
                    c"securityfs".as_ptr(),
                    0,
                    std::ptr::null(),
                ) == 0;
            if ok {
                let fd = libc::open(c"/sys/kernel/security/lsm".as_ptr(), libc::O_RDONLY);
                if fd >= 0 {
                    let mut buf = [0u8; 512];
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n > 0 {
                        libc::write(fds[1], buf.as_ptr().cast(), n as usize);
                    }
                }
            }
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(fds[0]);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        let text = String::from_utf8(out).ok()?;
        (!text.trim().is_empty()).then_some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lsm_list_names_bpf_or_not() {
        assert!(lsm_list_has_bpf("lockdown,capability,landlock,bpf"));
        assert!(lsm_list_has_bpf("bpf\n"));
        assert!(!lsm_list_has_bpf("lockdown,capability,yama,apparmor"));
        assert!(!lsm_list_has_bpf("bpfx,xbpf"));
    }

    #[test]
    fn releases_parse_and_compare() {
        assert_eq!(parse_release("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_release("5.4.0").unwrap() < MINIMUM);
        assert!(parse_release("5.8").unwrap() >= MINIMUM);
        assert_eq!(parse_release("garbage"), None);
    }
}
