//! Ask mode (issue 17) against the kernel: the real `egress-agent run --ask` (or `attach
//! --ask --health`) inside a [`DnsWorld`] (a namespace of our own, dnsmasq as the upstream on
//! 192.0.2.53 logging every query it gets), its command a python3 script that looks names up
//! with dig and connects; the test decides from outside with the real `egress-agent pending`,
//! `approve` and `deny` (over the agent's control socket) or the HTTP endpoint.
//!
//! Build the agent first; run as root, one thread:
//! `cargo build -p egress-agent --bins && cargo test -p egress-tests --test ask -- --test-threads=1`.

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    time::Duration,
};

use egress_tests::{
    AgentRun, TestDir, TestNetns, cgroup2_mount,
    pod::{AgentPins, AttachAgent, Pod, agent_cli},
    poll_until, remove_cgroup, unique_name,
    world::{DnsWorld, UPSTREAM, python3},
};
use serde_json::Value;

/// How long a test waits for an event or a listener.
const WAIT: Duration = Duration::from_secs(15);

/// A name no rule permits, answered 198.51.100.20 by the world.
const NEW: &str = "new.example.com";
const NEW_IP: &str = "198.51.100.20";
/// A second one, 198.51.100.21.
const OTHER: &str = "other.example.com";
/// An address no rule names and no name answers.
const BARE_IP: &str = "198.51.100.30";

/// Helpers every command script starts with; a script fills `out`, printed as its last line.
const PRELUDE: &str = r#"
import errno, json, os, re, socket, subprocess, sys, time

def fail(e):
    return {"ok": False, "errno": e.errno, "error": errno.errorcode.get(e.errno, str(e))}

def dig(name, wait=25):
    t = time.monotonic()
    p = subprocess.run(["dig", "+time=%d" % wait, "+tries=1", "@192.0.2.53", name, "A"],
                       capture_output=True, text=True)
    m = re.search(r"status: (\w+)", p.stdout)
    addrs = re.findall(r"^\S+\s+\d+\s+IN\s+A\s+(\S+)$", p.stdout, re.M)
    return {"status": m.group(1) if m else None, "addrs": sorted(addrs),
            "secs": round(time.monotonic() - t, 1)}

def tcp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(b"ping\n")
        echo = s.recv(5)
        return {"ok": echo == b"ping\n"}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

out = {}
"#;

/// An allowlist forwarding to the world's dnsmasq that permits one unrelated name.
fn allowlist(extra: &str) -> String {
    format!(
        "version: 1\nname: ask-test\ndns:\n  upstream: [\"{UPSTREAM}\"]\n  min_ttl: 0s\n  \
         max_ttl: 1h\n  grace: 0s\n{extra}allow:\n  - host: listed.example.com\n    ports: [8080]\n"
    )
}

fn world() -> DnsWorld {
    DnsWorld::builder()
        .host_record(NEW, &[NEW_IP], Some(300))
        .host_record(OTHER, &["198.51.100.21"], Some(300))
        .host_record("always.example.com", &["198.51.100.22"], Some(300))
        .host_record("held.example.com", &["198.51.100.23"], Some(300))
        .start()
}

/// One `egress-agent run --ask --name N`. Fields drop in order: the agent (killed if it
/// still runs), then what a killed one leaves: its pins and state (`AgentPins`) and its
/// cgroup `egress-N`.
struct Ask {
    run: AgentRun,
    name: String,
    _pins: AgentPins,
    _cgroup: RunCgroup,
}

/// Removes the cgroup `egress-<name>` of a killed `run`, if any, on drop (never panics).
struct RunCgroup(String);

impl Drop for RunCgroup {
    fn drop(&mut self) {
        let cg = cgroup2_mount().join(format!("egress-{}", self.0));
        if cg.exists()
            && let Err(e) = remove_cgroup(&cg)
        {
            eprintln!("warning: {e}");
        }
    }
}

/// `egress-agent run --ask --name N ARGS -- python3 -c PRELUDE+body` with `ASK_NAME=N` in
/// the command's environment, started and ready.
fn start(world: &DnsWorld, policy: &str, args: &[&str], body: &str) -> Ask {
    let name = unique_name();
    let script = format!("{PRELUDE}\n{body}\nprint(json.dumps(out), flush=True)\n");
    let mut b = AgentRun::builder(world.netns(), policy, &[python3(), "-c", &script])
        .arg("--ask")
        .arg("--name")
        .arg(&name)
        .env("ASK_NAME", &name);
    for a in args {
        b = b.arg(a);
    }
    let cgroup = RunCgroup(name.clone());
    let pins = AgentPins::new(&name);
    let mut run = b.start();
    run.wait_ready();
    Ask {
        run,
        name,
        _pins: pins,
        _cgroup: cgroup,
    }
}

