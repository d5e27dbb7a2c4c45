//! Inbound connections (issue #20): a listener in the enforced cgroup accepts only peers an
//! `inbound:` rule names (and loopback); from anyone else the handshake never completes, so
//! nothing the command writes reaches them.
//!
//! Peers are documentation addresses on the test namespace's `lo`, connecting from the test
//! itself (outside the cgroup). Run as root, after `cargo build -p egress-agent`:
//! `cargo test -p egress-tests --test inbound -- --test-threads=1`.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use egress_tests::{AgentRun, TestNetns, poll_until, world::python3};

/// A server for 8 seconds: TCP on 0.0.0.0:8080 and [::]:8080 sends `secret` to whoever it
/// accepts; UDP on 0.0.0.0:8082 answers each datagram (`udp_reply=ok|<errno>`).
const SERVER: &str = r#"
import os, select, socket, time
t4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t4.bind(("0.0.0.0", 8080)); t4.listen(8)
t6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
t6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t6.bind(("::", 8080)); t6.listen(8)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 8082))
print("listening=1", flush=True)
end = time.time() + 8
while time.time() < end:
    r, _, _ = select.select([t4, t6, u], [], [], 0.2)
    for s in r:
        if s is u:
            data, peer = u.recvfrom(100)
            try:
                u.sendto(b"secret", peer)
                print("udp_reply=ok", flush=True)
            except OSError as e:
                print(f"udp_reply={e.errno}", flush=True)
            continue
        c, peer = s.accept()
        print(f"accepted={peer[0]}", flush=True)
        c.sendall(b"secret")
        c.close()
"#;

const NO_INBOUND: &str = "version: 1\nname: inbound-test\nallow: []\n";
const INBOUND_8080: &str =
    "version: 1\nname: inbound-test\nallow:\n  - inbound: 203.0.113.0/24\n    ports: [8080]\n";

fn lab() -> TestNetns {
    let netns = TestNetns::new();
    netns.add_lo_address("203.0.113.7/32");
    netns.add_lo_address("2001:db8::7/128");
    netns
}

fn start(netns: &TestNetns, allowlist: &str) -> AgentRun {
    let mut run = AgentRun::builder(netns, allowlist, &[python3(), "-c", SERVER]).start();
    let ready = poll_until(Duration::from_secs(20), || {
        run.stdout().contains("listening=1").then_some(())
    });
    assert!(
        ready.is_some(),
        "the server did not start\n{}",
        run.output()
    );
    let _ = run.running();
    run
}

/// Connects to `to` from the test (outside the cgroup) and reads what the server sends:
/// `Some(bytes)` once connected, `None` when the connection never completes.
fn fetch(netns: &TestNetns, to: &str) -> Option<Vec<u8>> {
    let to: SocketAddr = to.parse().expect("address");
    netns.run_in(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        Some(got)
    })
}

fn accept_denies(run: &AgentRun) -> Vec<serde_json::Value> {
    run.events_of("deny")
        .into_iter()
        .filter(|e| e["hook"] == "accept")
        .collect()
}

#[test]
fn a_peer_no_rule_names_never_gets_a_connection() {
    let netns = lab();
    let mut run = start(&netns, NO_INBOUND);
    let v4 = fetch(&netns, "203.0.113.7:8080");
    let v6 = fetch(&netns, "[2001:db8::7]:8080");
    // Loopback peers are served: a client on this machine is not a way out.
    let lo = fetch(&netns, "127.0.0.1:8080");
    run.wait();
    assert_eq!(v4, None, "an IPv4 peer got a connection\n{}", run.output());
    assert_eq!(v6, None, "an IPv6 peer got a connection\n{}", run.output());
    assert_eq!(lo.as_deref(), Some(&b"secret"[..]), "{}", run.output());
    let denies = accept_denies(&run);
    for peer in ["203.0.113.7", "2001:db8::7"] {
        let e = denies
            .iter()
            .find(|e| e["dst"] == peer)
            .unwrap_or_else(|| panic!("no accept deny for {peer}\n{}", run.output()));
        assert_eq!(e["port"], 8080, "{e}");
        assert_eq!(e["reason"], "no-rule", "{e}");
    }
    assert!(
        !run.stdout().contains("accepted=203.0.113.7"),
        "the command accepted the denied peer\n{}",
        run.output()
    );
}

#[test]
fn an_inbound_rule_lets_its_peers_connect_on_its_ports() {
    let netns = lab();
    let mut run = start(&netns, INBOUND_8080);
    let got = fetch(&netns, "203.0.113.7:8080");
    let v6 = fetch(&netns, "[2001:db8::7]:8080");
    run.wait();
    assert_eq!(got.as_deref(), Some(&b"secret"[..]), "{}", run.output());
    // The rule names IPv4 peers only.
    assert_eq!(v6, None, "{}", run.output());
}

#[test]
fn a_udp_server_cannot_answer_a_peer_no_rule_allows() {
    let netns = lab();
    let mut run = start(&netns, INBOUND_8080);
    let got = netns.run_in(|| {
        let s = UdpSocket::bind("203.0.113.7:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s.send_to(b"ask", "203.0.113.7:8082").expect("send");
        let mut buf = [0u8; 64];
        s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    });
    run.wait();
    assert_eq!(
        got,
        None,
        "the UDP answer reached the peer\n{}",
        run.output()
    );
    assert!(
        run.stdout().contains(&format!("udp_reply={}", libc::EPERM)),
        "{}",
        run.output()
    );
}
