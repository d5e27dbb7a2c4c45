//! `egress-agent run`: enforce an allowlist on one command, from start to exit.
//!
//! Order matters: the cgroup is created and the programs attached (with the whole static
//! policy already in the maps) before the command starts, and the command joins the cgroup
//! before `exec`. At exit everything still in the cgroup is killed *before* the programs are
//! detached, so nothing the command left behind outlives enforcement.

use std::{
    ffi::OsString,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    sync::atomic::{AtomicI32, AtomicI64, Ordering},
    thread,
    time::SystemTime,
};

use crate::{
    daemon::{
        session::{EnforcerOptions, Session, SessionConfig, warn},
        status,
    },
    events::EventSink,
    policy::{self, Mode},
    sys::cgroup::{self, OwnedCgroup},
    workload::confine::{Capability, Confinement},
    workload::deputies::{DeputyView, LateMasker},
    workload::launch::{self, Identity, SpawnError},
    workload::learn,
    workload::persistence::Protected,
    workload::pty::Pty,
};
use anyhow::{Context as _, bail};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH},
    iterator::{SignalsInfo, exfiltrator::WithOrigin},
    low_level::siginfo::Cause,
};

/// Exit status when the agent itself fails (as `env` and container runtimes use it).
pub const EXIT_AGENT_ERROR: i32 = 125;

/// How long teardown waits for the command's last output on its pty once the cgroup is empty.
const OUTPUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Exit status when the command exists but cannot be executed.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit status when the command does not exist.
pub const EXIT_NOT_FOUND: i32 = 127;

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The allowlist file (`None` only when learning: start from nothing).
    pub allowlist: Option<PathBuf>,
    /// Where event lines go (`None`: stderr).
    pub events: Option<PathBuf>,
    /// Instance name; default `run-<agent pid>`.
    pub name: Option<String>,
    /// Learn: run in audit mode and write the allowlist the command needed here.
    pub learn_output: Option<PathBuf>,
    /// Audit mode whatever the policy says: report would-be denies, allow them.
    pub audit: bool,
    /// Capabilities confinement keeps (each weakens it; reported as a warning event).
    pub keep_caps: Vec<Capability>,
    /// Leave io_uring to the command where the family guard cannot run.
    pub allow_io_uring: bool,
    /// Inherited descriptors passed to the command beside stdin, stdout and stderr.
    pub pass_fds: Vec<i32>,
    /// Trace every verdict of the programs to the agent's log (a debugging aid).
    pub trace_verdicts: bool,
    /// Ask mode's settings (`None` for `learn`).
    pub ask: Option<crate::daemon::approvals::AskConfig>,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

