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
    bpf::enforcer::{self, Enforcer},
    bpf::trace,
    daemon::approvals,
    daemon::control,
    daemon::health::{self, HealthState},
    daemon::lastgood,
    daemon::monitor,
    daemon::reload,
    daemon::status,
    dns::grants::{self, Change},
    dns::names::Names,
    dns::{self, DnsContext, Resolver, held::Held},
    events::{Event, EventSink},
    metrics::Metrics,
    policy::{Mode, Policy},
    sys::cgroup,
};

/// The kernel side's options, part of a [`SessionConfig`].
pub use crate::bpf::enforcer::EnforcerOptions;

/// The grants file is rewritten at most this often (and only after a change).
const GRANTS_EVERY: Duration = Duration::from_millis(1000);

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
    /// What confinement protects, for the `ready` event (`run` only).
    pub protected: Vec<String>,
    /// Ask mode's settings (`None`: never ask).
    pub ask: Option<approvals::AskConfig>,
    /// The allowlist file was rejected at start: `policy` is the last valid one, kept beside
    /// the pins ([`lastgood`]), and this is reported once the session runs.
    pub rejected: Option<reload::Rejected>,
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
    /// The verdict trace reader (`--trace-verdicts`).
    trace: Option<JoinHandle<anyhow::Result<()>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Session {
    /// Starts the parts in order, each given what it needs: the programs and maps (adopting
    /// what an earlier agent pinned), the resolver (the cgroup's DNS comes to it from the
    /// first packet on), the event readers, the optional reload watcher and health server,
    /// the state file; then, once the resolver answers, the `ready` event (always the first
    /// line; warnings follow it). [`Session::stop`] ends them in reverse.
    pub async fn start(cfg: SessionConfig) -> anyhow::Result<Self> {
        let (held, ask) = ask_setup(&cfg)?;
        let policy = Arc::new(held.extend(cfg.policy.clone()));
        let (stop, stop_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let mut warnings = Vec::new();

        match sweep_stale(Some(&cfg.name)) {
            Ok(swept) => {
                if !swept.pins.is_empty() {
                    warnings.push(format!(
                        "removed the pins of {}: their cgroups are gone",
                        swept.pins.join(", ")
                    ));
                }
                if !swept.states.is_empty() {
                    warnings.push(format!(
                        "removed the state directories of {}: no pins, no agent",
                        swept.states.join(", ")
                    ));
                }
            }
            Err(e) => warnings.push(format!("cannot sweep stale pins: {e:#}")),
        }
        let kernel = Kernel::attach(&cfg, &policy)?;
        let resolver = Resolver::bind().await?;
        let Kernel {
            mut enforcer,
            pin_dir,
            fresh,
            ring,
            adopted,
            trace,
        } = kernel;
        enforcer.set_resolver(Some(resolver.addr()))?;
        if let Some(why) = enforcer.name_binding_missing() {
            warnings.push(format!(
                "name binding (TLS SNI and HTTP Host judged in the kernel) cannot run here: \
                 {why}. Host rules admit by address only"
            ));
        }
        let enforcer = Arc::new(Mutex::new(enforcer));

        let (dns, kept) = dns_context(
            &cfg,
            &policy,
            &enforcer,
            &metrics,
            &adopted,
            &mut warnings,
            held,
        );
        let approvals = match ask {
            Some(a) => {
                let approvals = Arc::new(approvals::Approvals::new(dns.clone(), a.file.clone()));
                let listener = control::bind(&cfg.name)?;
                tracing::info!(
                    "ask mode: unlisted names wait up to {:?} for `egress-agent approve|deny \
                     --name {}`; `always` appends to {}",
                    a.timeout,
                    cfg.name,
                    a.file.display()
                );
                Some((approvals, listener, a.token.clone()))
            }
            None => None,
        };
        let mut tasks = Vec::new();
        let approvals = approvals.map(|(approvals, listener, token)| {
            tasks.push(tokio::spawn(control::serve(listener, approvals.clone())));
            (approvals, token)
        });
        let monitor = tokio::spawn(monitor::pump(
            ring,
            cfg.sink.clone(),
            dns.names.clone(),
            metrics.clone(),
            dns.clone(),
            cgroup::Subtree::new(&cfg.cgroup),
            stop_rx.clone(),
        ));
        let trace = trace.map(|logger| tokio::spawn(trace::pump(logger, stop_rx.clone())));
        let addr = resolver.addr();
        tasks.extend(serve_dns(&cfg.name, resolver, &dns, &stop_rx)?);
        if let Some(root) = cfg.watch.clone() {
            tasks.push(tokio::spawn(reload::watch(
                cfg.name.clone(),
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
                enforcer: enforcer.clone(),
                dns_capacity: cfg.enforcer.dns_capacity,
                approvals: approvals
                    .as_ref()
                    .and_then(|(a, token)| token.as_ref().map(|t| (a.clone(), t.clone()))),
            });
            tasks.push(tokio::spawn(health::serve(listener, state)));
        }
        tasks.push(tokio::spawn(keep_state(
            StateInputs {
                name: cfg.name.clone(),
                cgroup: cfg.cgroup.clone(),
                allowlist: cfg.watch.clone(),
                protected: cfg.protected.clone(),
            },
            dns.clone(),
            metrics.clone(),
        )));

        dns::check_answers(addr)
            .await
            .context("the resolver does not answer")?;
        metrics.ready.store(true, Ordering::Relaxed);
        announce_ready(&cfg, &policy)?;
        for w in &warnings {
            warn(&cfg.sink, w);
        }
        match (&cfg.rejected, &cfg.watch) {
            (Some(r), _) => {
                Metrics::inc(&metrics.reloads_rejected);
                reload::reject(&dns, &metrics, r);
            }
            (None, Some(root)) => {
                if let Err(e) = lastgood::save(&cfg.name, root, &cfg.policy) {
                    warn(
                        &cfg.sink,
                        &format!("cannot keep the policy beside the pins: {e:#}"),
                    );
                }
            }
            (None, None) => {}
        }
        if !fresh {
            warn(
                &cfg.sink,
                &format!(
                    "adopted the pinned state of an earlier agent named {:?} ({} DNS entries \
                     kept, {} removed: no longer permitted, expired or not recorded)",
                    cfg.name,
                    kept,
                    adopted.len() - kept
                ),
            );
        }
        Ok(Self {
            name: cfg.name,
            pin_dir,
            enforcer,
            dns,
            metrics,
            stop,
            monitor,
            trace,
            tasks,
        })
    }

    /// Why the kernel does *not* refuse socket families other than unix, inet, inet6, netlink
    /// and alg for the cgroup (the BPF LSM family guard cannot run); `None` when it does.
    pub fn family_guard_missing(&self) -> Option<String> {
        self.enforcer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .family_guard_missing()
            .map(str::to_owned)
    }

    /// Where the family guard cannot run: why the packet-socket tripwire is not armed either
    /// (`Err`), or, armed, why it does not watch io_uring's `IORING_OP_SOCKET` (`Ok(Some)`).
    pub fn tripwire_state(&self) -> Result<Option<String>, String> {
        let enf = self.enforcer.lock().unwrap_or_else(|p| p.into_inner());
        match enf.tripwire_missing() {
            Some(why) => Err(why.to_owned()),
            None => Ok(enf.tripwire_io_uring_missing().map(str::to_owned)),
        }
    }

    /// Stops the resolver and helpers and drains the last events. With `detach`, also
    /// detaches the programs and removes the pins; without, enforcement stays in the kernel
    /// (fail closed) for a later agent to adopt.
    pub async fn stop(self, detach: bool) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        // No decisions any more: what was held is refused by the resolver's end (fail
        // closed); `always` rules are in their file.
        let _ = std::fs::remove_dir_all(control::dir(&self.name));
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        match self.monitor.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("event reader: {e:#}"),
            Err(e) => tracing::warn!("event reader: {e}"),
        }
        if let Some(t) = self.trace {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("verdict trace reader: {e:#}"),
                Err(e) => tracing::warn!("verdict trace reader: {e}"),
            }
        }
        if detach {
            self.enforcer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .detach()?;
            status::remove_state(&self.name);
        } else {
            // The entries stay in the pinned map: the next agent needs their names.
            write_grants(&self.name, &self.dns, &mut None);
        }
        Ok(())
    }
}