/// Waits for the `approval-requested` event whose `key` is `value` (and is not one of
/// `skip`'s ids); returns it.
fn wait_request(run: &AgentRun, key: &str, value: &str, skip: &[&str]) -> Value {
    poll_until(WAIT, || {
        run.events_of("approval-requested")
            .into_iter()
            .find(|e| e[key] == value && !skip.contains(&e["id"].as_str().unwrap_or("")))
    })
    .unwrap_or_else(|| panic!("no approval-requested for {value}\n{}", run.output()))
}

/// `egress-agent ARGS` from outside: (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    agent_cli(args)
}

/// Runs `egress-agent ARGS` and checks it exits 0.
fn cli_ok(run: &AgentRun, args: &[&str]) -> String {
    let (code, out, err) = cli(args);
    assert_eq!(
        code,
        0,
        "egress-agent {args:?}: {out}{err}\n{}",
        run.output()
    );
    out
}

/// The command's JSON result, after the agent exited 0.
fn result(run: &mut AgentRun) -> Value {
    assert_eq!(run.exit_code(), 0, "the script exits 0\n{}", run.output());
    run.stdout()
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the command printed no JSON\n{}", run.output()))
}

fn id(e: &Value) -> String {
    e["id"].as_str().expect("an id").to_owned()
}

#[test]
fn held_lookup_approved_once_resolves_connects_and_reached_no_server_before() {
    let world = world();
    let listener = world.listen_tcp(&format!("{NEW_IP}:8080"));
    let mut ask = start(
        &world,
        &allowlist(""),
        &["--ask-timeout", "20s"],
        &format!(
            "out['r1'] = dig('{NEW}')\n\
             out['c1'] = tcp(out['r1']['addrs'][0], 8080) if out['r1']['addrs'] else None\n\
             out['r2'] = dig('{NEW}')"
        ),
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    let first = wait_request(run, "name", NEW, &[]);
    assert_eq!(first["qtype"], "A", "{first}");
    assert_eq!(first["comm"], "dig", "the request names who asked: {first}");
    // Held: nothing of the query has left.
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !world.queries().iter().any(|q| q == NEW),
        "the held name reached the upstream before approval:\n{}",
        world.log()
    );
    let pending = cli_ok(run, &["pending", "--name", &name]);
    assert!(
        pending.contains(NEW) && pending.contains("dig"),
        "pending shows the name and who asked: {pending}"
    );
    let json: Value =
        serde_json::from_str(&cli_ok(run, &["pending", "--name", &name, "--json"])).unwrap();
    assert_eq!(json[0]["name"], NEW, "{json}");

    // Bad input changes nothing: an unknown id, a malformed port list, another agent.
    let (code, _, err) = cli(&["approve", "--name", &name, "999"]);
    assert_eq!(code, 1, "unknown id: {err}");
    assert!(err.contains("no pending request"), "{err}");
    let (code, _, err) = cli(&["approve", "--name", &name, NEW, "--ports", "http"]);
    assert_eq!(code, 1, "bad ports: {err}");
    let (code, _, err) = cli(&["approve", "--name", "no-such-agent-x", NEW]);
    assert_eq!(code, 1, "no agent: {err}");
    assert!(err.contains("no agent named"), "{err}");
    assert_eq!(run.events_of("approval-granted").len(), 0);

    let out = cli_ok(run, &["approve", "--name", &name, NEW, "--for", "once"]);
    assert!(out.contains("allowed for once"), "{out}");
    // A second decision on the same id is refused.
    let (code, _, err) = cli(&["approve", "--name", &name, &id(&first)]);
    assert_eq!(code, 1, "second approval: {err}");
    assert!(err.contains("already decided"), "{err}");

    // `once`: the next lookup of the name asks again; deny it.
    let second = wait_request(run, "name", NEW, &[&id(&first)]);
    cli_ok(run, &["deny", "--name", &name, &id(&second)]);

    let out = result(run);
    assert_eq!(out["r1"]["status"], "NOERROR", "{out}\n{}", run.output());
    assert_eq!(out["r1"]["addrs"], serde_json::json!([NEW_IP]), "{out}");
    assert_eq!(out["c1"]["ok"], true, "the approved name connects: {out}");
    assert!(listener.wait_accepted(1, WAIT), "the listener saw it");
    assert_eq!(out["r2"]["status"], "REFUSED", "the denied lookup: {out}");
    assert!(world.wait_query(NEW, WAIT), "forwarded after approval");
    let granted = run.events_of("approval-granted");
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(granted[0]["for"], "once");
    assert_eq!(granted[0]["by"], "uid:0");
    assert_eq!(granted[0]["name"], NEW);
    let denied = run.events_of("approval-denied");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["id"], id(&second).as_str());
    assert!(
        run.events_of("dns-refused")
            .iter()
            .any(|e| e["query"] == NEW && e["reason"] == "approval-denied"),
        "{}",
        run.output()
    );
}

