//! Names the unix connects and sends of `run`'s command that its deputy view refused, as
//! `deny` lines with `"proto":"unix"`: reads the records of `bpf::unix`'s programs and asks
//! `refused` (the view's judgement, see `workload::deputies`) about each. Under `attach` with
//! `unix:` rules, [`AbstractGuard`] has the programs refuse abstract names bound outside the
//! cgroup, and names those refusals the same way.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    bpf::unix::{UnixAttempt, UnixTarget, UnixWatch},
    events::{Event, EventSink},
};

/// At most this many lines a second for one (process, address, hook): a loop retrying a
/// refused connect does not flood the log.
const PER_SECOND: u32 = 10;

/// Writes a `deny` line for each refused attempt until `stop` turns true, then drains what
/// is queued.
pub async fn pump(
    watch: UnixWatch,
    refused: impl Fn(&UnixAttempt) -> bool,
    cgroup_id: u64,
    sink: Arc<EventSink>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // The ring moves into the AsyncFd; the programs stay attached while `watch` lives.
    let (ring, links) = watch.into_parts();
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters it
    // before dropping it.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    let mut seen: HashMap<(u32, String, &'static str), (Instant, u32)> = HashMap::new();
    let mut out = |a: UnixAttempt| {
        if !refused(&a) {
            return;
        }
        let dst = match &a.target {
            UnixTarget::Path(p) => p.clone(),
            UnixTarget::Abstract(n) => format!("@{n}"),
            UnixTarget::Unnamed => return,
        };
        let now = Instant::now();
        let slot = seen.entry((a.pid, dst.clone(), a.hook)).or_insert((now, 0));
        if now.duration_since(slot.0) > Duration::from_secs(1) {
            *slot = (now, 0);
        }
        slot.1 += 1;
        if slot.1 > PER_SECOND {
            return;
        }
        sink.emit(&Event::UnixDeny {
            ts: SystemTime::now(),
            proto: "unix",
            dst: &dst,
            pid: a.pid,
            tid: a.tid,
            comm: &a.comm,
            uid: a.uid,
            gid: a.gid,
            cgroup: cgroup_id,
            reason: "no-rule",
            hook: a.hook,
        });
    };
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(a) = UnixAttempt::decode(&item) {
                        drop(item);
                        out(a);
                    }
                }
                guard.clear_ready();
            }
            _ = stop.wait_for(|s| *s) => {
                let ring = fd.get_mut();
                for _ in 0..1024 {
                    let Some(item) = ring.next() else { break };
                    if let Some(a) = UnixAttempt::decode(&item) {
                        drop(item);
                        out(a);
                    }
                }
                drop(links);
                return Ok(());
            }
        }
    }
}

/// The running watch: stop it after the command exited.
pub struct Running {
    /// The abstract deny map, when the programs judge abstract names.
    pub deny_map: Option<std::os::fd::OwnedFd>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Drains what is queued and detaches the programs.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Err(e)) => tracing::warn!("unix watch: {e:#}"),
            Err(e) => tracing::warn!("unix watch: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// Attaches the unix watch to `cgroup` (refusing the abstract names of `deny_abstract`) and
/// starts writing `deny` lines for what `refused` says was refused. Fails where the kernel has no unix socket hooks (before 6.7).
pub fn start(
    cgroup: &std::path::Path,
    refused: impl Fn(&UnixAttempt) -> bool + Send + Sync + 'static,
    deny_abstract: Option<&[Vec<u8>]>,
    sink: Arc<EventSink>,
) -> anyhow::Result<Running> {
    let watch = crate::bpf::unix::attach(cgroup, deny_abstract)?;
    let deny_map = watch.deny_map();
    let cgroup_id = crate::sys::cgroup::cgroup_id(cgroup)?;
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(pump(watch, refused, cgroup_id, sink, rx));
    Ok(Running {
        deny_map,
        stop,
        task,
    })
}

/// `attach` with `unix:` rules (issue 15): the hooks refuse connects and sends from the
/// cgroup to the abstract names that processes outside it bound in the network namespaces of
/// its processes (another container of the pod, say), unless a rule names them. Looked for
/// every 100 ms: a name bound outside is reachable until the next look, and nothing is
/// refused once the agent has stopped (the hooks are not pinned). Paths are not judged under
/// attach.
pub struct AbstractGuard {
    running: Running,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often [`AbstractGuard`] looks for names bound outside.
const GUARD_TICK: Duration = Duration::from_millis(100);

impl AbstractGuard {
    /// Attaches the hooks to `cgroup`, refusing the names bound outside now, and starts
    /// looking for new ones. `named`: the names the rules allow.
    pub fn start(
        cgroup: &Path,
        named: BTreeSet<String>,
        sink: Arc<EventSink>,
    ) -> anyhow::Result<Self> {
        let first = outside_abstract(cgroup, &named);
        let keys: Vec<Vec<u8>> = first.iter().map(|n| n.as_bytes().to_vec()).collect();
        let denied = Arc::new(Mutex::new(first));
        let judged = denied.clone();
        let running = start(
            cgroup,
            move |a| {
                matches!(&a.target, UnixTarget::Abstract(n)
                    if judged.lock().is_ok_and(|d| d.contains(n)))
            },
            Some(&keys),
            sink,
        )?;
        let map = (running.deny_map.as_ref())
            .and_then(|m| m.try_clone().ok())
            .context("no deny map")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (halt, cgroup) = (stop.clone(), cgroup.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                std::thread::sleep(GUARD_TICK);
                for n in outside_abstract(&cgroup, &named) {
                    if !denied.lock().is_ok_and(|mut d| d.insert(n.clone())) {
                        continue;
                    }
                    if let Err(e) = crate::bpf::unix::deny_abstract(&map, n.as_bytes()) {
                        tracing::warn!("cannot refuse @{n}, bound outside the cgroup: {e}");
                    }
                }
            }
        });
        Ok(Self {
            running,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops looking and detaches the hooks.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.running.stop().await;
    }
}

/// The abstract names bound in the network namespaces of `cgroup`'s processes (and its
/// children's) by sockets none of them holds, less `named`.
fn outside_abstract(cgroup: &Path, named: &BTreeSet<String>) -> BTreeSet<String> {
    use std::os::unix::fs::MetadataExt as _;
    let pids = crate::sys::unix::cgroup_tree_pids(cgroup);
    let held = crate::sys::unix::held_sockets(pids.iter().map(String::as_str));
    let (mut namespaces, mut out) = (BTreeSet::new(), BTreeSet::new());
    for pid in &pids {
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !namespaces.insert((ns.dev(), ns.ino())) {
            continue;
        }
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
        for (inode, name) in crate::sys::unix::named_sockets(&table) {
            if let Some(n) = name.strip_prefix('@')
                && !held.contains(&inode)
                && !named.contains(n)
            {
                out.insert(n.to_owned());
            }
        }
    }
    out
}
