//! Learn, then enforce: `egress-agent learn` runs a command in audit mode and writes the
//! allowlist it needed; the same command then runs under that file with nothing denied, and
//! anything it did not do stays denied.

use std::{fs, process::Command, time::Duration};

use egress_tests::{
    agent_bin,
    world::{CLIENT_HELLO_PY, DnsWorld, UPSTREAM, python3},
};

const WAIT: Duration = Duration::from_secs(3);

/// Resolves a name and connects over TCP, then sends a UDP datagram to an IP literal.
const SCRIPT: &str = r#"
import json, socket
out = {}
try:
    addr = socket.getaddrinfo("allowed.example.com", 8080, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    s = socket.create_connection((addr, 8080), timeout=3); s.sendall(b"ping\n"); s.recv(5); s.close()
    out["tcp"] = "ok"
except OSError as e:
    out["tcp"] = str(e)
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"hi", ("198.51.100.12", 5353))
    out["udp"] = "ok"
except OSError as e:
    out["udp"] = str(e)
print(json.dumps(out))
"#;

/// Connects to a name the learning run never used.
const OTHER: &str = r#"
import json, socket
out = {}
try:
    socket.getaddrinfo("other.example.com", 9090, socket.AF_INET, socket.SOCK_STREAM)
    out["resolve"] = "ok"
except socket.gaierror as e:
    out["resolve"] = str(e)
try:
    s = socket.create_connection(("198.51.100.11", 9090), timeout=3); s.close()
    out["tcp"] = "ok"
except OSError as e:
    out["tcp"] = "errno %d" % e.errno
print(json.dumps(out))
"#;

fn world() -> DnsWorld {
    DnsWorld::builder()
        .address("allowed.example.com", "198.51.100.10")
        .address("other.example.com", "198.51.100.11")
        .local_addr("198.51.100.12")
        .start()
}

