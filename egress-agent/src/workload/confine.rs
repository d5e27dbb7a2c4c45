//! Workload confinement for `run`: a command, even one running as root, must not leave the
//! enforced cgroup, detach the programs, or reach the network below the socket hooks.
//!
//! What the child does between `fork` and `exec`, after joining the cgroup (see
//! docs/THREATS.md for the technique each step stops):
//! 1. its own cgroup namespace: `clone3(CLONE_INTO_CGROUP)` and `cgroup.procs` writes can only
//!    name cgroups below the enforced one (the kernel checks targets against the namespace
//!    root, whatever the file permissions say);
//! 2. its own mount namespace (slave: it still sees mounts the host adds later), where every
//!    cgroup filesystem is remounted read-only and every bpffs is covered by an empty
//!    read-only tmpfs (a read-only bind does not stop `BPF_OBJ_GET` on a pinned link, whose
//!    permission check looks only at the inode, so the pins must be out of sight);
//! 3. its own pid namespace with a fresh /proc, so no process outside is reachable by pid (the
//!    invoking user's shell, another root service with fewer capabilities: /proc/PID/root,
//!    /proc/PID/mem and ptrace all need the pid);
//! 4. a capability bounding set (and inheritable and ambient sets) without the dropped
//!    capabilities, so not even a setuid-root binary gets them back;
//! 5. `no_new_privs`, after the identity change, and a seccomp filter that answers `clone3`
//!    and `request_key` with ENOSYS and refuses sockets of families other than unix, inet,
//!    inet6, netlink and alg (see `crate::workload::seccomp`);
//! 6. no deputies: a private `/run`, the host's other unix sockets masked, abstract sockets
//!    scoped by Landlock, and a resolver view (see `crate::workload::deputies`).

use std::{ffi::CString, fs, io};

use anyhow::Context as _;

pub use crate::sys::caps::Capability;

/// The capabilities a confined command never has (unless kept with `--keep-cap`): every one
/// [`Capability::NAMED`].
pub const DROPPED: [Capability; 8] = [
    Capability::NET_ADMIN,
    Capability::NET_RAW,
    Capability::SYS_MODULE,
    Capability::SYS_RAWIO,
    Capability::SYS_PTRACE,
    Capability::SYS_ADMIN,
    Capability::PERFMON,
    Capability::BPF,
];

/// What keeping `cap` lets the command do, for the warning event.
pub fn risk(cap: Capability) -> &'static str {
    match cap {
        Capability::NET_ADMIN => "it can change network configuration and detach eBPF programs",
        Capability::NET_RAW => {
            "it can open raw and packet sockets, which the socket hooks do not see"
        }
        Capability::SYS_MODULE => "it can load kernel modules",
        Capability::SYS_RAWIO => "it can access devices and I/O ports directly",
        Capability::SYS_PTRACE => "it can trace and inject code into processes outside the cgroup",
        Capability::SYS_ADMIN => {
            "it can remount the cgroup and bpf filesystems, leave the cgroup and detach the programs"
        }
        Capability::PERFMON => "it can use performance monitoring and read kernel memory",
        Capability::BPF => "it can load eBPF programs and take the agent's maps and links",
        _ => "unknown capability",
    }
}

/// One mount to change in the child's mount namespace.
#[derive(Debug)]
struct MountFix {
    target: CString,
    /// Per-mount flags to keep when remounting (`MS_NOSUID`, ...).
    flags: libc::c_ulong,
    hide: bool,
}

/// Everything the child needs, prepared before the fork.
#[derive(Debug)]
pub struct Confinement {
    drop: Vec<Capability>,
    mounts: Vec<MountFix>,
    tmpfs: CString,
    tmpfs_opts: CString,
    /// Built before the fork: the child may not allocate.
    seccomp: Vec<libc::sock_filter>,
    /// What of the fresh /proc (and /sys) is made read-only or masked.
    masks: Vec<Mask>,
    /// For a command that would be root: the user namespace it runs in.
    userns: Option<UserNamespace>,
    /// Capabilities the command keeps (`--keep-cap`), carried through the identity change.
    keep: Vec<Capability>,
    /// Local daemons out of reach (see `crate::workload::deputies`).
    deputies: Option<crate::workload::deputies::DeputyView>,
}

