//! Per-client query rate limits, so that a flood degrades only the client that floods.
//!
//! A client is the sending socket: its source address and port (all clients share the
//! loopback address, so the port tells them apart). A stub resolver that opens a socket per
//! lookup (glibc, Go, dig) is never near the limit; a flood from one socket is cut down to it.
//! A flood that opens a fresh socket per query is bounded only by the resolver's total
//! in-flight limit (see [`super::MAX_IN_FLIGHT`]): telling its sockets apart from a
//! legitimate client's needs the sending process, which the resolver does not know cheaply.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Queries a second one client may send, sustained.
pub const RATE: u32 = 200;
/// Queries one client may send at once (after a quiet second).
pub const BURST: u32 = 400;
/// Clients tracked at most; when full, the idle ones (a full bucket) are forgotten first.
const CLIENTS: usize = 4096;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Self {
            tokens: f64::from(BURST),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * f64::from(RATE)).min(f64::from(BURST));
        self.last = now;
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The buckets of the clients of one socket of the resolver.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<SocketAddr, Bucket>,
}

impl Limiter {
    /// Whether `client` may send one more query at `now`.
    pub fn allow(&mut self, client: SocketAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&client) && self.buckets.len() >= CLIENTS {
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < f64::from(BURST)
            });
            if self.buckets.len() >= CLIENTS {
                // Every client is busy: start over rather than grow (each then gets a fresh
                // burst, once).
                self.buckets.clear();
            }
        }
        self.buckets
            .entry(client)
            .or_insert_with(|| Bucket::full(now))
            .take(now)
    }

    /// How many clients are tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// One client's limit on its own (a TCP connection).
#[derive(Debug)]
pub struct ClientLimit(Bucket);

impl ClientLimit {
    /// A full bucket.
    pub fn new() -> Self {
        Self(Bucket::full(Instant::now()))
    }

    /// Whether one more query may go now; otherwise how long until it may.
    pub fn wait(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.0.take(now) {
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - self.0.tokens) / f64::from(RATE),
            ))
        }
    }
}

impl Default for ClientLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_client_is_cut_to_its_rate_and_others_are_not() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let flood = (0..10 * BURST).filter(|_| l.allow(addr(1000), t0)).count();
        assert_eq!(flood, BURST as usize, "the burst, then nothing");
        assert!(l.allow(addr(1001), t0), "another client is untouched");
        // A second later: RATE more.
        let later = t0 + Duration::from_secs(1);
        let more = (0..10 * BURST)
            .filter(|_| l.allow(addr(1000), later))
            .count();
        assert_eq!(more, RATE as usize);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for port in 0..(3 * CLIENTS) as u16 {
            assert!(l.allow(addr(port), t0), "a new client gets its burst");
            assert!(l.len() <= CLIENTS);
        }
    }
}
