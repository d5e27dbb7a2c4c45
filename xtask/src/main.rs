//! The project's task runner: `cargo xtask <verb>`, verbs in [`USAGE`]. Every verb runs from
//! the workspace root.

mod bench;
mod cmd;
mod demo;
mod deploy;
mod deps;
mod e2e;
mod fuzz;
mod interrupt;
mod lint;
mod sandbox;
mod test;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::Cmd;

const USAGE: &str = "\
usage: cargo xtask <verb>

verbs:
  deps             install what is missing: Debian packages (as root), the nightly
                   toolchain and its rust-src, bpf-linker 0.10.4
  build            deps, then build the workspace (the agent embeds the eBPF programs)
  test [-- ARGS]   as root: deps, the unit tests, then the kernel integration tests (one
                   thread); ARGS go to the test binaries (a name filter, --nocapture, ...)
  demo             as root: an allowed and a blocked connection and the deny event, in a
                   network namespace of its own
  lint             rustfmt and clippy, the eBPF crate for its own target
  fuzz [SECONDS]   run each fuzz target for SECONDS (default 60) from its seed corpus
                   (installs cargo-fuzz; builds with the nightly toolchain)
  deploy-check     the Kubernetes manifests, Containerfile and their allowlists, offline
                   (deploy/validate.py, then egress-agent check)
  e2e              as root: the Kubernetes sidecar (deploy/kubernetes) in real pods run by
                   podman + runc (installed from Debian packages), with the app beside it;
                   named checks, last line `e2e: N passed, M failed`
  bench            as root: enforcement cost vs. unenforced controls and nftables/dnsmasq,
                   in namespaces of its own; writes BENCHMARKS.md";

fn main() -> ExitCode {
    let args: Vec<OsString> = env::args_os().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[OsString]) -> Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    let Some((verb, rest)) = args.split_first() else {
        bail!("no verb given\n\n{USAGE}");
    };
    let verb = verb.to_string_lossy();
    match verb.as_ref() {
        "deps" => no_args(&verb, rest).and_then(|()| deps::install()),
        "build" => no_args(&verb, rest).and_then(|()| build()),
        "test" => test::run(match rest.split_first() {
            Some((dashes, extra)) if dashes == "--" => extra,
            _ => rest,
        }),
        "demo" => no_args(&verb, rest).and_then(|()| demo::run()),
        "lint" => no_args(&verb, rest).and_then(|()| lint::run()),
        "deploy-check" => no_args(&verb, rest).and_then(|()| deploy::run()),
        "fuzz" => match rest {
            [] => fuzz::run(fuzz::DEFAULT_SECONDS),
            [secs] => secs
                .to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("fuzz: {secs:?} is not a number of seconds"))
                .and_then(fuzz::run),
            _ => Err(anyhow::anyhow!("fuzz takes at most one argument: SECONDS")),
        },
        "bench" => no_args(&verb, rest).and_then(|()| bench::run()),
        "e2e" => no_args(&verb, rest).and_then(|()| e2e::run()),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown verb `{verb}`\n\n{USAGE}"),
    }
}

fn no_args(verb: &str, rest: &[OsString]) -> Result<()> {
    match rest.first() {
        Some(arg) => bail!(
            "`cargo xtask {verb}` takes no arguments, got `{}`",
            arg.to_string_lossy()
        ),
        None => Ok(()),
    }
}

/// `cargo xtask build`: deps, then every crate and target of the workspace. The eBPF crate
/// builds only for the BPF target (on the host: "unwinding panics are not supported without
/// std"); the agent's build script builds it for that target, and the agent embeds it.
fn build() -> Result<()> {
    deps::install()?;
    Cmd::cargo()
        .args(["build", "--workspace", "--all-targets"])
        .args(["--exclude", "egress-ebpf"])
        .run()
}

/// The workspace root: xtask's parent directory.
fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target`), relative to the root.
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

/// Whether this process runs as root (effective uid 0).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An error saying `why` unless this process runs as root.
fn require_root(why: &str) -> Result<()> {
    if is_root() { Ok(()) } else { bail!("{why}") }
}
