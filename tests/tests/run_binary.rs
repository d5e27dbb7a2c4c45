//! The real `egress-agent run` binary, started as a user would and driven from outside:
//! through its events file, the command's output, its exit status and signals.
//!
//! The agent runs inside a test network namespace (joined before `exec`, see
//! [`TestNetns::command`]; not through `ip netns exec`, which remounts `/sys` and so hides the
//! cgroup v2 and bpf filesystems from the agent). Build the agent first:
//! `cargo build -p egress-agent`.

use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use egress_tests::{
    AgentRun, Outcome, TcpListener, TestNetns,
    agent::{egress_cgroups, pin_dir},
    cgroup2_mount, poll_until, probe_bin,
};
use serde_json::Value;

const ALLOW_8080: &str =
    "version: 1\nname: run-test\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n";

/// The agent removed its cgroup and pins: none of its cgroups appeared since `before`, and
/// the cgroup the ready line named is gone.
fn assert_cleaned_up(run: &AgentRun, ready: &Value, before: &BTreeSet<String>) {
    let cgroup = ready["cgroup"]
        .as_str()
        .expect("ready line names its cgroup");
    assert!(
        !Path::new(cgroup).exists(),
        "the agent's cgroup {cgroup} remains after it exited\n{}",
        run.output()
    );
    let after = egress_cgroups();
    let new: BTreeSet<_> = after.difference(before).cloned().collect();
    let left = run.own_cgroups(&new);
    assert!(
        left.is_empty(),
        "cgroups of agent {} remain: {left:?}\n{}",
        run.pid(),
        run.output()
    );
    let name = ready["name"]
        .as_str()
        .expect("ready line names the instance");
    let pins = pin_dir(name);
    assert!(
        !pins.exists(),
        "pins {} remain after the agent exited\n{}",
        pins.display(),
        run.output()
    );
}

/// The ready line names a cgroup of this agent under the cgroup v2 mount, with its id.
fn check_ready(run: &AgentRun, ready: &Value) -> u64 {
    let cgroup = PathBuf::from(ready["cgroup"].as_str().expect("ready.cgroup"));
    assert_eq!(
        cgroup.parent(),
        Some(cgroup2_mount().as_path()),
        "the agent's cgroup is a child of the mount: {ready}"
    );
    let name = cgroup.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("egress-run-{}", run.pid())),
        "the agent's cgroup {name} is named after its pid {}",
        run.pid()
    );
    ready["cgroup_id"].as_u64().expect("ready.cgroup_id")
}

/// Runs `egress-probe tcp-connect DST` under [`ALLOW_8080`] and returns the run, its ready
/// line and the probe's outcome, after checking exit status and cleanup.
fn run_probe(netns: &TestNetns, dst: &str, env: &[(&str, &str)]) -> (AgentRun, Value, Outcome) {
    let before = egress_cgroups();
    let probe = probe_bin();
    let probe = probe.to_str().expect("utf-8 path");
    let mut run = AgentRun::start(netns, ALLOW_8080, &[probe, "tcp-connect", dst], env);
    let code = run.exit_code();
    assert_eq!(code, 0, "the probe exits 0 either way\n{}", run.output());
    let events = run.events();
    let ready = events.first().cloned().unwrap_or(Value::Null);
    assert_eq!(
        ready["event"],
        "ready",
        "the first event line is ready\n{}",
        run.output()
    );
    check_ready(&run, &ready);
    assert_cleaned_up(&run, &ready, &before);
    let out = run.probe_outcome();
    (run, ready, out)
}

fn deny_lines(run: &AgentRun) -> Vec<Value> {
    run.events()
        .into_iter()
        .filter(|e| e["event"] == "deny")
        .collect()
}

#[test]
fn run_lets_an_allowed_connect_through() {
    let netns = TestNetns::new();
    let listener = TcpListener::bind(&netns, "127.0.0.1:8080");
    let (run, _ready, out) = run_probe(&netns, "127.0.0.1:8080", &[]);
    assert!(
        out.ok,
        "the allowed connect failed: {out:?}\n{}",
        run.output()
    );
    assert!(
        listener.wait_received(1, Duration::from_secs(2)),
        "the listener got nothing"
    );
    assert_eq!(listener.payloads(), vec![b"probe\n".to_vec()]);
    let denies = deny_lines(&run);
    assert!(
        denies.is_empty(),
        "an allowed run reported denies: {denies:?}"
    );
}

