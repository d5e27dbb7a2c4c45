//! Names the unix connects and sends of `run`'s command that its deputy view refused, as
//! `deny` lines with `"proto":"unix"`: reads the records of `bpf::unix`'s programs and asks
//! `refused` (the view's judgement, see `workload::deputies`) about each.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

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