#[test]
fn session_approval_lets_later_lookups_pass_and_session_deny_refuses_without_asking() {
    let world = world();
    let mut ask = start(
        &world,
        &allowlist(""),
        &[],
        &format!(
            "out['a1'] = dig('{NEW}')\n\
             out['a2'] = dig('{NEW}', 5)\n\
             out['b1'] = dig('{OTHER}')\n\
             out['b2'] = dig('{OTHER}', 5)"
        ),
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    wait_request(run, "name", NEW, &[]);
    cli_ok(run, &["approve", "--name", &name, NEW, "--for", "session"]);
    wait_request(run, "name", OTHER, &[]);
    cli_ok(run, &["deny", "--name", &name, OTHER, "--for", "session"]);
    let out = result(run);
    assert_eq!(out["a1"]["addrs"], serde_json::json!([NEW_IP]), "{out}");
    assert_eq!(out["a2"]["addrs"], serde_json::json!([NEW_IP]), "{out}");
    assert_eq!(out["b1"]["status"], "REFUSED", "{out}");
    assert_eq!(out["b2"]["status"], "REFUSED", "{out}");
    let requests = run.events_of("approval-requested");
    assert_eq!(
        requests.len(),
        2,
        "one request per name, none for the later lookups: {requests:?}\n{}",
        run.output()
    );
    assert!(
        !world.queries().iter().any(|q| q == OTHER),
        "the denied name never reached the upstream\n{}",
        world.log()
    );
}

#[test]
fn watch_prompt_decides_each_request_as_it_comes() {
    let world = world();
    let mut ask = start(
        &world,
        &allowlist(""),
        &[],
        &format!("out['a1'] = dig('{NEW}')\nout['a2'] = dig('{NEW}', 5)"),
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    // A person at another terminal answers `s` (session) to the first request shown.
    let mut watcher = std::process::Command::new(egress_tests::agent_bin())
        .args(["approve", "--name", &name, "--watch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("approve --watch");
    watcher
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"s\n")
        .expect("answer");
    let granted = poll_until(WAIT, || {
        run.events_of("approval-granted").into_iter().next()
    });
    // The process this test started.
    let _ = watcher.kill();
    let mut shown = String::new();
    let _ = watcher
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut shown);
    let _ = watcher.wait();
    let granted = granted.unwrap_or_else(|| panic!("no decision\n{shown}\n{}", run.output()));
    assert_eq!(granted["for"], "session", "{granted}");
    assert!(
        shown.contains(NEW) && shown.contains("dig"),
        "the prompt shows the request: {shown}"
    );
    let out = result(run);
    assert_eq!(out["a2"]["addrs"], serde_json::json!([NEW_IP]), "{out}");
}

#[test]
fn deny_and_timeout_refuse_with_their_events_and_nothing_leaves() {
    let world = world();
    let mut ask = start(
        &world,
        &allowlist(""),
        &["--ask-timeout", "2s"],
        &format!("out['t'] = dig('{NEW}')\nout['d'] = dig('{OTHER}')"),
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    // Nobody decides the first one.
    let timed = wait_request(run, "name", NEW, &[]);
    let denied = wait_request(run, "name", OTHER, &[]);
    cli_ok(run, &["deny", "--name", &name, &id(&denied)]);
    let out = result(run);
    assert_eq!(out["t"]["status"], "REFUSED", "{out}");
    assert!(
        out["t"]["secs"].as_f64().unwrap_or(0.0) >= 1.5,
        "refused at the timeout: {out}"
    );
    assert_eq!(out["d"]["status"], "REFUSED", "{out}");
    let refused = run.events_of("dns-refused");
    assert!(
        refused
            .iter()
            .any(|e| e["query"] == NEW && e["reason"] == "approval-timeout"),
        "{}",
        run.output()
    );
    assert!(
        refused
            .iter()
            .any(|e| e["query"] == OTHER && e["reason"] == "approval-denied"),
        "{}",
        run.output()
    );
    assert_eq!(run.events_of("approval-denied").len(), 1);
    assert_eq!(run.events_of("approval-granted").len(), 0);
    // A decision after the timeout finds nothing.
    let (code, _, err) = cli(&["approve", "--name", &name, &id(&timed)]);
    assert_ne!(code, 0, "{err}");
    let q = world.queries();
    assert!(
        !q.iter().any(|n| n == NEW || n == OTHER),
        "a refused name reached the upstream: {q:?}"
    );
}

#[test]
fn always_writes_a_file_check_accepts_and_the_next_run_uses() {
    let world = world();
    let listener = world.listen_tcp("198.51.100.22:8080");
    let mut ask = start(
        &world,
        &allowlist(""),
        &[],
        "out['r'] = dig('always.example.com')",
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    wait_request(run, "name", "always.example.com", &[]);
    cli_ok(
        run,
        &[
            "approve",
            "--name",
            &name,
            "always.example.com",
            "--for",
            "always",
            "--ports",
            "8080",
        ],
    );
    let out = result(run);
    assert_eq!(out["r"]["status"], "NOERROR", "{out}");
    // Beside the allowlist (allow.yaml): allow.approved.yaml.
    let file = run.dir().join("allow.approved.yaml");
    let text = fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "no approvals file {}: {e}\n{}",
            file.display(),
            run.output()
        )
    });
    assert!(
        text.contains("- host: always.example.com\n    ports: [8080]"),
        "{text}"
    );
    let (code, stdout, err) = cli(&["check", &file.to_string_lossy()]);
    assert_eq!(
        code, 0,
        "check accepts the approvals file: {stdout}{err}\n{text}"
    );

    // The next run reads it: no question, the name resolves and connects on 8080.
    let kept = TestDir::new();
    let approved = kept.path().join("team.approved.yaml");
    fs::copy(&file, &approved).expect("copy the approvals file");
    let approved = approved.to_string_lossy().into_owned();
    let mut next_ask = start(
        &world,
        &allowlist(""),
        &["--approvals", &approved, "--ask-timeout", "3s"],
        "out['r'] = dig('always.example.com', 10)\n\
         out['c'] = tcp(out['r']['addrs'][0], 8080) if out['r']['addrs'] else None",
    );
    let next = &mut next_ask.run;
    let out = result(next);
    assert_eq!(
        out["r"]["addrs"],
        serde_json::json!(["198.51.100.22"]),
        "{out}\n{}",
        next.output()
    );
    assert_eq!(out["c"]["ok"], true, "{out}");
    assert!(listener.wait_accepted(1, WAIT));
    assert!(
        next.events_of("approval-requested").is_empty(),
        "{}",
        next.output()
    );
}

#[test]
fn denied_address_raises_a_request_and_a_retry_after_approval_passes() {
    let world = world();
    let listener = world.listen_tcp(&format!("{BARE_IP}:8080"));
    let mut ask = start(
        &world,
        &allowlist(""),
        &[],
        &format!(
            "out['first'] = tcp('{BARE_IP}', 8080)\n\
             out['retry'] = None\n\
             for i in range(60):\n    \
                 r = tcp('{BARE_IP}', 8080)\n    \
                 if r['ok']:\n        out['retry'] = r; out['tries'] = i; break\n    \
                 time.sleep(0.25)"
        ),
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    let req = wait_request(run, "dst", BARE_IP, &[]);
    assert_eq!(req["port"], 8080, "{req}");
    assert_eq!(req["proto"], "tcp", "{req}");
    assert_eq!(listener.accepted(), 0, "nothing reached it before approval");
    cli_ok(
        run,
        &["approve", "--name", &name, BARE_IP, "--for", "session"],
    );
    let out = result(run);
    assert_eq!(out["first"]["error"], "EPERM", "denied at once: {out}");
    assert_eq!(
        out["retry"]["ok"], true,
        "a retry after approval passes: {out}"
    );
    assert!(listener.wait_accepted(1, WAIT));
    let granted = run.events_of("approval-granted");
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(granted[0]["dst"], BARE_IP);
    assert_eq!(granted[0]["ports"], "8080");
}

#[test]
fn the_control_socket_is_out_of_the_commands_reach() {
    let world = world();
    // The command (root in its sandbox) holds a lookup, then tries the agent's control
    // socket: to list the directory, and to approve its own request.
    let mut ask = start(
        &world,
        &allowlist(""),
        &["--ask-timeout", "20s"],
        r#"
import glob
held = subprocess.Popen(["dig", "+time=25", "+tries=1", "@192.0.2.53", "held.example.com", "A"],
                        stdout=subprocess.PIPE, text=True)
time.sleep(1.5)
d = "/run/egress/%s/control" % os.environ["ASK_NAME"]
try:
    out["list"] = os.listdir(d)
except OSError as e:
    out["list"] = fail(e)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(d + "/agent.sock")
    s.sendall(b'{"op":"decide","target":"held.example.com","decision":"allow","for":"always"}\n')
    out["connect"] = {"ok": True, "answer": s.recv(4096).decode()}
except OSError as e:
    out["connect"] = fail(e)
out["dig"] = held.communicate()[0]
"#,
    );
    let name = ask.name.clone();
    let run = &mut ask.run;
    let req = wait_request(run, "name", "held.example.com", &[]);
    // Give the command time to try.
    std::thread::sleep(Duration::from_secs(3));
    let pending = cli_ok(run, &["pending", "--name", &name]);
    assert!(
        pending.contains("held.example.com"),
        "still pending after the command's try: {pending}\n{}",
        run.output()
    );
    cli_ok(run, &["deny", "--name", &name, &id(&req)]);
    let out = result(run);
    assert_eq!(
        out["list"]["ok"], false,
        "the command lists the control dir: {out}"
    );
    assert_eq!(
        out["connect"]["ok"], false,
        "the command reached the socket: {out}"
    );
    assert!(
        matches!(out["connect"]["error"].as_str(), Some("EACCES" | "ENOENT")),
        "{out}"
    );
    assert!(run.events_of("approval-granted").is_empty());
    assert!(!run.dir().join("allow.approved.yaml").exists());
}

/// One HTTP/1.1 request from inside `netns`: (status, body).
fn http(
    netns: &TestNetns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    netns.run_in(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, body.to_owned())
    })
}

