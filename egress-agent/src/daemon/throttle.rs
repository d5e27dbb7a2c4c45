//! Bounds the deny lines a flood can produce. A process that retries one denied destination
//! in a loop (or a hijacked agent scanning) must not fill the disk nor take the CPU from the
//! workload: per second, each distinct deny (same process, destination, port, protocol, hook,
//! reason and verdict) gets its first [`PER_KEY`] lines, and all denies together at most
//! [`PER_SECOND`], summaries included. What is held back is counted, and once a second each
//! such deny gets one more line whose `repeats` field says how many identical denies it stands
//! for, the [`SUMMARY_LINES`] largest at most; the rest is one count (`denies-unrecorded`,
//! cause `throttle`). Those summary and count lines are charged to the second they start, so
//! no second holds more than [`PER_SECOND`] lines. Summing `repeats` (1 where absent) and the
//! counts gives every deny the ring delivered; the kernel counters count them too.
//!
//! Pure bookkeeping: the caller decides what a line is and writes it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use egress_common::{Addr, DenyEvent};

/// Lines per second for one distinct deny before it is summarized.
pub const PER_KEY: u32 = 10;
/// Lines per second for all denies together.
pub const PER_SECOND: u32 = 1000;
/// Summary lines a second at most (the largest first).
pub const SUMMARY_LINES: usize = 100;
/// Lines a second kept for the counts (`throttle`, `ring-full`).
pub const COUNT_LINES: u32 = 2;
/// Distinct denies tracked in one second; beyond, held-back denies are only counted.
pub const MAX_KEYS: usize = 4096;
const WINDOW: Duration = Duration::from_secs(1);

/// What identifies "the same deny", read off the kernel's record before anything is
/// decoded (a flood costs no allocation per deny).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    pid: u32,
    addr: Addr,
    port: u16,
    ip_proto: u8,
    hook: u8,
    reason: u8,
    audited: u8,
}

impl Key {
    fn of(e: &DenyEvent) -> Self {
        Self {
            pid: e.pid,
            addr: e.addr,
            port: e.port,
            ip_proto: e.ip_proto,
            hook: e.hook,
            reason: e.reason,
            audited: e.audited,
        }
    }
}

#[derive(Debug)]
struct Seen {
    lines: u32,
    held: u64,
    /// The latest held-back record, written with `repeats` at the end of the second.
    last: Option<DenyEvent>,
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
    pub fn admit(&mut self, rec: &DenyEvent) -> bool {
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
        seen.last = Some(*rec);
        false
    }

    /// When a second has passed since the window began (or `force`, at the end): for each
    /// deny held back, its latest record and how many identical ones it stands for; and the
    /// count held back without a record; then a new second begins.
    pub fn flush(&mut self, now: Instant, force: bool) -> (Vec<(DenyEvent, u64)>, Untracked) {
        if !force && now.duration_since(self.window_start) < WINDOW {
            return (Vec::new(), Untracked(0));
        }
        let mut out = Vec::new();
        for (_, s) in self.seen.drain() {
            if let Some(rec) = s.last
                && s.held > 0
            {
                out.push((rec, s.held));
            }
        }
        let mut untracked = std::mem::take(&mut self.untracked);
        if out.len() > SUMMARY_LINES {
            out.sort_unstable_by_key(|(_, held)| std::cmp::Reverse(*held));
            untracked += out
                .drain(SUMMARY_LINES..)
                .map(|(_, held)| held)
                .sum::<u64>();
        }
        out.sort_by_key(|(r, _)| r.ts_ns);
        self.window_start = now;
        // The summary and count lines are written now: they take their share of the new
        // second's lines.
        self.lines = out.len() as u32 + COUNT_LINES;
        (out, Untracked(untracked))
    }
}

#[cfg(test)]
mod tests {
    use egress_common::{
        addr_from_v4,
        events::{hook, reason},
    };

    use super::*;

    fn rec(pid: u32, port: u16) -> DenyEvent {
        DenyEvent {
            ts_ns: 0,
            cgroup_id: 1,
            pid,
            tid: pid,
            uid: 0,
            gid: 0,
            addr: addr_from_v4([198, 51, 100, 20]),
            port,
            ip_proto: 6,
            hook: hook::CONNECT4,
            reason: reason::NO_RULE,
            audited: 0,
            _pad: [0; 2],
            comm: *b"flood\0\0\0\0\0\0\0\0\0\0\0",
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
        assert_eq!(summary[0].1, 1000 - u64::from(PER_KEY));
        assert_eq!(summary[0].0.port, 443);
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
        assert!(
            summary.len() <= SUMMARY_LINES,
            "{} summary lines",
            summary.len()
        );
        // The next second: its own lines and the summaries just written stay within the bound.
        let next = (0..total)
            .filter(|i| t.admit(&rec(2, (i % 6000) as u16)))
            .count();
        assert_eq!(
            next + summary.len() + COUNT_LINES as usize,
            PER_SECOND as usize,
            "summaries count against the second they are written in"
        );
        let repeats: u64 = summary.iter().map(|(_, n)| n).sum();
        assert_eq!(
            lines + repeats + untracked,
            total,
            "nothing lost from the count"
        );
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
