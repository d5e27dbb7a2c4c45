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

use crate::confine::Confinement;

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

/// The passwd entry's (name, primary gid) for `uid`.
fn passwd(uid: u32) -> anyhow::Result<Option<(CString, u32)>> {
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
    Ok(Some((name, pw.pw_gid)))
}

fn primary_gid(uid: u32) -> anyhow::Result<u32> {
    Ok(passwd(uid)?.map(|(_, g)| g).unwrap_or(uid))
}

fn supplementary_groups(uid: u32, gid: u32) -> anyhow::Result<Vec<u32>> {
    let Some((name, _)) = passwd(uid)? else {
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
            if let Some(id) = &ident
                && (libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
                    || libc::setgid(id.gid) != 0
                    || libc::setuid(id.uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(c) = &confinement {
                c.seal_in_child()?;
            }
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

/// The command could not be started.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SpawnError {
    /// The program does not exist (exit status 127, as a shell gives).
    pub not_found: bool,
    message: String,
}
