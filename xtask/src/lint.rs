//! `cargo xtask lint`: rustfmt and clippy, the eBPF crate included, for its own target.

use anyhow::Result;

use crate::{
    cmd::{Cmd, Steps},
    deps,
};

/// Runs every check, going on after a failure, and fails naming those that failed.
pub fn run() -> Result<()> {
    let mut steps = Steps::default();
    steps.run(
        "rustfmt",
        Cmd::cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    // The eBPF crate is `no_std`/`no_main` for bpfel-unknown-none: on the host it is not
    // even a valid crate, so it gets its own run below.
    steps.run(
        "clippy",
        Cmd::cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--exclude",
                "egress-ebpf",
            ])
            .args(["--", "-D", "warnings"]),
    )?;
    // `rustup run nightly cargo` rather than `cargo +nightly`: the `cargo` that runs xtask
    // may be a toolchain's own binary rather than the rustup proxy that understands `+`.
    // A check never links, so this needs rust-src (build-std) but not bpf-linker.
    deps::nightly()?;
    deps::nightly_component("rust-src")?;
    deps::nightly_component("clippy")?;
    steps.run(
        "clippy (eBPF)",
        Cmd::new("rustup")
            .args(["run", "nightly", "cargo", "clippy", "-p", "egress-ebpf"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"]),
    )?;
    steps.finish()
}
