//! The `cgroup_skb/egress` backstop: packets that no socket hook judged still cannot leave
//! toward a destination that is not allowed. The way to get such packets here is a socket
//! opened in the cgroup *before* enforcement was attached (the situation of `attach` on a
//! running workload): `sock_create` never saw it, and a raw ICMP socket has no connect or
//! sendmsg hook. Its echo request (no `protocol: icmp` rule names the destination) and a
//! timestamp request (no ICMP type but echo ever passes) must be dropped, and the echo
//! counters of the namespace must not move.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::Duration,
};

use egress_agent::{
    bpf::enforcer::{Enforcer, EnforcerOptions},
    policy,
};
use egress_tests::{TestCgroup, TestNetns, UdpListener, require_root};

/// Opens its sockets at once, then sends one packet per line read on stdin and prints the
/// outcome of each.
const SCRIPT: &str = r#"
import json, os, socket, struct, sys
# One CPU: a send and the raw send after it meet the same per-CPU slot (`recent`).
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
# Hand-made UDP (no socket hook judges a raw socket's sends; sock_create refuses new ones).
raw_udp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
conn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
conn.connect(("198.51.100.20", 5001))
print("ready", flush=True)
# An ICMP message of `kind` (8: echo request, 13: timestamp request), id 0x4242, seq 1,
# checksum computed below.
def icmp_message(kind):
    hdr = bytearray([kind]) + bytearray(b"\x00\x00\x00\x42\x42\x00\x01") + b"backstop"
    s = 0
    for i in range(0, len(hdr), 2):
        s += (hdr[i] << 8) + hdr[i + 1]
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    c = ~s & 0xffff
    hdr[2], hdr[3] = c >> 8, c & 0xff
    return bytes(hdr)
def raw_to(host, port):
    raw_udp.sendto(struct.pack("!HHHH", 40000, port, 9, 0) + b"x", (host, 0))
for line in sys.stdin:
    what = line.strip()
    try:
        if what.startswith("pair "):
            # An allowed send, then at once a raw datagram to another destination.
            _, host, port = what.split()
            udp.sendto(b"x", ("198.51.100.20", 5000))
            raw_to(host, int(port))
        elif what.startswith("raw-udp "):
            _, host, port = what.split()
            raw_to(host, int(port))
        elif what == "icmp":
            icmp.sendto(icmp_message(8), ("198.51.100.20", 0))
        elif what == "icmp-timestamp":
            icmp.sendto(icmp_message(13), ("198.51.100.20", 0))
        elif what == "udp":
            udp.sendto(b"x", ("198.51.100.20", 5000))
        elif what == "udp-connected":
            conn.send(b"x")
        elif what == "udp-connected-cmsg":
            conn.sendmsg([b"x"], [(socket.IPPROTO_IP, socket.IP_TOS, (0x10).to_bytes(4, sys.byteorder))])
        print(json.dumps({"what": what, "ok": True}), flush=True)
    except OSError as e:
        print(json.dumps({"what": what, "ok": False, "errno": e.errno}), flush=True)
"#;