/// Runs the command under enforcement and returns the exit status to leave with: the
/// command's own, or 128+N when a signal N killed it.
pub async fn run(config: RunConfig) -> anyhow::Result<i32> {
    let mut policy = match &config.allowlist {
        Some(path) => policy::load(path)?,
        None => policy::parse_str("version: 1\nname: learn\nallow: []\n", Path::new("<learn>"))?,
    };
    if config.audit || config.learn_output.is_some() {
        policy.mode = Mode::Audit;
    }
    let policy_value = policy;
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "egress-agent run needs root: it creates a cgroup and attaches eBPF programs \
             (try: sudo egress-agent run ...)"
        );
    }
    // No real root in the sandbox: a command that would be root runs as root inside a user
    // namespace of its own, an unprivileged id outside (see `Confinement::prepare`).
    let (identity, root_command) = match Identity::sudo_invoker()? {
        Some(id) => (id, false),
        None => (Identity::outside_root(), true),
    };
    let mut confinement =
        Confinement::prepare(&config.keep_caps, root_command, config.allow_io_uring)?;
    // Files that would run later outside the sandbox: bound read-only, or watched.
    let home = if root_command {
        std::env::var_os("HOME").map(PathBuf::from)
    } else {
        launch::home_of(identity.uid)
    };
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let persist = Protected::find(home.as_deref(), &cwd, &policy_value.writable);
    confinement.protect(&persist.existing)?;
    // Local daemons' unix sockets out of reach, names only through the resolver.
    let view = DeputyView::prepare(
        &policy_value,
        (!root_command).then_some((identity.uid, identity.gid)),
    )?;
    let deputy_warnings = view.warnings.clone();
    let unix_judge = view.judge();
    let deny_abstract = view.hook_denied_abstract();
    confinement.close_deputies(view);
    // Installed before anything is created, so a signal during set-up still ends in teardown.
    let signals = SignalForwarder::install()?;
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| format!("run-{}", std::process::id()));
    let mut sink = EventSink::open(config.events.as_deref())?;
    if config.learn_output.is_some() {
        sink = sink.capturing();
    }
    let sink = Arc::new(sink);

    let mut cg = OwnedCgroup::create(&format!("egress-{name}"))?;
    if status::pin_dir(&name).exists() {
        bail!(
            "{} already exists: another egress-agent uses the name {name:?} (or one was \
             killed: egress-agent detach --name {name})",
            status::pin_dir(&name).display(),
        );
    }
    let session = Session::start(SessionConfig {
        name: name.clone(),
        cgroup: cg.path().to_owned(),
        policy: policy_value,
        watch: None,
        sink: sink.clone(),
        exempt_cgroup: 0,
        health: None,
        enforcer: EnforcerOptions {
            trace: config.trace_verdicts,
            // The command's seccomp filter refuses the families the tripwire's `sys_enter`
            // half watches, on the same calls and before that tracepoint: the half would never
            // fire, and would slow every system call of the machine.
            syscall_tripwire: false,
            ..EnforcerOptions::default()
        },
        protected: confinement.protected(),
        ask: config.ask.clone(),
        rejected: None,
    })
    .await?;
    match session.family_guard_missing() {
        // The BPF LSM program refuses them, and reports each attempt.
        None => confinement.leave_families_to_the_kernel(),
        Some(why) => {
            // With --allow-io-uring, io_uring's sockets pass the seccomp filter: the
            // tripwire's io_uring half is the line there (its sys_enter half is not attached,
            // see `syscall_tripwire` above). Without it, io_uring is refused too.
            if config.allow_io_uring {
                let note = match session.tripwire_state() {
                    Ok(None) => "the packet-socket tripwire watches io_uring: a process of the \
                                 command that asks for one of those families through \
                                 IORING_OP_SOCKET is killed (SIGKILL), with a deny event (hook \
                                 tripwire)"
                        .to_owned(),
                    Ok(Some(why)) | Err(why) => {
                        format!("the packet-socket tripwire does not watch io_uring: {why}")
                    }
                };
                warn(&sink, &note);
            }
            warn(
                &sink,
                &format!(
                    "the family guard (BPF LSM) cannot run here: {why}. The command's seccomp \
                     filter refuses the same socket families (AF_PACKET, AF_VSOCK, ...) \
                     instead, without deny events{}",
                    if config.allow_io_uring {
                        ""
                    } else {
                        ", and refuses io_uring (ENOSYS), whose IORING_OP_SOCKET would create \
                         sockets past that filter"
                    }
                ),
            );
            if config.allow_io_uring {
                warn(
                    &sink,
                    "confinement weakened: --allow-io-uring lets the command create sockets of \
                     any family through io_uring (IORING_OP_SOCKET, Linux 5.19+), past the \
                     seccomp family filter: AF_VSOCK to the hypervisor's host needs no \
                     capability",
                );
            }
        }
    }
    for w in &deputy_warnings {
        warn(&sink, w);
    }
    // Deny lines for the unix sockets the view refuses (Linux 6.7: the cgroup unix hooks).
    let unix_watch = match crate::daemon::unix_watch::start(
        cg.path(),
        move |a| unix_judge.refused(a),
        deny_abstract.as_deref(),
        sink.clone(),
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            warn(
                &sink,
                &format!(
                    "a unix connect or send the command's view refuses gives no deny event: \
                     the cgroup unix socket hooks cannot run here ({e:#}; they need Linux 6.7)"
                ),
            );
            None
        }
    };
    let confinement = Arc::new(confinement);
    for cap in &config.keep_caps {
        warn(
            &sink,
            &format!(
                "confinement weakened: the command keeps CAP_{}: {}",
                cap.name(),
                crate::workload::confine::risk(*cap)
            ),
        );
    }

    // A terminal of its own, when started on one (see `pty`).
    let mut pty = Pty::open_if_terminal()?;
    let terminal = pty
        .as_ref()
        .and_then(|p| p.slave_fd().map(|s| (s, p.replaced.clone())));
    let spawned = match signals.early_signal() {
        Some(sig) => Ok(Err(128 + sig)),
        None => launch::spawn_in_cgroup(
            &config.command,
            cg.path(),
            Some(&identity),
            Some(confinement.clone()),
            &config.pass_fds,
            terminal,
        )
        .map(Ok),
    };
    // The command's view holds the generated resolver files now (or it never started).
    confinement.forget_generated();
    // Sockets bound outside after the start: masked in the command's view as they appear.
    let late_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late = match (&spawned, confinement.deputy_view()) {
        (Ok(Ok(child)), Some(view)) => child.id().and_then(|pid| {
            match LateMasker::new(
                view,
                pid,
                cg.path(),
                unix_watch
                    .as_ref()
                    .and_then(|w| w.deny_map.as_ref().and_then(|m| m.try_clone().ok())),
            ) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn(
                        &sink,
                        &format!("sockets bound after the start stay reachable: {e:#}"),
                    );
                    None
                }
            }
        }),
        _ => None,
    }
    .map(|mut m| {
        let stop = late_stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for p in m.tick() {
                    tracing::debug!("masked {}, bound outside after the start", p.display());
                }
                std::thread::sleep(crate::workload::deputies::LATE_TICK);
            }
        })
    });
    let mut output = None;
    if let (Ok(Ok(_)), Some(p)) = (&spawned, pty.as_mut()) {
        output = Some(p.relay()?);
        signals.set_window(p.window_fds());
    }
    let outcome = match spawned {
        Ok(Err(code)) => Ok(code),
        Ok(Ok(mut child)) => {
            if let Some(pid) = child.id() {
                signals.set_child(pid as i32);
            }
            let status = child.wait().await.context("cannot wait for the command")?;
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        Err(e) => {
            let code = match e.downcast_ref::<SpawnError>() {
                Some(s) if s.not_found => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXECUTE,
            };
            eprintln!("egress-agent: {e:#}");
            Ok(code)
        }
    };

    // Teardown: kill leftovers first (nothing may outlive enforcement), then destroy the
    // sockets they leave behind (an orphaned connection keeps retransmitting its queued data
    // after its process is gone, and would do so unjudged once the programs are detached),
    // then stop the helpers, detach and remove.
    late_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = late {
        let _ = t.join();
    }
    cgroup::kill_all(cg.path())?;
    cgroup::wait_empty(cg.path(), std::time::Duration::from_secs(5));
    if let Some(w) = unix_watch {
        w.stop().await;
    }
    // Every copy of the pty's slave is gone with them: the last output is relayed, then the
    // caller's terminal is put back. Bounded: a copy of the slave that reached a process
    // outside the cgroup (passed over a unix socket) would keep the relay open forever, and
    // teardown must not wait on it.
    if let Some(out) = output {
        let deadline = std::time::Instant::now() + OUTPUT_DRAIN;
        while !out.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if out.is_finished() {
            let _ = out.join();
        }
    }
    if let Some(p) = &pty {
        p.restore();
    }
    for (created, aside) in persist.quarantine() {
        warn(
            &sink,
            &format!(
                "the command created {}, which would run outside the sandbox later: moved to {} \
                 (open it with writable: in the allowlist if it is wanted)",
                created.display(),
                aside.display()
            ),
        );
    }
    match crate::sys::sockdiag::destroy_cgroup_sockets(cgroup::cgroup_id(cg.path())?) {
        Ok(0) => {}
        Ok(n) => tracing::debug!("destroyed {n} sockets the command left behind"),
        Err(e) => warn(
            &sink,
            &format!(
                "cannot destroy the sockets the command left behind ({e}): an orphaned \
                 connection may send its queued data after the programs are detached \
                 (SOCK_DESTROY needs Linux >= 5.7 and CONFIG_INET_DIAG_DESTROY)"
            ),
        ),
    }
    let policy = session.dns.current_policy();
    session.stop(true).await?;
    cg.remove()?;
    if let Some(out) = &config.learn_output {
        let settings = match &config.allowlist {
            Some(base) => learn::carried_settings(&policy, base),
            None => String::new(),
        };
        write_learned(out, &sink, &config.command, &settings)?;
    }
    outcome
}

