//! The enforcement core against the kernel: the connect4/6 and sendmsg4/6 programs attached
//! to a test cgroup, driven by `egress-probe` processes inside a test network namespace.
//!
//! Every denied "remote" destination (198.51.100.20, 2001:db8::20) is tried from inside a
//! namespace that holds only `lo`: if enforcement failed the probe would see ENETUNREACH,
//! and no packet could leave the machine.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, SystemTime},
};

use egress_agent::{
    bpf::enforcer::{Enforcer, EnforcerOptions},
    events::DenyRecord,
    policy,
};
use egress_tests::{
    Outcome, Probe, TcpListener, TestCgroup, TestNetns, UdpListener, poll_until, require_root,
};

/// How long to wait for a listener or an event.
const WAIT: Duration = Duration::from_secs(2);

/// A cgroup with the programs attached under one allowlist, and a namespace to probe from.
/// Fields drop in order: the programs are detached before the cgroup is removed.
struct Sandbox {
    enf: Enforcer,
    cg: TestCgroup,
    netns: TestNetns,
    yaml: String,
}

impl Sandbox {
    /// Attaches the allowlist whose `allow:` items are `allow` (YAML list lines, or ` []`).
    fn new(allow: &str) -> Self {
        Self::with_header("", allow)
    }

    /// As [`Sandbox::new`], with extra top-level keys (e.g. `mode: audit`).
    fn with_header(header: &str, allow: &str) -> Self {
        Self::with_options(header, allow, &EnforcerOptions::default())
    }

    /// As [`Sandbox::with_header`], with these enforcer options.
    fn with_options(header: &str, allow: &str, opts: &EnforcerOptions) -> Self {
        require_root();
        let yaml = format!("version: 1\nname: test\n{header}allow:{allow}");
        let policy = policy::parse_str(&yaml, Path::new("test.yaml"))
            .unwrap_or_else(|e| panic!("test allowlist does not parse: {e}\n{yaml}"));
        let netns = TestNetns::new();
        let cg = TestCgroup::new();
        let enf = Enforcer::attach(cg.path(), &policy, opts)
            .unwrap_or_else(|e| panic!("cannot attach to {}: {e:#}", cg.path().display()));
        Self {
            enf,
            cg,
            netns,
            yaml,
        }
    }

    /// Runs the probe inside the enforced cgroup.
    fn probe(&self, action: &str, dst: &str) -> Outcome {
        Probe::new(&self.netns)
            .in_cgroup(&self.cg)
            .run(&[action, dst])
    }

    /// Runs the probe and asserts it succeeded and produced no deny event.
    fn allowed(&mut self, action: &str, dst: &str) -> Outcome {
        let out = self.probe(action, dst);
        if !out.ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        let events = self.enf.poll_denies();
        assert!(
            out.ok,
            "{action} {dst} should be allowed under\n{}\ngot {out:?}, denies {events:#?}",
            self.yaml
        );
        assert!(
            events.is_empty(),
            "{action} {dst} was allowed but reported as denied: {events:#?}"
        );
        out
    }

    /// Runs the probe, asserts EPERM and exactly one deny event that names the probe, the
    /// destination (IPv4-mapped shown as IPv4), the protocol, the hook and the cgroup.
    /// Returns the event (for its reason).
    fn denied(&mut self, action: &str, dst: &str) -> DenyRecord {
        let out = self.probe(action, dst);
        assert!(
            out.is_eperm(),
            "{action} {dst} should fail with EPERM under\n{}\ngot {out:?}",
            self.yaml
        );
        let events = self.wait_denies();
        assert_eq!(
            events.len(),
            1,
            "one denied {action} {dst} should give exactly one event, got {events:#?}"
        );
        let ev = events.into_iter().next().expect("one event");
        self.check_event(&ev, action, dst, out.pid);
        ev
    }

