//! `protocol: icmp` rules (issue #5): ping sockets (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) may be
//! created only while some rule allows ICMP, and then reach only the destinations such a rule
//! names: at `connect` (connect4/6) and per echo request (the `cgroup_skb/egress` backstop,
//! which is what judges an unconnected `sendto`: ping sockets run no sendmsg hook). Raw
//! sockets stay refused. The command is the real `egress-agent run` with a python3 script,
//! in a namespace of our own (documentation addresses on `lo`, dnsmasq as the upstream);
//! ping sockets are enabled in that namespace only. Turning ping sockets on and off by
//! reload is in `lifecycle.rs` (`reload_turns_ping_sockets_on_and_off`: hot reload is an
//! `attach` feature).
//!
//! What reached the "remote" host is read from the namespace's own counters (`InEchos`): an
//! allowed echo is counted and answered, a denied one never reaches the stack.
//!
//! Build the agent first; run as root, one thread:
//! `cargo build -p egress-agent && cargo test -p egress-tests --test icmp -- --test-threads=1`.

use egress_tests::world::{AgentExit, DnsWorld, UPSTREAM};
use serde_json::Value;

/// Allowed by an ICMP rule.
const ALLOWED_V4: &str = "198.51.100.20";
const ALLOWED_V6: &str = "2001:db8::20";
/// Covered by a tcp/udp rule only (v4), or by no rule (v6).
const OTHER_V4: &str = "198.51.100.30";
const OTHER_V6: &str = "2001:db8::30";

/// Helpers every script starts with; a script adds results to `out`.
const PRELUDE: &str = r#"
import errno, json, os, socket, time

def fail(e, step):
    code = getattr(e, "errno", None)
    return {"ok": False, "step": step, "errno": code,
            "error": errno.errorcode.get(code, str(e)) if code else str(e)}

def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def icmp_socket(host, kind=socket.SOCK_DGRAM):
    fam = family(host)
    proto = socket.IPPROTO_ICMPV6 if fam == socket.AF_INET6 else socket.IPPROTO_ICMP
    return socket.socket(fam, kind, proto)

def echo(host, connect=False):
    """An echo request from a ping socket (the kernel sets id and checksum); ok once the
    reply arrives."""
    v6 = family(host) == socket.AF_INET6
    try:
        s = icmp_socket(host)
    except OSError as e:
        return fail(e, "socket")
    s.settimeout(1)
    msg = bytes([128 if v6 else 8, 0, 0, 0, 0, 0, 0, 1]) + b"egress-icmp-test"
    step = "connect" if connect else "sendto"
    try:
        if connect:
            s.connect((host, 0))
            step = "send"
            s.send(msg)
        else:
            s.sendto(msg, (host, 0))
        step = "recv"
        want = 129 if v6 else 0
        deadline = time.time() + 2
        while time.time() < deadline:
            data = s.recv(2048)
            if data and data[0] == want:
                return {"ok": True}
        return {"ok": False, "step": step, "error": "no reply"}
    except OSError as e:
        return fail(e, step)
    finally:
        s.close()

def create(host, kind=socket.SOCK_DGRAM):
    """Whether an ICMP socket of `kind` can be created."""
    try:
        icmp_socket(host, kind).close()
        return {"ok": True}
    except OSError as e:
        return fail(e, "socket")

out = {"pid": os.getpid()}
"#;

/// A world with the test addresses on `lo`, `names` answered by dnsmasq, ping sockets
/// enabled in its namespace.
fn world(names: &[(&str, &str)]) -> DnsWorld {
    let mut b = DnsWorld::builder();
    for (name, ip) in names {
        b = b.address(name, ip);
    }
    let world = b.start();
    for ip in [ALLOWED_V4, ALLOWED_V6, OTHER_V4, OTHER_V6] {
        world.add_addr(ip.parse().expect("address"));
    }
    world.netns().enable_ping_sockets();
    world
}

/// An allowlist forwarding to the world's dnsmasq, with `rules` under `allow:`.
fn policy(rules: &str) -> String {
    format!(
        "version: 1\nname: icmp\ndns:\n  upstream: [\"{UPSTREAM}\"]\n  min_ttl: 0s\n  \
         grace: 0s\nallow:\n{rules}"
    )
}

