//! `egress-agent attach`: enforce on an existing cgroup (a Kubernetes pod's, found from its
//! UID) until stopped. The agent's own cgroup, when it lies inside the enforced one (a sidecar
//! container of the pod), is exempted so that its resolver can reach upstream; nothing else is.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};

use crate::{
    bpf::{enforcer::EnforcerOptions, rules::ApplyError},
    daemon::lastgood,
    daemon::reload::Rejected,
    daemon::session::{self, Session, SessionConfig},
    daemon::status,
    events::EventSink,
    policy,
    sys::cgroup,
};

/// What `attach` needs.
#[derive(Debug, Clone)]
pub struct AttachConfig {
    /// The cgroup: absolute, or relative to the cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
    /// Or the pod whose cgroup to find.
    pub pod_uid: Option<String>,
    /// Where the host's cgroup v2 hierarchy is mounted (default: found in /proc/mounts).
    pub cgroup_root: Option<PathBuf>,
    /// The allowlist (watched for changes).
    pub allowlist: PathBuf,
    /// Event lines go here (default stderr).
    pub events: Option<PathBuf>,
    /// Instance name (pins under /sys/fs/bpf/egress/<name>).
    pub name: Option<String>,
    /// Health endpoints.
    pub health: Option<SocketAddr>,
    /// Detach on SIGTERM/SIGINT instead of leaving enforcement in place.
    pub detach_on_exit: bool,
    /// Trace every verdict of the programs to the agent's log (a debugging aid).
    pub trace_verdicts: bool,
    /// /readyz fails while CAP_NET_RAW or a packet socket is found in the cgroup.
    pub require_no_raw: bool,
    /// The tripwire kills at any io_uring system call of the cgroup (where it is armed).
    pub refuse_io_uring: bool,
    /// Ask mode's settings.
    pub ask: Option<crate::daemon::approvals::AskConfig>,
}