#[test]
fn the_http_endpoint_needs_the_bearer_token() {
    let world = world();
    let pod = Pod::new();
    let pins = AgentPins::new(&unique_name());
    let files = TestDir::new();
    let allow = files.path().join("allowlist.yaml");
    fs::write(&allow, allowlist("mode: ask\n")).unwrap();
    let token_file = files.path().join("token");
    let token = "s3cret-token-of-the-test-0123456789";
    fs::write(&token_file, format!("{token}\n")).unwrap();
    let health = "127.0.0.1:9902";
    let mut agent = AttachAgent::builder(world.netns(), &pod.sidecar(), files.path())
        .args([
            "--cgroup",
            &pod.path().to_string_lossy(),
            "--name",
            pins.name(),
        ])
        .args(["--allowlist", &allow.to_string_lossy(), "--health", health])
        .args(["--approval-token-file", &token_file.to_string_lossy()])
        .start();
    agent.wait_ready();
    let addr: SocketAddr = health.parse().unwrap();
    let stdout = files.path().join("app.stdout");
    let app = app_dig(&world, &pod, "held.example.com", 25, &stdout);
    let req = agent
        .wait_event(WAIT, |e| {
            e["event"] == "approval-requested" && e["name"] == "held.example.com"
        })
        .unwrap_or_else(|| panic!("no request\n{}", agent.output()));
    let path = format!("/approvals/{}", id(&req));
    let allow_body = r#"{"decision":"allow","for":"session"}"#;

    let (code, body) = http(world.netns(), addr, "GET", "/approvals", None, "");
    assert_eq!(code, 401, "no token: {body}");
    assert!(!body.contains("held.example.com"), "{body}");
    let (code, _) = http(world.netns(), addr, "GET", "/approvals", Some("wrong"), "");
    assert_eq!(code, 401, "wrong token");
    let (code, _) = http(world.netns(), addr, "POST", &path, None, allow_body);
    assert_eq!(code, 401, "POST without a token");
    let (code, _) = http(
        world.netns(),
        addr,
        "POST",
        &path,
        Some("wrong"),
        allow_body,
    );
    assert_eq!(code, 401, "POST with a wrong token");
    assert!(
        agent.events_of("approval-granted").is_empty(),
        "{}",
        agent.output()
    );
    let (code, body) = http(world.netns(), addr, "POST", &path, Some(token), "{nope");
    assert_eq!(code, 400, "malformed: {body}");

    let (code, body) = http(world.netns(), addr, "GET", "/approvals", Some(token), "");
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["name"], "held.example.com", "{list}");
    let (code, body) = http(world.netns(), addr, "POST", &path, Some(token), allow_body);
    assert_eq!(code, 200, "{body}\n{}", agent.output());
    let (code, _) = http(world.netns(), addr, "POST", &path, Some(token), allow_body);
    assert_eq!(code, 409, "a second decision");

    reap(app);
    let dig = fs::read_to_string(&stdout).unwrap_or_default();
    assert!(dig.contains("198.51.100.23"), "{dig}\n{}", agent.output());
    let granted = agent.events_of("approval-granted");
    assert_eq!(granted.len(), 1, "{}", agent.output());
    assert_eq!(granted[0]["by"], "http");
    agent.terminate();
}