/// The id a command that would run as root has outside its user namespace (`nobody`).
pub const OUTSIDE_ID: u32 = 65534;

/// Paths of the fresh /proc that container runtimes make read-only (runc's and podman's
/// defaults): writes there reach the whole machine (`/proc/sys/kernel/core_pattern` runs a
/// helper as root outside every sandbox, `/proc/sysrq-trigger` reboots it).
const PROC_READ_ONLY: [&str; 6] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
    "/proc/asound",
];

/// Paths of the fresh /proc that runtimes mask (kernel memory, keys, timers, scheduler
/// internals): files get /dev/null, directories an empty read-only tmpfs.
const PROC_MASKED: [&str; 9] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/acpi",
    "/proc/scsi",
    "/proc/kmsg",
];

/// One path of the command's /proc or /sys to cover.
#[derive(Debug)]
struct Mask {
    target: CString,
    how: MaskKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MaskKind {
    /// A read-only bind of itself.
    ReadOnly,
    /// /dev/null bound over a file.
    NullFile,
    /// An empty read-only tmpfs over a directory.
    EmptyDir,
}

/// The single-id maps of the user namespace a root command runs in: root inside,
/// [`OUTSIDE_ID`] outside.
#[derive(Debug)]
struct UserNamespace {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl Confinement {
    /// Reads the mount table and prepares the steps; `keep` are capabilities not to drop.
    /// `root_command`: the command would run as root (no invoking user to become): it runs as
    /// root inside a user namespace of its own instead, [`OUTSIDE_ID`] outside, unless it keeps
    /// capabilities, which only exist outside (it then runs as [`OUTSIDE_ID`] with them).
    /// `allow_io_uring`: leave io_uring to the command even where the family guard cannot run
    /// (see [`crate::workload::seccomp::Rules::io_uring`]).
    pub fn prepare(
        keep: &[Capability],
        root_command: bool,
        allow_io_uring: bool,
    ) -> anyhow::Result<Self> {
        let drop = DROPPED.into_iter().filter(|c| !keep.contains(c)).collect();
        let info = fs::read_to_string("/proc/self/mountinfo")
            .context("cannot read /proc/self/mountinfo")?;
        let mut mounts = Vec::new();
        for line in info.lines() {
            let Some(m) = parse_mountinfo_line(line) else {
                continue;
            };
            let hide = m.fstype == "bpf";
            if !(hide || m.fstype == "cgroup" || m.fstype == "cgroup2") {
                continue;
            }
            mounts.push(MountFix {
                target: CString::new(m.target).context("mount point with a NUL byte")?,
                flags: m.flags,
                hide,
            });
        }
        let userns = if root_command && keep.is_empty() {
            user_namespaces_available()?;
            let map = format!("0 {OUTSIDE_ID} 1\n").into_bytes();
            Some(UserNamespace {
                uid_map: map.clone(),
                gid_map: map,
            })
        } else {
            None
        };
        Ok(Self {
            drop,
            mounts,
            tmpfs: CString::from(c"tmpfs"),
            tmpfs_opts: CString::from(c"mode=0555"),
            seccomp: crate::workload::seccomp::filter(crate::workload::seccomp::Rules {
                families: true,
                io_uring: !allow_io_uring,
            }),
            masks: masks()?,
            userns,
            keep: keep.to_vec(),
            deputies: None,
        })
    }

    /// Binds `paths` read-only in the command's mount namespace (files that run later
    /// outside the sandbox: [`crate::workload::persistence`]).
    pub fn protect(&mut self, paths: &[std::path::PathBuf]) -> anyhow::Result<()> {
        use std::os::unix::ffi::OsStrExt as _;
        for p in paths {
            self.masks.push(Mask {
                target: CString::new(p.as_os_str().as_bytes())
                    .context("a protected path with a NUL byte")?,
                how: MaskKind::ReadOnly,
            });
        }
        Ok(())
    }

    /// Puts local daemons' unix sockets out of the command's reach and gives it a resolver
    /// view (see [`crate::workload::deputies`]).
    pub fn close_deputies(&mut self, view: crate::workload::deputies::DeputyView) {
        self.deputies = Some(view);
    }