/// Runs until SIGTERM or SIGINT; returns the exit status.
pub async fn attach(cfg: AttachConfig) -> anyhow::Result<i32> {
    let root = match &cfg.cgroup_root {
        Some(r) => r.clone(),
        None => cgroup::cgroup2_mount()?,
    };
    let target = match (&cfg.cgroup, &cfg.pod_uid) {
        (Some(c), None) => {
            let p = if c.is_absolute() {
                c.clone()
            } else {
                root.join(c)
            };
            if !p.join("cgroup.procs").exists() {
                bail!("{} is not a cgroup v2 directory", p.display());
            }
            p
        }
        (None, Some(uid)) => find_pod_cgroup(&root, uid)?,
        (Some(_), Some(_)) => bail!("give --cgroup or --pod-uid, not both"),
        (None, None) => bail!("give --cgroup PATH or --pod-uid UID (or set POD_UID)"),
    };
    let target = fs::canonicalize(&target)
        .with_context(|| format!("cannot resolve {}", target.display()))?;
    if target == fs::canonicalize(&root).unwrap_or(root.clone()) {
        bail!(
            "refusing to attach to the cgroup v2 root ({}): every process of the machine lives \
             there",
            target.display()
        );
    }
    let own = own_cgroup_within(&target);
    if own.as_deref() == Some(target.as_path()) {
        bail!(
            "the agent is itself a member of {} and cannot exempt the whole cgroup it enforces: \
             run it in a cgroup of its own (a sidecar container has one)",
            target.display()
        );
    }
    let watch = crate::daemon::raw_watch::RawWatch {
        cgroup: target.clone(),
        own: own.clone(),
    };
    let exempt = match &own {
        Some(p) => cgroup::cgroup_id(p)?,
        None => 0,
    };
    let name = cfg.name.clone().unwrap_or_else(|| match &cfg.pod_uid {
        Some(uid) => format!("pod-{uid}"),
        None => target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "attach".into()),
    });
    // A pinned state of this name: an earlier agent enforces still, under the last valid
    // policy it kept; a bad file then must not take DNS down with this agent.
    let pinned = status::pin_dir(&name).join("maps").exists();
    let (policy, rejected) = match policy::load(&cfg.allowlist) {
        Ok(p) => (p, None),
        Err(e) if pinned => match lastgood::load(&name) {
            Ok(p) => (p, Some(Rejected::invalid(&cfg.allowlist, &e))),
            Err(why) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "the allowlist is invalid and no last valid policy is kept beside the pins of \
                     {name:?} ({why:#}); enforcement stays pinned"
                )));
            }
        },
        Err(e) => return Err(e.into()),
    };
    let sink = Arc::new(EventSink::open(cfg.events.as_deref())?);
    let stop = StopSignals::install()?;
    let config = |policy, rejected| SessionConfig {
        name: name.clone(),
        cgroup: target.clone(),
        policy,
        watch: Some(cfg.allowlist.clone()),
        sink: sink.clone(),
        exempt_cgroup: exempt,
        health: cfg.health,
        enforcer: EnforcerOptions {
            trace: cfg.trace_verdicts,
            refuse_io_uring: cfg.refuse_io_uring,
            ..EnforcerOptions::default()
        },
        protected: Vec::new(),
        ask: cfg.ask.clone(),
        rejected,
    };
    let session = match Session::start(config(policy, rejected.clone())).await {
        Ok(s) => s,
        // A valid file the adopted maps did not take (rolled back whole): run under the last
        // valid policy rather than leave the cgroup without DNS.
        Err(e) if pinned && rejected.is_none() && e.downcast_ref::<ApplyError>().is_some() => {
            let why = Rejected::unapplied(&cfg.allowlist, &e);
            let last = lastgood::load(&name)
                .map_err(|no| e.context(format!("and no last valid policy is kept ({no:#})")))?;
            Session::start(config(last, Some(why))).await?
        }
        Err(e) => return Err(e),
    };
    // Unlike `run`, attach cannot confine the workload: say what the runtime must provide.
    let net_raw = match session.family_guard_missing() {
        None => "",
        Some(why) => {
            session::warn(
                &sink,
                &format!(
                    "socket families other than unix, inet, inet6, netlink and alg (AF_PACKET, \
                     AF_VSOCK, ...) are not refused by the kernel here: {why}"
                ),
            );
            let state = session.tripwire_state();
            let armed = state.is_ok();
            session::warn(&sink, &tripwire_note(state, cfg.refuse_io_uring));
            // Packet sockets then bypass every cgroup program; the tripwire kills at their
            // creation, but not what one io_uring submission sends with it, nor a socket
            // opened before the agent attached.
            if armed {
                "CAP_NET_RAW (drop it from the app container: the tripwire kills a process that \
                 opens a packet socket, but sockets opened before the agent attached, and \
                 without --refuse-io-uring sends in the io_uring submission that created one, \
                 bypass every cgroup program), "
            } else {
                "CAP_NET_RAW (drop it from the app container: packet sockets bypass every cgroup \
                 program here), "
            }
        }
    };
    session::warn(
        &sink,
        &format!(
            "the enforced processes must not hold {net_raw}CAP_SYS_ADMIN, CAP_NET_ADMIN or \
             CAP_BPF, and must see the cgroup filesystem read-only"
        ),
    );
    let policy_now = session.dns.current_policy();
    let unix_rules: Vec<String> = (policy_now.unix_names().iter())
        .map(|u| u.to_string())
        .collect();
    // With unix rules, the hooks refuse abstract names bound outside the cgroup.
    let guard = if unix_rules.is_empty() {
        None
    } else {
        let named = (policy_now.unix_names().into_iter())
            .filter_map(|u| match u {
                crate::policy::UnixName::Abstract(n) => Some(n.clone()),
                crate::policy::UnixName::Path(_) => None,
            })
            .collect();
        match crate::daemon::unix_watch::AbstractGuard::start(&target, named, sink.clone()) {
            Ok(g) => Some(g),
            Err(e) => {
                session::warn(
                    &sink,
                    &format!(
                        "abstract unix sockets are not judged either: the cgroup unix socket \
                         hooks cannot run here ({e:#}; they need Linux 6.7)"
                    ),
                );
                None
            }
        }
    };
    session::warn(&sink, &unix_open(&unix_rules, guard.is_some()));
    let watcher =
        tokio::spawn(watch.run(sink.clone(), session.metrics.clone(), cfg.require_no_raw));
    stop.wait().await;
    watcher.abort();
    if let Some(g) = guard {
        g.stop().await;
    }
    session.stop(cfg.detach_on_exit).await?;
    Ok(0)
}

/// What the packet-socket tripwire does where the family guard cannot run.
fn tripwire_note(state: Result<Option<String>, String>, refuse_io_uring: bool) -> String {
    match state {
        Ok(None) if refuse_io_uring => "the packet-socket tripwire is armed instead: a process \
                     of the cgroup that asks for one of those families (socket, socketpair), \
                     or makes any io_uring system call (--refuse-io-uring), is killed (SIGKILL) \
                     before the socket or the ring exists, with a deny event (hook tripwire)"
            .to_owned(),
        Ok(None) => "the packet-socket tripwire is armed instead: a process of the cgroup that \
                     asks for one of those families (socket, socketpair, io_uring's \
                     IORING_OP_SOCKET) is killed (SIGKILL) before the socket exists, with a \
                     deny event (hook tripwire); sends in the io_uring submission that made \
                     the socket still leave (--refuse-io-uring closes io_uring)"
            .to_owned(),
        Ok(Some(why)) => format!(
            "the packet-socket tripwire is armed instead: a process of the cgroup that asks \
             for one of those families through socket or socketpair is killed (SIGKILL) before \
             the socket exists, with a deny event (hook tripwire); io_uring's IORING_OP_SOCKET \
             is not watched ({why})"
        ),
        Err(why) => format!("the packet-socket tripwire is not armed either: {why}"),
    }
}

