//! Reads deny records from the kernel's ring buffer and writes them as event lines, within
//! the bounds of [`crate::daemon::throttle`].

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    daemon::throttle::{Throttle, Untracked},
    dns::DnsContext,
    dns::names::Names,
    events::{DenyRecord, Event, EventSink, raw_event, reason_name},
    metrics::Metrics,
    policy::explain,
};

/// Forwards deny records to `sink` until `stop` turns true, then drains what is left, so a
/// deny that happened just before the command exited is still reported.
/// `ring`: the event ring and the boot-to-wall-clock offset of its timestamps.
pub async fn pump(
    (ring, boot_offset): (RingBuf<MapData>, Duration),
    sink: Arc<EventSink>,
    names: Names,
    metrics: Arc<Metrics>,
    policy: Arc<DnsContext>,
    workload: crate::sys::cgroup::Subtree,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters it
    // before dropping it (the I/O-safety condition of `register`).
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    let out = Out {
        boot_offset,
        sink: &sink,
        names: &names,
        metrics: &metrics,
        policy: &policy,
        workload: std::cell::RefCell::new(workload),
    };
    let mut throttle = Throttle::new(Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Records the kernel could not queue (ring full) before this agent: not ours to report.
    let mut lost = ring_drops(&policy);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                if drain(guard.get_inner_mut(), boot_offset, &out, &mut throttle, BATCH) {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                out.summaries(&mut throttle, false);
                out.ring_full(&mut lost);
            }
            _ = stop.wait_for(|s| *s) => {
                // What is queued now, not a flood that goes on after the stop.
                for _ in 0..16 {
                    if drain(fd.get_mut(), boot_offset, &out, &mut throttle, BATCH) {
                        break;
                    }
                }
                out.summaries(&mut throttle, true);
                out.ring_full(&mut lost);
                return Ok(());
            }
        }
    }
}

/// Where deny lines go.
struct Out<'a> {
    boot_offset: Duration,
    sink: &'a EventSink,
    names: &'a Names,
    metrics: &'a Metrics,
    policy: &'a DnsContext,
    /// The enforced cgroup and those below it (see [`DenyRecord::attribute`]).
    workload: std::cell::RefCell<crate::sys::cgroup::Subtree>,
}

impl Out<'_> {
    /// Names the host and the nearest rule, keeps the line for `status`, writes it.
    fn write(&self, mut rec: DenyRecord) {
        rec.attribute(&mut self.workload.borrow_mut());
        rec.host = self.names.lookup(&rec.dst);
        if rec.reason == "port" {
            rec.near_rule =
                explain::nearest_rule(&self.policy.current_policy(), rec.dst, rec.host.as_deref());
        }
        if let Ok(v) = serde_json::to_value(&rec) {
            self.metrics.remember(v);
        }
        if rec.verdict == "audit" {
            self.sink.emit(&Event::Audit(&rec));
        } else {
            self.sink.emit(&Event::Deny(&rec));
            crate::daemon::approvals::raise_for_deny(self.policy, &rec);
        }
    }

    /// Writes the lines for what the throttle held back, once a second (`force`: now).
    fn summaries(&self, throttle: &mut Throttle, force: bool) {
        let (held, Untracked(untracked)) = throttle.flush(Instant::now(), force);
        for (e, repeats) in held {
            let mut rec = DenyRecord::from_kernel(&e, self.boot_offset);
            rec.repeats = Some(repeats);
            self.write(rec);
        }
        if untracked > 0 {
            self.sink.emit(&Event::DeniesUnrecorded {
                ts: SystemTime::now(),
                count: untracked,
                cause: "throttle",
            });
        }
    }

    /// Writes how many deny records the kernel could not queue since `lost` (its ring-full
    /// counter) was read, and moves `lost` on.
    fn ring_full(&self, lost: &mut u64) {
        let now = ring_drops(self.policy);
        if now > *lost {
            self.sink.emit(&Event::DeniesUnrecorded {
                ts: SystemTime::now(),
                count: now - *lost,
                cause: "ring-full",
            });
            *lost = now;
        }
    }
}

/// The kernel's count of deny records lost to a full ring (0 if it cannot be read).
fn ring_drops(ctx: &DnsContext) -> u64 {
    ctx.enforcer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .counters()
        .map_or(0, |c| c.ringbuf_drop)
}

/// Records read per turn, so that a flood that keeps the ring full still lets the summaries
/// (and the rest of the agent) run.
const BATCH: usize = 4096;

/// Reads at most `max` records; whether the ring is empty.
fn drain(
    ring: &mut RingBuf<MapData>,
    boot_offset: Duration,
    out: &Out,
    throttle: &mut Throttle,
    max: usize,
) -> bool {
    for _ in 0..max {
        let Some(item) = ring.next() else {
            return true;
        };
        let Some(e) = raw_event(&item) else {
            tracing::warn!("short record ({} bytes) in the events ring", item.len());
            continue;
        };
        if let Some(sock) = crate::events::refused_flight(&item) {
            // Before the throttle: every refused connection is reset, reported or not.
            if let Err(err) = crate::sys::sockdiag::destroy_tcp(&sock) {
                tracing::debug!("cannot reset the refused connection {sock:?}: {err}");
            }
        }
        out.metrics.deny(reason_name(e.reason));
        if throttle.admit(&e) {
            let mut rec = DenyRecord::from_kernel(&e, boot_offset);
            rec.add_name(&item);
            out.write(rec);
        }
    }
    false
}
