//! `cargo xtask test`: the unit tests, then the kernel integration tests (root, one thread).

use std::{ffi::OsString, fs};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{Cmd, Steps},
    deps,
};

/// Runs every test; `extra` goes to the test binaries of both steps (a name filter,
/// `--nocapture`, ...). Needs root.
pub fn run(extra: &[OsString]) -> Result<()> {
    crate::require_root(
        "cargo xtask test needs root (it attaches eBPF programs to a test cgroup): \
         run it with sudo",
    )?;
    deps::install()?;
    let mut steps = Steps::default();

    // The eBPF crate builds only for the BPF target, and the kernel tests come next.
    steps.run_tests(
        "unit tests",
        Cmd::cargo()
            .args(["test", "--workspace", "--exclude", "egress-tests"])
            .args(["--exclude", "egress-ebpf"])
            .args(if extra.is_empty() { None } else { Some("--") })
            .args(extra),
    )?;
    // The integration tests spawn the real agent from target/debug; cargo builds another
    // package's binaries for nobody's tests, so build it here.
    let built = steps.run(
        "build egress-agent",
        Cmd::cargo().args(["build", "-p", "egress-agent", "--bins"]),
    )?;
    if built {
        println!("kernel: {}", kernel()?);
        println!("cgroup v2: {}", cgroup2_mount()?);
        // One thread: the tests share kernel state (bpffs pins, cgroups, map ids).
        steps.run_tests(
            "kernel tests",
            Cmd::cargo()
                .args(["test", "-p", "egress-tests", "--", "--test-threads=1"])
                .args(extra),
        )?;
    }
    steps.finish()
}

/// `6.18.44 (x86_64)`.
fn kernel() -> Result<String> {
    let read = |file: &str| {
        fs::read_to_string(file)
            .with_context(|| format!("cannot read {file}"))
            .map(|s| s.trim().to_owned())
    };
    let release = read("/proc/sys/kernel/osrelease")?;
    let version = read("/proc/sys/kernel/version")?;
    Ok(format!("{release} {version} ({})", std::env::consts::ARCH))
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in a hybrid
/// layout), from /proc/mounts.
fn cgroup2_mount() -> Result<String> {
    match egress_common::mounts::cgroup2().context("cannot read /proc/mounts")? {
        Some(mount) => Ok(mount.display().to_string()),
        None => bail!("no cgroup v2 mount in /proc/mounts: the kernel tests need cgroup v2"),
    }
}
