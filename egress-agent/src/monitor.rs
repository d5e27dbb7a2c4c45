//! Reads deny records from the kernel's ring buffer and writes them as event lines.

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    events::{DenyRecord, Event, EventSink},
    explain,
    metrics::Metrics,
    names::Names,
    resolver::DnsContext,
};

/// Forwards deny records to `sink` until `stop` turns true, then drains what is left, so a
/// deny that happened just before the command exited is still reported.
pub async fn pump(
    ring: RingBuf<MapData>,
    boot_offset: Duration,
    sink: Arc<EventSink>,
    names: Names,
    metrics: Arc<Metrics>,
    policy: Arc<DnsContext>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which deregisters it
    // before dropping it (the I/O-safety condition of `register`).
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), boot_offset, &sink, &names, &metrics, &policy);
                guard.clear_ready();
            }
            _ = stop.wait_for(|s| *s) => {
                drain(fd.get_mut(), boot_offset, &sink, &names, &metrics, &policy);
                return Ok(());
            }
        }
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    boot_offset: Duration,
    sink: &EventSink,
    names: &Names,
    metrics: &Metrics,
    policy: &DnsContext,
) {
    while let Some(item) = ring.next() {
        match DenyRecord::from_bytes(&item, boot_offset) {
            Some(mut rec) => {
                rec.host = names.lookup(&rec.dst);
                if rec.reason == "port" {
                    rec.near_rule = explain::nearest_rule(
                        &policy.current_policy(),
                        rec.dst,
                        rec.host.as_deref(),
                    );
                }
                metrics.deny(rec.reason);
                if let Ok(v) = serde_json::to_value(&rec) {
                    metrics.remember(v);
                }
                if rec.verdict == "audit" {
                    sink.emit(&Event::Audit(&rec));
                } else {
                    sink.emit(&Event::Deny(&rec));
                }
            }
            None => tracing::warn!("short record ({} bytes) in the events ring", item.len()),
        }
    }
}
