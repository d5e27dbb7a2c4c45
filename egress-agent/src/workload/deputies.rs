//! No deputies: a command under `run` cannot have a local daemon act for it through a unix
//! socket (the system D-Bus starting a transient unit, a container engine starting an
//! unconfined container, nscd or systemd-resolved resolving a name past the resolver, an
//! ssh-agent signing, X11 typing into another window), unless a `unix:` rule names the socket.
//!
//! Four mechanisms, the first three set up in the child between `fork` and `exec` (see
//! docs/THREATS.md, "Deputies"):
//! 1. **A private `/run`** (and `/var/run` where it is a directory of its own): an empty tmpfs
//!    in the command's mount namespace, where the host's daemons keep their sockets (D-Bus,
//!    docker, containerd, podman, nscd, systemd-resolved, cups, the session's
//!    `/run/user/UID`: bus, ssh and gpg agents, wayland, pulse). A socket a `unix:` rule names
//!    is bound back in at its place, and the invoking user gets an empty `/run/user/UID` of
//!    its own. It covers sockets daemons bind there later too. Mount namespaces: any kernel.
//! 2. **Masked sockets elsewhere**: every path socket bound in any network namespace with a
//!    process when the command starts (`/proc/PID/net/unix`: /tmp's X11, ssh-agent and tmux
//!    sockets, a home's docker or gpg socket) gets `/dev/null` bound over it (connect: ECONNREFUSED),
//!    unless a rule names it, at every path another mount of its file system shows it too (a
//!    bind mount of its directory elsewhere). A mount elsewhere that shows part of a private
//!    directory (a bind mount of `/run/docker` or `/run/user/UID`) is made private as well.
//!    A socket bound there after the command started is masked by [`LateMasker`] when it next
//!    looks: the agent says so in a warning.
//! 3. **Landlock scoping of abstract sockets** (`LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET`, Landlock
//!    ABI 6, Linux 6.12): the command's Landlock domain may connect and send only to abstract
//!    sockets created inside it, which is exactly "its own, and its children's". Scoping is
//!    all or nothing, so a `unix: "@name"` rule turns it off (warning).
//! 4. **The cgroup unix hooks judge abstract names where the scope is off** (Linux 6.7): an
//!    abstract address is exact, so the programs refuse (`EPERM`) the names bound outside
//!    (at the start, and added by [`LateMasker`] as they appear) that no rule names.
//!
//! [`LateMasker`] also covers mounts made outside after the start that show part of a private
//! directory (they propagate into the command's namespace).
//!
//! The command's own sockets are untouched: a socketpair has no address, a listener it binds
//! anywhere it may write is its own inode (not in the scan, which ran before it started), an
//! abstract name it binds belongs to its domain.
//!
//! And names only through our resolver: `/etc/nsswitch.conf` and `/etc/resolv.conf` (or what
//! they link to) are replaced in the view by generated files: `hosts: files dns` (no nscd,
//! `resolve`, `mdns`, `myhostname`), and the host's name servers, search and options (every
//! name server is steered to the agent's resolver, 127.0.0.53 too).
//!
//! The cgroup unix socket-address hooks (`BPF_CGROUP_UNIX_CONNECT`/`_SENDMSG`, Linux 6.7)
//! report each unix connect and send of the command (`bpf::unix`); [`UnixJudge`] says which
//! of them the view refused, and `daemon::unix_watch` writes a `deny` line with
//! `"proto":"unix"` for those. They cannot judge a path: they see it as written, before the
//! lookup.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::FileTypeExt as _},
    path::{Component, Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    policy::{Policy, UnixName},
    sys::unix::named_sockets,
    workload::confine::check,
};

/// The most binds (rule-named sockets in a private directory, generated files) one view holds:
/// their mount descriptors live on the child's stack.
const MAX_BINDS: usize = 64;

/// The most sockets masked outside the private directories.
const MAX_MASKED: usize = 16384;

/// `open_tree` and `move_mount` flags (linux/mount.h, Linux 5.2).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `landlock_create_ruleset` flag asking for the ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
/// `landlock_ruleset_attr.scoped` bit (Landlock ABI 6, Linux 6.12).
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;

/// `struct landlock_ruleset_attr` as of ABI 6.
#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// One mount to place in the view: `source` is opened (as a detached bind) before the private
/// directories cover it, and placed at `target` after.
#[derive(Debug)]
struct Bind {
    source: CString,
    target: CString,
    /// The target is inside a private directory: create an empty file there first.
    create: bool,
}