    /// The deputy view, when [`Confinement::close_deputies`] set one.
    pub fn deputy_view(&self) -> Option<&crate::workload::deputies::DeputyView> {
        self.deputies.as_ref()
    }

    /// Removes the generated resolver files once the command started (its view holds them).
    pub fn forget_generated(&self) {
        if let Some(d) = &self.deputies {
            d.forget_generated();
        }
    }

    /// Whether the command runs as root inside a user namespace of its own.
    pub fn root_in_user_namespace(&self) -> bool {
        self.userns.is_some()
    }

    /// What the command cannot write or read of the machine's kernel interfaces, for the
    /// `ready` event and `status`.
    pub fn protected(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .masks
            .iter()
            .map(|m| {
                let path = m.target.to_string_lossy();
                match m.how {
                    MaskKind::ReadOnly => format!("{path} (read-only)"),
                    _ => format!("{path} (masked)"),
                }
            })
            .collect();
        if let Some(d) = &self.deputies {
            out.extend(d.summary().iter().cloned());
        }
        if self.userns.is_some() {
            out.push(format!(
                "root runs in a user namespace (uid {OUTSIDE_ID} outside): host files, sysctls \
                 and devices owned by root are not writable"
            ));
        }
        out
    }

    /// Leaves socket families to the family guard (the BPF LSM program, which also reports
    /// each refusal, and sees sockets io_uring creates too): the seccomp filter keeps its
    /// `clone3`, `request_key` and terminal rules.
    pub fn leave_families_to_the_kernel(&mut self) {
        self.seccomp = crate::workload::seccomp::filter(crate::workload::seccomp::Rules {
            families: false,
            io_uring: false,
        });
    }

    /// The capabilities this confinement drops.
    pub fn dropped(&self) -> &[Capability] {
        &self.drop
    }

    /// Steps 1 and 2 and 3: namespaces, mounts, capability sets. Runs in the child after it
    /// joined the cgroup and before it changes identity (they need CAP_SYS_ADMIN and
    /// CAP_SETPCAP).
    ///
    /// # Safety
    /// Only raw syscalls on data prepared by [`Confinement::prepare`]: fit for the window
    /// between `fork` and `exec` of a multi-threaded parent.
    pub unsafe fn apply_in_child(&self) -> io::Result<()> {
        // SAFETY (whole body): raw syscalls with valid NUL-terminated strings and null pointers
        // where the kernel accepts them.
        unsafe {
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP | libc::CLONE_NEWPID,
            ))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for m in &self.mounts {
                if m.hide {
                    check(libc::mount(
                        self.tmpfs.as_ptr(),
                        m.target.as_ptr(),
                        self.tmpfs.as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        self.tmpfs_opts.as_ptr().cast(),
                    ))?;
                } else {
                    check(libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | m.flags,
                        std::ptr::null(),
                    ))?;
                }
            }
            if let Some(d) = &self.deputies {
                d.apply_in_child()?;
            }
            // From here on the process forks twice (see `fork_into_pid_namespace`); what
            // follows runs in the command's own process, pid 2 of the new namespace.
            fork_into_pid_namespace()?;
            // A /proc of the new pid namespace: processes outside it (the user's shell, another
            // root service) are out of reach by pid, through /proc/PID/root, /proc/PID/mem or
            // ptrace.
            check(libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            self.cover_kernel_interfaces()?;
            if self.keep.is_empty() {
                drop_capabilities(&self.drop)?;
            } else {
                // Kept capabilities must survive the identity change (restored in
                // `keep_capabilities_in_child`).
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
                drop_capabilities(&self.drop)?;
            }
        }
        Ok(())
    }

