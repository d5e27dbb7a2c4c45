//! `cargo xtask deps`: installs what the build, the tests and the demo need and is missing,
//! one line per thing installed; prints nothing when everything is there.

use anyhow::{Result, bail};

use crate::cmd::Cmd;

/// Debian packages the kernel tests and the demo use (`ip netns`, curl, dig, a DNS server,
/// nft, bpftool to inspect programs, python3 for test peers, `ps`/`pgrep`), and dnsperf, the
/// load generator of `cargo xtask bench`'s DNS part.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "bpftool",
    "dnsmasq-base",
    "dnsutils",
    "nftables",
    "python3",
    "procps",
    "dnsperf",
];

/// Exactly this one: 0.11 and later link against a system LLVM (23) that Debian does not
/// ship, while 0.10.4 loads the nightly toolchain's own LLVM at run time.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Installs whatever is missing: Debian packages (needs root), the nightly toolchain, its
/// `rust-src` (for `-Z build-std=core`) and `bpf-linker`.
pub fn install() -> Result<()> {
    apt(APT_PACKAGES)?;
    nightly()?;
    nightly_component("rust-src")?;
    bpf_linker()
}

/// Installs those of `packages` that are missing (apt-get, as root).
pub fn apt(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &package in packages {
        if !dpkg_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages: {}: installing them needs root: rerun with sudo",
            missing.join(" ")
        );
    }
    for package in &missing {
        println!("deps: installing {package} (apt)");
    }
    Cmd::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run_captured()?;
    Cmd::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run_captured()
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let output = Cmd::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map_err(|e| {
            e.context(format!(
                "`cargo xtask deps` installs Debian packages (on Debian and its derivatives): \
                 elsewhere install these yourself: {}",
                APT_PACKAGES.join(" ")
            ))
        })?;
    // dpkg-query exits 1 for a package it has never heard of; "deinstall ok config-files"
    // is a removed one.
    Ok(output.status.success() && output.stdout == b"install ok installed")
}

/// Installs the nightly toolchain that builds the eBPF crate, if `rustup` has none.
pub fn nightly() -> Result<()> {
    let probe = Cmd::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()?;
    if probe.status.success() {
        return Ok(());
    }
    println!("deps: installing the nightly toolchain (rustup, minimal profile)");
    Cmd::new("rustup")
        .args(["toolchain", "install", "nightly", "--profile", "minimal"])
        .run_captured()
}

/// Adds a component (`rust-src`, `clippy`) to the nightly toolchain if it lacks it.
pub fn nightly_component(component: &str) -> Result<()> {
    let list = Cmd::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if !list.status.success() {
        bail!(
            "`rustup component list --toolchain nightly --installed` failed: {}",
            String::from_utf8_lossy(&list.stderr).trim()
        );
    }
    // Lines are `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
    let installed = String::from_utf8_lossy(&list.stdout).lines().any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    });
    if installed {
        return Ok(());
    }
    println!("deps: installing {component} for the nightly toolchain (rustup)");
    Cmd::new("rustup")
        .args(["component", "add", component, "--toolchain", "nightly"])
        .run_captured()
}

fn bpf_linker() -> Result<()> {
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    println!("deps: installing bpf-linker {BPF_LINKER_VERSION} (cargo install, about a minute)");
    Cmd::cargo()
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .run_captured()?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        // cargo installed it into $CARGO_HOME/bin, but another one is found first, or none.
        other => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed, but `bpf-linker --version` {}: \
             put $CARGO_HOME/bin (usually ~/.cargo/bin) first on PATH",
            other.map_or_else(|| "fails".to_owned(), |v| format!("reports {v}"))
        ),
    }
}

/// The version `bpf-linker --version` reports (`bpf-linker 0.10.4`), if it runs.
fn bpf_linker_version() -> Option<String> {
    let output = Cmd::new("bpf-linker").arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}