/// The kernel part: programs attached and pinned (or adopted), and what the other parts take
/// from it.
struct Kernel {
    enforcer: Enforcer,
    pin_dir: PathBuf,
    /// Nothing was pinned under this name before.
    fresh: bool,
    /// The event ring and the boot-to-wall-clock offset of its timestamps.
    ring: (aya::maps::RingBuf<aya::maps::MapData>, Duration),
    /// The DNS-derived entries an earlier agent left.
    adopted: Vec<(std::net::IpAddr, Duration)>,
    /// The verdict trace's logger (`--trace-verdicts`).
    trace: Option<trace::Logger>,
}

impl Kernel {
    fn attach(cfg: &SessionConfig, policy: &Policy) -> anyhow::Result<Self> {
        let pin_dir = enforcer::ensure_bpffs()?.join("egress").join(&cfg.name);
        let mut opts = cfg.enforcer.clone();
        opts.pin_dir = Some(pin_dir.clone());
        let fresh = !pin_dir.exists();
        let mut enf = match Enforcer::attach(&cfg.cgroup, policy, &opts) {
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
        // Loading leaves megabytes of freed heap behind (the parsed kernel BTF, the verifier
        // log buffers of a program the kernel refused): hand them back, so an idle agent
        // stays small (measured: 24 MiB without, 8 MiB with).
        // SAFETY: glibc's malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let Some(ring) = enf.take_events() else {
            bail!("the events ring buffer is missing");
        };
        // An adopted DNS map that cannot be read whole is emptied (names resolve, and are
        // granted, anew); one that cannot be emptied either fails the start (the pins keep
        // enforcing what they hold).
        let entries = match enf.dns_entries() {
            Ok(entries) => entries,
            Err(e) => {
                let removed = enf
                    .clear_dns()
                    .with_context(|| format!("{e:#}, and the DNS map cannot be emptied"))?;
                tracing::warn!(
                    "{e:#}: the {removed} adopted DNS entries are removed, names resolve again"
                );
                Vec::new()
            }
        };
        let adopted = entries
            .iter()
            .map(|(addr, value)| {
                (
                    egress_common::keys::ip_from_addr(addr),
                    Duration::from_nanos(value.expires_ns),
                )
            })
            .collect();
        let trace = enf.take_trace();
        Ok(Self {
            enforcer: enf,
            pin_dir,
            fresh,
            ring,
            adopted,
            trace,
        })
    }
}