    /// Makes the kernel's machine-wide knobs in the fresh /proc read-only or masked, and /sys
    /// read-only (`/sys/kernel/uevent_helper` is another helper the kernel runs as root).
    ///
    /// # Safety
    /// As for [`Confinement::apply_in_child`].
    unsafe fn cover_kernel_interfaces(&self) -> io::Result<()> {
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // SAFETY: raw syscalls with NUL-terminated strings prepared before the fork.
        unsafe {
            for m in &self.masks {
                let t = m.target.as_ptr();
                match m.how {
                    MaskKind::ReadOnly => {
                        check(libc::mount(
                            t,
                            t,
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        check(libc::mount(
                            std::ptr::null(),
                            t,
                            std::ptr::null(),
                            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
                            std::ptr::null(),
                        ))?;
                    }
                    MaskKind::NullFile => {
                        check(libc::mount(
                            c"/dev/null".as_ptr(),
                            t,
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ))?;
                    }
                    MaskKind::EmptyDir => {
                        check(libc::mount(
                            self.tmpfs.as_ptr(),
                            t,
                            self.tmpfs.as_ptr(),
                            libc::MS_RDONLY | flags,
                            self.tmpfs_opts.as_ptr().cast(),
                        ))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After the identity change, for `--keep-cap`: the kept capabilities back in the
    /// permitted, effective and inheritable sets and raised as ambient, so they survive `exec`
    /// of an ordinary binary by a process that is not root.
    ///
    /// # Safety
    /// As for [`Confinement::apply_in_child`].
    pub unsafe fn keep_capabilities_in_child(&self) -> io::Result<()> {
        if self.keep.is_empty() {
            return Ok(());
        }
        // SAFETY: capget/capset and prctl on this thread, no allocation.
        unsafe {
            set_kept(&self.keep)?;
            for c in &self.keep {
                check(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    c.0 as libc::c_ulong,
                    0,
                    0,
                ))?;
            }
        }
        Ok(())
    }

    /// For a command that would be root: after the identity change to [`OUTSIDE_ID`], a user
    /// namespace of its own where it is root. Created last, so the cgroup, mount and pid
    /// namespaces and every mount above belong to the initial user namespace and its
    /// capabilities reach none of them; outside it is [`OUTSIDE_ID`], so files, sysctls and
    /// devices owned by the real root are not writable (sysctl writes are checked against the
    /// global root uid, and a mount it makes in a new mount namespace cannot uncover what the
    /// outer one locked).
    ///
    /// # Safety
    /// As for [`Confinement::apply_in_child`].
    pub unsafe fn enter_user_namespace_in_child(&self) -> io::Result<()> {
        let Some(ns) = &self.userns else {
            return Ok(());
        };
        // SAFETY: raw syscalls on buffers prepared before the fork.
        unsafe {
            // The id change made the process non-dumpable, which makes its /proc files root's:
            // it could not write its own maps.
            check(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0))?;
            check(libc::unshare(libc::CLONE_NEWUSER))?;
            write_file(c"/proc/self/setgroups", b"deny")?;
            write_file(c"/proc/self/uid_map", &ns.uid_map)?;
            write_file(c"/proc/self/gid_map", &ns.gid_map)?;
            // Root of the new namespace holds every capability in it; the same ones as
            // outside stay out of its bounding set (they would act only on namespaces it
            // creates itself, but there is no reason to hand them over).
            drop_capabilities(&self.drop)?;
        }
        Ok(())
    }
}

/// Errors early, with the reason, when this kernel gives no user namespaces.
fn user_namespaces_available() -> anyhow::Result<()> {
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if max.trim() == "0" {
        anyhow::bail!(
            "a command that would run as root runs as root inside a user namespace (uid \
             {OUTSIDE_ID} outside), and user.max_user_namespaces is 0 here: run egress-agent \
             through sudo as the user the command should run as (it then runs as SUDO_UID)"
        );
    }
    Ok(())
}

/// The masks that apply on this machine (the same kernel serves the child's fresh /proc).
fn masks() -> anyhow::Result<Vec<Mask>> {
    let mut out = Vec::new();
    for p in PROC_READ_ONLY {
        if fs::symlink_metadata(p).is_ok() {
            out.push(Mask {
                target: CString::new(p)?,
                how: MaskKind::ReadOnly,
            });
        }
    }
    for p in PROC_MASKED {
        if let Ok(m) = fs::symlink_metadata(p) {
            out.push(Mask {
                target: CString::new(p)?,
                how: if m.is_dir() {
                    MaskKind::EmptyDir
                } else {
                    MaskKind::NullFile
                },
            });
        }
    }
    if fs::metadata("/sys/kernel").is_ok() {
        out.push(Mask {
            target: CString::new("/sys")?,
            how: MaskKind::ReadOnly,
        });
    }
    Ok(out)
}

/// Writes `data` to `path` with raw syscalls.
///
/// # Safety
/// Async-signal-safe.
unsafe fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: a valid path and buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != data.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// Drops `caps` from the bounding set, clears the ambient set and removes them from the
/// inheritable set.
///
/// # Safety
/// Async-signal-safe.
unsafe fn drop_capabilities(caps: &[Capability]) -> io::Result<()> {
    // SAFETY: plain prctl and capget/capset.
    unsafe {
        for c in caps {
            check(libc::prctl(
                libc::PR_CAPBSET_DROP,
                c.0 as libc::c_ulong,
                0,
                0,
                0,
            ))?;
        }
        // The bounding set does not limit inheritable capabilities carried through exec:
        // clear those too, and the ambient set.
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        clear_inheritable(caps)
    }
}

impl Confinement {
    /// Step 4, after the identity change.
    ///
    /// # Safety
    /// As for [`Confinement::apply_in_child`].
    pub unsafe fn seal_in_child(&self) -> io::Result<()> {
        // SAFETY: plain prctl, and a filter program that lives on this stack frame only for
        // the duration of the call (the kernel copies it).
        unsafe {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            if let Some(d) = &self.deputies {
                d.seal_in_child()?;
            }
            install_seccomp(&self.seccomp)
        }
    }
}

/// Installs [`crate::workload::seccomp::filter`]: `clone3` answers ENOSYS (`clone3(CLONE_INTO_CGROUP)`
/// places a new process in any cgroup whose `cgroup.procs` the caller could write, checked on
/// the inode only: the read-only mount does not stop it, and the cgroup namespace only does
/// when cgroup2 is mounted with `nsdelegate`, not a setting we may change on a shared host),
/// `request_key` answers ENOSYS (the kernel's key request runs a root helper outside the
/// sandbox), and sockets of families other than unix, inet, inet6, netlink and alg answer
/// EPERM.
unsafe fn install_seccomp(filter: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: a valid filter program; no_new_privs is already set.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog as libc::c_ulong,
            0,
            0,
        )
    })
}

/// After `unshare(CLONE_NEWPID)` the caller stays outside the new namespace; its next child
/// is the namespace's pid 1. Pid 1 ignores every signal it has no handler for, so the command
/// must not be it. Hence two forks:
/// - the caller (the process the agent spawned and waits for) relays signals to the
///   namespace's init and exits as it does;
/// - the init (pid 1) relays signals to the command, reaps orphans, and exits as the command
///   does (the kernel then ends whatever else is left in the namespace);
/// - the command's process (pid 2) returns and goes on to `exec`.
///
/// # Safety
/// Between `fork` and `exec` of a multi-threaded parent: only async-signal-safe calls.
unsafe fn fork_into_pid_namespace() -> io::Result<()> {
    // SAFETY: fork, then only async-signal-safe calls in both processes.
    unsafe {
        let init = libc::fork();
        if init < 0 {
            return Err(io::Error::last_os_error());
        }
        if init > 0 {
            libc::prctl(
                libc::PR_SET_NAME,
                c"egress-relay".as_ptr() as libc::c_ulong,
                0,
                0,
                0,
            );
            relay(init);
        }
        let command = libc::fork();
        if command < 0 {
            return Err(io::Error::last_os_error());
        }
        if command > 0 {
            libc::prctl(
                libc::PR_SET_NAME,
                c"egress-init".as_ptr() as libc::c_ulong,
                0,
                0,
                0,
            );
            relay(command);
        }
    }
    Ok(())
}

/// Waits for `child`, forwarding signals to it, then exits as it did. Never returns.
///
/// # Safety
/// Async-signal-safe calls only.
unsafe fn relay(child: libc::pid_t) -> ! {
    // SAFETY: async-signal-safe syscalls on local data.
    unsafe {
        // Close everything but stdio: the spawner reads its exec-status pipe until every copy
        // of the write end is closed, and it must see the command's exec, not wait for us.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..1024 {
                libc::close(fd);
            }
        }
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        // A child that ended before the signals were blocked sent a SIGCHLD that was
        // discarded (its default action is to ignore it): reap once before waiting, or a
        // command that exits at once leaves this relay waiting for ever.
        reap(child);
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(&all, &mut info);
            if sig < 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                reap(child);
                continue;
            }
            // The terminal sent this one to the whole process group: the command has it.
            if info.si_code == libc::SI_KERNEL {
                continue;
            }
            libc::kill(child, sig);
        }
    }
}