/// Which unix addresses the view refuses, for the `deny` lines of `daemon::unix_watch` (the
/// kernel programs only report what the command asked for).
#[derive(Debug, Clone, Default)]
pub struct UnixJudge {
    private: Vec<PathBuf>,
    named: BTreeSet<PathBuf>,
    named_abstract: BTreeSet<String>,
    masked: BTreeSet<PathBuf>,
    /// Abstract names bound in the command's network namespace before it started.
    outside_abstract: BTreeSet<String>,
    /// Socket files (device, inode) masked at the start.
    masked_ids: BTreeSet<(u64, u64)>,
    /// Sockets bound outside after the start, masked since by [`LateMasker`].
    late: std::sync::Arc<std::sync::Mutex<BTreeSet<PathBuf>>>,
    /// Mounts made outside after the start that show part of a private directory, made
    /// private since by [`LateMasker`].
    late_private: std::sync::Arc<std::sync::Mutex<Vec<PathBuf>>>,
    /// Abstract names bound outside after the start, refused since by the hooks.
    late_abstract: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl UnixJudge {
    /// Whether the command's attempt was refused by the view: a path (a relative one taken
    /// from the process's working directory, while it still has one), folded, then resolved
    /// in the host's view, that was masked, or that is a socket in a private directory on the
    /// host; an abstract name bound outside before the command started, while scoping is on.
    /// An abstract name bound later is not named.
    pub fn refused(&self, attempt: &crate::bpf::unix::UnixAttempt) -> bool {
        use crate::bpf::unix::UnixTarget;
        match &attempt.target {
            UnixTarget::Path(p) => {
                let absolute = if p.starts_with('/') {
                    PathBuf::from(p)
                } else {
                    match fs::read_link(format!("/proc/{}/task/{}/cwd", attempt.pid, attempt.tid))
                        .or_else(|_| fs::read_link(format!("/proc/{}/cwd", attempt.pid)))
                    {
                        Ok(cwd) => cwd.join(p),
                        Err(_) => return false,
                    }
                };
                let folded = fold(&absolute);
                let real = fs::canonicalize(&folded).unwrap_or(folded);
                if self.named.contains(&real) {
                    return false;
                }
                let private = self.private.iter().any(|d| real.starts_with(d))
                    || self
                        .late_private
                        .lock()
                        .is_ok_and(|l| l.iter().any(|d| real.starts_with(d)));
                self.masked.contains(&real)
                    || self.late.lock().is_ok_and(|l| l.contains(&real))
                    || (private
                        && fs::symlink_metadata(&real).is_ok_and(|m| m.file_type().is_socket()))
            }
            // Refused by the Landlock scope, or by the cgroup hooks when a rule needs the
            // scope off.
            UnixTarget::Abstract(n) => {
                !self.named_abstract.contains(n)
                    && (self.outside_abstract.contains(n)
                        || self.late_abstract.lock().is_ok_and(|l| l.contains(n)))
            }
            UnixTarget::Unnamed => false,
        }
    }
}

/// The command's view of local daemons, prepared before the fork.
#[derive(Debug)]
pub struct DeputyView {
    private: Vec<CString>,
    /// Directories to create inside the private ones (parents of bind targets), in order.
    dirs: Vec<CString>,
    binds: Vec<Bind>,
    /// `/run/user/UID` for the invoking user, with its owner.
    runtime_dir: Option<(CString, CString, u32, u32)>,
    masked: Vec<CString>,
    scope_abstract: bool,
    /// Where the generated resolver files are written (removed once the command started).
    generated: Option<PathBuf>,
    /// What the view protects, for the `ready` event and `status`.
    summary: Vec<String>,
    /// What stays open, one `warning` event each.
    pub warnings: Vec<String>,
    judge: UnixJudge,
    /// The private directories as asked (`/run`, `/var/run`), without the other mounts of
    /// what they hold.
    base_private: Vec<PathBuf>,
    /// Those other mounts (private or masked), as found at the start.
    aliases: BTreeSet<PathBuf>,
}

impl DeputyView {
    /// Reads the host (`/proc/net/unix`, the resolver files, the Landlock ABI) and plans the
    /// view. `user`: the invoking user's uid and gid, when the command runs as one (it gets a
    /// `/run/user/UID` of its own).
    pub fn prepare(policy: &Policy, user: Option<(u32, u32)>) -> anyhow::Result<Self> {
        let mut private = vec![PathBuf::from("/run")];
        if fs::symlink_metadata("/var/run").is_ok_and(|m| m.is_dir()) {
            private.push(PathBuf::from("/var/run"));
        }
        let mounts = mounts();
        // Other mounts showing what a private directory hides (a bind mount of /run or of a
        // directory in it elsewhere) are private too; one of a single socket is masked.
        let base_private = private.clone();
        let mut alias_files = Vec::new();
        let mut alias_dirs = Vec::new();
        let shown_elsewhere: BTreeSet<PathBuf> =
            private_aliases(&mounts, &private).into_iter().collect();
        for a in shown_elsewhere.iter().cloned() {
            if fs::symlink_metadata(&a).is_ok_and(|m| m.is_dir()) {
                alias_dirs.push(a);
            } else if fs::symlink_metadata(&a).is_ok_and(|m| m.file_type().is_socket()) {
                alias_files.push(a);
            }
        }
        private.extend(alias_dirs.iter().cloned());
        let inside = |p: &Path| private.iter().any(|d| p.starts_with(d));
        let mut warnings = Vec::new();
        let mut summary = Vec::new();
        let mut binds = Vec::new();
        let mut dirs = BTreeSet::new();

        // Rule-named sockets.
        let mut named = BTreeSet::new();
        let mut abstract_rules = Vec::new();
        let mut named_abstract = BTreeSet::new();
        for name in policy.unix_names() {
            let path = match name {
                UnixName::Abstract(a) => {
                    abstract_rules.push(format!("@{a}"));
                    named_abstract.insert(a.clone());
                    continue;
                }
                UnixName::Path(p) => p,
            };
            let real = fs::canonicalize(path).unwrap_or_else(|_| resolve(path));
            named.insert(real.clone());
            let is_socket = fs::symlink_metadata(&real).is_ok_and(|m| m.file_type().is_socket());
            if !inside(&real) {
                continue;
            }
            if !is_socket {
                warnings.push(format!(
                    "unix: {} names no socket that exists now: the command's private /run \
                     holds only sockets that exist when it starts, so it stays out of reach",
                    path.display()
                ));
                continue;
            }
            add_parents(&real, &private, &mut dirs);
            binds.push(Bind {
                source: cstring(&real)?,
                target: cstring(&real)?,
                create: true,
            });
            summary.push(format!(
                "{} (unix: rule, bound into the private /run)",
                real.display()
            ));
        }

        // The resolver view.
        let generated = PathBuf::from(format!(
            "{}/view-{}",
            crate::daemon::status::STATE_DIR,
            std::process::id()
        ));
        let files = resolver_files();
        if !files.is_empty() {
            fs::create_dir_all(&generated)
                .with_context(|| format!("cannot create {}", generated.display()))?;
        }
        for (host_path, content) in files {
            let real =
                fs::canonicalize(host_path).unwrap_or_else(|_| resolve(Path::new(host_path)));
            let file = generated.join(Path::new(host_path).file_name().unwrap_or_default());
            fs::write(&file, content)
                .with_context(|| format!("cannot write {}", file.display()))?;
            let create = inside(&real);
            if create {
                add_parents(&real, &private, &mut dirs);
            } else if !fs::metadata(&real).is_ok_and(|m| m.is_file()) {
                // Nothing to bind over outside the private directories (the real /etc is
                // never written); glibc's defaults apply.
                continue;
            }
            binds.push(Bind {
                source: cstring(&file)?,
                target: cstring(&real)?,
                create,
            });
            summary.push(if host_path.ends_with("nsswitch.conf") {
                format!("{host_path} (resolver view: hosts: files dns)")
            } else {
                format!("{host_path} (resolver view: its name servers, steered to the agent)")
            });
        }
        if binds.len() > MAX_BINDS {
            anyhow::bail!(
                "{} unix: rules name sockets in /run, more than the {MAX_BINDS} a view holds",
                binds.len()
            );
        }

        // Sockets bound now elsewhere.
        let mut masked = BTreeSet::new();
        let paths: BTreeSet<String> = unix_tables().iter().flat_map(|t| bound_paths(t)).collect();
        for path in paths {
            let p = Path::new(&path);
            if !fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                continue;
            }
            let real = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            if inside(&real) || named.contains(&real) {
                continue;
            }
            // The same socket where another mount of its file system shows it.
            for a in aliases(&mounts, &real) {
                if !inside(&a) && !named.contains(&a) {
                    masked.insert(a);
                }
            }
            masked.insert(real);
        }
        masked.extend(alias_files);
        if masked.len() > MAX_MASKED {
            warnings.push(format!(
                "{} unix sockets are bound outside /run; only the first {MAX_MASKED} are masked",
                masked.len()
            ));
        }
        let masked_set = masked.clone();
        let masked_ids = masked
            .iter()
            .filter_map(|p| fs::symlink_metadata(p).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                (m.dev(), m.ino())
            })
            .collect();
        let masked: Vec<CString> = masked
            .iter()
            .take(MAX_MASKED)
            .map(|p| cstring(p))
            .collect::<anyhow::Result<_>>()?;

