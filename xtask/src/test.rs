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
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    match find_cgroup2(&mounts) {
        Some(mount) => Ok(mount),
        None => bail!("no cgroup v2 mount in /proc/mounts: the kernel tests need cgroup v2"),
    }
}

fn find_cgroup2(mounts: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
        (fstype == "cgroup2").then(|| unescape_octal(target))
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let Some(byte) = escaped {
            out.push(byte);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            find_cgroup2(mounts).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(find_cgroup2("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_octal(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_octal(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_octal(r"/x\777\0"), r"/x\777\0");
    }
}