/// The resolver's shared state, with the grants an earlier agent recorded for the `adopted`
/// entries: what the current policy still permits of the names it recorded stays, the rest
/// goes at once (fail closed). Returns how many entries were kept.
fn dns_context(
    cfg: &SessionConfig,
    policy: &Arc<Policy>,
    enforcer: &Arc<Mutex<Enforcer>>,
    metrics: &Arc<Metrics>,
    adopted: &[(std::net::IpAddr, Duration)],
    warnings: &mut Vec<String>,
    held: Held,
) -> (Arc<DnsContext>, usize) {
    let upstreams = dns::upstreams(policy);
    if upstreams.is_empty() {
        warnings.push(
            "no upstream DNS server (no dns.upstream, none in /etc/resolv.conf): permitted \
             names will get SERVFAIL"
                .to_owned(),
        );
    }
    let recorded = if adopted.is_empty() {
        Default::default()
    } else {
        read_grants(&cfg.sink, &cfg.name)
    };
    let (grants, restored) =
        grants::restore(adopted, &recorded, crate::events::boot_now(), |name| {
            !policy.host_rules_for(name).is_empty()
        });
    let kept = grants.len();
    let dns = Arc::new(DnsContext {
        policy: RwLock::new(policy.clone()),
        upstreams: RwLock::new(upstreams),
        enforcer: enforcer.clone(),
        grants: Mutex::new(grants),
        grants_changed: Default::default(),
        search: dns::system_search_domains(),
        names: Names::default(),
        sink: cfg.sink.clone(),
        cgroup: cfg.cgroup.clone(),
        metrics: metrics.clone(),
        entries: Default::default(),
        answers: Default::default(),
        held,
    });
    for change in &restored {
        if let Change::Update(ip, live) = change {
            for g in live {
                dns.names.remember(*ip, &g.name);
            }
        }
    }
    // Before the resolver serves: the adopted entries take the current policy's values.
    dns::apply_changes(&dns, policy, restored);
    dns::count_entries(&dns, &dns.grants.lock().unwrap_or_else(|p| p.into_inner()));
    (dns, kept)
}

/// Ask mode's held requests, configured when the session asks (with the approvals file's
/// rules, for the session), and the settings when it does.
fn ask_setup(cfg: &SessionConfig) -> anyhow::Result<(Held, Option<approvals::AskConfig>)> {
    let held = Held::default();
    let Some(ask) = cfg.ask.as_ref().filter(|a| a.on(&cfg.policy)) else {
        return Ok((held, None));
    };
    held.configure(ask.timeout, ask.forced);
    for rule in approvals::file_rules(&ask.file, &cfg.policy)? {
        let _ = held.add_rule(rule);
    }
    Ok((held, Some(ask.clone())))
}