#[test]
fn learned_allowlist_lets_the_command_run_and_nothing_else() {
    let world = world();
    let tcp = world.listen_tcp("198.51.100.10:8080");
    let udp = world.listen_udp("198.51.100.12:5353");
    let _other = world.listen_tcp("198.51.100.11:9090");
    let base = format!("version: 1\nname: base\ndns:\n  upstream: [\"{UPSTREAM}\"]\nallow: []\n");
    let learned = world.dir().join("learned.yaml");

    // 1. Learn: audit mode, nothing blocked.
    let run = world.learn_agent(&learned, &base, &[python3(), "-c", SCRIPT]);
    assert_eq!(run.code(), 0, "learn run\n{}", run.context());
    assert!(
        run.stdout.contains(r#""tcp": "ok""#) && run.stdout.contains(r#""udp": "ok""#),
        "nothing is blocked while learning\n{}",
        run.context()
    );
    assert!(
        tcp.wait_accepted(1, WAIT),
        "the listener saw the learning run"
    );
    let text = fs::read_to_string(&learned).expect("learn writes the allowlist");
    for want in [
        "host: allowed.example.com",
        "ports: [8080]",
        "protocol: tcp",
        "ip: 198.51.100.12",
        "ports: [5353]",
        "protocol: udp",
        "REVIEW: IP literal",
        "upstream:",
    ] {
        assert!(text.contains(want), "learned file lacks {want:?}:\n{text}");
    }
    assert!(
        !text.contains("198.51.100.10"),
        "a name was used, so no address for it:\n{text}"
    );
    let check = Command::new(agent_bin())
        .arg("check")
        .arg(&learned)
        .output()
        .expect("egress-agent check");
    assert!(
        check.status.success(),
        "the learned file passes check: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // 2. Enforce the learned file: the same command runs with nothing denied.
    let learned_yaml = text;
    let run = world.run_agent(&learned_yaml, &[python3(), "-c", SCRIPT]);
    assert_eq!(run.code(), 0, "enforced run\n{}", run.context());
    assert!(
        run.stdout.contains(r#""tcp": "ok""#) && run.stdout.contains(r#""udp": "ok""#),
        "the command runs under what it learned\n{}",
        run.context()
    );
    let denies: Vec<_> = run
        .events_of("deny")
        .into_iter()
        .filter(|e| e["proto"] == "tcp" || e["port"] == 5353)
        .collect();
    assert!(
        denies.is_empty(),
        "denied under the learned file: {denies:?}\n{}",
        run.context()
    );
    assert!(
        tcp.wait_accepted(2, WAIT),
        "the listener saw the enforced run"
    );
    assert!(
        udp.wait_received(2, WAIT),
        "the UDP listener got both datagrams"
    );

    // 3. What the command never did stays denied.
    let run = world.run_agent(&learned_yaml, &[python3(), "-c", OTHER]);
    assert!(
        run.stdout
            .contains(&format!("\"tcp\": \"errno {}\"", libc::EPERM)),
        "a destination the learning run never used is denied\n{}",
        run.context()
    );
    assert!(
        !run.events_of("dns-refused").is_empty(),
        "a name the learning run never used is refused\n{}",
        run.context()
    );
}

/// SSH to one name (no name in its first bytes), TLS to another (its name in the SNI), both
/// on one address; reports whether each first flight was accepted.
const NAMELESS: &str = r#"
import json, socket
out = {}
def flight(name, port, data):
    try:
        addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        s = socket.create_connection((addr, port), timeout=3)
        s.sendall(data)
        s.recv(len(data))
        s.close()
        return "ok"
    except OSError as e:
        return str(e)
out["ssh"] = flight("git.example.com", 22, b"SSH-2.0-OpenSSH_9.6\r\n")
out["tls"] = flight("web.example.com", 443, hello("web.example.com"))
print(json.dumps(out))
"#;

#[test]
fn learn_writes_name_check_false_where_the_traffic_carried_no_name() {
    let world = DnsWorld::builder()
        .address("git.example.com", "198.51.100.20")
        .address("web.example.com", "198.51.100.20")
        .start();
    let ssh = world.listen_tcp("198.51.100.20:22");
    let tls = world.listen_tcp("198.51.100.20:443");
    let base = format!("version: 1\nname: base\ndns:\n  upstream: [\"{UPSTREAM}\"]\nallow: []\n");
    let learned = world.dir().join("learned.yaml");
    let script = format!("{CLIENT_HELLO_PY}\n{NAMELESS}");
    let ok = r#""ssh": "ok", "tls": "ok""#;

    let run = world.learn_agent(&learned, &base, &[python3(), "-c", &script]);
    assert_eq!(run.code(), 0, "learn run\n{}", run.context());
    assert!(
        run.stdout.contains(ok),
        "nothing is blocked while learning\n{}",
        run.context()
    );
    let text = fs::read_to_string(&learned).expect("learn writes the allowlist");
    // The SSH rule admits by address (and says why); the TLS rule stays name-checked.
    let rule = |name: &str| -> String {
        let at = text
            .find(&format!("host: {name}"))
            .unwrap_or_else(|| panic!("no rule for {name}:\n{text}"));
        let end = text[at + 1..].find("- ").map_or(text.len(), |e| at + 1 + e);
        text[at..end].to_owned()
    };
    assert!(
        rule("git.example.com").contains("name_check: false"),
        "{text}"
    );
    assert!(
        text.contains("carried no TLS server name or HTTP Host"),
        "{text}"
    );
    assert!(!rule("web.example.com").contains("name_check"), "{text}");

    // Enforced: both work, the SSH banner reached its server.
    let run = world.run_agent(&text, &[python3(), "-c", &script]);
    assert_eq!(run.code(), 0, "enforced run\n{}", run.context());
    assert!(
        run.stdout.contains(ok),
        "the command runs under what it learned\n{}",
        run.context()
    );
    assert!(
        run.events_of("deny").is_empty(),
        "nothing denied under the learned file\n{}",
        run.context()
    );
    assert!(ssh.wait_accepted(2, WAIT) && tls.wait_accepted(2, WAIT));
    // And a foreign name on the TLS port is still refused under it.
    let foreign = format!(
        "{CLIENT_HELLO_PY}\nimport json, socket\nsocket.getaddrinfo('web.example.com', 443)\n\
         s = socket.create_connection(('198.51.100.20', 443), timeout=3)\ntry:\n    \
         s.sendall(hello('evil.example.net'))\n    print(json.dumps({{'foreign': 'sent'}}))\n\
         except OSError as e:\n    print(json.dumps({{'foreign': e.errno}}))\n"
    );
    let run = world.run_agent(&text, &[python3(), "-c", &foreign]);
    assert!(
        run.stdout
            .contains(&format!("\"foreign\": {}", libc::EACCES)),
        "{}",
        run.context()
    );
}
