//! `cargo xtask deploy-check`: the deployment files, offline. `deploy/validate.py` checks the
//! Kubernetes manifests against the API's schemas (strict, oldest and newest supported
//! Kubernetes), the sidecar rules the schemas cannot express, and the Containerfile's
//! versions; then the agent's own parser checks the allowlists the manifests carry.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::Cmd;

/// Runs the validator (in its virtualenv under the target directory, created once), then
/// `egress-agent check` on every allowlist it extracted from the ConfigMaps.
pub fn run() -> Result<()> {
    let dir = crate::target_dir().join("deploy-check");
    let allowlists = dir.join("allowlists");
    Cmd::new("python3")
        .arg("deploy/validate.py")
        .arg("--venv")
        .arg(dir.join("venv"))
        .arg("--allowlists-out")
        .arg(&allowlists)
        .run()?;

    let files = extracted(&allowlists)?;
    if files.is_empty() {
        bail!(
            "deploy/validate.py found no allowlist in the manifests (no egress-agent sidecar \
             reads one from a ConfigMap)"
        );
    }
    Cmd::cargo()
        .args(["run", "-p", "egress-agent", "--", "check"])
        .args(&files)
        .run()
        .context(
            "an allowlist in deploy/kubernetes is invalid, or egress-agent did not build (its \
             eBPF programs need what `cargo xtask deps` installs)",
        )
}

/// `DIR/<configmap>/<key>`, sorted; none if the validator wrote no `DIR`.
fn extracted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !dir.exists() {
        return Ok(files);
    }
    for configmap in read_dir(dir)? {
        if configmap.is_dir() {
            files.extend(read_dir(&configmap)?.into_iter().filter(|p| p.is_file()));
        }
    }
    files.sort();
    Ok(files)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .map(|entry| {
            entry
                .map(|e| e.path())
                .with_context(|| format!("cannot read {}", dir.display()))
        })
        .collect()
}