/// What stays open to unix sockets under `attach` (issue 15): paths are not judged; abstract
/// names only with `unix:` rules (`guarded`: the hooks refuse the others bound outside).
fn unix_open(rules: &[String], guarded: bool) -> String {
    if guarded {
        return format!(
            "unix sockets bound by path are not judged under attach: the enforced processes \
             reach every one their mount namespace shows (the unix: rules for paths take \
             effect only under run); abstract names bound outside the cgroup are refused \
             unless a rule names them ({}), one bound later from the agent's next look (every \
             100 ms), and none once the agent has stopped",
            rules.join(", ")
        );
    }
    let mut m = "unix sockets are not judged under attach: the enforced processes reach every \
                 unix socket their mount and network namespaces show (a daemon there can act \
                 for them); run keeps them out of reach"
        .to_string();
    if !rules.is_empty() {
        m.push_str(&format!(
            "; the unix: rules ({}) take effect only under run",
            rules.join(", ")
        ));
    }
    m
}

/// SIGTERM and SIGINT, caught from before the session starts: a stop request that arrives
/// right after the `ready` line must end in an orderly stop, not the default disposition.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The cgroup below (or equal to) `target` whose `cgroup.procs` lists this process, if any.
/// Works inside a container's cgroup namespace too: the pid is read in our own pid namespace.
fn own_cgroup_within(target: &Path) -> Option<PathBuf> {
    let me = std::process::id().to_string();
    let mut stack = vec![(target.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs"))
            && procs.lines().any(|l| l.trim() == me)
        {
            return Some(dir);
        }
        if depth >= 8 {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    None
}

/// Finds a pod's cgroup under the kubelet's layouts: the systemd driver
/// (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`, uid dashes
/// as underscores) and the cgroupfs driver (`kubepods/burstable/pod<uid>`), for the
/// guaranteed (directly under kubepods), burstable and besteffort QoS classes.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> anyhow::Result<PathBuf> {
    let uid = uid.trim();
    if uid.is_empty()
        || !uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
    {
        bail!("{uid:?} is not a pod UID");
    }
    let found: Vec<PathBuf> = pod_cgroup_candidates(uid)
        .into_iter()
        .map(|rel| root.join(rel))
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no cgroup for pod {uid} under {} (looked for the systemd and cgroupfs kubelet \
             layouts; is the host's cgroup v2 hierarchy mounted there?)",
            root.display()
        ),
        many => bail!(
            "several cgroups match pod {uid}: {}",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Relative paths where the kubelet puts a pod's cgroup.
pub fn pod_cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let dashed = uid.replace('_', "-");
    let under = uid.replace('-', "_");
    let mut out = vec![
        PathBuf::from(format!("kubepods.slice/kubepods-pod{under}.slice")),
        PathBuf::from(format!("kubepods/pod{dashed}")),
    ];
    for qos in ["burstable", "besteffort"] {
        out.push(PathBuf::from(format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{under}.slice"
        )));
        out.push(PathBuf::from(format!("kubepods/{qos}/pod{dashed}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1f2e3d4c-0000-4111-8222-333344445555";

    fn tree(rel: &str) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join(rel);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("cgroup.procs"), "").unwrap();
        (d, p)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("egress-attach-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn systemd_driver_layouts_are_found() {
        for rel in [
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_0000_4111_8222_333344445555.slice",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e3d4c_0000_4111_8222_333344445555.slice",
            "kubepods.slice/kubepods-pod1f2e3d4c_0000_4111_8222_333344445555.slice",
        ] {
            let (d, p) = tree(rel);
            assert_eq!(find_pod_cgroup(&d.0, UID).unwrap(), p, "{rel}");
        }
    }

    #[test]
    fn cgroupfs_driver_layouts_are_found() {
        for rel in [
            "kubepods/burstable/pod1f2e3d4c-0000-4111-8222-333344445555",
            "kubepods/besteffort/pod1f2e3d4c-0000-4111-8222-333344445555",
            "kubepods/pod1f2e3d4c-0000-4111-8222-333344445555",
        ] {
            let (d, p) = tree(rel);
            assert_eq!(find_pod_cgroup(&d.0, UID).unwrap(), p, "{rel}");
        }
    }

    #[test]
    fn a_missing_pod_or_a_bad_uid_is_a_clear_error() {
        let (d, _) = tree("kubepods/burstable/podother");
        let e = find_pod_cgroup(&d.0, UID).unwrap_err().to_string();
        assert!(e.contains("no cgroup for pod"), "{e}");
        let e = find_pod_cgroup(&d.0, "../../etc").unwrap_err().to_string();
        assert!(e.contains("is not a pod UID"), "{e}");
    }
}
