//! One enforcement session on one cgroup: programs attached (pinned, adopting what an
//! earlier agent of the same name left), the resolver, the event reader, and optionally the
//! reload watcher and the health endpoints. `run` and `attach` both drive one.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    cgroup,
    enforcer::{self, Enforcer, EnforcerOptions},
    events::{Event, EventSink},
    grants::Grants,
    health::{self, HealthState},
    metrics::Metrics,
    monitor,
    names::Names,
    policy::{Mode, Policy},
    reload,
    resolver::{self, DnsContext, Resolver},
    status,
};

/// What a session needs.
pub struct SessionConfig {
    /// Instance name: pins live under `/sys/fs/bpf/egress/<name>`.
    pub name: String,
    /// The cgroup v2 directory to enforce on.
    pub cgroup: PathBuf,
    /// The policy.
    pub policy: Policy,
    /// The allowlist file to watch for changes (`None`: no hot reload).
    pub watch: Option<PathBuf>,
    /// Event output.
    pub sink: Arc<EventSink>,
    /// cgroup v2 id left alone by the programs (the agent's own, as a sidecar); 0 for none.
    pub exempt_cgroup: u64,
    /// Serve `/healthz`, `/readyz`, `/metrics` here.
    pub health: Option<SocketAddr>,
    /// Kernel map sizes and the like.
    pub enforcer: EnforcerOptions,
}