    /// Drains deny events, polling until at least one arrived (at most [`WAIT`]).
    fn wait_denies(&mut self) -> Vec<DenyRecord> {
        let enf = &mut self.enf;
        let mut events = poll_until(WAIT, || {
            let v = enf.poll_denies();
            (!v.is_empty()).then_some(v)
        })
        .unwrap_or_else(|| panic!("no deny event within {WAIT:?}"));
        // Whatever else is queued already (a duplicate would be a bug).
        events.extend(self.enf.poll_denies());
        events
    }

    fn check_event(&self, ev: &DenyRecord, action: &str, dst: &str, pid: u32) {
        let sa: SocketAddr = dst.parse().expect("probe destination");
        let (want_ip, family) = match sa.ip() {
            IpAddr::V6(v6) => (v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4), 6),
            ip @ IpAddr::V4(_) => (ip, 4),
        };
        let (want_proto, hook) = match action {
            "tcp-connect" => ("tcp", "connect"),
            "udp-connect" => ("udp", "connect"),
            "udp-sendto" => ("udp", "sendmsg"),
            other => panic!("no expectations for action {other}"),
        };
        // A connect to a v4-mapped address runs connect6 (the socket is AF_INET6), but
        // udpv6_sendmsg hands a v4-mapped destination to udp_sendmsg, which runs sendmsg4
        // with the plain IPv4 address; sendmsg6 never sees it.
        let family = if hook == "sendmsg" && want_ip.is_ipv4() {
            4
        } else {
            family
        };
        let ctx = format!("event for {action} {dst}: {ev:#?}");
        assert_eq!(ev.dst, want_ip, "dst of {ctx}");
        assert_eq!(ev.port, sa.port(), "port of {ctx}");
        assert_eq!(ev.proto, want_proto, "proto of {ctx}");
        assert_eq!(ev.hook, format!("{hook}{family}"), "hook of {ctx}");
        assert_eq!(ev.pid, pid, "pid of {ctx}");
        assert_eq!(ev.tid, pid, "tid of {ctx} (the probe is single-threaded)");
        assert_eq!(ev.comm, "egress-probe", "comm of {ctx}");
        // SAFETY: no arguments.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(ev.uid, uid, "uid of {ctx}");
        assert_eq!(ev.gid, gid, "gid of {ctx}");
        assert_eq!(ev.cgroup, self.cg.id(), "cgroup id of {ctx}");
        let age = SystemTime::now()
            .duration_since(ev.ts)
            .unwrap_or_else(|e| panic!("ts of {ctx} is {:?} in the future", e.duration()));
        assert!(age < Duration::from_secs(30), "ts of {ctx} is {age:?} old");
        assert!(ev.host.is_none(), "no host name is known for {ctx}");
    }

    fn tcp_listener(&self, addr: &str) -> TcpListener {
        TcpListener::bind(&self.netns, addr)
    }

    fn udp_listener(&self, addr: &str) -> UdpListener {
        UdpListener::bind(&self.netns, addr)
    }
}

/// A loopback listener of either protocol.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpListener),
}

impl Listener {
    fn for_action(sb: &Sandbox, action: &str, addr: &str) -> Self {
        if action.starts_with("tcp") {
            Self::Tcp(sb.tcp_listener(addr))
        } else {
            Self::Udp(sb.udp_listener(addr))
        }
    }

    fn received(&self) -> usize {
        match self {
            Self::Tcp(l) => l.received(),
            Self::Udp(l) => l.received(),
        }
    }

    fn wait_received(&self, n: usize) -> bool {
        match self {
            Self::Tcp(l) => l.wait_received(n, WAIT),
            Self::Udp(l) => l.wait_received(n, WAIT),
        }
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        match self {
            Self::Tcp(l) => l.payloads(),
            Self::Udp(l) => l.payloads(),
        }
    }
}

/// The allowlist of the deny tests: it allows only the control destinations 127.0.0.2:8080
/// and [::1]:9090, which prove that the sandbox works at all.
const ONLY_CONTROLS: &str = r#"
  - ip: 127.0.0.2
    ports: [8080]
  - ip: "::1"
    ports: [9090]
"#;

