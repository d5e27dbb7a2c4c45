//! Connections coming in: a command under the real `egress-agent run` listens on
//! `[::]:8080` (dual stack) and writes a secret to whoever connects. A peer in another
//! network namespace (a veth pair, documentation addresses) connects in:
//! - with no `inbound:` rule the handshake never completes, and the peer's wire (an
//!   AF_PACKET capture on its side of the veth) carries ZERO payload bytes from the
//!   command, over IPv4 and IPv6, with SYN cookies forced too; a `deny` line with
//!   `"hook":"accept"` names the peer and the local port;
//! - with `- inbound: <peer>/32, ports: [8080]` the peer gets the secret;
//! - a client on loopback (outside the cgroup) is served whatever the rules;
//! - a UDP server in the sandbox cannot reply to a peer no rule allows (its `sendto` is
//!   judged by sendmsg4/6 like any send).

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use egress_tests::{AgentRun, TestDir, TestNetns, poll_until, world::python3};
use serde_json::Value;

/// The sandbox side of the veth.
const SRV4: &str = "192.0.2.1";
const SRV6: &str = "2001:db8::1";
/// The peer side.
const PEER4: &str = "192.0.2.2";
const PEER6: &str = "2001:db8::2";
const PORT: u16 = 8080;

/// The command: a TCP server on `[::]:PORT` (or a UDP one) that sends `SECRET` to each
/// client, until `STOP` exists (at most 40 s).
const SERVER: &str = r#"
import json, os, socket, sys, time
kind, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 40
if kind in ("tcp", "tfo"):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if kind == "tfo":
        # TCP Fast Open, server side: data with the SYN, a child socket before the ACK.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 5)
    s.bind(("::", port))
    s.listen(1)
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
s.settimeout(0.2)
print("listening", flush=True)
while time.time() < deadline and not os.path.exists(stop):
    try:
        if kind != "udp":
            c, peer = s.accept()
            c.sendall(b"SECRET-INBOUND\n" * 4)
            c.close()
            print(json.dumps({"accepted": peer[0]}), flush=True)
        else:
            data, peer = s.recvfrom(100)
            try:
                s.sendto(b"SECRET-INBOUND\n", peer)
                print(json.dumps({"replied": peer[0]}), flush=True)
            except OSError as e:
                print(json.dumps({"reply_failed": peer[0], "errno": e.errno}), flush=True)
    except socket.timeout:
        pass
"#;

/// The peer: captures its veth, connects (TCP) or sends (UDP) to the server, and reports
/// what its socket received and how many payload bytes from the server's port crossed the
/// wire at all.
const CLIENT: &str = r#"
import json, socket, struct, sys, time
kind, dev, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cap = None
if dev != "-":
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
    cap.bind((dev, 0))
    cap.setblocking(False)
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
out = {"connected": False, "received": 0, "error": None}
try:
    if kind in ("tcp", "tfo"):
        c = socket.socket(fam, socket.SOCK_STREAM)
        if kind == "tfo":
            # Blocking (a timeout makes the socket non-blocking: EINPROGRESS), bounded by
            # SO_SNDTIMEO.
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0))
            c.sendto(b"hello", socket.MSG_FASTOPEN, (dst, port))
            c.settimeout(3)
        else:
            c.settimeout(3)
            c.connect((dst, port))
        out["connected"] = True
        while True:
            b = c.recv(4096)
            if not b:
                break
            out["received"] += len(b)
    else:
        c = socket.socket(fam, socket.SOCK_DGRAM)
        c.settimeout(2)
        c.sendto(b"hello", (dst, port))
        out["received"] = len(c.recv(100))
except OSError as e:
    out["error"] = str(e)
time.sleep(0.5)
wire = synacks = 0
while cap is not None:
    try:
        f = cap.recv(65535)
    except BlockingIOError:
        break
    et = struct.unpack("!H", f[12:14])[0]
    p = f[14:]
    if et == 0x0800 and p[9] in (6, 17):
        ihl = (p[0] & 15) * 4
        total = struct.unpack("!H", p[2:4])[0]
        l4, proto, rest = p[ihl:], p[9], total - ihl
    elif et == 0x86dd and p[6] in (6, 17):
        l4, proto, rest = p[40:], p[6], struct.unpack("!H", p[4:6])[0]
    else:
        continue
    if struct.unpack("!H", l4[0:2])[0] != port:
        continue
    if proto == 6:
        if l4[13] & 0x12 == 0x12:
            synacks += 1
        wire += rest - (l4[12] >> 4) * 4
    else:
        wire += rest - 8
out["wire_payload"] = wire
out["synacks"] = synacks
print(json.dumps(out), flush=True)
"#;