/// Reaps every ended child; exits like `child` when it is one of them.
///
/// # Safety
/// Async-signal-safe.
unsafe fn reap(child: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: a plain syscall.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == child {
            exit_like(status);
        }
    }
}

/// Exits with the wait status of a child: its exit code, or 128+N when signal N ended it
/// (a pid-namespace init cannot kill itself with a signal, so the shell convention is used).
fn exit_like(status: libc::c_int) -> ! {
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    };
    // SAFETY: async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// A libc return value as an `io::Result` (`errno` on -1).
pub(crate) fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Changes the calling thread's capability sets: `change` gets the current ones (capget) and
/// what it leaves is set (capset). No allocation.
unsafe fn change_capabilities(change: impl FnOnce(&mut [CapData; 2])) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and two data words as the v3 ABI wants.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } as libc::c_int)?;
    change(&mut data);
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } as libc::c_int)
}

/// The (word, bit) of a capability in the v3 ABI's two data words.
fn cap_bit(c: Capability) -> (usize, u32) {
    ((c.0 / 32) as usize, 1 << (c.0 % 32))
}

/// Removes `caps` from the calling thread's inheritable set.
unsafe fn clear_inheritable(caps: &[Capability]) -> io::Result<()> {
    // SAFETY: forwarded.
    unsafe {
        change_capabilities(|data| {
            for &c in caps {
                let (word, bit) = cap_bit(c);
                data[word].inheritable &= !bit;
            }
        })
    }
}

