//! `cargo xtask fuzz [SECONDS]`: runs each cargo-fuzz target (fuzz/fuzz_targets) for a bounded
//! time from the checked-in seed corpus. New inputs go to `target/fuzz-corpus/<target>`, so the
//! seeds in `fuzz/corpus/<target>` stay as committed; a crash fails the run and leaves its input
//! in `fuzz/artifacts/<target>/` (make it a regression test).

use std::{fs, path::Path};

use anyhow::{Context as _, Result};

use crate::cmd::{Cmd, Steps};

/// The fuzz targets, each with a seed corpus under fuzz/corpus/.
pub const TARGETS: [&str; 3] = ["allowlist", "dns_query", "dns_reply"];

/// Default time per target.
pub const DEFAULT_SECONDS: u64 = 60;

/// Installs cargo-fuzz if missing, then runs every target for `seconds`.
pub fn run(seconds: u64) -> Result<()> {
    let have = Cmd::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        println!("installing cargo-fuzz");
        Cmd::cargo()
            .args(["install", "cargo-fuzz", "--locked"])
            .run_captured()?;
    }
    let mut steps = Steps::default();
    for target in TARGETS {
        let work = Path::new("target/fuzz-corpus").join(target);
        fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        steps.run(
            &format!("fuzz {target}"),
            Cmd::new("rustup")
                .args([
                    "run",
                    "nightly",
                    "cargo",
                    "fuzz",
                    "run",
                    "--release",
                    target,
                ])
                .arg(&work)
                .arg(Path::new("fuzz/corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=4096"),
        )?;
    }
    steps.finish()
}