/// Two namespaces joined by a veth: the sandbox (`srv`, where the agent runs) and the peer.
struct Lab {
    srv: TestNetns,
    peer: TestNetns,
    dir: TestDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    fn new() -> Self {
        let (srv, peer) = (TestNetns::new(), TestNetns::new());
        // Created inside the sandbox namespace, its peer end moved straight into the peer
        // namespace: nothing touches the host's namespace.
        ip(&[
            "-n",
            srv.name(),
            "link",
            "add",
            "egin0",
            "type",
            "veth",
            "peer",
            "name",
            "egin1",
            "netns",
            peer.name(),
        ]);
        for (ns, dev, v4, v6) in [(&srv, "egin0", SRV4, SRV6), (&peer, "egin1", PEER4, PEER6)] {
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns.name(), "link", "set", dev, "up"]);
        }
        Self {
            srv,
            peer,
            dir: TestDir::new(),
        }
    }

    /// Sets a sysctl inside the sandbox namespace only.
    fn srv_sysctl(&self, setting: &str) {
        let out = self
            .srv
            .command("sysctl")
            .args(["-w", setting])
            .stdin(Stdio::null())
            .output()
            .expect("run sysctl");
        assert!(out.status.success(), "sysctl -w {setting}");
    }

    /// Starts the server under `run` with `allowlist`; waits until it listens.
    fn serve(&self, kind: &str, allowlist: &str) -> AgentRun {
        let stop = self.dir.path().join("stop");
        let _ = fs::remove_file(&stop);
        let stop = stop.to_str().expect("utf-8").to_owned();
        let port = PORT.to_string();
        let mut run = AgentRun::start(
            &self.srv,
            allowlist,
            &[python3(), "-c", SERVER, kind, &port, &stop],
            &[],
        );
        run.wait_ready();
        let listening = poll_until(Duration::from_secs(10), || {
            run.stdout().contains("listening").then_some(())
        });
        assert!(
            listening.is_some(),
            "the server did not start\n{}",
            run.output()
        );
        run
    }

    /// Connects from `ns` (capturing `dev`, or `-`) to `dst`.
    fn client(&self, ns: &TestNetns, kind: &str, dev: &str, dst: &str) -> Value {
        let out = ns
            .command(python3())
            .args(["-c", CLIENT, kind, dev, dst, &PORT.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("run the client");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "client output {text:?}: {e}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn peer_connects(&self, kind: &str, dst: &str) -> Value {
        self.client(&self.peer, kind, "egin1", dst)
    }

    fn stop(&self, mut run: AgentRun) -> AgentRun {
        fs::write(self.dir.path().join("stop"), b"").expect("write stop");
        assert_eq!(run.exit_code(), 0, "{}", run.output());
        run
    }
}

fn no_inbound() -> String {
    "version: 1\nname: inbound-test\nallow:\n  - ip: 198.51.100.9\n    ports: [443]\n".into()
}

/// The peer got nothing: no connection, no byte, nothing on the wire.
fn assert_refused(out: &Value, run: &AgentRun) {
    assert_eq!(out["connected"], false, "{out}\n{}", run.output());
    assert_eq!(out["received"], 0, "{out}\n{}", run.output());
    assert_eq!(
        out["wire_payload"],
        0,
        "payload from the command crossed the wire: {out}\n{}",
        run.output()
    );
    assert_eq!(out["synacks"], 0, "a SYN-ACK went out: {out}");
}

/// The agent wrote a deny line for `peer` connecting in to PORT.
fn assert_accept_denied(run: &AgentRun, peer: &str) {
    let denies = run.events_of("deny");
    assert!(
        denies.iter().any(|e| e["hook"] == "accept"
            && e["dst"] == peer
            && e["port"] == PORT
            && e["proto"] == "tcp"
            && e["reason"] == "no-rule"),
        "no accept deny for {peer}\n{}",
        run.output()
    );
}

#[derive(PartialEq)]
enum Variant {
    Plain,
    /// Every SYN is answered with a cookie: no request socket, a SYN-ACK owned by no socket
    /// (the egress filter never sees it), and the ACK creates the child.
    SynCookies,
    /// TCP Fast Open without a cookie: the SYN's data creates a child socket at once.
    FastOpen,
}

fn refuses_a_peer(dst: &str, peer: &str, variant: Variant) {
    let lab = Lab::new();
    let kind = match variant {
        Variant::Plain => "tcp",
        Variant::SynCookies => {
            lab.srv_sysctl("net.ipv4.tcp_syncookies=2");
            "tcp"
        }
        Variant::FastOpen => {
            // Client and server, no cookie required (0x200), in these namespaces only.
            lab.srv_sysctl("net.ipv4.tcp_fastopen=515");
            let out = lab
                .peer
                .command("sysctl")
                .args(["-w", "net.ipv4.tcp_fastopen=515"])
                .stdin(Stdio::null())
                .output()
                .expect("sysctl");
            assert!(out.status.success());
            "tfo"
        }
    };
    let run = lab.serve(kind, &no_inbound());
    let out = lab.peer_connects(kind, dst);
    let run = lab.stop(run);
    assert_refused(&out, &run);
    assert_accept_denied(&run, peer);
    assert!(
        !run.stdout().contains("accepted"),
        "the server accepted a connection\n{}",
        run.output()
    );
}

#[test]
fn a_peer_no_rule_allows_gets_nothing_over_ipv4() {
    refuses_a_peer(SRV4, PEER4, Variant::Plain);
}

#[test]
fn a_peer_no_rule_allows_gets_nothing_over_ipv6() {
    refuses_a_peer(SRV6, PEER6, Variant::Plain);
}

#[test]
fn a_peer_no_rule_allows_gets_nothing_with_syn_cookies() {
    refuses_a_peer(SRV4, PEER4, Variant::SynCookies);
}

#[test]
fn a_peer_no_rule_allows_gets_nothing_with_tcp_fast_open() {
    refuses_a_peer(SRV4, PEER4, Variant::FastOpen);
}

/// Control for the variants: an allowed peer is served with SYN cookies forced and with
/// TCP Fast Open, so the refusals above are the policy's doing.
#[test]
fn an_allowed_peer_is_served_with_syn_cookies_and_fast_open() {
    let lab = Lab::new();
    lab.srv_sysctl("net.ipv4.tcp_syncookies=2");
    lab.srv_sysctl("net.ipv4.tcp_fastopen=515");
    let out = lab
        .peer
        .command("sysctl")
        .args(["-w", "net.ipv4.tcp_fastopen=515"])
        .stdin(Stdio::null())
        .output()
        .expect("sysctl");
    assert!(out.status.success());
    let allow = format!(
        "{}  - inbound: {PEER4}\n    ports: [{PORT}]\n",
        no_inbound()
    );
    let run = lab.serve("tfo", &allow);
    let tfo = lab.peer_connects("tfo", SRV4);
    let plain = lab.peer_connects("tcp", SRV4);
    let run = lab.stop(run);
    let secret = "SECRET-INBOUND\n".len() * 4;
    assert_eq!(tfo["received"], secret, "{tfo}\n{}", run.output());
    assert_eq!(plain["received"], secret, "{plain}\n{}", run.output());
}

#[test]
fn an_inbound_rule_lets_its_peer_in_and_loopback_is_always_served() {
    let lab = Lab::new();
    let allow = format!(
        "{}  - inbound: {PEER4}/32\n    ports: [{PORT}]\n  - inbound: {PEER6}\n    ports: [9000]\n",
        no_inbound()
    );
    let run = lab.serve("tcp", &allow);
    let v4 = lab.peer_connects("tcp", SRV4);
    // The IPv6 address of the same peer is allowed on another port only.
    let v6 = lab.peer_connects("tcp", SRV6);
    // A client on the sandbox's own loopback, outside the cgroup.
    let lo = lab.client(&lab.srv, "tcp", "-", "127.0.0.1");
    let lo6 = lab.client(&lab.srv, "tcp", "-", "::1");
    let run = lab.stop(run);
    let secret = "SECRET-INBOUND\n".len() * 4;
    assert_eq!(v4["received"], secret, "{v4}\n{}", run.output());
    assert_eq!(lo["received"], secret, "{lo}\n{}", run.output());
    assert_eq!(lo6["received"], secret, "{lo6}\n{}", run.output());
    assert_refused(&v6, &run);
    let denies = run.events_of("deny");
    assert!(
        denies
            .iter()
            .any(|e| e["hook"] == "accept" && e["dst"] == PEER6 && e["reason"] == "port"),
        "the IPv6 peer is denied for its port\n{}",
        run.output()
    );
    assert!(
        !denies
            .iter()
            .any(|e| e["dst"] == PEER4 || e["dst"] == "127.0.0.1"),
        "allowed peers were reported\n{}",
        run.output()
    );
}

#[test]
fn a_udp_server_cannot_reply_to_a_peer_no_rule_allows() {
    let lab = Lab::new();
    let run = lab.serve("udp", &no_inbound());
    let out = lab.peer_connects("udp", SRV4);
    let run = lab.stop(run);
    assert_eq!(out["received"], 0, "{out}\n{}", run.output());
    assert_eq!(out["wire_payload"], 0, "{out}\n{}", run.output());
    assert!(
        run.stdout().contains(&format!(
            "\"reply_failed\": \"::ffff:{PEER4}\", \"errno\": {}",
            libc::EPERM
        )),
        "the reply was refused with EPERM\n{}",
        run.output()
    );
    assert!(
        run.events_of("deny")
            .iter()
            // A mapped destination on an IPv6 socket is sent (and judged) as IPv4.
            .any(|e| e["dst"] == PEER4 && e["proto"] == "udp" && e["hook"] == "sendmsg4"),
        "{}",
        run.output()
    );
}

#[test]
fn audit_mode_reports_the_peer_and_lets_it_in() {
    let lab = Lab::new();
    let allow = no_inbound().replace("name: inbound-test\n", "name: inbound-test\nmode: audit\n");
    let run = lab.serve("tcp", &allow);
    let out = lab.peer_connects("tcp", SRV4);
    let run = lab.stop(run);
    assert_eq!(
        out["received"],
        "SECRET-INBOUND\n".len() * 4,
        "{out}\n{}",
        run.output()
    );
    let audits = run.events_of("audit");
    let accept: Vec<&Value> = audits.iter().filter(|e| e["hook"] == "accept").collect();
    assert!(
        !accept.is_empty()
            && accept
                .iter()
                .all(|e| e["dst"] == PEER4 && e["port"] == PORT),
        "{}",
        run.output()
    );
}