struct Sender {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Sender {
    /// Starts the script in `netns` and `cg` (joined before exec), as root with CAP_NET_RAW.
    fn start(netns: &TestNetns, cg: &TestCgroup) -> Self {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(cg.path().join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        let mut cmd = netns.command("python3");
        cmd.args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: one raw write on a descriptor opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start python3");
        drop(procs);
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready", "the sender opened its sockets");
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, what: &str) -> serde_json::Value {
        writeln!(self.stdin, "{what}").expect("write");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Attaches the programs to `cg` with the allowlist `yaml`.
fn enforce(cg: &TestCgroup, yaml: &str) -> Enforcer {
    let policy = policy::parse_str(yaml, Path::new("backstop.yaml")).expect("policy");
    Enforcer::attach(cg.path(), &policy, &EnforcerOptions::default())
        .expect("attach to the test cgroup")
}

/// `InEchos` of the namespace (`/proc/net/snmp` read from inside it).
fn in_echos(netns: &TestNetns) -> u64 {
    let text = netns
        .run_in(|| fs::read_to_string(Path::new("/proc/thread-self/net/snmp")))
        .expect("read /proc/net/snmp");
    let mut lines = text.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (lines.next().expect("header"), lines.next().expect("values"));
    let i = names
        .split_whitespace()
        .position(|n| n == "InEchos")
        .expect("InEchos column");
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("InEchos value")
}

#[test]
fn a_socket_opened_before_enforcement_cannot_send_what_no_rule_allows() {
    require_root();
    let netns = TestNetns::new();
    netns.add_lo_address("198.51.100.20/32");
    let cg = TestCgroup::new();
    let mut sender = Sender::start(&netns, &cg);

    // Control: before enforcement the echo goes out and arrives.
    let before = in_echos(&netns);
    let out = sender.send("icmp");
    assert_eq!(out["ok"], true, "control: the echo request goes out: {out}");
    assert!(
        in_echos(&netns) > before,
        "control: the namespace received the echo request"
    );

    let mut enf = enforce(
        &cg,
        "version: 1\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n",
    );

    let before = in_echos(&netns);
    let out = sender.send("icmp");
    assert_eq!(
        out["ok"], false,
        "the backstop drops the echo request: {out}"
    );
    assert_eq!(out["errno"], libc::EPERM, "{out}");
    let ts = sender.send("icmp-timestamp");
    assert_eq!(ts["ok"], false, "other ICMP types are dropped: {ts}");
    let udp = sender.send("udp");
    assert_eq!(
        udp["ok"], false,
        "an unconnected UDP send is judged too: {udp}"
    );
    assert_eq!(
        in_echos(&netns),
        before,
        "no echo request reached the namespace"
    );
    // An echo request is judged by its destination (no rule allows ICMP to it); any other
    // ICMP type is dropped for its protocol.
    let events = enf.poll_denies();
    let backstop = |reason: &str| {
        events
            .iter()
            .any(|e| e.hook == "egress" && e.proto == "icmp" && e.reason == reason)
    };
    assert!(
        backstop("no-rule") && backstop("protocol"),
        "both drops are reported by the backstop: {events:?}"
    );
}

/// What the backstop does not do, as README and THREATS say: a UDP socket connected before
/// the programs were attached (`attach` on a running workload) keeps sending to its peer, with
/// a plain `send` (no socket hook runs on that path) or with a control message (`sendmsg4` runs
/// without an address and passes a connected socket's send: the datagram can only go to the
/// peer), and the backstop passes a connected socket's datagram to its peer: it cannot tell
/// when the connect was judged. Anywhere else is judged: an unconnected send is denied.
#[test]
fn a_udp_socket_connected_before_enforcement_keeps_only_its_peer() {
    require_root();
    let netns = TestNetns::new();
    netns.add_lo_address("198.51.100.20/32");
    // The peer listens: no port-unreachable comes back to fail the next send.
    let peer = UdpListener::bind(&netns, "198.51.100.20:5001");
    let cg = TestCgroup::new();
    let mut sender = Sender::start(&netns, &cg);
    let _enf = enforce(
        &cg,
        "version: 1\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n",
    );

    let plain = sender.send("udp-connected");
    assert_eq!(
        plain["ok"], true,
        "a plain send on a socket connected before attach passes (the gap written down): {plain}"
    );
    let cmsg = sender.send("udp-connected-cmsg");
    assert_eq!(
        cmsg["ok"], true,
        "with a control message it goes to the same peer, and passes too: {cmsg}"
    );
    assert!(
        peer.wait_received(2, Duration::from_secs(2)),
        "both datagrams reached the peer ({} did)",
        peer.received()
    );
    let unconnected = sender.send("udp");
    assert_eq!(unconnected["errno"], libc::EPERM, "{unconnected}");
}

/// The backstop passes the packet of a send the socket hook allowed a moment ago on the same
/// CPU without looking it up again (`recent`, issue 14). That shortcut must match exactly what
/// was allowed: a raw UDP datagram (a socket opened before enforcement: no socket hook judges
/// it) sent at once after an allowed send, on the same CPU, to another port or another address
/// is still dropped, and reported by the backstop; to the allowed destination it passes.
#[test]
fn the_backstop_passes_only_the_destination_just_allowed() {
    require_root();
    let netns = TestNetns::new();
    netns.add_lo_address("198.51.100.20/32");
    netns.add_lo_address("198.51.100.21/32");
    let cg = TestCgroup::new();
    let mut sender = Sender::start(&netns, &cg);
    let mut enf = enforce(
        &cg,
        "version: 1\nallow:\n  - ip: 198.51.100.20\n    ports: [5000]\n    protocol: udp\n",
    );

    for _ in 0..20 {
        for (to, why) in [
            ("198.51.100.20 5001", "port"),
            ("198.51.100.21 5000", "no-rule"),
        ] {
            let out = sender.send(&format!("pair {to}"));
            assert_eq!(
                (out["ok"].clone(), out["errno"].clone()),
                (serde_json::json!(false), serde_json::json!(libc::EPERM)),
                "a raw datagram to {to} right after an allowed send is dropped ({why}): {out}"
            );
        }
    }
    let out = sender.send("raw-udp 198.51.100.20 5000");
    assert_eq!(out["ok"], true, "the allowed destination passes: {out}");
    let events = enf.poll_denies();
    for (port, why) in [(5001, "port"), (5000, "no-rule")] {
        assert!(
            events.iter().any(|e| e.hook == "egress"
                && e.proto == "udp"
                && e.port == port
                && e.reason == why),
            "the backstop reported the drop to port {port} ({why}): {events:?}"
        );
    }
}
