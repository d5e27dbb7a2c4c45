//! Agent-side counters, rendered with the kernel's as Prometheus text.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use crate::bpf::enforcer::Counters;

/// Counters the agent keeps (the kernel keeps allows, denies and drops).
#[derive(Debug, Default)]
pub struct Metrics {
    /// DNS queries answered or refused.
    pub dns_queries: AtomicU64,
    /// DNS queries refused.
    pub dns_refused: AtomicU64,
    /// DNS queries that failed upstream (SERVFAIL).
    pub dns_upstream_failures: AtomicU64,
    /// DNS queries dropped (a client over its rate) or answered SERVFAIL at once (every
    /// forwarding slot taken).
    pub dns_rate_limited: AtomicU64,
    /// Addresses the resolver holds grants for (what it wrote into the DNS map), kept by the
    /// resolver as it writes, so that a scrape never walks the kernel map.
    pub dns_entries: AtomicU64,
    /// Policy reloads applied.
    pub reloads_ok: AtomicU64,
    /// Policy reloads rejected (invalid file; the old policy kept running).
    pub reloads_rejected: AtomicU64,
    /// Where the running policy stands against the allowlist file (for `status` and the
    /// `egress_policy_rejected` gauge).
    pub standing: Mutex<Standing>,
    /// Deny events by reason, as reported through the ring buffer.
    pub denies_by_reason: Mutex<BTreeMap<String, u64>>,
    /// Enforcement attached and the resolver answering.
    pub ready: AtomicBool,
    /// `attach`: processes of the enforced cgroup holding CAP_NET_RAW, now (`raw_watch`).
    pub raw_net_raw: AtomicU64,
    /// `attach`: packet sockets open in the enforced cgroup or the pod's namespace, now.
    pub raw_packet_sockets: AtomicU64,
    /// `attach --require-no-raw` and one of the two above: /readyz says not ready.
    pub raw_blocks_ready: AtomicBool,
    /// The latest deny events, newest last (for `status`).
    pub latest: Mutex<std::collections::VecDeque<serde_json::Value>>,
}

/// What the maps hold against the allowlist file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// Why the file on disk was last rejected (`None`: the maps hold its policy). While set,
    /// the maps hold the previous valid policy whole, unless `inconsistent`.
    pub rejected: Option<String>,
    /// A failed change could not be rolled back: the maps match no policy.
    pub inconsistent: bool,
}

impl Standing {
    /// `applied` (the maps hold the file's policy), `previous` (the file was rejected, the
    /// maps hold the previous valid policy whole) or `inconsistent`.
    pub fn state(&self) -> &'static str {
        match (&self.rejected, self.inconsistent) {
            (_, true) => "inconsistent",
            (Some(_), false) => "previous",
            (None, false) => "applied",
        }
    }
}

/// How many deny events `status` shows.
pub const LATEST_KEPT: usize = 20;

impl Metrics {
    /// Counts one deny event.
    pub fn deny(&self, reason: &str) {
        let mut by = self
            .denies_by_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match by.get_mut(reason) {
            Some(n) => *n += 1,
            None => {
                by.insert(reason.to_owned(), 1);
            }
        }
    }

    /// Remembers a deny event line for `status`.
    pub fn remember(&self, line: serde_json::Value) {
        let mut l = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == LATEST_KEPT {
            l.pop_front();
        }
        l.push_back(line);
    }

    /// Records where the policy stands after a change (or a refused one).
    pub fn set_standing(&self, standing: Standing) {
        *self.standing.lock().unwrap_or_else(|p| p.into_inner()) = standing;
    }

    /// Where the policy stands.
    pub fn standing(&self) -> Standing {
        self.standing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, kernel: Option<Counters>, dns_capacity: u32) -> String {
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        if let Some(k) = kernel {
            metric(
                "egress_allowed_total",
                "counter",
                "Connects and sends the programs allowed.",
                vec![(String::new(), k.allow)],
            );
            metric(
                "egress_denied_total",
                "counter",
                "Connects and sends the programs denied (or audited).",
                vec![(String::new(), k.deny)],
            );
            metric(
                "egress_ringbuf_drops_total",
                "counter",
                "Deny events lost because the ring buffer was full.",
                vec![(String::new(), k.ringbuf_drop)],
            );
            metric(
                "egress_program_errors_total",
                "counter",
                "Errors inside the programs (each one denied).",
                vec![(String::new(), k.error)],
            );
        }
        let by_reason = self
            .denies_by_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), *v))
            .collect();
        metric(
            "egress_deny_events_total",
            "counter",
            "Deny events received, by reason.",
            by_reason,
        );
        metric(
            "egress_raw_risks",
            "gauge",
            "attach: processes of the enforced cgroup holding CAP_NET_RAW, and packet sockets \
             open there (they bypass the cgroup programs), now.",
            vec![
                ("{kind=\"cap_net_raw\"}".to_owned(), get(&self.raw_net_raw)),
                (
                    "{kind=\"packet_socket\"}".to_owned(),
                    get(&self.raw_packet_sockets),
                ),
            ],
        );
        metric(
            "egress_dns_queries_total",
            "counter",
            "DNS queries from the enforced cgroup.",
            vec![(String::new(), get(&self.dns_queries))],
        );
        metric(
            "egress_dns_refused_total",
            "counter",
            "DNS queries refused (name not permitted).",
            vec![(String::new(), get(&self.dns_refused))],
        );
        metric(
            "egress_dns_upstream_failures_total",
            "counter",
            "Permitted DNS queries answered SERVFAIL because upstream failed.",
            vec![(String::new(), get(&self.dns_upstream_failures))],
        );
        metric(
            "egress_dns_rate_limited_total",
            "counter",
            "DNS queries dropped because their client was over its rate, or answered SERVFAIL \
             at once because every forwarding slot was taken.",
            vec![(String::new(), get(&self.dns_rate_limited))],
        );
        metric(
            "egress_dns_map_entries",
            "gauge",
            "Addresses allowed from DNS answers.",
            vec![(String::new(), get(&self.dns_entries))],
        );
        metric(
            "egress_dns_map_capacity",
            "gauge",
            "Capacity of the DNS-derived address map.",
            vec![(String::new(), u64::from(dns_capacity))],
        );
        metric(
            "egress_policy_reloads_total",
            "counter",
            "Policy reloads, by outcome.",
            vec![
                ("{outcome=\"applied\"}".into(), get(&self.reloads_ok)),
                ("{outcome=\"rejected\"}".into(), get(&self.reloads_rejected)),
            ],
        );
        let standing = self.standing();
        metric(
            "egress_policy_rejected",
            "gauge",
            "1 while the allowlist file is rejected and the previous valid policy runs.",
            vec![(String::new(), u64::from(standing.rejected.is_some()))],
        );
        metric(
            "egress_policy_maps_inconsistent",
            "gauge",
            "1 if a failed policy change could not be rolled back (the maps match no policy).",
            vec![(String::new(), u64::from(standing.inconsistent))],
        );
        metric(
            "egress_ready",
            "gauge",
            "1 once enforcement is attached and the resolver answers.",
            vec![(String::new(), u64::from(self.ready.load(Ordering::Relaxed)))],
        );
        o
    }
}