/// Forwards termination and user signals to the command. Signals the terminal sent to the
/// whole foreground process group (Ctrl-C, Ctrl-\\) already reached the command, so those are
/// not sent twice. A signal that arrives before the command exists stops the run before it
/// starts.
struct SignalForwarder {
    handle: signal_hook::iterator::Handle,
    state: Arc<ForwardState>,
}

#[derive(Default)]
struct ForwardState {
    /// The command's pid, 0 until it runs.
    child: AtomicI32,
    /// A signal that came before the command ran, 0 if none.
    early: AtomicI32,
    /// With a pty: the caller's terminal and the pty master (`terminal << 32 | master`), -1
    /// without (0 until set, which no pty pair can be).
    window: AtomicI64,
}

impl SignalForwarder {
    fn install() -> anyhow::Result<Self> {
        let mut signals = SignalsInfo::<WithOrigin>::new([
            SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH,
        ])
        .context("cannot install signal handlers")?;
        let handle = signals.handle();
        let state = Arc::new(ForwardState::default());
        let st = state.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for origin in signals.forever() {
                    let child = st.child.load(Ordering::SeqCst);
                    if child == 0 {
                        if matches!(origin.signal, SIGINT | SIGTERM | SIGHUP | SIGQUIT) {
                            st.early.store(origin.signal, Ordering::SeqCst);
                        }
                        continue;
                    }
                    let window = st.window.load(Ordering::SeqCst);
                    if window > 0 {
                        // The command has a pty of its own: the caller's terminal signals
                        // reach only us. A window change is copied to the pty (whose line
                        // discipline tells the command); the rest is passed on.
                        if origin.signal == SIGWINCH {
                            Pty::copy_window_size((window >> 32) as i32, window as i32);
                            continue;
                        }
                    } else if matches!(origin.cause, Cause::Kernel) {
                        // The terminal sent this one to its whole foreground process group:
                        // the command, in it, has it already.
                        continue;
                    }
                    // SAFETY: plain syscall to our own child's pid.
                    unsafe { libc::kill(child, origin.signal) };
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Self { handle, state })
    }