        let runtime_dir = match user {
            Some((uid, gid)) if uid != 0 => Some((
                CString::new("/run/user")?,
                CString::new(format!("/run/user/{uid}"))?,
                uid,
                gid,
            )),
            _ => None,
        };
        let shown: Vec<String> = private
            .iter()
            .filter(|p| !alias_dirs.contains(p))
            .map(|p| p.display().to_string())
            .collect();
        let aliased = if alias_dirs.is_empty() {
            String::new()
        } else {
            let a: Vec<String> = alias_dirs.iter().map(|p| p.display().to_string()).collect();
            format!(", and {} (other mounts of what they hold)", a.join(", "))
        };
        summary.insert(
            0,
            format!(
                "{}{aliased} (private and empty: the host daemons' unix sockets there are out of \
                 reach)",
                shown.join(", ")
            ),
        );
        summary.push(format!(
            "{} unix sockets bound elsewhere when the command started (masked)",
            masked.len()
        ));

        let abi = landlock_abi();
        let scope_abstract = abstract_rules.is_empty() && abi >= 6;
        let hooks = crate::bpf::unix::hooks_available();
        if scope_abstract {
            summary.push(
                "abstract unix sockets bound outside the sandbox (Landlock scope)".to_string(),
            );
        } else if hooks {
            summary.push(
                "abstract unix sockets bound outside the sandbox, but those rules name (cgroup \
                 unix hooks)"
                    .to_string(),
            );
            warnings.push(format!(
                "an abstract unix socket bound outside after the command started is refused only \
                 when the agent next looks (every {} ms): until then the command can reach it; \
                 {}; the cgroup unix hooks refuse the names instead",
                LATE_TICK.as_millis(),
                if abstract_rules.is_empty() {
                    format!(
                        "scoping them needs Landlock ABI 6 (Linux 6.12), {}",
                        match abi {
                            a if a > 0 => format!("this kernel gives ABI {a}"),
                            _ => "and Landlock is not enabled on this kernel".to_string(),
                        }
                    )
                } else {
                    format!(
                        "the rule for {} needs Landlock's scope off (it scopes abstract sockets \
                         all or nothing)",
                        abstract_rules.join(", ")
                    )
                }
            ));
        } else if !abstract_rules.is_empty() {
            warnings.push(format!(
                "abstract unix sockets outside the sandbox stay reachable: the rule for {} \
                 needs them unscoped (Landlock scopes abstract sockets all or nothing), so \
                 every abstract socket in this network namespace is open to the command",
                abstract_rules.join(", ")
            ));
        } else {
            warnings.push(format!(
                "abstract unix sockets outside the sandbox stay reachable (the X server's, the \
                 session bus's where it has one, any daemon's in this network namespace): \
                 scoping them needs Landlock ABI 6 (Linux 6.12); {}",
                match abi {
                    a if a > 0 => format!("this kernel gives ABI {a}"),
                    _ => "Landlock is not enabled on this kernel".to_string(),
                }
            ));
        }
        warnings.push(format!(
            "a unix socket that a process outside the sandbox binds after the command \
             started, outside /run, is masked in the command's view only when the agent next \
             looks (every {} ms): until then the command can reach it",
            LATE_TICK.as_millis()
        ));
        let outside_abstract = fs::read_to_string("/proc/self/net/unix")
            .map(|t| bound_abstract(&t))
            .unwrap_or_default();
        let judge = UnixJudge {
            private: private.clone(),
            named: named.clone(),
            named_abstract,
            masked: masked_set,
            outside_abstract,
            masked_ids,
            late: Default::default(),
            late_private: Default::default(),
            late_abstract: Default::default(),
        };