/// Checks one deny line against the probe that caused it.
fn check_deny(run: &AgentRun, ready: &Value, out: &Outcome, dst: &str, port: u16, uid: u32) {
    assert!(
        out.is_eperm(),
        "expected EPERM, got {out:?}\n{}",
        run.output()
    );
    let denies = deny_lines(run);
    assert_eq!(
        denies.len(),
        1,
        "one denied connect, one deny line\n{}",
        run.output()
    );
    let d = &denies[0];
    let ctx = format!("deny line {d}");
    assert_eq!(d["proto"], "tcp", "{ctx}");
    let want: IpAddr = dst.parse().unwrap();
    assert_eq!(
        d["dst"].as_str().and_then(|s| s.parse().ok()),
        Some(want),
        "{ctx}"
    );
    assert_eq!(d["port"], port, "{ctx}");
    // The command has its own pid namespace: the event names the host pid, the probe knows
    // only its namespaced one.
    assert!(
        d["pid"].as_u64().is_some_and(|p| p > 2) && out.pid > 0,
        "{ctx}: a host pid"
    );
    assert_eq!(d["comm"], "egress-probe", "{ctx}");
    assert_eq!(d["uid"], uid, "{ctx}");
    assert_eq!(
        d["cgroup"], ready["cgroup_id"],
        "{ctx}: the ready line's cgroup id"
    );
    assert_eq!(d["hook"], "connect4", "{ctx}");
}

#[test]
fn run_denies_a_port_outside_the_rule_and_reports_it() {
    let netns = TestNetns::new();
    let listener = TcpListener::bind(&netns, "127.0.0.1:9090");
    let (run, ready, out) = run_probe(&netns, "127.0.0.1:9090", &[]);
    // A command that would be root is root only in its own user namespace: 65534 outside.
    check_deny(&run, &ready, &out, "127.0.0.1", 9090, 65534);
    assert_eq!(deny_lines(&run)[0]["reason"], "port");
    assert_eq!(listener.received(), 0, "the denied port received data");
}

#[test]
fn run_denies_an_unlisted_address_and_reports_it() {
    let netns = TestNetns::new();
    let (run, ready, out) = run_probe(&netns, "198.51.100.20:443", &[]);
    check_deny(&run, &ready, &out, "198.51.100.20", 443, 65534);
    assert_eq!(deny_lines(&run)[0]["reason"], "no-rule");
}

#[test]
fn run_drops_the_command_to_the_sudo_invoker() {
    let netns = TestNetns::new();
    // An id of its own, not 65534 (what a root command is outside its user namespace).
    let user = [("SUDO_UID", "4242"), ("SUDO_GID", "4243")];
    let (run, ready, out) = run_probe(&netns, "198.51.100.20:443", &user);
    check_deny(&run, &ready, &out, "198.51.100.20", 443, 4242);
    assert_eq!(deny_lines(&run)[0]["gid"], 4243);
}

#[test]
fn run_propagates_the_commands_exit_status() {
    let netns = TestNetns::new();
    for (command, want) in [
        (&["sh", "-c", "exit 7"][..], 7),
        (&["sh", "-c", "exit 0"][..], 0),
        // Killed by SIGKILL: 128 + 9, as a shell reports it.
        (&["sh", "-c", "kill -KILL $$"][..], 137),
        (&["/nonexistent/egress-test-command"][..], 127),
    ] {
        let before = egress_cgroups();
        let mut run = AgentRun::start(&netns, ALLOW_8080, command, &[]);
        let code = run.exit_code();
        assert_eq!(code, want, "exit status of {command:?}\n{}", run.output());
        let ready = run
            .events()
            .into_iter()
            .find(|e| e["event"] == "ready")
            .unwrap_or_else(|| panic!("no ready line for {command:?}\n{}", run.output()));
        assert_cleaned_up(&run, &ready, &before);
    }
}