/// Sets the permitted, effective and inheritable sets to exactly `caps`: what `--keep-cap`
/// carries through the identity change.
unsafe fn set_kept(caps: &[Capability]) -> io::Result<()> {
    // SAFETY: forwarded.
    unsafe {
        change_capabilities(|data| {
            *data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            for &c in caps {
                let (word, bit) = cap_bit(c);
                data[word].permitted |= bit;
                data[word].effective |= bit;
                data[word].inheritable |= bit;
            }
        })
    }
}

/// The parts of a mountinfo line that matter here.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct MountLine {
    /// The file system (`maj:min`): two mounts with the same one show the same files.
    pub dev: String,
    /// The directory of that file system shown at `target` (`/` unless a bind mount).
    pub root: String,
    pub target: String,
    pub fstype: String,
    pub flags: libc::c_ulong,
}

/// Parses one `/proc/self/mountinfo` line: `id parent maj:min root target opts [optional...]
/// - fstype source superopts`.
pub(super) fn parse_mountinfo_line(line: &str) -> Option<MountLine> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let dev = l.nth(2)?;
    let root = l.next()?;
    let target = l.next()?;
    let opts = l.next()?;
    let fstype = right.split(' ').next()?;
    let mut flags = 0;
    for o in opts.split(',') {
        flags |= match o {
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            _ => 0,
        };
    }
    Some(MountLine {
        dev: dev.to_owned(),
        root: egress_common::mounts::unescape(root),
        target: egress_common::mounts::unescape(target),
        fstype: fstype.to_owned(),
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let l = "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw";
        let m = parse_mountinfo_line(l).unwrap();
        assert_eq!(m.target, "/sys/fs/cgroup/unified");
        assert_eq!((m.dev.as_str(), m.root.as_str()), ("0:30", "/"));
        assert_eq!(m.fstype, "cgroup2");
        assert_eq!(
            m.flags,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RELATIME
        );
        let odd = "40 24 0:31 / /mnt/a\\040b rw - bpf bpf rw";
        assert_eq!(parse_mountinfo_line(odd).unwrap().target, "/mnt/a b");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn capability_names_parse() {
        assert_eq!("CAP_NET_RAW".parse::<Capability>(), Ok(Capability(13)));
        assert_eq!("net_raw".parse::<Capability>(), Ok(Capability(13)));
        assert!("CAP_CHOWN".parse::<Capability>().is_err());
        assert_eq!(Capability(39).name(), "BPF");
    }
}