/// A denied destination on loopback with a listener behind it (which must see nothing),
/// and a denied remote one; then an allowed control of the same family and action.
fn check_denied(action: &str, family: Family) {
    let mut sb = Sandbox::new(ONLY_CONTROLS);
    // The loopback target has a listener; [::1] has a rule (for the control), but not for
    // port 8080.
    let (listen, target, reason, remote, control_listen, control) = match family {
        Family::V4 => (
            "127.0.0.1:8080",
            "127.0.0.1:8080",
            "no-rule",
            "198.51.100.20:443",
            "127.0.0.2:8080",
            "127.0.0.2:8080",
        ),
        Family::V6 => (
            "[::1]:8080",
            "[::1]:8080",
            "port",
            "[2001:db8::20]:443",
            "[::1]:9090",
            "[::1]:9090",
        ),
        Family::Mapped => (
            "127.0.0.1:8080",
            "[::ffff:127.0.0.1]:8080",
            "no-rule",
            "[::ffff:198.51.100.20]:443",
            "127.0.0.2:8080",
            "[::ffff:127.0.0.2]:8080",
        ),
    };
    let listener = Listener::for_action(&sb, action, listen);
    let ev = sb.denied(action, target);
    assert_eq!(ev.reason, reason, "{ev:#?}");
    let ev = sb.denied(action, remote);
    assert_eq!(ev.reason, "no-rule", "{ev:#?}");
    assert_eq!(
        listener.received(),
        0,
        "{listen} received data although {action} {target} was denied"
    );

    let control_listener = Listener::for_action(&sb, action, control_listen);
    sb.allowed(action, control);
    assert!(
        control_listener.wait_received(1),
        "the allowed control {action} {control} never reached {control_listen}"
    );
    assert_eq!(control_listener.payloads(), vec![b"probe\n".to_vec()]);
    assert_eq!(
        listener.received(),
        0,
        "{listen} received data although every probe to it was denied"
    );
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
    Mapped,
}

#[test]
fn tcp_connect_is_denied_over_ipv4() {
    check_denied("tcp-connect", Family::V4);
}

#[test]
fn tcp_connect_is_denied_over_ipv6() {
    check_denied("tcp-connect", Family::V6);
}

#[test]
fn tcp_connect_is_denied_over_ipv4_mapped_ipv6() {
    check_denied("tcp-connect", Family::Mapped);
}

#[test]
fn udp_sendto_is_denied_over_ipv4() {
    check_denied("udp-sendto", Family::V4);
}

#[test]
fn udp_sendto_is_denied_over_ipv6() {
    check_denied("udp-sendto", Family::V6);
}

#[test]
fn udp_sendto_is_denied_over_ipv4_mapped_ipv6() {
    check_denied("udp-sendto", Family::Mapped);
}

#[test]
fn udp_connect_is_denied_over_ipv4() {
    check_denied("udp-connect", Family::V4);
}

#[test]
fn udp_connect_is_denied_over_ipv6() {
    check_denied("udp-connect", Family::V6);
}

#[test]
fn udp_connect_is_denied_over_ipv4_mapped_ipv6() {
    check_denied("udp-connect", Family::Mapped);
}

#[test]
fn an_empty_allowlist_denies_everything() {
    let mut sb = Sandbox::new(" []\n");
    let tcp = sb.tcp_listener("127.0.0.1:8080");
    let udp = sb.udp_listener("[::1]:8080");
    for (action, dst) in [
        ("tcp-connect", "127.0.0.1:8080"),
        ("udp-sendto", "[::1]:8080"),
        ("udp-connect", "[::1]:8080"),
        ("tcp-connect", "198.51.100.20:443"),
    ] {
        let ev = sb.denied(action, dst);
        assert_eq!(ev.reason, "no-rule", "{ev:#?}");
    }
    assert_eq!(
        tcp.received() + udp.received(),
        0,
        "a listener received data"
    );
}