        // What stays open, in the `ready` event and `status` too.
        summary.extend(warnings.iter().map(|w| format!("still open: {w}")));
        Ok(Self {
            private: private
                .iter()
                .map(|p| cstring(p))
                .collect::<anyhow::Result<_>>()?,
            dirs: dirs
                .iter()
                .map(|p| cstring(p))
                .collect::<anyhow::Result<_>>()?,
            binds,
            runtime_dir,
            masked,
            scope_abstract,
            generated: Some(generated),
            summary,
            warnings,
            judge,
            base_private,
            aliases: shown_elsewhere,
        })
    }

    /// Which unix addresses this view refuses (for the `deny` lines).
    pub fn judge(&self) -> UnixJudge {
        self.judge.clone()
    }

    /// The abstract names the cgroup unix hooks must refuse: with Landlock's scope off, those
    /// bound outside when the command started that no rule names (maybe none yet); `None`
    /// with the scope on.
    pub fn hook_denied_abstract(&self) -> Option<Vec<Vec<u8>>> {
        if self.scope_abstract {
            return None;
        }
        Some(
            (self.judge.outside_abstract.iter())
                .filter(|n| !self.judge.named_abstract.contains(*n))
                .map(|n| n.as_bytes().to_vec())
                .collect(),
        )
    }

    /// What the view protects, for the `ready` event and `status`.
    pub fn summary(&self) -> &[String] {
        &self.summary
    }

    /// Removes the generated resolver files once the command's view holds them.
    pub fn forget_generated(&self) {
        if let Some(dir) = &self.generated {
            let _ = fs::remove_dir_all(dir);
        }
    }

    /// Makes the view, in the child's own mount namespace, as root of the initial user
    /// namespace.
    ///
    /// # Safety
    /// Only raw syscalls on data prepared by [`DeputyView::prepare`]: fit for the window
    /// between `fork` and `exec` of a multi-threaded parent.
    pub unsafe fn apply_in_child(&self) -> io::Result<()> {
        let mut fds = [-1 as libc::c_int; MAX_BINDS];
        // SAFETY (whole body): raw syscalls with NUL-terminated strings prepared before the
        // fork, on descriptors this function opened.
        unsafe {
            // Detached copies of every source first: the private directories hide them next.
            for (fd, b) in fds.iter_mut().zip(&self.binds) {
                let r = libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    b.source.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
                );
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                *fd = r as libc::c_int;
            }
            for d in &self.private {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    d.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=0755".as_ptr().cast(),
                ))?;
            }
            for d in &self.dirs {
                mkdir(d, 0o755)?;
            }
            if let Some((parent, dir, uid, gid)) = &self.runtime_dir {
                mkdir(parent, 0o755)?;
                mkdir(dir, 0o700)?;
                check(libc::chown(dir.as_ptr(), *uid, *gid))?;
            }
            for (fd, b) in fds.iter().zip(&self.binds) {
                if b.create {
                    let f = libc::open(
                        b.target.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if f < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(f);
                }
                let r = libc::syscall(
                    libc::SYS_move_mount,
                    *fd,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    b.target.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                );
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(*fd);
            }
            for m in &self.masked {
                let r = libc::mount(
                    c"/dev/null".as_ptr(),
                    m.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
                // A socket removed since the scan leaves nothing to mask.
                if r < 0 && *libc::__errno_location() != libc::ENOENT {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Scopes abstract unix sockets to the command's Landlock domain. After `no_new_privs`.
    ///
    /// # Safety
    /// As for [`DeputyView::apply_in_child`].
    pub unsafe fn seal_in_child(&self) -> io::Result<()> {
        if !self.scope_abstract {
            return Ok(());
        }
        let attr = LandlockRulesetAttr {
            handled_access_fs: 0,
            handled_access_net: 0,
            scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET,
        };
        // SAFETY: the attribute struct outlives the call; the descriptor is ours.
        unsafe {
            let fd = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const LandlockRulesetAttr,
                std::mem::size_of::<LandlockRulesetAttr>(),
                0u32,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let r = libc::syscall(libc::SYS_landlock_restrict_self, fd as libc::c_int, 0u32);
            let err = io::Error::last_os_error();
            libc::close(fd as libc::c_int);
            if r < 0 {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// The Landlock ABI version this kernel gives (0: none, or Landlock is not enabled).
pub fn landlock_abi() -> i64 {
    // SAFETY: the version query takes no attribute.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<LandlockRulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

/// How often [`LateMasker`] looks for sockets bound after the start.
pub const LATE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Masks, in the command's mount namespace, the path sockets that processes outside its
/// cgroup bind after it started (the scan at the start could not see them): polled every
/// [`LATE_TICK`], so such a socket is reachable from its `bind` until the next look. A socket
/// is the command's own when one of the cgroup's processes holds it (`/proc/PID/fd`); that is
/// true from `socket()` on, before any `bind`.
#[derive(Debug)]
pub struct LateMasker {
    judge: UnixJudge,
    known: BTreeSet<(u64, u64)>,
    base_private: Vec<PathBuf>,
    aliases: BTreeSet<PathBuf>,
    /// The hooks' abstract deny map, when they judge abstract names, and the names seen.
    deny_map: Option<std::os::fd::OwnedFd>,
    abstract_seen: BTreeSet<String>,
    mntns: std::os::fd::OwnedFd,
    procs: PathBuf,
}

impl LateMasker {
    /// For the command whose first process (in its mount namespace) is `pid`, in `cgroup`;
    /// `deny_map`: the hooks' abstract deny map, when they judge abstract names (Landlock's
    /// scope off), to which abstract names bound outside later are added.
    pub fn new(
        view: &DeputyView,
        pid: u32,
        cgroup: &Path,
        deny_map: Option<std::os::fd::OwnedFd>,
    ) -> anyhow::Result<Self> {
        let ns = fs::File::open(format!("/proc/{pid}/ns/mnt"))
            .with_context(|| format!("cannot open the mount namespace of {pid}"))?;
        Ok(Self {
            judge: view.judge.clone(),
            known: view.judge.masked_ids.clone(),
            base_private: view.base_private.clone(),
            aliases: view.aliases.clone(),
            deny_map: if view.scope_abstract { None } else { deny_map },
            abstract_seen: view.judge.outside_abstract.clone(),
            mntns: ns.into(),
            procs: cgroup.join("cgroup.procs"),
        })
    }

    /// One look: masks what is new and outside; returns it.
    pub fn tick(&mut self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let mut out = self.late_aliases();
        let mut own: Option<BTreeSet<u64>> = None;
        if let Some(map) = &self.deny_map {
            // Abstract names bound outside since, in the command's network namespace.
            let table = fs::read_to_string("/proc/self/net/unix").unwrap_or_default();
            for (inode, name) in named_sockets(&table) {
                let Some(n) = name.strip_prefix('@') else {
                    continue;
                };
                if !self.abstract_seen.insert(n.to_owned())
                    || self.judge.named_abstract.contains(n)
                    || own
                        .get_or_insert_with(|| own_sockets(&self.procs))
                        .contains(&inode)
                {
                    continue;
                }
                match crate::bpf::unix::deny_abstract(map, n.as_bytes()) {
                    Ok(()) => {
                        if let Ok(mut l) = self.judge.late_abstract.lock() {
                            l.insert(n.to_owned());
                        }
                        out.push(PathBuf::from(format!("@{n}")));
                    }
                    Err(e) => tracing::warn!("cannot refuse @{n}, bound after the start: {e}"),
                }
            }
        }
        for table in unix_tables() {
            for (inode, name) in named_sockets(&table) {
                if !name.starts_with('/') {
                    continue;
                }
                let Ok(m) = fs::symlink_metadata(name) else {
                    continue;
                };
                if !m.file_type().is_socket() || !self.known.insert((m.dev(), m.ino())) {
                    continue;
                }
                let real = fs::canonicalize(name).unwrap_or_else(|_| PathBuf::from(name));
                if self.judge.private.iter().any(|d| real.starts_with(d))
                    || self.judge.named.contains(&real)
                {
                    continue;
                }
                if own
                    .get_or_insert_with(|| own_sockets(&self.procs))
                    .contains(&inode)
                {
                    continue;
                }
                out.push(real);
            }
        }
        if out.is_empty() {
            return out;
        }
        let mounts = mounts();
        let also: Vec<PathBuf> = out
            .iter()
            .flat_map(|p| aliases(&mounts, p))
            .filter(|a| {
                !self.judge.private.iter().any(|d| a.starts_with(d))
                    && !self.judge.named.contains(a)
            })
            .collect();
        out.extend(also);
        let paths: Vec<CString> = out.iter().filter_map(|p| cstring(p).ok()).collect();
        if let Err(e) = mask_in(&self.mntns, &paths, &[]) {
            tracing::warn!("cannot mask sockets bound after the start: {e}");
        }
        if let Ok(mut late) = self.judge.late.lock() {
            late.extend(out.iter().cloned());
        }
        out
    }
}

impl LateMasker {
    /// Mounts made outside since the start that show part of a private directory (they
    /// propagate into the command's namespace, which is a slave of the host's): made private
    /// (a directory) or masked (a socket) there too. Returns them.
    fn late_aliases(&mut self) -> Vec<PathBuf> {
        let (mut dirs, mut files) = (Vec::new(), Vec::new());
        for a in private_aliases(&mounts(), &self.base_private) {
            if !self.aliases.insert(a.clone()) {
                continue;
            }
            match fs::symlink_metadata(&a) {
                Ok(m) if m.is_dir() => dirs.push(a),
                Ok(m) if m.file_type().is_socket() => files.push(a),
                _ => {}
            }
        }
        if dirs.is_empty() && files.is_empty() {
            return Vec::new();
        }
        let c =
            |v: &[PathBuf]| -> Vec<CString> { v.iter().filter_map(|p| cstring(p).ok()).collect() };
        if let Err(e) = mask_in(&self.mntns, &c(&files), &c(&dirs)) {
            tracing::warn!("cannot hide mounts of /run made after the start: {e}");
        }
        if let Ok(mut l) = self.judge.late_private.lock() {
            l.extend(dirs.iter().cloned());
        }
        if let Ok(mut l) = self.judge.late.lock() {
            l.extend(files.iter().cloned());
        }
        dirs.into_iter().chain(files).collect()
    }
}

/// The socket inodes the cgroup's processes hold.
fn own_sockets(procs: &Path) -> BTreeSet<u64> {
    let pids = fs::read_to_string(procs).unwrap_or_default();
    crate::sys::unix::held_sockets(pids.split_whitespace())
}

/// Covers each of `dirs` with an empty tmpfs and binds `/dev/null` over each of `paths` in
/// the mount namespace `ns`, from a forked child (`setns` into a mount namespace needs a
/// single-threaded caller).
fn mask_in(ns: &std::os::fd::OwnedFd, paths: &[CString], dirs: &[CString]) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = ns.as_raw_fd();
    // SAFETY: the child makes only raw syscalls on data prepared before the fork, then exits.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                libc::_exit(1);
            }
            for d in dirs {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    d.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=0755".as_ptr().cast(),
                );
            }
            for p in paths {
                libc::mount(
                    c"/dev/null".as_ptr(),
                    p.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
            }
            libc::_exit(0);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(io::Error::other(
                "the masking child failed to enter the namespace",
            ));
        }
    }
    Ok(())
}

/// A mount of the agent's view: which file system, which of its directories, where.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    dev: String,
    root: PathBuf,
    target: PathBuf,
}

/// The mounts of the agent's view, in `/proc/self/mountinfo` order (a later one over an
/// earlier one at the same place).
fn mounts() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(crate::workload::confine::parse_mountinfo_line)
        .map(|m| Mount {
            dev: m.dev,
            root: PathBuf::from(m.root),
            target: PathBuf::from(m.target),
        })
        .collect()
}

/// Where `path` lives: its file system and its path inside it (through the topmost of the
/// mounts with the longest target above it).
fn locate<'a>(mounts: &'a [Mount], path: &Path) -> Option<(&'a str, PathBuf)> {
    let m = mounts
        .iter()
        .filter(|m| path.starts_with(&m.target))
        .max_by_key(|m| m.target.components().count())?;
    let rel = path.strip_prefix(&m.target).ok()?;
    Some((&m.dev, fold(&m.root.join(rel))))
}

/// The other paths under which the file at `path` shows through mounts of its file system
/// elsewhere (a bind mount of its directory or of a parent, a second mount of the same file
/// system), each checked to be the same file (device and inode): a socket masked at one path
/// must be masked at all of them.
fn aliases(mounts: &[Mount], path: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let (Some((dev, inner)), Some(want)) = (locate(mounts, path), id(path)) else {
        return Vec::new();
    };
    let mut out = BTreeSet::new();
    for m in mounts.iter().filter(|m| m.dev == dev) {
        if let Ok(rel) = inner.strip_prefix(&m.root) {
            let a = fold(&m.target.join(rel));
            if a != path && id(&a) == Some(want) {
                out.insert(a);
            }
        }
    }
    out.into_iter().collect()
}

/// Mounts outside the private directories that show what those hide: a mount of the same
/// file system whose root is inside a hidden part (a bind mount of `/run/docker` at `/srv/x`,
/// a second mount of `/run/user/UID`), or above it where the same directory shows through
/// (a bind mount of `/` at `/mnt/root` when `/run` is a plain directory of the root file
/// system). Outermost first; none above a private directory.
fn private_aliases(mounts: &[Mount], private: &[PathBuf]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let under = |p: &Path| private.iter().any(|d| p.starts_with(d));
    // (file system, hidden directory inside it, where it shows in the host's view).
    let mut hidden: Vec<(&str, PathBuf, PathBuf)> = Vec::new();
    for d in private {
        if let Some((dev, inner)) = locate(mounts, d) {
            hidden.push((dev, inner, d.clone()));
        }
    }
    for m in mounts.iter().filter(|m| under(&m.target)) {
        hidden.push((&m.dev, m.root.clone(), m.target.clone()));
    }
    let mut found = BTreeSet::new();
    for m in mounts.iter().filter(|m| !under(&m.target)) {
        for (dev, inner, shown) in &hidden {
            if m.dev != *dev || &m.target == shown {
                continue;
            }
            if m.root.starts_with(inner) {
                found.insert(m.target.clone());
            } else if let Ok(rel) = inner.strip_prefix(&m.root) {
                let a = fold(&m.target.join(rel));
                if &a != shown && !under(&a) && id(&a).is_some() && id(&a) == id(shown) {
                    found.insert(a);
                }
            }
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for a in found {
        // BTreeSet order: a parent comes before what is below it.
        if out.iter().any(|o| a.starts_with(o)) || private.iter().any(|d| d.starts_with(&a)) {
            continue;
        }
        out.push(a);
    }
    out
}

/// `/proc/PID/net/unix` of one process in each network namespace that has processes: a path
/// socket bound in any of them is reachable through the file system, whatever the
/// namespace of the process that connects.
fn unix_tables() -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let pids = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for dir in std::iter::once(PathBuf::from("/proc/self")).chain(pids) {
        let Ok(ns) = fs::metadata(dir.join("ns/net")) else {
            continue;
        };
        if !seen.insert((ns.dev(), ns.ino())) {
            continue;
        }
        if let Ok(t) = fs::read_to_string(dir.join("net/unix")) {
            out.push(t);
        }
    }
    out
}

/// The generated `/etc/nsswitch.conf` and `/etc/resolv.conf`, for the files the host has.
fn resolver_files() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/nsswitch.conf") {
        out.push(("/etc/nsswitch.conf", nsswitch(&text)));
    }
    let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    out.push(("/etc/resolv.conf", resolv_conf(&text)));
    out
}