/// The resolver's thread and the grants file writer; their handles.
fn serve_dns(
    name: &str,
    resolver: Resolver,
    dns: &Arc<DnsContext>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    // Written now, so that the first answer is written at once too.
    let mut written = None;
    write_grants(name, dns, &mut written);
    let grants = tokio::spawn(keep_grants(name.to_owned(), dns.clone(), written));
    let thread = resolver.spawn(dns.clone(), stop.clone())?;
    // Done once the thread is: `stop` ends it.
    let resolver = tokio::task::spawn_blocking(move || {
        let _ = thread.join();
    });
    Ok(vec![grants, resolver])
}

/// The `ready` event.
fn announce_ready(cfg: &SessionConfig, policy: &Policy) -> anyhow::Result<()> {
    cfg.sink.emit(&Event::Ready {
        ts: SystemTime::now(),
        name: &cfg.name,
        cgroup: &cfg.cgroup,
        cgroup_id: cgroup::cgroup_id(&cfg.cgroup)?,
        policy: &policy.name,
        mode: match policy.mode {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
            Mode::Ask => "ask",
        },
        rules: policy.rules.len(),
        protected: &cfg.protected,
    });
    Ok(())
}

struct StateInputs {
    name: String,
    cgroup: PathBuf,
    allowlist: Option<PathBuf>,
    protected: Vec<String>,
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
            protected: inputs.protected.clone(),
            policy_state: metrics.standing().state().to_owned(),
            policy_rejected: metrics.standing().rejected,
            latest_denies: metrics
                .latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
            denies_by_reason: metrics
                .denies_by_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
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

/// Persists the grants (which names each DNS-derived address was answered for) whenever they
/// change, for an agent that adopts these pins after us: a change after a quiet spell at
/// once, then at most every [`GRANTS_EVERY`]. (`written`: the generation already written.)
async fn keep_grants(name: String, dns: Arc<DnsContext>, mut written: Option<u64>) {
    loop {
        dns.grants_changed.notified().await;
        if write_grants(&name, &dns, &mut written) {
            tokio::time::sleep(GRANTS_EVERY).await;
        }
    }
}

/// Writes the grants file unless `written` already holds the current generation; whether it
/// wrote.
fn write_grants(name: &str, dns: &DnsContext, written: &mut Option<u64>) -> bool {
    let (generation, json) = {
        let grants = dns.grants.lock().unwrap_or_else(|p| p.into_inner());
        if *written == Some(grants.generation()) {
            return false;
        }
        (grants.generation(), grants.to_json())
    };
    match status::write_grants(name, &json) {
        Ok(()) => *written = Some(generation),
        Err(e) => tracing::debug!("cannot write the grants file: {e:#}"),
    }
    true
}

/// The grants an earlier agent named `name` recorded (empty, with a warning, if unreadable).
fn read_grants(
    sink: &EventSink,
    name: &str,
) -> std::collections::HashMap<std::net::IpAddr, Vec<grants::Grant>> {
    let path = status::grants_path(name);
    let why = match std::fs::read(&path) {
        Ok(bytes) => match grants::from_json(&bytes) {
            Ok(recorded) => return recorded,
            Err(e) => e,
        },
        Err(e) => e.to_string(),
    };
    warn(
        sink,
        &format!(
            "cannot read {} ({why}): the adopted DNS entries are removed, names resolve again",
            path.display()
        ),
    );
    Default::default()
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

/// What [`sweep_stale`] removed.
#[derive(Debug, Default)]
pub struct Swept {
    /// Agents whose pins (and state) were removed: their cgroups are gone.
    pub pins: Vec<String>,
    /// State directories with no pins and no agent (an agent killed before it unpinned, a
    /// `run` killed before it cleaned up).
    pub states: Vec<String>,
}

/// How long a state directory with no pins is left alone: an agent that is starting may write
/// its state before it pins.
const ORPHAN_STATE_MIN_AGE: Duration = Duration::from_secs(60);

/// Removes the pins and state files of every agent whose cgroup is gone, and the state
/// directories no agent owns (`detach --stale`, and each start), except `keep`.
pub fn sweep_stale(keep: Option<&str>) -> anyhow::Result<Swept> {
    let root = enforcer::ensure_bpffs()?.join("egress");
    let pins = crate::bpf::stale::stale_names(&root, keep)?;
    for name in &pins {
        enforcer::remove_pin_dir(&root.join(name))?;
        status::remove_state(name);
    }
    let states = status::orphan_states(
        Path::new(status::STATE_DIR),
        &root,
        keep,
        ORPHAN_STATE_MIN_AGE,
    );
    for name in &states {
        status::remove_state(name);
    }
    Ok(Swept { pins, states })
}

/// Writes a warning line.
pub fn warn(sink: &EventSink, message: &str) {
    tracing::warn!("{message}");
    sink.emit(&Event::Warning {
        ts: SystemTime::now(),
        message,
    });
}