#[test]
fn allowed_destinations_are_reached_over_every_family_and_action() {
    // Every SYN and unconnected datagram is judged again by the backstop (its socket's hook
    // judged it a moment before): both must let allowed traffic through.
    let mut sb = Sandbox::new(
        r#"
  - ip: 127.0.0.1
    ports: [8080]
  - ip: "::1"
    ports: [8080]
"#,
    );
    let tcp4 = sb.tcp_listener("127.0.0.1:8080");
    let tcp6 = sb.tcp_listener("[::1]:8080");
    let udp4 = sb.udp_listener("127.0.0.1:8080");
    let udp6 = sb.udp_listener("[::1]:8080");

    sb.allowed("tcp-connect", "127.0.0.1:8080");
    sb.allowed("tcp-connect", "[::ffff:127.0.0.1]:8080");
    sb.allowed("tcp-connect", "[::1]:8080");
    for action in ["udp-sendto", "udp-connect"] {
        sb.allowed(action, "127.0.0.1:8080");
        sb.allowed(action, "[::ffff:127.0.0.1]:8080");
        sb.allowed(action, "[::1]:8080");
    }
    for (name, l, n) in [
        ("tcp 127.0.0.1:8080", Listener::Tcp(tcp4), 2),
        ("tcp [::1]:8080", Listener::Tcp(tcp6), 1),
        ("udp 127.0.0.1:8080", Listener::Udp(udp4), 4),
        ("udp [::1]:8080", Listener::Udp(udp6), 2),
    ] {
        assert!(
            l.wait_received(n),
            "{name} received {} of {n}",
            l.received()
        );
        assert_eq!(
            l.payloads(),
            vec![b"probe\n".to_vec(); n],
            "{name} payloads"
        );
    }
}

#[test]
fn cidr_rule_covers_exactly_its_prefix() {
    let mut sb = Sandbox::new(
        r#"
  - cidr: 127.0.0.0/30
    ports: [8080]
"#,
    );
    let inside: Vec<_> = ["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.3:8080"]
        .into_iter()
        .map(|a| (a, sb.tcp_listener(a)))
        .collect();
    let outside: Vec<_> = ["127.0.0.4:8080", "127.0.0.5:8080"]
        .into_iter()
        .map(|a| (a, sb.tcp_listener(a)))
        .collect();
    for (addr, l) in &inside {
        sb.allowed("tcp-connect", addr);
        assert!(
            l.wait_received(1, WAIT),
            "{addr} inside 127.0.0.0/30 got nothing"
        );
    }
    for (addr, l) in &outside {
        let ev = sb.denied("tcp-connect", addr);
        assert_eq!(ev.reason, "no-rule", "{ev:#?}");
        assert_eq!(l.received(), 0, "{addr} outside 127.0.0.0/30 received data");
    }
}

#[test]
fn port_lists_and_range_edges() {
    let mut sb = Sandbox::new(
        r#"
  - ip: 127.0.0.1
    ports: [443, "8000-8080"]
"#,
    );
    for port in [443, 8000, 8001, 8079, 8080] {
        let dst = format!("127.0.0.1:{port}");
        let l = sb.tcp_listener(&dst);
        sb.allowed("tcp-connect", &dst);
        assert!(l.wait_received(1, WAIT), "{dst} got nothing");
    }
    for port in [442, 444, 7999, 8081] {
        let dst = format!("127.0.0.1:{port}");
        let l = sb.tcp_listener(&dst);
        let ev = sb.denied("tcp-connect", &dst);
        assert_eq!(ev.reason, "port", "{dst}: {ev:#?}");
        assert_eq!(l.received(), 0, "{dst} received data");
    }
}