/// The host's nsswitch.conf with its `hosts:` line replaced by `hosts: files dns`: no nscd
/// cache (glibc asks nscd only through its socket, which the view hides anyway), no
/// `resolve` (systemd-resolved over varlink), no `mdns` (avahi), no `myhostname`.
pub fn nsswitch(host: &str) -> String {
    let mut out = String::from("# egress: names only through the agent's resolver\n");
    let mut seen = false;
    for line in host.lines() {
        if line.trim_start().starts_with("hosts:") {
            if !seen {
                out.push_str("hosts: files dns\n");
            }
            seen = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !seen {
        out.push_str("hosts: files dns\n");
    }
    out
}

/// The host's resolv.conf reduced to its name servers, search list and options (every name
/// server is steered to the agent's resolver: port 53 at any address is); `nameserver
/// 127.0.0.1` when it names none.
pub fn resolv_conf(host: &str) -> String {
    let mut out = String::from("# egress: every name server here is steered to the agent\n");
    let mut servers = 0;
    for line in host.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if matches!(word, "nameserver" | "search" | "domain" | "options") {
            servers += usize::from(word == "nameserver");
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    if servers == 0 {
        out.push_str("nameserver 127.0.0.1\n");
    }
    out
}

/// The name column of each socket in a `/proc/net/unix` table (`Num RefCount Protocol Flags
/// Type St Inode Path`: what follows the seventh field, which may hold spaces).
fn names(table: &str) -> impl Iterator<Item = &str> {
    named_sockets(table).map(|(_, n)| n)
}

/// The absolute paths of the sockets bound in `/proc/net/unix` (abstract names, shown with a
/// leading `@`, and relative paths, whose directory is unknown, are left out).
pub fn bound_paths(table: &str) -> BTreeSet<String> {
    names(table)
        .filter(|n| n.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

/// The abstract names bound in a `/proc/net/unix` table (shown there with a leading `@`).
pub fn bound_abstract(table: &str) -> BTreeSet<String> {
    names(table)
        .filter_map(|n| n.strip_prefix('@'))
        .map(str::to_owned)
        .collect()
}

/// Where `path` leads when it cannot be canonicalized (it does not exist): its parent
/// canonicalized, or `path` with `.` and `..` folded.
fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    // A dangling symlink (`/etc/resolv.conf` to a file under a /run that is not there):
    // follow it by hand.
    for _ in 0..8 {
        match fs::read_link(&p) {
            Ok(to) => p = p.parent().unwrap_or(Path::new("/")).join(to),
            Err(_) => break,
        }
    }
    let folded = fold(&p);
    match (folded.parent(), folded.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent)
            .map(|c| c.join(name))
            .unwrap_or(folded),
        _ => folded,
    }
}

fn fold(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Adds the directories between the private directory holding `target` and `target`.
fn add_parents(target: &Path, private: &[PathBuf], dirs: &mut BTreeSet<PathBuf>) {
    let Some(root) = private.iter().find(|d| target.starts_with(d)) else {
        return;
    };
    let mut p = target.parent();
    while let Some(d) = p {
        if d == root.as_path() || !d.starts_with(root) {
            break;
        }
        dirs.insert(d.to_path_buf());
        p = d.parent();
    }
}

fn cstring(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("{p:?} holds a NUL byte"))
}

/// # Safety
/// A raw syscall on a NUL-terminated path.
unsafe fn mkdir(path: &CString, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: as the function says.
    unsafe {
        if libc::mkdir(path.as_ptr(), mode) < 0 && *libc::__errno_location() != libc::EEXIST {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsswitch_keeps_everything_but_hosts() {
        let host = "passwd: files systemd\nhosts: mymachines resolve [!UNAVAIL=return] files \
                    myhostname dns\nnetworks: files\n";
        let v = nsswitch(host);
        assert!(v.contains("\nhosts: files dns\n"), "{v}");
        assert!(
            !v.contains("mymachines") && !v.contains("myhostname"),
            "{v}"
        );
        assert!(v.contains("passwd: files systemd\n") && v.contains("networks: files\n"));
        assert!(nsswitch("passwd: files\n").ends_with("hosts: files dns\n"));
    }

    #[test]
    fn resolv_conf_keeps_servers_search_and_options() {
        let v = resolv_conf(
            "# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch x.test\nsortlist 1.2.3.4\n",
        );
        assert_eq!(
            v.lines().skip(1).collect::<Vec<_>>(),
            [
                "nameserver 127.0.0.53",
                "options edns0 trust-ad",
                "search x.test"
            ]
        );
        assert!(resolv_conf("").ends_with("nameserver 127.0.0.1\n"));
    }

    #[test]
    fn bound_paths_reads_proc_net_unix() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 20504 /run/dbus/system_bus_socket\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 20505 @/tmp/.X11-unix/X0\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 20506\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 20507 /tmp/a b.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 20508 rel.sock\n";
        assert_eq!(
            bound_abstract(table).into_iter().collect::<Vec<_>>(),
            ["/tmp/.X11-unix/X0"]
        );
        assert_eq!(
            bound_paths(table).into_iter().collect::<Vec<_>>(),
            ["/run/dbus/system_bus_socket", "/tmp/a b.sock"]
        );
    }

    #[test]
    fn a_path_is_located_through_the_topmost_longest_mount() {
        let m = |dev: &str, root: &str, target: &str| Mount {
            dev: dev.into(),
            root: root.into(),
            target: target.into(),
        };
        let mounts = [
            m("8:1", "/", "/"),
            m("0:25", "/", "/run"),
            m("8:1", "/srv/run", "/run"),
            m("0:25", "/docker", "/srv/d"),
        ];
        // The later of two mounts at /run is the one on top.
        assert_eq!(
            locate(&mounts, Path::new("/run/a.sock")),
            Some(("8:1", PathBuf::from("/srv/run/a.sock")))
        );
        assert_eq!(
            locate(&mounts, Path::new("/srv/d/x.sock")),
            Some(("0:25", PathBuf::from("/docker/x.sock")))
        );
        assert_eq!(
            locate(&mounts, Path::new("/tmp")),
            Some(("8:1", PathBuf::from("/tmp")))
        );
    }

    #[test]
    fn parents_stop_at_the_private_directory() {
        let mut dirs = BTreeSet::new();
        add_parents(
            Path::new("/run/systemd/resolve/stub-resolv.conf"),
            &[PathBuf::from("/run")],
            &mut dirs,
        );
        assert_eq!(
            dirs.into_iter().collect::<Vec<_>>(),
            [
                PathBuf::from("/run/systemd"),
                PathBuf::from("/run/systemd/resolve")
            ]
        );
        assert_eq!(fold(Path::new("/etc/../run/x")), PathBuf::from("/run/x"));
    }
}
