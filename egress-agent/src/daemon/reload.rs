//! Hot reload: the allowlist files are read again every second and compared by content, which
//! catches an edit in place, a replacement by rename and a Kubernetes ConfigMap update (kubelet
//! swaps the `..data` symlink) alike. A valid new policy is applied without touching live
//! connections; an invalid one is rejected with a `policy-rejected` event naming file and line,
//! and the old policy keeps running.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use crate::{
    bpf::rules::ApplyError,
    daemon::lastgood,
    dns::{self, DnsContext},
    events::Event,
    metrics::{Metrics, Standing},
    policy::{self, Policy, PolicyError},
};

/// An allowlist file that was not applied: where, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The file (an include, when the error is in one).
    pub file: PathBuf,
    /// The line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub error: String,
    /// A change failed and could not be rolled back.
    pub inconsistent: bool,
}

impl Rejected {
    /// A file that does not parse or validate.
    pub fn invalid(root: &Path, e: &PolicyError) -> Self {
        let at = e.location().map(|l| (l.file.clone(), l.line));
        Self {
            file: at.as_ref().map_or_else(|| root.to_owned(), |a| a.0.clone()),
            line: at.map(|a| a.1),
            error: e.to_string(),
            inconsistent: false,
        }
    }

    /// A valid policy the maps did not take (its change was rolled back, or not).
    pub fn unapplied(root: &Path, e: &anyhow::Error) -> Self {
        Self {
            file: root.to_owned(),
            line: None,
            error: format!("{e:#}"),
            inconsistent: e
                .downcast_ref::<ApplyError>()
                .is_some_and(|a| !a.rolled_back),
        }
    }
}

/// How often the files are compared.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// [`POLL_EVERY`]; debug builds take `EGRESS_RELOAD_POLL_MS` instead when it is set, so the
/// stress test can reload every 50 ms (release builds never read it).
fn poll_every() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("EGRESS_RELOAD_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    POLL_EVERY
}

/// A fingerprint of every file of a policy (a missing file counts as its own state).
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        match std::fs::read(f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().to_string().hash(&mut h),
        }
    }
    h.finish()
}

/// Watches `root` (and the files it includes) until `stop` turns true. The files are read
/// for the first comparison here, when the task is made, not when it first runs: an edit
/// made right after `ready` (before a busy runtime polled the task) is then a change.
pub fn watch(
    name: String,
    root: PathBuf,
    ctx: Arc<DnsContext>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let files = ctx.current_policy().files.clone();
    let seen = fingerprint(&files);
    watch_from(name, root, ctx, metrics, stop, files, seen)
}

async fn watch_from(
    name: String,
    root: PathBuf,
    ctx: Arc<DnsContext>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    mut files: Vec<PathBuf>,
    mut seen: u64,
) {
    let every = poll_every();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = fingerprint(&files);
        if now == seen {
            continue;
        }
        seen = now;
        match policy::load(&root) {
            Ok(new) => {
                files = new.files.clone();
                seen = fingerprint(&files);
                let kept = new.clone();
                match apply(&ctx, new) {
                    Ok(summary) => {
                        Metrics::inc(&metrics.reloads_ok);
                        metrics.set_standing(Standing::default());
                        if let Err(e) = lastgood::save(&name, &root, &kept) {
                            tracing::warn!("cannot keep the policy beside the pins: {e:#}");
                        }
                        ctx.sink.emit(&Event::PolicyReloaded {
                            ts: SystemTime::now(),
                            file: &root,
                            summary: &summary,
                        });
                    }
                    Err(e) => {
                        Metrics::inc(&metrics.reloads_rejected);
                        reject(&ctx, &metrics, &Rejected::unapplied(&root, &e));
                    }
                }
            }
            Err(e) => {
                Metrics::inc(&metrics.reloads_rejected);
                reject(&ctx, &metrics, &Rejected::invalid(&root, &e));
            }
        }
    }
}

/// Reports a rejected file (event, log, `status`, the `egress_policy_rejected` gauge); the
/// previous policy keeps running.
pub fn reject(ctx: &DnsContext, metrics: &Metrics, r: &Rejected) {
    tracing::warn!(
        "policy rejected, the running policy stays: {}: {}",
        r.file.display(),
        r.error
    );
    let was = metrics.standing();
    metrics.set_standing(Standing {
        rejected: Some(match r.line {
            Some(l) => format!("{}:{l}: {}", r.file.display(), r.error),
            None => format!("{}: {}", r.file.display(), r.error),
        }),
        inconsistent: was.inconsistent || r.inconsistent,
    });
    ctx.sink.emit(&Event::PolicyRejected {
        ts: SystemTime::now(),
        file: &r.file,
        line: r.line,
        error: &r.error,
    });
}

/// Applies a validated policy: static rules and mode, the resolver's view, and the DNS-derived
/// entries (an address keeps only what names the new policy still permits; entries no name
/// permits any more are removed). Live connections are not touched.
pub fn apply(ctx: &DnsContext, new: Policy) -> anyhow::Result<String> {
    // Ask mode: what a person approved for the session stays through a reload (one apply at
    // a time, so a decision and a reload cannot drop each other's rules).
    let _one = ctx.held.applying();
    apply_extended(ctx, new)
}

/// Ask mode: applies the rules a person just approved (added to `held` before this call) to
/// the policy in force, read under the same lock a reload holds: a reload that came first is
/// kept, one that comes after keeps the approved rules. The same transaction as a reload:
/// all of it or nothing (the maps rolled back, the policy in force unchanged).
pub fn apply_approved(ctx: &DnsContext) -> anyhow::Result<String> {
    let _one = ctx.held.applying();
    let current = (*ctx.current_policy()).clone();
    apply_extended(ctx, current)
}

/// [`apply`] with the apply lock held.
fn apply_extended(ctx: &DnsContext, new: Policy) -> anyhow::Result<String> {
    let new = ctx.held.extend(new);
    let summary = new.summary();
    let new = Arc::new(new);
    ctx.enforcer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .apply_policy(&new)?;
    *ctx.upstreams.write().unwrap_or_else(|p| p.into_inner()) = dns::upstreams(&new);
    {
        // The swap and the prune under the grants lock, which the resolver holds while it
        // judges an answer again under the policy in force and writes it: an answer to a query
        // sent upstream before this reload is either written before the prune (which then
        // removes what the new policy drops) or judged by the new policy.
        let mut grants = ctx.grants.lock().unwrap_or_else(|p| p.into_inner());
        *ctx.policy.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
        let changes = grants.retain_names(|name| !new.host_rules_for(name).is_empty());
        dns::count_entries(ctx, &grants);
        dns::apply_changes(ctx, &new, changes);
    }
    ctx.answers.clear();
    Ok(summary)
}
