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
    dns::{self, DnsContext},
    events::Event,
    metrics::Metrics,
    policy::{self, Policy},
};

/// How often the files are compared.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

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

/// Watches `root` (and the files it includes) until `stop` turns true.
pub async fn watch(
    root: PathBuf,
    ctx: Arc<DnsContext>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut files = ctx.current_policy().files.clone();
    let mut seen = fingerprint(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
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
                match apply(&ctx, new) {
                    Ok(summary) => {
                        Metrics::inc(&metrics.reloads_ok);
                        ctx.sink.emit(&Event::PolicyReloaded {
                            ts: SystemTime::now(),
                            file: &root,
                            summary: &summary,
                        });
                    }
                    Err(e) => {
                        Metrics::inc(&metrics.reloads_rejected);
                        reject(&ctx, &root, None, &format!("{e:#}"));
                    }
                }
            }
            Err(e) => {
                Metrics::inc(&metrics.reloads_rejected);
                let at = e.location().map(|l| (l.file.clone(), l.line));
                reject(&ctx, &root, at, &e.to_string());
            }
        }
    }
}

fn reject(ctx: &DnsContext, root: &Path, at: Option<(PathBuf, usize)>, error: &str) {
    tracing::warn!("policy rejected, the running policy stays: {error}");
    let (file, line) = match &at {
        Some((f, l)) => (f.as_path(), Some(*l)),
        None => (root, None),
    };
    ctx.sink.emit(&Event::PolicyRejected {
        ts: SystemTime::now(),
        file,
        line,
        error,
    });
}

/// Applies a validated policy: static rules and mode, the resolver's view, and the DNS-derived
/// entries (an address keeps only what names the new policy still permits; entries no name
/// permits any more are removed). Live connections are not touched.
pub fn apply(ctx: &DnsContext, new: Policy) -> anyhow::Result<String> {
    // Ask mode: what a person approved for the session stays through a reload (one apply at
    // a time, so a decision and a reload cannot drop each other's rules).
    let _one = ctx.held.applying();
    let new = ctx.held.extend(new);
    let summary = new.summary();
    let new = Arc::new(new);
    ctx.enforcer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .apply_policy(&new)?;
    *ctx.upstreams.write().unwrap_or_else(|p| p.into_inner()) = dns::upstreams(&new);
    *ctx.policy.write().unwrap_or_else(|p| p.into_inner()) = new.clone();
    let changes = ctx
        .grants
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain_names(|name| !new.host_rules_for(name).is_empty());
    dns::apply_changes(ctx, &new, changes);
    ctx.answers.clear();
    Ok(summary)
}