#[test]
fn protocol_restricts_a_rule() {
    let mut sb = Sandbox::new(
        r#"
  - ip: 127.0.0.1
    ports: [8080]
    protocol: tcp
  - ip: 127.0.0.2
    ports: [8080]
    protocol: udp
  - ip: 127.0.0.3
    ports: [8080]
    protocol: any
"#,
    );
    let tcp1 = sb.tcp_listener("127.0.0.1:8080");
    let udp1 = sb.udp_listener("127.0.0.1:8080");
    let tcp2 = sb.tcp_listener("127.0.0.2:8080");
    let udp2 = sb.udp_listener("127.0.0.2:8080");

    sb.allowed("tcp-connect", "127.0.0.1:8080");
    for action in ["udp-sendto", "udp-connect"] {
        let ev = sb.denied(action, "127.0.0.1:8080");
        assert_eq!(ev.reason, "port", "udp to a tcp-only rule: {ev:#?}");
    }
    assert!(
        tcp1.wait_received(1, WAIT),
        "tcp 127.0.0.1:8080 got nothing"
    );
    assert_eq!(udp1.received(), 0, "udp 127.0.0.1:8080 received data");

    let ev = sb.denied("tcp-connect", "127.0.0.2:8080");
    assert_eq!(ev.reason, "port", "tcp to a udp-only rule: {ev:#?}");
    sb.allowed("udp-sendto", "127.0.0.2:8080");
    sb.allowed("udp-connect", "127.0.0.2:8080");
    assert!(
        udp2.wait_received(2, WAIT),
        "udp 127.0.0.2:8080 got {}",
        udp2.received()
    );
    assert_eq!(tcp2.received(), 0, "tcp 127.0.0.2:8080 received data");

    let tcp3 = sb.tcp_listener("127.0.0.3:8080");
    let udp3 = sb.udp_listener("127.0.0.3:8080");
    sb.allowed("tcp-connect", "127.0.0.3:8080");
    sb.allowed("udp-sendto", "127.0.0.3:8080");
    assert!(tcp3.wait_received(1, WAIT) && udp3.wait_received(1, WAIT));
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    let mut sb = Sandbox::new(
        r#"
  - ip: 127.0.0.1
    ports: [8080]
"#,
    );
    let tcp = sb.tcp_listener("127.0.0.1:8080");
    let udp = sb.udp_listener("127.0.0.1:8080");
    sb.allowed("tcp-connect", "[::ffff:127.0.0.1]:8080");
    sb.allowed("udp-sendto", "[::ffff:127.0.0.1]:8080");
    sb.allowed("udp-connect", "[::ffff:127.0.0.1]:8080");
    assert!(
        tcp.wait_received(1, WAIT),
        "tcp via ::ffff:127.0.0.1 got nothing"
    );
    assert!(
        udp.wait_received(2, WAIT),
        "udp via ::ffff:127.0.0.1 got {}",
        udp.received()
    );

    // The port rule holds for the mapped form, and the deny names the IPv4 address.
    let other = sb.tcp_listener("127.0.0.1:9090");
    let ev = sb.denied("tcp-connect", "[::ffff:127.0.0.1]:9090");
    assert_eq!(ev.dst, "127.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(ev.hook, "connect6");
    assert_eq!(ev.reason, "port", "{ev:#?}");
    let ev = sb.denied("udp-sendto", "[::ffff:127.0.0.5]:8080");
    assert_eq!(ev.dst, "127.0.0.5".parse::<IpAddr>().unwrap());
    // The kernel turns an unconnected send to a mapped address into an IPv4 send.
    assert_eq!(ev.hook, "sendmsg4");
    assert_eq!(other.received(), 0, "127.0.0.1:9090 received data");
}

#[test]
fn ipv4_and_ipv6_rules_do_not_cover_each_other() {
    let mut sb = Sandbox::new(
        r#"
  - cidr: 0.0.0.0/0
    ports: [8080]
  - cidr: "::/0"
    ports: [9090]
"#,
    );
    let v4 = sb.tcp_listener("127.0.0.9:8080");
    let v6 = sb.tcp_listener("[::1]:9090");
    sb.allowed("tcp-connect", "127.0.0.9:8080");
    sb.allowed("tcp-connect", "[::ffff:127.0.0.9]:8080");
    sb.allowed("tcp-connect", "[::1]:9090");
    assert!(v4.wait_received(2, WAIT) && v6.wait_received(1, WAIT));

    let v6_on_v4_port = sb.tcp_listener("[::1]:8080");
    let ev = sb.denied("tcp-connect", "[::1]:8080");
    assert_eq!(ev.reason, "port", "0.0.0.0/0 must not open IPv6: {ev:#?}");
    let v4_on_v6_port = sb.tcp_listener("127.0.0.9:9090");
    let ev = sb.denied("tcp-connect", "127.0.0.9:9090");
    assert_eq!(ev.reason, "port", "::/0 must not open IPv4: {ev:#?}");
    sb.denied("tcp-connect", "[::ffff:127.0.0.9]:9090");
    assert_eq!(v6_on_v4_port.received() + v4_on_v6_port.received(), 0);
}

#[test]
fn a_broader_cidrs_ports_still_apply_under_a_narrower_one() {
    let mut sb = Sandbox::new(
        r#"
  - cidr: 127.0.0.0/8
    ports: [9000]
  - cidr: 127.0.0.0/30
    ports: [8080]
  - cidr: 127.0.0.2/32
    ports: [7000]
    protocol: udp
"#,
    );
    for dst in ["127.0.0.2:9000", "127.0.0.2:8080", "127.0.0.9:9000"] {
        let l = sb.tcp_listener(dst);
        sb.allowed("tcp-connect", dst);
        assert!(l.wait_received(1, WAIT), "{dst} got nothing");
    }
    let l = sb.udp_listener("127.0.0.2:7000");
    sb.allowed("udp-sendto", "127.0.0.2:7000");
    sb.allowed("udp-sendto", "127.0.0.2:9000");
    assert!(l.wait_received(1, WAIT), "udp 127.0.0.2:7000 got nothing");

    let ev = sb.denied("tcp-connect", "127.0.0.9:8080");
    assert_eq!(ev.reason, "port", "127.0.0.9 is outside the /30: {ev:#?}");
    let ev = sb.denied("tcp-connect", "127.0.0.2:7000");
    assert_eq!(ev.reason, "port", "the /32 rule is udp only: {ev:#?}");
    let ev = sb.denied("udp-sendto", "127.0.0.3:7000");
    assert_eq!(ev.reason, "port", "the /32 rule is only 127.0.0.2: {ev:#?}");
}

#[test]
fn a_process_outside_the_cgroup_is_unaffected() {
    let mut sb = Sandbox::new(ONLY_CONTROLS);
    let l = sb.tcp_listener("127.0.0.1:8080");
    sb.denied("tcp-connect", "127.0.0.1:8080");
    let before = sb.enf.counters().expect("counters");

    // Same namespace, same destination, not in the cgroup.
    let out = Probe::new(&sb.netns).run(&["tcp-connect", "127.0.0.1:8080"]);
    assert!(
        out.ok,
        "a probe outside the enforced cgroup was blocked: {out:?}"
    );
    assert!(
        l.wait_received(1, WAIT),
        "the unenforced probe's connection never arrived"
    );
    // Outside the cgroup a remote address is merely unreachable.
    let out = Probe::new(&sb.netns).run(&["udp-sendto", "198.51.100.20:443"]);
    assert_eq!(out.errno, Some(libc::ENETUNREACH), "{out:?}");

    let events = sb.enf.poll_denies();
    assert!(
        events.is_empty(),
        "unenforced probes were reported: {events:#?}"
    );
    let after = sb.enf.counters().expect("counters");
    assert_eq!(before, after, "unenforced probes changed the counters");
}

#[test]
fn counters_count_allows_and_denies() {
    let mut sb = Sandbox::new(ONLY_CONTROLS);
    let zero = sb.enf.counters().expect("counters");
    assert_eq!(
        (zero.allow, zero.deny, zero.error, zero.ringbuf_drop),
        (0, 0, 0, 0),
        "fresh counters"
    );
    let _tcp = sb.tcp_listener("127.0.0.2:8080");
    let _udp = sb.udp_listener("[::1]:9090");
    sb.allowed("tcp-connect", "127.0.0.2:8080");
    sb.allowed("udp-sendto", "[::1]:9090");
    sb.allowed("udp-connect", "[::1]:9090");
    sb.denied("tcp-connect", "127.0.0.1:8080");
    sb.denied("udp-sendto", "198.51.100.20:443");
    sb.denied("udp-connect", "[2001:db8::20]:443");
    sb.denied("tcp-connect", "[::ffff:198.51.100.20]:443");
    let c = sb.enf.counters().expect("counters");
    assert_eq!(c.allow, 3, "allowed connects and sends: {c:?}");
    assert_eq!(c.deny, 4, "denied connects and sends: {c:?}");
    assert_eq!(c.error, 0, "program errors: {c:?}");
    assert_eq!(c.ringbuf_drop, 0, "lost events: {c:?}");
}

#[test]
fn deny_events_name_the_process_and_its_cgroup() {
    let mut sb = Sandbox::new(ONLY_CONTROLS);
    // `denied` checks pid, tid, comm, uid, gid, cgroup id, time, destination and hook.
    let a = sb.denied("tcp-connect", "198.51.100.20:443");
    let b = sb.denied("tcp-connect", "198.51.100.20:443");
    assert_ne!(a.pid, b.pid, "two probes, two pids");
    assert!(b.ts >= a.ts, "events are in order: {a:#?} {b:#?}");
}

#[test]
fn audit_mode_allows_and_reports() {
    let mut sb = Sandbox::with_header("mode: audit\n", ONLY_CONTROLS);
    let l = sb.tcp_listener("127.0.0.1:8080");
    let out = sb.probe("tcp-connect", "127.0.0.1:8080");
    assert!(out.ok, "audit mode must not block: {out:?}");
    assert!(
        l.wait_received(1, WAIT),
        "the audited connection never arrived"
    );
    // Name binding judges an audited connection's first flight too (so that `learn` sees
    // whether it carried a name) and may report it, hook `first_flight`: not a connect event.
    let events: Vec<_> = sb
        .wait_denies()
        .into_iter()
        .filter(|e| e.hook != "first_flight")
        .collect();
    assert_eq!(
        events.len(),
        1,
        "one audited connect, one event: {events:#?}"
    );
    sb.check_event(&events[0], "tcp-connect", "127.0.0.1:8080", out.pid);
    let c = sb.enf.counters().expect("counters");
    assert_eq!(
        (c.allow, c.deny),
        (0, 1),
        "audit counts would-be denies: {c:?}"
    );
}

/// A connected UDP socket's `sendmsg` with control messages (a traffic class, a packet info,
/// UDP_SEGMENT) runs `sendmsg4/6` with no address (the kernel shows zeros) and goes to the
/// socket's peer: an allowed peer gets all three datagrams and no deny event (each was denied
/// as `udp 0.0.0.0:0 no-rule` before); a denied peer is still refused at connect.
#[test]
fn connected_udp_sends_with_control_messages_are_judged_as_the_connected_peer() {
    for (family, listen, target) in [
        (Family::V4, "127.0.0.2:8080", "127.0.0.2:8080"),
        (Family::V6, "[::1]:9090", "[::1]:9090"),
        (Family::Mapped, "127.0.0.2:8080", "[::ffff:127.0.0.2]:8080"),
    ] {
        let mut sb = Sandbox::new(ONLY_CONTROLS);
        let listener = sb.udp_listener(listen);
        sb.allowed("udp-connect-cmsg", target);
        assert!(
            listener.wait_received(3, WAIT),
            "{family:?}: the three datagrams to {target} never all arrived ({} did)",
            listener.received()
        );
        assert_eq!(
            listener.payloads(),
            vec![b"probe\n".to_vec(); 3],
            "{family:?}"
        );
        let denied = sb.udp_listener(if listen.starts_with('[') {
            "[::1]:8080"
        } else {
            "127.0.0.1:8080"
        });
        let to = match family {
            Family::V4 => "127.0.0.1:8080",
            Family::V6 => "[::1]:8080",
            Family::Mapped => "[::ffff:127.0.0.1]:8080",
        };
        let out = sb.probe("udp-connect-cmsg", to);
        assert!(out.is_eperm(), "{family:?}: {out:?}");
        let _ = sb.wait_denies();
        assert_eq!(denied.received(), 0, "{family:?}: the denied peer got data");
    }
}