    fn set_child(&self, pid: i32) {
        self.state.child.store(pid, Ordering::SeqCst);
        // A signal may have landed between the early check and now: pass it on.
        let early = self.state.early.swap(0, Ordering::SeqCst);
        if early != 0 {
            // SAFETY: plain syscall to our own child's pid.
            unsafe { libc::kill(pid, early) };
        }
    }

    /// The command runs on a pty: `(caller's terminal, master)`.
    fn set_window(&self, (terminal, master): (i32, i32)) {
        let packed = (i64::from(terminal) << 32) | i64::from(master);
        self.state.window.store(packed, Ordering::SeqCst);
    }

    fn early_signal(&self) -> Option<i32> {
        match self.state.early.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Writes the allowlist learned from the captured events.
fn write_learned(
    out: &Path,
    sink: &EventSink,
    command: &[OsString],
    settings: &str,
) -> anyhow::Result<()> {
    let events = sink.captured();
    let observed = learn::Observed::from_events(&events);
    let shown: Vec<String> = command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "learned".into());
    let text = learn::render(
        &observed,
        &name,
        &shown.join(" "),
        &crate::events::rfc3339(SystemTime::now()),
        settings,
    );
    std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "egress-agent: learned allowlist written to {}",
        out.display()
    );
    Ok(())
}