/// A running session.
pub struct Session {
    /// Instance name.
    pub name: String,
    /// The pins' directory.
    pub pin_dir: PathBuf,
    /// The kernel side.
    pub enforcer: Arc<Mutex<Enforcer>>,
    /// The resolver's shared state (policy, grants).
    pub dns: Arc<DnsContext>,
    /// Agent counters.
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    monitor: JoinHandle<anyhow::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Session {
    /// Attaches and starts everything; writes the `ready` event last.
    pub async fn start(cfg: SessionConfig) -> anyhow::Result<Self> {
        let pin_dir = enforcer::ensure_bpffs()?.join("egress").join(&cfg.name);
        let policy = Arc::new(cfg.policy);
        let mut opts = cfg.enforcer.clone();
        opts.pin_dir = Some(pin_dir.clone());
        let fresh = !pin_dir.exists();
        let mut enf = match Enforcer::attach(&cfg.cgroup, &policy, &opts) {
            Ok(e) => e,
            Err(e) => {
                if fresh {
                    // A failed first start leaves nothing half pinned behind.
                    let _ = enforcer::remove_pin_dir(&pin_dir);
                }
                return Err(e);
            }
        };
        enf.set_exempt_cgroup(cfg.exempt_cgroup)?;
        let Some((ring, boot_offset)) = enf.take_events() else {
            bail!("the events ring buffer is missing");
        };
        let adopted = enf.dns_entries();

        // The cgroup's DNS goes to our resolver from the first packet on.
        let resolver = Resolver::bind().await?;
        enf.set_resolver(Some(resolver.addr()))?;
        let upstreams = resolver::upstreams(&policy);
        if upstreams.is_empty() {
            warn(
                &cfg.sink,
                "no upstream DNS server (no dns.upstream, none in /etc/resolv.conf): \
                 permitted names will get SERVFAIL",
            );
        }
        let enf = Arc::new(Mutex::new(enf));
        let names = Names::default();
        let metrics = Arc::new(Metrics::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut grants = Grants::default();
        for (addr, value) in &adopted {
            // Entries an earlier agent wrote stay until their own expiry.
            grants.adopt(
                egress_common::keys::ip_from_addr(addr),
                Duration::from_nanos(value.expires_ns),
            );
        }

        let monitor = tokio::spawn(monitor::pump(
            ring,
            boot_offset,
            cfg.sink.clone(),
            names.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        let dns = Arc::new(DnsContext {
            policy: RwLock::new(policy.clone()),
            upstreams: RwLock::new(upstreams),
            enforcer: enf.clone(),
            grants: Mutex::new(grants),
            names,
            sink: cfg.sink.clone(),
            cgroup: cfg.cgroup.clone(),
            metrics: metrics.clone(),
        });
        let addr = resolver.addr();
        let mut tasks = vec![tokio::spawn(resolver.serve(dns.clone(), stop_rx.clone()))];
        if let Some(root) = cfg.watch.clone() {
            tasks.push(tokio::spawn(reload::watch(
                root,
                dns.clone(),
                metrics.clone(),
                stop_rx.clone(),
            )));
        }
        if let Some(at) = cfg.health {
            let listener = health::bind(at).await?;
            let state = Arc::new(HealthState {
                metrics: metrics.clone(),
                enforcer: enf.clone(),
                dns_capacity: opts.dns_capacity,
            });
            tasks.push(tokio::spawn(health::serve(listener, state)));
        }
        tasks.push(tokio::spawn(keep_state(
            StateInputs {
                name: cfg.name.clone(),
                cgroup: cfg.cgroup.clone(),
                allowlist: cfg.watch.clone(),
            },
            dns.clone(),
            metrics.clone(),
        )));
        resolver::check_answers(addr)
            .await
            .context("the resolver does not answer")?;
        metrics.ready.store(true, Ordering::Relaxed);

        let cgroup_id = cgroup::cgroup_id(&cfg.cgroup)?;
        cfg.sink.emit(&Event::Ready {
            ts: SystemTime::now(),
            name: &cfg.name,
            cgroup: &cfg.cgroup,
            cgroup_id,
            policy: &policy.name,
            mode: match policy.mode {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            },
            rules: policy.rules.len(),
        });
        if !fresh {
            warn(
                &cfg.sink,
                &format!(
                    "adopted the pinned state of an earlier agent named {:?} ({} DNS entries kept)",
                    cfg.name,
                    adopted.len()
                ),
            );
        }
        Ok(Self {
            name: cfg.name,
            pin_dir,
            enforcer: enf,
            dns,
            metrics,
            stop,
            monitor,
            tasks,
        })
    }

    /// Stops the resolver and helpers and drains the last events. With `detach`, also
    /// detaches the programs and removes the pins; without, enforcement stays in the kernel
    /// (fail closed) for a later agent to adopt.
    pub async fn stop(self, detach: bool) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        match self.monitor.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("event reader: {e:#}"),
            Err(e) => tracing::warn!("event reader: {e}"),
        }
        if detach {
            self.enforcer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .detach()?;
            status::remove_state(&self.name);
        }
        Ok(())
    }
}

struct StateInputs {
    name: String,
    cgroup: PathBuf,
    allowlist: Option<PathBuf>,
}

/// Writes the state file `status` reads, every 2 s.
async fn keep_state(inputs: StateInputs, dns: Arc<DnsContext>, metrics: Arc<Metrics>) {
    loop {
        let state = status::AgentState {
            name: inputs.name.clone(),
            pid: std::process::id(),
            cgroup: inputs.cgroup.clone(),
            allowlist: inputs.allowlist.clone(),
            policy: dns.current_policy().summary(),
            latest_denies: metrics
                .latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
            written: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        if let Err(e) = status::write_state(&state) {
            tracing::debug!("cannot write the state file: {e:#}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Detaches and removes what an agent named `name` pinned (`egress-agent detach`).
pub fn detach_pins(name: &str) -> anyhow::Result<bool> {
    let dir = enforcer::ensure_bpffs()?.join("egress").join(name);
    if !dir.exists() {
        return Ok(false);
    }
    enforcer::remove_pin_dir(&dir)?;
    status::remove_state(name);
    Ok(true)
}

/// Writes a warning line.
pub fn warn(sink: &EventSink, message: &str) {
    tracing::warn!("{message}");
    sink.emit(&Event::Warning {
        ts: SystemTime::now(),
        message,
    });
}

/// The pin directory of `name`.
pub fn pin_dir(name: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/egress").join(name)
}
