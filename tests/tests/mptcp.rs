//! MPTCP: a subflow the kernel opens for an MPTCP connection is judged like any connect (its
//! socket carries the connection's cgroup), and its deny is attributed to the socket's side
//! (the enforced cgroup, the kernel worker named as such), not to the worker as if it were
//! the owner. Found from outside (issue 19): the deny said `kworker/N:M`, pid of the worker,
//! cgroup 1 (the root).
//!
//! The namespace's path manager (per namespace, `ip mptcp`) announces a second address of
//! the server, 203.0.113.5, which no rule allows; the client's side accepts it and opens a
//! subflow to it from the MPTCP worker.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    time::Duration,
};

use egress_agent::{
    bpf::enforcer::{Enforcer, EnforcerOptions},
    policy,
};
use egress_tests::{TestCgroup, TestNetns, pod::join_cgroup, poll_until, require_root};

/// An MPTCP listener on 8080 (outside the enforced cgroup) that keeps its first connection.
const SERVER: &str = r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(8)
print("ready", flush=True)
c, _ = s.accept()
time.sleep(6)
"#;

/// An MPTCP client that connects to the allowed address and stays a while.
const CLIENT: &str = r#"
import json, os, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
s.connect(("198.51.100.10", 8080))
s.sendall(b"x")
print(json.dumps({"pid": os.getpid()}), flush=True)
time.sleep(3)
"#;

#[test]
fn an_mptcp_subflow_to_a_denied_address_is_denied_and_attributed_to_its_owner() {
    require_root();
    let netns = TestNetns::new();
    netns.add_lo_address("198.51.100.10/32");
    netns.add_lo_address("203.0.113.5/32");
    for args in [
        &[
            "mptcp",
            "limits",
            "set",
            "add_addr_accepted",
            "1",
            "subflows",
            "1",
        ][..],
        &["mptcp", "endpoint", "add", "203.0.113.5", "signal"][..],
    ] {
        let st = netns.command("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?}");
    }
    let cg = TestCgroup::new();
    let policy = policy::parse_str(
        "version: 1\nallow:\n  - ip: 198.51.100.10\n    ports: [8080]\n",
        Path::new("mptcp.yaml"),
    )
    .expect("policy");
    let mut enf = Enforcer::attach(cg.path(), &policy, &EnforcerOptions::default())
        .expect("attach to the test cgroup");

    let mut server = netns
        .command("python3")
        .args(["-c", SERVER])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut line = String::new();
    BufReader::new(server.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "ready");
    let mut cmd = netns.command("python3");
    cmd.args(["-c", CLIENT]).stdout(Stdio::piped());
    join_cgroup(&mut cmd, cg.path());
    let mut client = cmd.spawn().expect("start the client");
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let out: serde_json::Value = serde_json::from_str(&line).expect("client json");

    let mut seen = Vec::new();
    let deny = poll_until(Duration::from_secs(5), || {
        seen.extend(enf.poll_denies());
        seen.iter()
            .find(|e| e.dst.to_string() == "203.0.113.5")
            .cloned()
    });
    assert!(
        out["pid"].is_u64(),
        "the MPTCP connection to the allowed address: {out}"
    );
    let _ = client.kill();
    let _ = client.wait();
    let _ = server.kill();
    let _ = server.wait();
    let deny = deny.expect("the subflow to the announced address is denied");
    assert_eq!(
        (deny.hook, deny.reason, deny.port),
        ("connect4", "no-rule", 8080),
        "{deny:?}"
    );
    assert!(
        deny.worker
            .as_deref()
            .is_some_and(|w| w.starts_with("kworker")),
        "the kernel worker is named as such: {deny:?}"
    );
    assert_eq!(
        (deny.pid, deny.tid, deny.comm.as_str(), deny.cgroup),
        (0, 0, "", cg.id()),
        "attributed to the socket's cgroup, no owner pid claimed: {deny:?}"
    );
}
