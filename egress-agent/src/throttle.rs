//! Bounds the deny lines a flood can produce. A process that retries one denied destination
//! in a loop (or a hijacked agent scanning) must not fill the disk nor take the CPU from the
//! workload: per second, each distinct deny (same process, destination, port, protocol, hook,
//! reason and verdict) gets its first [`PER_KEY`] lines, and all denies together at most
//! [`PER_SECOND`]. What is held back is counted, and once a second each such deny gets one more
//! line whose `repeats` field says how many identical denies it stands for. Summing `repeats`
//! (1 where absent) over the lines gives every deny; the kernel counters count them too.
//!
//! Pure bookkeeping: the caller decides what a line is and writes it.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::events::DenyRecord;

/// Lines per second for one distinct deny before it is summarized.
pub const PER_KEY: u32 = 10;
/// Lines per second for all denies together.
pub const PER_SECOND: u32 = 1000;
/// Distinct denies tracked in one second; beyond, held-back denies are only counted.
pub const MAX_KEYS: usize = 4096;
const WINDOW: Duration = Duration::from_secs(1);

/// What identifies "the same deny".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    pid: u32,
    dst: IpAddr,
    port: u16,
    proto: String,
    hook: &'static str,
    reason: &'static str,
    verdict: &'static str,
}

impl Key {
    fn of(r: &DenyRecord) -> Self {
        Self {
            pid: r.pid,
            dst: r.dst,
            port: r.port,
            proto: r.proto.clone(),
            hook: r.hook,
            reason: r.reason,
            verdict: r.verdict,
        }
    }
}

#[derive(Debug)]
struct Seen {
    lines: u32,
    held: u64,
    /// The latest held-back record, written with `repeats` at the end of the second.
    last: Option<DenyRecord>,
}

/// The throttle's state.
#[derive(Debug)]
pub struct Throttle {
    window_start: Instant,
    lines: u32,
    seen: HashMap<Key, Seen>,
    /// Held back while [`MAX_KEYS`] distinct denies were already tracked.
    untracked: u64,
}

/// Denies held back without a record to summarize them (more distinct denies than
/// [`MAX_KEYS`] in one second).
#[derive(Debug, PartialEq, Eq)]
pub struct Untracked(pub u64);

impl Throttle {
    /// A throttle whose first second starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            lines: 0,
            seen: HashMap::new(),
            untracked: 0,
        }
    }

    /// Whether `rec` gets a line of its own; if not, it is counted. Call [`Throttle::flush`]
    /// first when a second may have passed.
    pub fn admit(&mut self, rec: &DenyRecord) -> bool {
        let key = Key::of(rec);
        let tracked = self.seen.len();
        let seen = match self.seen.get_mut(&key) {
            Some(s) => s,
            None if tracked >= MAX_KEYS => {
                if self.lines < PER_SECOND {
                    self.lines += 1;
                    return true;
                }
                self.untracked += 1;
                return false;
            }
            None => self.seen.entry(key).or_insert(Seen {
                lines: 0,
                held: 0,
                last: None,
            }),
        };
        if seen.lines < PER_KEY && self.lines < PER_SECOND {
            seen.lines += 1;
            self.lines += 1;
            return true;
        }
        seen.held += 1;
        seen.last = Some(rec.clone());
        false
    }

    /// When a second has passed since the window began (or `force`, at the end): the
    /// summary lines for what was held back (each record carries `repeats`), and the count
    /// held back without a record; then a new second begins.
    pub fn flush(&mut self, now: Instant, force: bool) -> (Vec<DenyRecord>, Untracked) {
        if !force && now.duration_since(self.window_start) < WINDOW {
            return (Vec::new(), Untracked(0));
        }
        let mut out = Vec::new();
        for (_, s) in self.seen.drain() {
            if let Some(mut rec) = s.last
                && s.held > 0
            {
                rec.repeats = Some(s.held);
                out.push(rec);
            }
        }
        out.sort_by_key(|r| r.ts);
        let untracked = Untracked(std::mem::take(&mut self.untracked));
        self.window_start = now;
        self.lines = 0;
        (out, untracked)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn rec(pid: u32, port: u16) -> DenyRecord {
        DenyRecord {
            ts: SystemTime::UNIX_EPOCH,
            proto: "tcp".into(),
            dst: "198.51.100.20".parse().unwrap(),
            port,
            pid,
            tid: pid,
            comm: "flood".into(),
            uid: 0,
            gid: 0,
            cgroup: 1,
            reason: "no-rule",
            hook: "connect4",
            verdict: "deny",
            host: None,
            near_rule: None,
            repeats: None,
        }
    }

    #[test]
    fn a_repeated_deny_gets_its_first_lines_then_one_summary_a_second() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        let admitted = (0..1000).filter(|_| t.admit(&rec(7, 443))).count();
        assert_eq!(admitted, PER_KEY as usize);
        // Another destination is not held back by the first one's flood.
        assert!(t.admit(&rec(7, 80)));
        assert_eq!(t.flush(t0 + Duration::from_millis(500), false).0, vec![]);
        let (summary, untracked) = t.flush(t0 + WINDOW, false);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].repeats, Some(1000 - u64::from(PER_KEY)));
        assert_eq!(summary[0].port, 443);
        assert_eq!(untracked, Untracked(0));
        // A new second: lines again.
        assert!(t.admit(&rec(7, 443)));
    }

    #[test]
    fn every_deny_is_a_line_or_counted() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        let total: u64 = 20_000;
        let mut lines = 0u64;
        for i in 0..total {
            // Distinct denies: every port another key, more than MAX_KEYS of them.
            if t.admit(&rec(1, (i % 6000) as u16)) {
                lines += 1;
            }
        }
        assert_eq!(lines, u64::from(PER_SECOND), "the global bound holds");
        let (summary, Untracked(untracked)) = t.flush(t0 + WINDOW, false);
        let repeats: u64 = summary.iter().map(|r| r.repeats.unwrap_or(1)).sum();
        assert_eq!(
            lines + repeats + untracked,
            total,
            "nothing lost from the count"
        );
        assert!(summary.len() <= MAX_KEYS);
    }

    #[test]
    fn a_quiet_workload_is_never_summarized() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        for port in 0..50 {
            assert!(t.admit(&rec(port.into(), port)));
        }
        let (summary, untracked) = t.flush(t0, true);
        assert!(summary.is_empty());
        assert_eq!(untracked, Untracked(0));
    }
}
