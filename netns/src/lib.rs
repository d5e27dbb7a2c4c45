//! Network namespaces of our own, for the kernel tests, `cargo xtask bench` and the demo: one
//! implementation of creating one (`ip netns add`, `lo` up), giving it documentation
//! addresses, running a command or a thread inside it, and deleting it in `Drop`.
//!
//! A namespace made here holds only `lo`: nothing sent from inside leaves the machine, which is
//! what lets tests play "the internet" with documentation addresses (192.0.2.0/24,
//! 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) on its `lo`.
//!
//! Entering one is `setns(2)` on the `/run/netns/NAME` descriptor, never `ip netns exec`: that
//! also unshares the mount namespace and mounts a fresh sysfs on `/sys`, which hides the
//! cgroup v2 and bpf filesystems mounted below it.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    thread,
};

/// A network namespace created with `ip netns add`, `lo` up. Dropping it deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` and brings its `lo` up. On a failure after `ip netns
    /// add`, the namespace is deleted again.
    pub fn create(name: &str) -> io::Result<Self> {
        ip(&["netns", "add", name])?;
        // From here on a failure still deletes the namespace, through Drop.
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the bind mount that keeps it alive and that `setns` opens.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Adds `cidr` (e.g. `198.51.100.20/32`) to the namespace's `lo`: a "remote" host without
    /// a veth (the `dummy` link type may be missing).
    pub fn add_lo_address(&self, cidr: &str) -> io::Result<()> {
        self.ip(&["addr", "add", cidr, "dev", "lo"])
    }

    /// A command whose process joins this namespace before `exec`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> io::Result<Command> {
        command_in(&self.path(), program)
    }

    /// Runs `f` on a fresh thread that first joins this namespace, and returns its result.
    /// Sockets created in `f` stay in the namespace wherever they are used later. A panic in
    /// `f` is resumed on the caller's thread.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = self.path();
        thread::scope(|s| {
            let handle = s.spawn(move || enter(&path).map(|()| f()));
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panics: this runs while unwinding and after Ctrl-C. Sockets still open in the
        // namespace keep it alive until they close; the name is gone at once.
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!(
                "warning: network namespace {} is left behind: {e}",
                self.name
            );
        }
    }
}

/// Moves the calling thread (only it: namespaces are per thread) into the network namespace
/// at `path` (`/run/netns/NAME`). Sockets it creates afterwards belong to that namespace.
pub fn enter(path: &Path) -> io::Result<()> {
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: plain syscall on a descriptor we own; it touches no memory of ours.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot enter network namespace {}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// A command whose process joins the network namespace at `path` before `exec` (through a
/// descriptor opened now and owned by the command, so it stays valid until spawned). More
/// `pre_exec` steps added by the caller run after this one.
pub fn command_in(path: &Path, program: impl AsRef<OsStr>) -> io::Result<Command> {
    let ns =
        Arc::new(File::open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        })?);
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec the closure makes one raw syscall on a descriptor it
    // owns (through the Arc) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `ip ARGS`; the error names the command and carries its stderr.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run ip {}: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