/// Runs `body` (after [`PRELUDE`]) under `allowlist` with `args` after `run`; checks ready
/// and exit status 0; returns the run and what the script reported.
fn run_script(world: &DnsWorld, args: &[&str], allowlist: &str, body: &str) -> (AgentExit, Value) {
    world.run_script(args, allowlist, PRELUDE, body)
}

/// How many sockets `sock_create` refused (reason `protocol`).
fn sock_create_denies(run: &AgentExit) -> usize {
    run.events_of("deny")
        .into_iter()
        .filter(|e| e["hook"] == "sock_create" && e["reason"] == "protocol")
        .count()
}

/// `out[key]` succeeded.
fn assert_ok(run: &AgentExit, out: &Value, key: &str) {
    assert_eq!(
        out[key]["ok"],
        true,
        "{key}: expected success, got {}\n{}",
        out[key],
        run.context()
    );
}

/// `out[key]` failed with EPERM at `step`.
fn assert_eperm_at(run: &AgentExit, out: &Value, key: &str, step: &str) {
    assert_eq!(
        (&out[key]["error"], &out[key]["step"]),
        (&Value::from("EPERM"), &Value::from(step)),
        "{key}: expected EPERM at {step}, got {}\n{}",
        out[key],
        run.context()
    );
}

/// The deny events from `hook` for `dst`.
fn denies<'a>(run: &'a AgentExit, hook: &str, dst: &str) -> Vec<&'a Value> {
    run.events_of("deny")
        .into_iter()
        .filter(|e| e["hook"] == hook && e["dst"] == dst)
        .collect()
}

/// Exactly one deny from `hook` for `dst`, over `proto`, for `reason`.
fn assert_one_deny(run: &AgentExit, hook: &str, dst: &str, proto: &str, reason: &str) {
    let found = denies(run, hook, dst);
    assert_eq!(
        found.len(),
        1,
        "one deny from {hook} for {dst}\n{}",
        run.context()
    );
    let e = found[0];
    assert_eq!(
        (&e["proto"], &e["reason"], &e["port"]),
        (&Value::from(proto), &Value::from(reason), &Value::from(0)),
        "{e}"
    );
}

#[test]
fn an_icmp_rule_allows_ping_to_its_destinations_only() {
    let world = world(&[]);
    // 198.51.100.0/24 is open to tcp and udp: `any` must not allow ICMP to OTHER_V4.
    let allowlist = policy(&format!(
        "  - cidr: {ALLOWED_V4}/32\n    protocol: icmp\n  - ip: {ALLOWED_V6}\n    protocol: \
         icmp\n  - cidr: 198.51.100.0/24\n"
    ));
    let before = world.netns().in_echos();
    let (run, out) = run_script(
        &world,
        &[],
        &allowlist,
        &format!(
            r#"
out["v4_sendto"] = echo("{ALLOWED_V4}")
out["v4_connect"] = echo("{ALLOWED_V4}", connect=True)
out["v6_sendto"] = echo("{ALLOWED_V6}")
out["v6_connect"] = echo("{ALLOWED_V6}", connect=True)
out["other_v4_sendto"] = echo("{OTHER_V4}")
out["other_v4_connect"] = echo("{OTHER_V4}", connect=True)
out["other_v6_sendto"] = echo("{OTHER_V6}")
out["other_v6_connect"] = echo("{OTHER_V6}", connect=True)
"#
        ),
    );
    for key in ["v4_sendto", "v4_connect", "v6_sendto", "v6_connect"] {
        assert_ok(&run, &out, key);
    }
    // An unconnected send is judged by the backstop (no sendmsg hook runs for ping
    // sockets): the packet is dropped and the send fails with EPERM.
    assert_eperm_at(&run, &out, "other_v4_sendto", "sendto");
    // IPv6 reports no error: `icmpv6_push_pending_frames` ignores what
    // `ip6_push_pending_frames` returns, so the send "succeeds", no reply comes, and the
    // namespace's counter and the deny event below show the drop.
    assert_eq!(
        (
            &out["other_v6_sendto"]["ok"],
            &out["other_v6_sendto"]["step"]
        ),
        (&Value::from(false), &Value::from("recv")),
        "{}",
        run.context()
    );
    // A connect is judged by connect4/6.
    assert_eperm_at(&run, &out, "other_v4_connect", "connect");
    assert_eperm_at(&run, &out, "other_v6_connect", "connect");
    // Exactly the four allowed echo requests reached the namespace's stack.
    let after = world.netns().in_echos();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (2, 2),
        "echo requests counted by the namespace ({before:?} -> {after:?})\n{}",
        run.context()
    );
    // OTHER_V4 has an entry (the /24, tcp and udp): reason port; OTHER_V6 has none.
    assert_one_deny(&run, "egress", OTHER_V4, "icmp", "port");
    assert_one_deny(&run, "connect4", OTHER_V4, "icmp", "port");
    assert_one_deny(&run, "egress", OTHER_V6, "icmpv6", "no-rule");
    assert_one_deny(&run, "connect6", OTHER_V6, "icmpv6", "no-rule");
    assert!(
        run.events_of("deny")
            .iter()
            .all(|e| e["dst"] != ALLOWED_V4 && e["dst"] != ALLOWED_V6),
        "no deny for the allowed destinations\n{}",
        run.context()
    );
}