#[test]
fn sigterm_to_the_agent_stops_the_command_and_removes_the_cgroup() {
    let netns = TestNetns::new();
    let before = egress_cgroups();
    let mut run = AgentRun::start(&netns, ALLOW_8080, &["sleep", "60"], &[]);
    let ready = run.wait_ready();
    check_ready(&run, &ready);
    let cgroup = PathBuf::from(ready["cgroup"].as_str().expect("ready.cgroup"));
    // The command joins the cgroup right after the ready line.
    let procs = cgroup.join("cgroup.procs");
    let joined = poll_until(Duration::from_secs(10), || {
        let pids = fs::read_to_string(&procs).unwrap_or_default();
        (!pids.trim().is_empty()).then_some(pids)
    });
    assert!(
        joined.is_some(),
        "the command never appeared in {}\n{}",
        cgroup.display(),
        run.output()
    );

    // SAFETY: plain syscall to the agent this test started.
    let rc = unsafe { libc::kill(run.pid() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let code = run.exit_code();
    // SIGTERM is forwarded to the command; its death by signal 15 becomes 128 + 15.
    assert_eq!(code, 143, "exit status after SIGTERM\n{}", run.output());
    assert_cleaned_up(&run, &ready, &before);
}

#[test]
fn a_deny_flood_is_summarized_and_every_deny_is_counted() {
    // 3,000 connects to one denied destination, as fast as python can: the first lines are
    // written one by one, the rest summarized once a second with `repeats`, and the lines
    // add up to every deny.
    const N: u64 = 3000;
    let netns = TestNetns::new();
    let script = format!(
        "import socket\nfor _ in range({N}):\n    s = socket.socket()\n    try:\n        \
         s.connect(('198.51.100.20', 443))\n    except PermissionError:\n        pass\n    \
         s.close()\n"
    );
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &["python3", "-c", &script]).start();
    assert_eq!(run.exit_code(), 0, "{}", run.output());
    let lines = deny_lines(&run);
    let total: u64 = lines
        .iter()
        .map(|l| l["repeats"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(total, N, "the lines stand for every deny\n{}", run.output());
    assert!(
        lines.len() < 200,
        "{} lines for {N} identical denies: not summarized",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .any(|l| l["repeats"].as_u64().is_some_and(|r| r > 1)),
        "a summary line carries repeats"
    );
    for l in &lines {
        assert_eq!(l["dst"], "198.51.100.20", "{l}");
        assert_eq!(l["port"], 443, "{l}");
    }
}

/// A deny flood that overflows the kernel's event ring (the agent stopped with SIGSTOP while
/// 20,000 connects to 3,000 distinct ports are denied) is still accounted exactly: the deny
/// lines' `repeats` (1 where absent) plus the `count`s of the `denies-unrecorded` lines
/// (`ring-full`: lost in the kernel, counted there; `throttle`: beyond the summary lines) add up
/// to every deny, and no more than 1,000 lines come out for the burst's second.
#[test]
fn a_deny_flood_that_overflows_the_ring_is_accounted_exactly() {
    const N: u64 = 20_000;
    let netns = TestNetns::new();
    let script = format!(
        "import socket, time\ntime.sleep(1.5)\nfor i in range({N}):\n    s = socket.socket()\n    \
         try:\n        s.connect(('198.51.100.20', 1000 + i % 3000))\n    except \
         PermissionError:\n        pass\n    s.close()\n"
    );
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &["python3", "-c", &script]).start();
    let ready = run.wait_ready();
    let agent = libc::pid_t::try_from(run.pid()).expect("pid");
    let procs = PathBuf::from(ready["cgroup"].as_str().expect("ready.cgroup")).join("cgroup.procs");
    // The command is in its cgroup (sleeping before its flood): stop the agent now.
    let started = poll_until(Duration::from_secs(10), || {
        let pids = fs::read_to_string(&procs).unwrap_or_default();
        (!pids.trim().is_empty()).then_some(())
    });
    assert!(
        started.is_some(),
        "the command never started\n{}",
        run.output()
    );
    // SAFETY: plain syscall to the agent this test started.
    assert_eq!(unsafe { libc::kill(agent, libc::SIGSTOP) }, 0);
    let done = poll_until(Duration::from_secs(60), || {
        let pids = fs::read_to_string(&procs).unwrap_or_default();
        pids.trim().is_empty().then_some(())
    });
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(agent, libc::SIGCONT) }, 0);
    assert!(done.is_some(), "the flood never ended");
    assert_eq!(run.exit_code(), 0, "{}", run.output());
    let events = run.events();
    let lines: Vec<&Value> = events.iter().filter(|e| e["event"] == "deny").collect();
    let repeats: u64 = lines
        .iter()
        .map(|l| l["repeats"].as_u64().unwrap_or(1))
        .sum();
    let unrecorded = |cause: &str| -> u64 {
        events
            .iter()
            .filter(|e| e["event"] == "denies-unrecorded" && e["cause"] == cause)
            .map(|e| e["count"].as_u64().unwrap_or(0))
            .sum()
    };
    let (ring, throttle) = (unrecorded("ring-full"), unrecorded("throttle"));
    assert!(
        ring > 0,
        "the ring never overflowed: the test proves nothing\n{}",
        run.output()
    );
    assert_eq!(
        repeats + ring + throttle,
        N,
        "lines {} (repeats {repeats}), ring-full {ring}, throttle {throttle}",
        lines.len()
    );
    let counted = lines.len()
        + events
            .iter()
            .filter(|e| e["event"] == "denies-unrecorded")
            .count();
    assert!(
        counted <= 2 * 1000,
        "{counted} lines for a burst read in about one second"
    );
}
