//! Starting the command inside the enforced cgroup, confined, as the invoking user.
//!
//! Everything the child does between `fork` and `exec` is a raw syscall on data prepared
//! before the fork (the parent is multi-threaded: no allocation, no locks in the child).

use std::{
    ffi::{CString, OsString},
    fs::OpenOptions,
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::workload::confine::Confinement;

/// Who the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Identity {
    /// The unprivileged id a command that would be root runs as outside its user namespace
    /// (see [`crate::workload::confine::OUTSIDE_ID`]).
    pub fn outside_root() -> Self {
        Self {
            uid: crate::workload::confine::OUTSIDE_ID,
            gid: crate::workload::confine::OUTSIDE_ID,
            groups: Vec::new(),
        }
    }

    /// The user who invoked `sudo` (`SUDO_UID`/`SUDO_GID`), when the agent runs as root
    /// through sudo; `None` otherwise (the command keeps the agent's identity).
    pub fn sudo_invoker() -> anyhow::Result<Option<Self>> {
        // SAFETY: no arguments.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let Some(uid) = std::env::var_os("SUDO_UID") else {
            return Ok(None);
        };
        let uid: u32 = parse_id(&uid).context("SUDO_UID is not a user id")?;
        if uid == 0 {
            return Ok(None);
        }
        let gid = match std::env::var_os("SUDO_GID") {
            Some(g) => parse_id(&g).context("SUDO_GID is not a group id")?,
            None => primary_gid(uid)?,
        };
        let groups = supplementary_groups(uid, gid)?;
        Ok(Some(Self { uid, gid, groups }))
    }
}

fn parse_id(s: &std::ffi::OsStr) -> anyhow::Result<u32> {
    Ok(s.to_str().unwrap_or("").trim().parse()?)
}

/// The home directory of `uid` (its passwd entry), if it has one.
pub fn home_of(uid: u32) -> Option<std::path::PathBuf> {
    passwd(uid).ok().flatten().map(|(_, _, home)| home)
}

/// The passwd entry's (name, primary gid, home) for `uid`.
fn passwd(uid: u32) -> anyhow::Result<Option<(CString, u32, std::path::PathBuf)>> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed passwd is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: buffers are valid for the given lengths.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 {
        bail!(
            "cannot look up user {uid}: {}",
            io::Error::from_raw_os_error(rc)
        );
    }
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: getpwuid_r filled pw_name with a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_owned();
    // SAFETY: as above, for pw_dir.
    let home = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    let home = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(home.to_bytes()));
    Ok(Some((name, pw.pw_gid, home)))
}

fn primary_gid(uid: u32) -> anyhow::Result<u32> {
    Ok(passwd(uid)?.map(|(_, g, _)| g).unwrap_or(uid))
}

fn supplementary_groups(uid: u32, gid: u32) -> anyhow::Result<Vec<u32>> {
    let Some((name, _, _)) = passwd(uid)? else {
        return Ok(vec![gid]);
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: `groups` holds `count` entries.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count as usize);
            return Ok(groups);
        }
        if count <= n {
            n *= 2;
        } else {
            n = count;
        }
        if n > 65_536 {
            bail!("user {uid} is in too many groups");
        }
    }
}

/// Spawns `argv` as a member of the cgroup at `cgroup` (it joins before `exec`, so its first
/// instruction is already enforced), as `identity` when given.
pub fn spawn_in_cgroup(
    argv: &[OsString],
    cgroup: &Path,
    identity: Option<&Identity>,
    confinement: Option<Arc<Confinement>>,
    pass_fds: &[i32],
    terminal: Option<(i32, Vec<i32>)>,
) -> anyhow::Result<Child> {
    let Some((program, args)) = argv.split_first() else {
        bail!("no command given");
    };
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("cannot open {}", procs_path.display()))?;
    let procs_fd = procs.as_raw_fd();
    let ident = identity.cloned();
    let ranges = closed_ranges(pass_fds)?;

    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only makes raw syscalls on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Keep `procs` alive (and its fd open) until exec; it is close-on-exec.
            let _keep = &procs;
            // "0" moves the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(c) = &confinement {
                c.apply_in_child()?;
            }
            // After the pid namespace's relays are forked: they keep the caller's terminal,
            // the command gets the pty as its own.
            if let Some((slave, replaced)) = &terminal {
                crate::workload::pty::take_terminal(*slave, replaced)?;
            }
            if let Some(id) = &ident
                && (libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
                    || libc::setgid(id.gid) != 0
                    || libc::setuid(id.uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(c) = &confinement {
                c.keep_capabilities_in_child()?;
                c.enter_user_namespace_in_child()?;
                c.seal_in_child()?;
            }
            // Nothing inherited but stdio (and what `--pass-fd` names) reaches the command:
            // a socket the caller had open to any address would carry data past every hook.
            close_on_exec(&ranges)?;
            Ok(())
        });
    }
    cmd.kill_on_drop(false);
    cmd.spawn().map_err(|e| {
        let shown = Path::new(program)
            .as_os_str()
            .as_bytes()
            .escape_ascii()
            .to_string();
        anyhow::Error::new(SpawnError {
            not_found: e.kind() == io::ErrorKind::NotFound,
            message: format!("cannot run {shown}: {e}"),
        })
    })
}

/// The descriptor ranges to close at `exec`: everything from 3 up except `pass`.
fn closed_ranges(pass: &[i32]) -> anyhow::Result<Vec<(u32, u32)>> {
    let mut keep: Vec<u32> = Vec::new();
    for &fd in pass {
        // SAFETY: F_GETFD on any number is harmless.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("--pass-fd {fd}: no such open file descriptor");
        }
        keep.push(fd as u32);
    }
    keep.sort_unstable();
    keep.dedup();
    let mut ranges = Vec::new();
    let mut from = 3u32;
    for k in keep {
        if k > from {
            ranges.push((from, k - 1));
        }
        from = k + 1;
    }
    ranges.push((from, u32::MAX));
    Ok(ranges)
}

/// Marks every descriptor in `ranges` close-on-exec, and clears the flag on the ones between
/// (passed on purpose: the caller may have set it).
///
/// # Safety
/// Async-signal-safe: raw syscalls only.
unsafe fn close_on_exec(ranges: &[(u32, u32)]) -> io::Result<()> {
    let mut prev_end: u32 = 2;
    for &(lo, hi) in ranges {
        for fd in prev_end + 1..lo {
            // SAFETY: clearing FD_CLOEXEC on a descriptor `closed_ranges` checked.
            unsafe { libc::fcntl(fd as i32, libc::F_SETFD, 0) };
        }
        prev_end = hi;
        // SAFETY: close_range takes plain numbers; CLOSE_RANGE_CLOEXEC (Linux 5.11) keeps the
        // exec-status pipe std reads working until the exec itself.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, libc::CLOSE_RANGE_CLOEXEC) };
        if rc != 0 {
            // Before 5.11: one fcntl per open descriptor, up to the soft limit.
            let mut lim: libc::rlimit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid out-parameter.
            let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
                lim.rlim_cur.min(1 << 20) as u32
            } else {
                1024
            };
            for fd in lo..=hi.min(max) {
                // SAFETY: F_SETFD on any number is harmless.
                unsafe { libc::fcntl(fd as i32, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        if hi == u32::MAX {
            break;
        }
    }
    Ok(())
}

/// The command could not be started.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SpawnError {
    /// The program does not exist (exit status 127, as a shell gives).
    pub not_found: bool,
    message: String,
}