#[test]
fn raw_icmp_sockets_stay_refused_with_an_icmp_rule() {
    let world = world(&[]);
    let allowlist = policy(&format!(
        "  - cidr: {ALLOWED_V4}/32\n    protocol: icmp\n  - ip: {ALLOWED_V6}\n    protocol: icmp\n"
    ));
    // CAP_NET_RAW kept, so that only the sock_create program stands in the way.
    let (run, out) = run_script(
        &world,
        &["--keep-cap", "CAP_NET_RAW"],
        &allowlist,
        &format!(
            r#"
out["raw_v4"] = create("{ALLOWED_V4}", socket.SOCK_RAW)
out["raw_v6"] = create("{ALLOWED_V6}", socket.SOCK_RAW)
out["dgram_v4"] = create("{ALLOWED_V4}")
"#
        ),
    );
    assert_eperm_at(&run, &out, "raw_v4", "socket");
    assert_eperm_at(&run, &out, "raw_v6", "socket");
    assert_ok(&run, &out, "dgram_v4");
    assert_eq!(sock_create_denies(&run), 2, "{}", run.context());
}

#[test]
fn without_an_icmp_rule_ping_sockets_are_refused_even_where_any_allows_everything() {
    let world = world(&[]);
    let allowlist = policy("  - cidr: 0.0.0.0/0\n  - cidr: ::/0\n    protocol: any\n");
    let before = world.netns().in_echos();
    let (run, out) = run_script(
        &world,
        &[],
        &allowlist,
        &format!(
            r#"
out["v4"] = echo("{ALLOWED_V4}")
out["v6"] = echo("{ALLOWED_V6}")
"#
        ),
    );
    assert_eperm_at(&run, &out, "v4", "socket");
    assert_eperm_at(&run, &out, "v6", "socket");
    assert_eq!(world.netns().in_echos(), before, "{}", run.context());
    assert_eq!(sock_create_denies(&run), 2, "{}", run.context());
}

#[test]
fn a_host_rule_allows_ping_to_the_answered_addresses() {
    let world = world(&[("ping.example.com", ALLOWED_V4)]);
    let allowlist = policy("  - host: ping.example.com\n    protocol: icmp\n");
    let before = world.netns().in_echos();
    let (run, out) = run_script(
        &world,
        &[],
        &allowlist,
        &format!(
            r#"
out["before_lookup"] = echo("{ALLOWED_V4}")
addrs = sorted({{i[4][0] for i in socket.getaddrinfo("ping.example.com", None, socket.AF_INET)}})
out["addrs"] = addrs
out["sendto"] = echo(addrs[0])
out["connect"] = echo(addrs[0], connect=True)
out["other"] = echo("{OTHER_V4}")
"#
        ),
    );
    assert_eq!(
        out["addrs"],
        serde_json::json!([ALLOWED_V4]),
        "{}",
        run.context()
    );
    // Not answered yet: no grant.
    assert_eperm_at(&run, &out, "before_lookup", "sendto");
    assert_ok(&run, &out, "sendto");
    assert_ok(&run, &out, "connect");
    assert_eperm_at(&run, &out, "other", "sendto");
    let after = world.netns().in_echos();
    assert_eq!(
        after.0 - before.0,
        2,
        "{before:?} -> {after:?}\n{}",
        run.context()
    );
    assert_one_deny(&run, "egress", OTHER_V4, "icmp", "no-rule");
}
