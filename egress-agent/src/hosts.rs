//! Keeps the addresses of the policy's exact `host:` rules allowed, by resolving them with the
//! system resolver at start and again when their TTL runs out.
//!
//! This is the stopgap before the agent owns the cgroup's DNS (the transparent resolver
//! replaces it): wildcards cannot be resolved ahead of time and are not allowed by it, and the
//! command's own lookups need the system resolver, so its name servers are allowed on port 53
//! while the policy has host rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use egress_common::{
    AllowValue, PortRange,
    consts::{PROTO_ANY},
};
use hickory_resolver::{TokioResolver, system_conf::read_system_conf};
use tokio::sync::watch;

use crate::{
    enforcer::Enforcer,
    events::{Event, EventSink, boot_now},
    names::Names,
    policy::{self, HostPattern, Policy, Target},
};

/// How soon a failed lookup is retried.
const RETRY: Duration = Duration::from_secs(5);
/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The exact host names of the policy (wildcards cannot be resolved ahead of time).
pub fn exact_hosts(policy: &Policy) -> BTreeSet<String> {
    policy
        .rules
        .iter()
        .filter_map(|r| match &r.target {
            Target::Host(HostPattern::Exact(name)) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// The system resolver's name servers (from `/etc/resolv.conf`).
pub fn system_name_servers() -> Vec<SocketAddr> {
    match read_system_conf() {
        Ok((conf, _)) => {
            let set: BTreeSet<SocketAddr> =
                conf.name_servers().iter().map(|ns| ns.socket_addr).collect();
            set.into_iter().collect()
        }
        Err(e) => {
            tracing::warn!("cannot read the system resolver configuration: {e}");
            Vec::new()
        }
    }
}

/// Allows the system name servers on their port (UDP and TCP), never expiring.
pub fn allow_name_servers(enforcer: &mut Enforcer, servers: &[SocketAddr]) -> anyhow::Result<()> {
    for s in servers {
        let port = s.port();
        let value = AllowValue::from_ranges(
            [PortRange {
                lo: port,
                hi: port,
                protos: PROTO_ANY,
                _pad: 0,
            }],
            0,
        )
        .expect("one range fits");
        enforcer.allow_dns(s.ip(), value)?;
    }
    Ok(())
}

/// Resolves every exact host once, writing the answers into the map. Returns when the next
/// refresh is due.
pub async fn resolve_all(
    resolver: &TokioResolver,
    policy: &Policy,
    enforcer: &Mutex<Enforcer>,
    names: &Names,
    sink: &EventSink,
) -> Instant {
    let started = Instant::now();
    let mut next = started + policy.dns.max_ttl;
    // ip -> the names it was answered for in this round: its entry is the union of their rules.
    let mut answered: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    let mut ttl_of: BTreeMap<IpAddr, Duration> = BTreeMap::new();
    for host in exact_hosts(policy) {
        match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(host.as_str())).await {
            Ok(Ok(lookup)) => {
                let ttl = lookup.valid_until().saturating_duration_since(started);
                let ttl = ttl.clamp(policy.dns.min_ttl, policy.dns.max_ttl);
                next = next.min(started + ttl);
                for ip in lookup.iter() {
                    answered.entry(ip).or_default().insert(host.clone());
                    let t = ttl_of.entry(ip).or_insert(ttl);
                    *t = (*t).max(ttl);
                }
            }
            Ok(Err(e)) => {
                warn(sink, &format!("cannot resolve {host}: {e}"));
                next = next.min(started + RETRY);
            }
            Err(_) => {
                warn(sink, &format!("cannot resolve {host}: timed out"));
                next = next.min(started + RETRY);
            }
        }
    }
    let now_boot = boot_now();
    let mut enf = enforcer.lock().unwrap_or_else(|p| p.into_inner());
    for (ip, hosts) in answered {
        let rules: Vec<_> = hosts.iter().flat_map(|h| policy.host_rules_for(h)).collect();
        let expires = now_boot + ttl_of[&ip] + policy.dns.grace;
        match policy::rule_value(&rules, expires.as_nanos() as u64) {
            Ok(value) => {
                if let Err(e) = enf.allow_dns(ip, value) {
                    warn(sink, &format!("{e:#}"));
                    continue;
                }
                if let Some(h) = hosts.into_iter().next() {
                    names.remember(ip, h);
                }
            }
            Err(e) => warn(sink, &format!("{ip}: {e:?}")),
        }
    }
    next
}

/// Resolves the hosts and keeps them fresh until `stop` turns true.
pub async fn keep_resolved(
    policy: Arc<Policy>,
    enforcer: Arc<Mutex<Enforcer>>,
    names: Names,
    sink: Arc<EventSink>,
    first: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let resolver = match TokioResolver::builder_tokio() {
        Ok(b) => b.build(),
        Err(e) => {
            warn(&sink, &format!("cannot use the system resolver: {e}"));
            return;
        }
    };
    let mut next = first;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        next = resolve_all(&resolver, &policy, &enforcer, &names, &sink).await;
    }
}

/// Builds the system resolver (for the first, blocking round in `run`).
pub fn system_resolver() -> anyhow::Result<TokioResolver> {
    Ok(TokioResolver::builder_tokio()?.build())
}

fn warn(sink: &EventSink, message: &str) {
    tracing::warn!("{message}");
    sink.emit(&Event::Warning {
        ts: SystemTime::now(),
        message,
    });
}