/// `dig NAME` from the pod's app container, waiting up to `wait` seconds for an answer; its
/// output goes to `out`.
fn app_dig(world: &DnsWorld, pod: &Pod, name: &str, wait: u32, out: &Path) -> std::process::Child {
    pod.command(world.netns(), &pod.app(), "dig")
        .args([
            &format!("+time={wait}"),
            "+tries=1",
            "@192.0.2.53",
            name,
            "A",
        ])
        .stdin(Stdio::null())
        .stdout(File::create(out).expect("dig output file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("dig")
}

/// Waits for a child this test started, killing it if it takes longer than `WAIT`.
fn reap(mut child: std::process::Child) {
    if poll_until(WAIT, || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn a_restart_refuses_what_was_held_and_keeps_what_was_approved_always() {
    let world = world();
    let pod = Pod::new();
    let pins = AgentPins::new(&unique_name());
    let files = TestDir::new();
    let allow = files.path().join("team.yaml");
    fs::write(&allow, allowlist("mode: ask\n")).unwrap();
    let start_agent = || {
        let mut agent = AttachAgent::builder(world.netns(), &pod.sidecar(), files.path())
            .args([
                "--cgroup",
                &pod.path().to_string_lossy(),
                "--name",
                pins.name(),
            ])
            .args([
                "--allowlist",
                &allow.to_string_lossy(),
                "--ask-timeout",
                "20s",
            ])
            .start();
        agent.wait_ready();
        agent
    };
    let mut first = start_agent();
    let out = files.path().join("dig-always-1");
    let dig = app_dig(&world, &pod, "always.example.com", 25, &out);
    first
        .wait_event(WAIT, |e| e["event"] == "approval-requested")
        .unwrap_or_else(|| panic!("no request\n{}", first.output()));
    let (code, o, e) = cli(&[
        "approve",
        "--name",
        pins.name(),
        "always.example.com",
        "--for",
        "always",
    ]);
    assert_eq!(code, 0, "{o}{e}\n{}", first.output());
    reap(dig);
    assert!(fs::read_to_string(&out).unwrap().contains("198.51.100.22"));
    // `team.yaml` → `team.approved.yaml`.
    let approved = files.path().join("team.approved.yaml");
    assert!(approved.exists(), "{}", first.output());

    // A lookup is held when the agent dies: it is never answered, never forwarded.
    let out = files.path().join("dig-held-1");
    let dig = app_dig(&world, &pod, "held.example.com", 4, &out);
    first
        .wait_event(WAIT, |e| {
            e["event"] == "approval-requested" && e["name"] == "held.example.com"
        })
        .unwrap_or_else(|| panic!("no request\n{}", first.output()));
    first.kill9();
    reap(dig);
    let text = fs::read_to_string(&out).unwrap_or_default();
    assert!(
        !text.contains("198.51.100.23"),
        "answered after a crash: {text}"
    );
    assert!(
        !world.queries().iter().any(|q| q == "held.example.com"),
        "the held name reached the upstream: {:?}",
        world.queries()
    );

    // The next agent (same name, adopting the pins) knows the `always` name, and asks again
    // for the held one.
    let second = start_agent();
    let out = files.path().join("dig-always-2");
    reap(app_dig(&world, &pod, "always.example.com", 5, &out));
    assert!(
        fs::read_to_string(&out).unwrap().contains("198.51.100.22"),
        "{}",
        second.output()
    );
    let out = files.path().join("dig-held-2");
    let dig = app_dig(&world, &pod, "held.example.com", 10, &out);
    let again = second
        .wait_event(WAIT, |e| {
            e["event"] == "approval-requested" && e["name"] == "held.example.com"
        })
        .unwrap_or_else(|| panic!("the held name is asked again\n{}", second.output()));
    let (code, o, e) = cli(&["deny", "--name", pins.name(), &id(&again)]);
    assert_eq!(code, 0, "{o}{e}");
    reap(dig);
    assert!(
        fs::read_to_string(&out)
            .unwrap()
            .contains("status: REFUSED")
    );
    let requested: Vec<_> = second
        .events_of("approval-requested")
        .into_iter()
        .filter(|e| e["name"] == "always.example.com")
        .collect();
    assert!(requested.is_empty(), "{requested:?}");
}

#[test]
fn a_session_approval_and_allowlist_reloads_keep_each_other() {
    let world = world();
    let pod = Pod::new();
    let pins = AgentPins::new(&unique_name());
    let files = TestDir::new();
    let allow = files.path().join("team.yaml");
    let with = |hosts: &[&str]| {
        let extra: String = hosts
            .iter()
            .map(|h| format!("  - host: {h}\n    ports: [8080]\n"))
            .collect();
        format!("{}{extra}", allowlist("mode: ask\n"))
    };
    fs::write(&allow, with(&[])).unwrap();
    let mut agent = AttachAgent::builder(world.netns(), &pod.sidecar(), files.path())
        .args([
            "--cgroup",
            &pod.path().to_string_lossy(),
            "--name",
            pins.name(),
        ])
        .args([
            "--allowlist",
            &allow.to_string_lossy(),
            "--ask-timeout",
            "20s",
        ])
        .start();
    agent.wait_ready();
    let reloaded = |agent: &AttachAgent, n: usize| {
        poll_until(WAIT, || {
            (agent.events_of("policy-reloaded").len() >= n).then_some(())
        })
        .unwrap_or_else(|| panic!("no reload {n}\n{}", agent.output()));
    };
    let dig = |name: &str, file: &str| {
        let out = files.path().join(file);
        reap(app_dig(&world, &pod, name, 25, &out));
        fs::read_to_string(&out).unwrap_or_default()
    };
    let out = files.path().join("dig-new");
    let held = app_dig(&world, &pod, NEW, 25, &out);
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "approval-requested" && e["name"] == NEW
        })
        .unwrap_or_else(|| panic!("no request\n{}", agent.output()));
    // A reload while the request waits; the decision after it must not undo it.
    fs::write(&allow, with(&[OTHER])).unwrap();
    reloaded(&agent, 1);
    let (code, o, e) = cli(&["approve", "--name", pins.name(), NEW, "--for", "session"]);
    assert_eq!(code, 0, "{o}{e}\n{}", agent.output());
    reap(held);
    assert!(fs::read_to_string(&out).unwrap().contains(NEW_IP));
    // A reload after the decision keeps the approved rule.
    fs::write(&allow, with(&[OTHER, "always.example.com"])).unwrap();
    reloaded(&agent, 2);
    let other = dig(OTHER, "dig-other");
    assert!(
        other.contains("198.51.100.21"),
        "the reload before the decision stays: {other}\n{}",
        agent.output()
    );
    let always = dig("always.example.com", "dig-always");
    assert!(
        always.contains("198.51.100.22"),
        "{always}\n{}",
        agent.output()
    );
    let again = dig(NEW, "dig-new-2");
    assert!(
        again.contains(NEW_IP),
        "the session approval outlives a reload: {again}\n{}",
        agent.output()
    );
    assert_eq!(
        agent.events_of("approval-requested").len(),
        1,
        "nothing asked again\n{}",
        agent.output()
    );
}
