//! The programs' verdict trace, a debugging aid (`run`/`attach --trace-verdicts`): the
//! programs are loaded with their read-only `TRACE` global at 1 and write one aya-log record
//! per verdict into aya-log's ring buffer (`AYA_LOGS`); [`pump`] reads them and [`VerdictLog`]
//! writes each as a line of the agent's log (stderr), at `info` under this module's target,
//! which [`directive`] lets through whatever `EGRESS_LOG` says:
//!
//! ```text
//! INFO kernel verdict: deny connect4 tcp 198.51.100.20:443 reason no-rule
//! ```
//!
//! Without the flag `TRACE` stays 0, the verifier removes the tracing code from the loaded
//! programs, the ring shrinks to one page and nothing reads it.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use aya_log::EbpfLogger;
use egress_common::{DenyEvent, consts::VERDICT_ALLOW};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};
use tracing_subscriber::filter::Directive;

use crate::events::DenyRecord;

/// The reader of the programs' aya-log ring buffer.
pub type Logger = EbpfLogger<VerdictLog>;

/// The read-only global of the eBPF object that switches tracing on (`egress-ebpf`'s
/// `programs/trace.rs`).
pub const GLOBAL: &str = "TRACE";

/// aya-log's ring buffer map.
pub const MAP: &str = "AYA_LOGS";

/// The smallest ring buffer the kernel accepts: one page.
pub fn page_size() -> u32 {
    // SAFETY: no arguments.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// The filter directive that shows the trace lines: they exist only when asked for
/// (`--trace-verdicts`), so they are let through whatever `EGRESS_LOG` says.
pub fn directive() -> Directive {
    concat!(module_path!(), "=info")
        .parse()
        .expect("a valid directive")
}

/// Starts reading the trace of the programs in `ebpf` (loaded with `TRACE` at 1).
pub fn logger(ebpf: &mut aya::Ebpf) -> Result<Logger, aya_log::Error> {
    EbpfLogger::init_with_logger(ebpf, VerdictLog)
}

/// Writes the trace records as they arrive until `stop` turns true, then what is left.
pub async fn pump(logger: Logger, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    // SAFETY: the logger owns the ring buffer's fd and is moved into the AsyncFd, which
    // deregisters it before dropping it (the I/O-safety condition of `register`).
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = stop.wait_for(|s| *s) => {
                fd.get_mut().flush();
                return Ok(());
            }
        }
    }
}

/// Names the fields of a record (hook, protocol, reason, as in the event lines) and writes
/// it to the log.
#[derive(Debug, Clone, Copy)]
pub struct VerdictLog;

impl log::Log for VerdictLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        match line(&text) {
            Some(line) => tracing::info!("kernel verdict: {line}"),
            // Not a verdict record (none other is written today): as it came.
            None => tracing::info!("kernel: {text}"),
        }
    }

    fn flush(&self) {}
}

/// The line for a record `verdict V hook H proto P dst A port N reason R` (the format of
/// `egress-ebpf`'s `programs/trace.rs`): `deny connect4 tcp 198.51.100.20:443 reason
/// no-rule`.
pub fn line(text: &str) -> Option<String> {
    let mut f = text.split(' ');
    let mut field = |name: &str| match (f.next(), f.next()) {
        (Some(n), Some(v)) if n == name => Some(v),
        _ => None,
    };
    let verdict: i32 = field("verdict")?.parse().ok()?;
    let hook: u8 = field("hook")?.parse().ok()?;
    let ip_proto: u8 = field("proto")?.parse().ok()?;
    let dst: Ipv6Addr = field("dst")?.parse().ok()?;
    let port: u16 = field("port")?.parse().ok()?;
    let reason: u8 = field("reason")?.parse().ok()?;
    let allowed = reason == 0;
    let event = DenyEvent {
        ts_ns: 0,
        cgroup_id: 0,
        pid: 0,
        tid: 0,
        uid: 0,
        gid: 0,
        addr: dst.octets(),
        port,
        ip_proto,
        hook,
        reason,
        audited: u8::from(!allowed && verdict == VERDICT_ALLOW),
        _pad: [0; 2],
        comm: [0; 16],
    };
    let r = DenyRecord::from_kernel(&event, Duration::ZERO);
    let dst = match r.dst {
        IpAddr::V4(a) => format!("{a}:{}", r.port),
        IpAddr::V6(a) => format!("[{a}]:{}", r.port),
    };
    let (verdict, reason) = if allowed {
        ("allow", "-")
    } else {
        (r.verdict, r.reason)
    };
    Some(format!(
        "{verdict} {} {} {dst} reason {reason}",
        r.hook, r.proto
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_named_as_in_the_event_lines() {
        let cases = [
            (
                "verdict 0 hook 1 proto 6 dst ::ffff:198.51.100.20 port 443 reason 1",
                "deny connect4 tcp 198.51.100.20:443 reason no-rule",
            ),
            (
                "verdict 1 hook 4 proto 17 dst 2001:db8::1 port 53 reason 0",
                "allow sendmsg6 udp [2001:db8::1]:53 reason -",
            ),
            (
                "verdict 1 hook 6 proto 6 dst ::ffff:192.0.2.1 port 80 reason 2",
                "audit egress tcp 192.0.2.1:80 reason port",
            ),
        ];
        for (record, want) in cases {
            assert_eq!(line(record).as_deref(), Some(want), "{record}");
        }
    }

    #[test]
    fn another_record_is_not_a_verdict() {
        assert_eq!(line("verdict 0 hook 1"), None);
        assert_eq!(line("something else"), None);
        assert_eq!(
            line("verdict 0 hook 1 proto 6 dst nonsense port 443 reason 1"),
            None
        );
    }
}
