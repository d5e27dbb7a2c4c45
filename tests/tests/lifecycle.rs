//! The sidecar topology and the agent's lifecycle, against the kernel: a simulated pod (a pod
//! cgroup with `app` and `sidecar` children) in a [`DnsWorld`] (a namespace of our own with
//! dnsmasq on 192.0.2.53 and echo servers on documentation addresses), the real
//! `egress-agent attach --cgroup <pod>` running in `sidecar`, and python3 scripts in `app`
//! standing in for the workload.
//!
//! Covered: enforcement on the app with the agent's own upstream DNS exempt, discovery from a
//! pod UID, health and metrics, kill -9 (fail closed, adoption by a restarted agent), SIGTERM
//! with and without `--detach-on-exit`, hot reload (in place, invalid, rename, ConfigMap
//! `..data` swap, a removed rule), `detach`, and a policy narrowed across a restart (the
//! adopted DNS-derived entries of a name no longer permitted must go too).
//!
//! Every "remote" address is on the namespace's `lo`: without enforcement every connect here
//! would succeed, so an `EPERM` is the programs' doing.
//!
//! Build the agent first; run as root, one thread:
//! `cargo build -p egress-agent && cargo test -p egress-tests --test lifecycle -- --test-threads=1`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use egress_tests::{
    TestDir,
    pod::{AgentPins, AttachAgent, AttachBuilder, Pod, agent_cli, http_get, metric},
    poll_until, unique_name,
    world::{CLIENT_HELLO_PY, DnsWorld, EchoListener, FILL_OPTION_MEMORY_PY, UPSTREAM, python3},
};
use serde_json::Value;

/// How long to wait for an event, a query in dnsmasq's log or a metric.
const WAIT: Duration = Duration::from_secs(5);
/// How long an app script may run.
const SCRIPT_WAIT: Duration = Duration::from_secs(20);
/// Where the agent serves `/healthz`, `/readyz` and `/metrics` (inside the namespace).
const HEALTH: &str = "127.0.0.1:9901";

/// Permitted by most policies here: 198.51.100.10, TTL 300 s.
const ALLOWED: &str = "allowed.example.com";
const ALLOWED_IP: &str = "198.51.100.10";
/// A second permitted name: 198.51.100.11, TTL 300 s.
const SECOND: &str = "second.example.com";
const SECOND_IP: &str = "198.51.100.11";
/// A permitted name with a short TTL: 198.51.100.12, TTL 4 s.
const SHORT: &str = "short.example.com";
const SHORT_IP: &str = "198.51.100.12";
const SHORT_TTL: u32 = 4;
/// An address no rule names (until a test adds one).
const DENIED_IP: &str = "198.51.100.20";
/// A name dnsmasq answers (with [`DENIED_IP`]) that no policy here permits.
const DENIED_NAME: &str = "denied.example.com";

/// `allowed.example.com` on 8080.
const ALLOWED_RULE: &str =
    "  - host: allowed.example.com\n    ports: [8080]\n    name_check: false\n";
/// `second.example.com` on 8080.
const SECOND_RULE: &str =
    "  - host: second.example.com\n    ports: [8080]\n    name_check: false\n";
/// `short.example.com` on 8080.
const SHORT_RULE: &str = "  - host: short.example.com\n    ports: [8080]\n    name_check: false\n";
/// The denied address, on 8080.
const DENIED_IP_RULE: &str = "  - cidr: 198.51.100.20/32\n    ports: [8080]\n";

/// An allowlist forwarding to the world's dnsmasq, TTLs as answered, no grace, with `rules`
/// (YAML list items) under `allow:`.
fn policy(rules: &str) -> String {
    format!(
        "version: 1\nname: pod-test\ndns:\n  upstream: [\"{UPSTREAM}\"]\n  min_ttl: 0s\n  \
         max_ttl: 1h\n  grace: 0s\nallow:\n{rules}"
    )
}

/// Helpers every app script starts with; a script adds results to `out`, which is printed
/// as its last line.
const PRELUDE: &str = r#"
import errno, json, os, re, socket, subprocess, sys

def fail(e):
    return {"ok": False, "errno": e.errno, "error": errno.errorcode.get(e.errno, str(e))}

def resolve(name):
    try:
        infos = socket.getaddrinfo(name, 8080, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        return {"ok": False, "gai": e.errno, "error": str(e)}
    return {"ok": True, "addrs": sorted({i[4][0] for i in infos})}

def tcp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.sendall(b"ping\n")
        echo = b""
        while len(echo) < 5:
            chunk = s.recv(5 - len(echo))
            if not chunk:
                break
            echo += chunk
        return {"ok": echo == b"ping\n", "echo": echo.decode()}
    except OSError as e:
        return fail(e)
    finally:
        s.close()

def dig(name):
    p = subprocess.run(["dig", "+time=1", "+tries=1", name, "A"], capture_output=True,
                       text=True)
    m = re.search(r"status: (\w+)", p.stdout)
    answers = re.findall(r"^\S+\s+\d+\s+IN\s+A\s+(\S+)$", p.stdout, re.M)
    return {"rc": p.returncode, "status": m.group(1) if m else None,
            "answers": sorted(answers), "out": p.stdout}

out = {"pid": os.getpid()}
"#;

/// A long-lived TCP connection from the app: connects once, then exchanges a line each time
/// it is asked to (a script reading stdin), so a test can see it survive a change.
const LIVE_SCRIPT: &str = r#"
import json, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(json.dumps({"ok": True}), flush=True)
except OSError as e:
    print(json.dumps({"ok": False, "error": str(e)}), flush=True)
    sys.exit(0)
for line in sys.stdin:
    try:
        s.sendall(b"live\n")
        echo = b""
        while len(echo) < 5:
            chunk = s.recv(5 - len(echo))
            if not chunk:
                break
            echo += chunk
        print(json.dumps({"ok": echo == b"live\n", "echo": echo.decode()}), flush=True)
    except OSError as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
"#;

/// Counter for script output files.
static NEXT_SCRIPT: AtomicUsize = AtomicUsize::new(0);

/// One test's sandbox. Fields drop in order: files, then the pins (agents, locals declared
/// after this, are gone by then), the pod's cgroups, the echo servers and the namespace.
struct Env {
    files: TestDir,
    pins: AgentPins,
    pod: Pod,
    listeners: Vec<EchoListener>,
    world: DnsWorld,
}

impl Env {
    /// A pod directly in a test cgroup, the agent named `egress-test-{pid}-{n}`.
    fn new(rules: &str) -> Self {
        Self::with_pod(Pod::new(), &unique_name(), rules)
    }

    /// `pod`, agents named `name`, the allowlist `allowlist.yaml` holding `policy(rules)`.
    fn with_pod(pod: Pod, name: &str, rules: &str) -> Self {
        let world = DnsWorld::builder()
            .host_record(ALLOWED, &[ALLOWED_IP], Some(300))
            .host_record(SECOND, &[SECOND_IP], Some(300))
            .host_record(SHORT, &[SHORT_IP], Some(SHORT_TTL))
            .host_record(DENIED_NAME, &[DENIED_IP], Some(300))
            .start();
        let listeners = [ALLOWED_IP, SECOND_IP, SHORT_IP, DENIED_IP]
            .iter()
            .map(|ip| world.listen_tcp(&format!("{ip}:8080")))
            .chain([world.listen_tcp(&format!("{ALLOWED_IP}:9090"))])
            .collect();
        let env = Self {
            files: TestDir::new(),
            pins: AgentPins::new(name),
            pod,
            listeners,
            world,
        };
        env.write_allowlist(&policy(rules));
        env
    }

    /// The allowlist the agents watch.
    fn allowlist(&self) -> PathBuf {
        self.files.path().join("allowlist.yaml")
    }

    /// Rewrites the allowlist in place (same inode).
    fn write_allowlist(&self, yaml: &str) {
        let path = self.allowlist();
        fs::write(&path, yaml).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// `egress-agent attach --allowlist A` in the sidecar, nothing else yet.
    fn attach_bare(&self) -> AttachBuilder<'_> {
        AttachAgent::builder(self.world.netns(), &self.pod.sidecar(), self.files.path())
    }

    /// `egress-agent attach --cgroup <pod> --name N --allowlist A` in the sidecar.
    fn attach(&self) -> AttachBuilder<'_> {
        self.attach_bare()
            .arg("--cgroup")
            .arg(self.pod.path())
            .arg("--name")
            .arg(self.pins.name())
            .arg("--allowlist")
            .arg(self.allowlist())
    }

    /// Starts an agent with `extra` arguments and waits until it is ready.
    /// Root in the app cgroup asks for a packet socket: the signal that ended it (SIGKILL when
    /// the packet-socket tripwire is armed), `None` when it exited.
    fn packet_socket_signal(&self) -> Option<i32> {
        let status = self
            .pod
            .command(self.world.netns(), &self.pod.app(), python3())
            .arg("-c")
            .arg("import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n")
            .stdin(Stdio::null())
            .status()
            .expect("python3");
        std::os::unix::process::ExitStatusExt::signal(&status)
    }

    fn start_agent(&self, extra: &[&str]) -> AttachAgent {
        let mut agent = self.attach().args(extra).start();
        agent.wait_ready();
        agent
    }

    /// Runs `body` (after [`PRELUDE`]) as a python3 script in `cgroup`; returns its JSON.
    fn script_in(&self, cgroup: &Path, body: &str) -> Value {
        let n = NEXT_SCRIPT.fetch_add(1, Ordering::Relaxed);
        let stdout = self.files.path().join(format!("script-{n}.stdout"));
        let stderr = self.files.path().join(format!("script-{n}.stderr"));
        let script = format!("{PRELUDE}\n{body}\nprint(json.dumps(out), flush=True)\n");
        let mut child = self
            .pod
            .command(self.world.netns(), cgroup, python3())
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("script stdout file"))
            .stderr(File::create(&stderr).expect("script stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        let status = poll_until(SCRIPT_WAIT, || child.try_wait().ok().flatten());
        if status.is_none() {
            // The process this test started.
            let _ = child.kill();
            let _ = child.wait();
        }
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let text = read(&stdout);
        text.lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| {
                panic!(
                    "the script printed no JSON (status {status:?})\nscript:\n{body}\nstdout:\n\
                     {text}\nstderr:\n{}",
                    read(&stderr)
                )
            })
    }

    /// A script in the app's cgroup.
    fn app(&self, body: &str) -> Value {
        self.script_in(&self.pod.app(), body)
    }

    /// A TCP connect (and echo) from the app.
    fn app_tcp(&self, ip: &str, port: u16) -> Value {
        self.app(&format!("out['r'] = tcp('{ip}', {port})"))
    }

    /// A lookup through the system resolver from the app, then a connect to its first
    /// answer on 8080.
    fn app_resolve_and_connect(&self, name: &str) -> Value {
        self.app(&format!(
            "out['resolve'] = resolve('{name}')\n\
             out['r'] = tcp(out['resolve']['addrs'][0], 8080) if out['resolve']['ok'] else None"
        ))
    }

    /// `dig NAME` from the app (one try, 1 s).
    fn app_dig(&self, name: &str) -> Value {
        self.app(&format!("out['r'] = dig('{name}')"))
    }

    /// A connection from the app that stays open.
    fn live_connection(&self, ip: &str, port: u16) -> LiveConnection {
        self.live_script(LIVE_SCRIPT, &[ip, &port.to_string()])
    }

    /// `script` from the app, with `args`, kept running: it prints a JSON line when ready
    /// (`ok` true), then one per line it reads (see [`LiveConnection::exchange`]).
    fn live_script(&self, script: &str, args: &[&str]) -> LiveConnection {
        let mut child = self
            .pod
            .command(self.world.netns(), &self.pod.app(), python3())
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut live = LiveConnection {
            child,
            stdin: Some(stdin),
            stdout,
        };
        let first = live.line();
        assert_eq!(first["ok"], true, "the live script is ready: {first}");
        live
    }

    /// `GET path` on the agent's health address.
    fn health(&self, path: &str) -> (u16, String) {
        let addr: SocketAddr = HEALTH.parse().expect("health address");
        http_get(self.world.netns(), addr, path)
            .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
    }

    /// Waits until the metric `series` satisfies `ok`; returns the last /metrics text.
    fn wait_metric(&self, series: &str, ok: impl Fn(f64) -> bool) -> String {
        let mut last = String::new();
        let found = poll_until(WAIT, || {
            let (code, body) = self.health("/metrics");
            assert_eq!(code, 200, "/metrics answers 200: {body}");
            let v = metric(&body, series);
            last = body;
            v.filter(|v| ok(*v))
        });
        assert!(found.is_some(), "{series} never as expected in:\n{last}");
        last
    }

    /// `egress-agent status --name N --json`.
    fn status(&self) -> Value {
        let (code, out, err) = agent_cli(&["status", "--name", self.pins.name(), "--json"]);
        assert_eq!(code, 0, "status --name {} exits 0: {err}", self.pins.name());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    /// The listener on `ip`:`port`.
    fn listener(&self, ip: &str, port: u16) -> &EchoListener {
        let want: SocketAddr = format!("{ip}:{port}").parse().expect("address");
        self.listeners
            .iter()
            .find(|l| l.addr() == want)
            .unwrap_or_else(|| panic!("no listener on {want}"))
    }
}

/// A long-lived app connection (see [`LIVE_SCRIPT`]). Dropping it ends the script.
struct LiveConnection {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl LiveConnection {
    fn line(&mut self) -> Value {
        let mut line = String::new();
        // The script answers within its 3 s socket timeout, or exits (EOF).
        let _ = self.stdout.read_line(&mut line);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("live script said {line:?}: {e}"))
    }

    /// Sends a line over the open connection and reads the echo.
    fn exchange(&mut self) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("the live script reads its stdin");
        self.line()
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        // EOF ends the script; then make sure (the process this test started).
        drop(self.stdin.take());
        if poll_until(Duration::from_secs(2), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The cgroup v2 id of `dir` (its inode).
fn cgroup_id(dir: &Path) -> u64 {
    fs::metadata(dir)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", dir.display()))
        .ino()
}

/// `out` is a successful TCP exchange.
#[track_caller]
fn assert_connected(what: &str, out: &Value, agent: &AttachAgent) {
    assert_eq!(
        out["r"]["ok"],
        true,
        "{what}: the connect should work: {out}\n{}",
        agent.output()
    );
}

/// `out` failed with `EPERM`.
#[track_caller]
fn assert_eperm(what: &str, out: &Value, agent: &AttachAgent) {
    assert_eq!(
        out["r"]["error"],
        "EPERM",
        "{what}: expected EPERM, got {out}\n{}",
        agent.output()
    );
}

/// Waits for the agent's deny event for the app process `pid` to `ip`:`port`.
#[track_caller]
fn wait_deny(agent: &AttachAgent, pid: &Value, ip: &str, port: u16) -> Value {
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "deny" && e["pid"] == *pid && e["dst"] == ip && e["port"] == port
        })
        .unwrap_or_else(|| {
            panic!(
                "no deny event for pid {pid} to {ip}:{port}\n{}",
                agent.output()
            )
        })
}

/// Waits for the restarted agent's warning that it adopted the pinned state.
#[track_caller]
fn wait_adopted(agent: &AttachAgent) {
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "warning"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("adopted the pinned state"))
        })
        .unwrap_or_else(|| panic!("no adopted warning\n{}", agent.output()));
}

/// Waits for a `policy-reloaded` (or fails on a `policy-rejected`) after `seen` events.
#[track_caller]
fn wait_reloaded(agent: &AttachAgent, seen: usize) -> Value {
    let ev = poll_until(WAIT, || {
        agent
            .events()
            .into_iter()
            .skip(seen)
            .find(|e| e["event"] == "policy-reloaded" || e["event"] == "policy-rejected")
    })
    .unwrap_or_else(|| panic!("no policy-reloaded event\n{}", agent.output()));
    assert_eq!(
        ev["event"],
        "policy-reloaded",
        "the new allowlist is valid: {ev}\n{}",
        agent.output()
    );
    ev
}

#[test]
fn sidecar_agent_enforces_the_app_and_reaches_its_upstream() {
    let env = Env::new(ALLOWED_RULE);
    let mut agent = env.start_agent(&["--health", HEALTH]);
    let events = agent.events();
    assert_eq!(events[0]["event"], "ready", "{}", agent.output());
    assert_eq!(events[0]["name"], env.pins.name(), "{}", agent.output());
    assert_eq!(
        events[0]["cgroup"],
        env.pod.path().to_str().expect("utf-8 path"),
        "the agent enforces on the pod cgroup\n{}",
        agent.output()
    );
    assert_eq!(events[0]["cgroup_id"], cgroup_id(env.pod.path()));
    let procs = fs::read_to_string(env.pod.sidecar().join("cgroup.procs")).expect("sidecar procs");
    assert!(
        procs.lines().any(|l| l.trim() == agent.pid().to_string()),
        "the agent runs in the sidecar cgroup: {procs:?}"
    );

    assert_eq!(env.health("/healthz"), (200, "ok\n".into()));
    assert_eq!(env.health("/readyz"), (200, "ready\n".into()));

    // The app: an address no rule names is denied by the kernel, and reported.
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("app to a denied address", &out, &agent);
    let deny = wait_deny(&agent, &out["pid"], DENIED_IP, 8080);
    assert_eq!(deny["reason"], "no-rule", "{deny}");
    assert_eq!(deny["proto"], "tcp", "{deny}");
    assert_eq!(
        deny["cgroup"],
        cgroup_id(&env.pod.app()),
        "the deny names the app's cgroup: {deny}"
    );
    assert_eq!(env.listener(DENIED_IP, 8080).accepted(), 0);

    // A permitted name: the app's lookup goes to the agent's resolver, which asks dnsmasq
    // from the sidecar cgroup (inside the enforced pod cgroup: exempt, or it would loop back
    // to itself), allows the answer, and the connect works.
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_eq!(
        out["resolve"]["addrs"],
        Value::from(vec![ALLOWED_IP]),
        "{out}\n{}",
        agent.output()
    );
    assert_connected("app to a permitted name", &out, &agent);
    assert!(
        env.world.wait_query(ALLOWED, WAIT),
        "the agent's upstream query reached dnsmasq:\n{}",
        env.world.log()
    );

    // A name no rule permits: REFUSED by the agent, never forwarded.
    let out = env.app_dig("exfil.evil.test");
    assert_eq!(out["r"]["status"], "REFUSED", "{out}\n{}", agent.output());
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "dns-refused" && e["query"] == "exfil.evil.test"
        })
        .unwrap_or_else(|| panic!("no dns-refused event\n{}", agent.output()));
    assert!(
        !env.world.queries().iter().any(|q| q == "exfil.evil.test"),
        "a refused name reached the upstream:\n{}",
        env.world.log()
    );

    // Only the agent's own cgroup is exempt: the same connect from the sidecar works.
    let out = env.script_in(
        &env.pod.sidecar(),
        &format!("out['r'] = tcp('{DENIED_IP}', 8080)"),
    );
    assert_connected("sidecar to the denied address", &out, &agent);

    // Metrics: the kernel's and the agent's counters.
    let text = env.wait_metric("egress_deny_events_total{reason=\"no-rule\"}", |v| v >= 1.0);
    for (series, min) in [
        ("egress_allowed_total", 1.0),
        ("egress_denied_total", 1.0),
        ("egress_dns_queries_total", 2.0),
        ("egress_dns_refused_total", 1.0),
        ("egress_dns_map_entries", 1.0),
        ("egress_ready", 1.0),
    ] {
        let v = metric(&text, series);
        assert!(
            v.is_some_and(|v| v >= min),
            "{series} >= {min}, got {v:?}:\n{text}"
        );
    }
    for series in [
        "egress_ringbuf_drops_total",
        "egress_policy_reloads_total{outcome=\"applied\"}",
        "egress_policy_reloads_total{outcome=\"rejected\"}",
    ] {
        assert_eq!(metric(&text, series), Some(0.0), "{series}:\n{text}");
    }

    // status: enforcing, the agent running, the deny among the latest.
    let status = poll_until(WAIT, || {
        let s = env.status();
        let seen = s["agent"]["latest_denies"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["dst"] == DENIED_IP));
        seen.then_some(s)
    })
    .unwrap_or_else(|| panic!("status never lists the deny: {}", env.status()));
    assert_eq!(status["name"], env.pins.name(), "{status}");
    assert_eq!(status["enforcing"], true, "{status}");
    assert_eq!(status["agent_running"], true, "{status}");
    assert_eq!(status["agent"]["pid"], agent.pid(), "{status}");
    assert_eq!(status["mode"], "enforce", "{status}");
    assert_ne!(status["dns_port"], 0, "{status}");
    assert!(status["denied"].as_u64() >= Some(1), "{status}");
    assert!(status["dns_entries"].as_u64() >= Some(1), "{status}");

    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.output());
}

#[test]
fn pod_uid_finds_the_pod_cgroup_under_a_kubelet_layout() {
    // Unique per run (pid, and a counter of this process): the default instance name is
    // pod-<uid>.
    let uid = format!(
        "{:08x}-{:04x}-4000-8000-00000000e9e5",
        std::process::id(),
        NEXT_SCRIPT.fetch_add(1, Ordering::Relaxed) & 0xffff
    );
    let under = uid.replace('-', "_");
    let qos = Path::new("kubepods.slice/kubepods-burstable.slice");
    let mut pod = Pod::below(&qos.join(format!("kubepods-burstable-pod{under}.slice")));
    // A neighbour pod in the same QoS class, never to be touched.
    let neighbour = pod
        .base()
        .join(qos)
        .join("kubepods-burstable-pod00000000_0000_4000_8000_000000000000.slice");
    pod.mkdir(&neighbour);
    pod.mkdir(&neighbour.join("app"));
    let env = Env::with_pod(pod, &format!("pod-{uid}"), ALLOWED_RULE);

    let mut agent = env
        .attach_bare()
        .arg("--pod-uid")
        .arg(&uid)
        .arg("--cgroup-root")
        .arg(env.pod.base())
        .arg("--allowlist")
        .arg(env.allowlist())
        .start();
    let ready = agent.wait_ready();
    assert_eq!(
        ready["name"],
        format!("pod-{uid}"),
        "the default name comes from the pod UID\n{}",
        agent.output()
    );
    assert_eq!(
        ready["cgroup"],
        env.pod.path().to_str().expect("utf-8 path"),
        "the pod's cgroup was found from its UID\n{}",
        agent.output()
    );
    assert!(
        env.pins.dir().join("links").is_dir(),
        "pinned under pod-<uid>"
    );

    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("app to a denied address", &out, &agent);
    wait_deny(&agent, &out["pid"], DENIED_IP, 8080);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("app to a permitted name", &out, &agent);

    let out = env.script_in(
        &neighbour.join("app"),
        &format!("out['r'] = tcp('{DENIED_IP}', 8080)"),
    );
    assert_connected("the neighbour pod is not enforced", &out, &agent);
    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.output());
}

#[test]
fn kill_9_keeps_enforcement_and_a_restarted_agent_adopts_it() {
    let env = Env::new(&format!("{ALLOWED_RULE}{SECOND_RULE}{SHORT_RULE}"));
    let mut first = env.start_agent(&[]);
    let links_before = env.pins.links();
    let generations_before = env.pins.generations();
    assert_eq!(
        links_before.len(),
        env.pins.links_per_generation(),
        "8 sock_addr + sock_create + egress backstop + ingress + sock_ops + setsockopt (+ family guard) links: {links_before:?}"
    );
    assert_eq!(generations_before.len(), 1, "{links_before:?}");
    let maps_before = env.pins.maps();

    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("before the kill: allowed name", &out, &first);
    let out = env.app_resolve_and_connect(SHORT);
    assert_connected("before the kill: short-TTL name", &out, &first);

    first.kill9();

    // Fail closed: the kernel still denies, and the entries answered before stay.
    let out = env.app_tcp(SHORT_IP, 8080);
    assert_connected(
        "after the kill: short-TTL address before its expiry",
        &out,
        &first,
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("after the kill: denied address", &out, &first);
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("after the kill: address answered before", &out, &first);
    // No resolver: the steered port has nothing listening, and nothing reaches dnsmasq.
    let out = env.app_dig(SECOND);
    assert_ne!(out["r"]["rc"], 0, "dig fails without the agent: {out}");
    assert_eq!(
        out["r"]["answers"],
        Value::from(Vec::<&str>::new()),
        "{out}"
    );
    let out = env.app_resolve_and_connect(SECOND);
    assert_eq!(out["resolve"]["ok"], false, "getaddrinfo fails: {out}");
    // The kernel checks expiry itself: the short-TTL address closes without any agent.
    let expired = poll_until(Duration::from_secs(u64::from(SHORT_TTL) + 3), || {
        let out = env.app_tcp(SHORT_IP, 8080);
        (out["r"]["error"] == "EPERM").then_some(())
    });
    assert!(
        expired.is_some(),
        "the short-TTL address expires with no agent: {}",
        env.app_tcp(SHORT_IP, 8080)
    );
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("after the kill: a long-TTL address stays", &out, &first);
    assert!(
        !env.world.queries().iter().any(|q| q == SECOND),
        "a query reached dnsmasq with no agent:\n{}",
        env.world.log()
    );

    let status = env.status();
    assert_eq!(status["enforcing"], true, "{status}");
    assert_eq!(status["agent_running"], false, "{status}");
    assert_eq!(status["agent"]["pid"], first.pid(), "{status}");

    // A new agent of the same name adopts the pins.
    let mut second = env.start_agent(&[]);
    wait_adopted(&second);
    let links_after = env.pins.links();
    let generations_after = env.pins.generations();
    assert_eq!(
        links_after.len(),
        env.pins.links_per_generation(),
        "one generation of link pins: {links_after:?}"
    );
    assert_eq!(generations_after.len(), 1, "{links_after:?}");
    assert_ne!(
        generations_after, generations_before,
        "the new agent pinned its own links"
    );
    assert_eq!(env.pins.maps(), maps_before, "the same maps");
    assert_eq!(
        env.pod.children(),
        BTreeSet::from(["app".to_owned(), "sidecar".to_owned()]),
        "no cgroup appeared in the pod"
    );

    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("after the restart: adopted entry", &out, &second);
    let out = env.app_resolve_and_connect(SECOND);
    assert_eq!(
        out["resolve"]["addrs"],
        Value::from(vec![SECOND_IP]),
        "DNS works again: {out}\n{}",
        second.output()
    );
    assert_connected("after the restart: new name", &out, &second);
    assert!(env.world.wait_query(SECOND, WAIT), "{}", env.world.log());
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("after the restart: denied address", &out, &second);
    wait_deny(&second, &out["pid"], DENIED_IP, 8080);

    let status = env.status();
    assert_eq!(status["agent_running"], true, "{status}");
    assert_eq!(status["agent"]["pid"], second.pid(), "{status}");
    assert_eq!(second.terminate().code(), Some(0), "{}", second.output());
}

#[test]
fn sigterm_keeps_enforcement_unless_detach_on_exit() {
    let env = Env::new(ALLOWED_RULE);
    let mut first = env.start_agent(&[]);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("agent running", &out, &first);
    let tripwire = tripwire_armed(&first);
    assert_eq!(first.terminate().code(), Some(0), "{}", first.output());

    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("after SIGTERM", &out, &first);
    if tripwire {
        // Pinned with the cgroup programs: armed while no agent runs.
        assert_eq!(
            env.packet_socket_signal(),
            Some(libc::SIGKILL),
            "tripwire after SIGTERM"
        );
    }
    assert_eq!(
        env.pins.links().len(),
        env.pins.links_per_generation(),
        "the links stay pinned"
    );
    let status = env.status();
    assert_eq!(status["enforcing"], true, "{status}");
    assert_eq!(status["agent_running"], false, "{status}");

    let mut second = env.start_agent(&["--detach-on-exit"]);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("second agent running", &out, &second);
    assert_eq!(second.terminate().code(), Some(0), "{}", second.output());
    assert!(
        !env.pins.dir().exists(),
        "--detach-on-exit removes the pins: {:?}",
        env.pins.links()
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("after SIGTERM with --detach-on-exit", &out, &second);
    // Detached, the tripwire is gone too (the packet socket opens; the script exits).
    assert_eq!(env.packet_socket_signal(), None, "tripwire after detach");
    assert!(env.listener(DENIED_IP, 8080).wait_accepted(1, WAIT));
    let (code, _, err) = agent_cli(&["status", "--name", env.pins.name()]);
    assert_eq!(code, 1, "status of a detached name fails: {err}");
}

#[test]
fn detach_removes_the_pins_and_fails_the_second_time() {
    let env = Env::new(ALLOWED_RULE);
    let mut agent = env.start_agent(&[]);
    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.output());
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("after SIGTERM", &out, &agent);

    let name = env.pins.name();
    let (code, stdout, stderr) = agent_cli(&["detach", "--name", name]);
    assert_eq!(code, 0, "detach: {stdout} {stderr}");
    assert_eq!(stdout.trim(), format!("detached {name}"));
    assert!(
        !env.pins.dir().exists(),
        "pins left: {:?}",
        env.pins.links()
    );
    assert!(
        !egress_tests::pod::state_dir(name).exists(),
        "the state file is removed too"
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("after detach", &out, &agent);

    let (code, stdout, stderr) = agent_cli(&["detach", "--name", name]);
    assert_eq!(code, 1, "a second detach finds nothing: {stdout} {stderr}");
    assert!(
        stderr.contains("nothing pinned"),
        "the error says so: {stderr}"
    );
}

#[test]
fn reload_in_place_applies_a_new_rule_and_keeps_live_connections() {
    let env = Env::new(ALLOWED_RULE);
    let agent = env.start_agent(&["--health", HEALTH]);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("allowed name", &out, &agent);
    let out = env.app_tcp(ALLOWED_IP, 9090);
    assert_eperm("another port of the allowed name", &out, &agent);
    let deny = wait_deny(&agent, &out["pid"], ALLOWED_IP, 9090);
    assert_eq!(deny["reason"], "port", "{deny}");
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("denied address", &out, &agent);
    let mut live = env.live_connection(ALLOWED_IP, 8080);
    let inode = fs::metadata(env.allowlist()).expect("allowlist").ino();

    let seen = agent.events().len();
    env.write_allowlist(&policy(&format!(
        "{ALLOWED_RULE}  - host: allowed.example.com\n    ports: [9090]\n    name_check: false\n{DENIED_IP_RULE}"
    )));
    assert_eq!(
        fs::metadata(env.allowlist()).expect("allowlist").ino(),
        inode,
        "edited in place"
    );
    let ev = wait_reloaded(&agent, seen);
    assert_eq!(
        ev["file"],
        env.allowlist().to_str().expect("utf-8 path"),
        "{ev}"
    );
    assert!(
        ev["summary"].as_str().is_some_and(|s| !s.is_empty()),
        "{ev}"
    );

    // The new port of a name answered before the reload: no new lookup needed.
    let out = env.app_tcp(ALLOWED_IP, 9090);
    assert_connected("the newly allowed port", &out, &agent);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("the newly allowed address", &out, &agent);
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("the old rule", &out, &agent);
    let echo = live.exchange();
    assert_eq!(
        echo["ok"], true,
        "the live connection survives the reload: {echo}"
    );
    assert!(
        agent.events_of("policy-rejected").is_empty(),
        "{}",
        agent.output()
    );
    env.wait_metric("egress_policy_reloads_total{outcome=\"applied\"}", |v| {
        v == 1.0
    });
}

/// A ping socket to `DENIED_IP` from the app: created, and an echo answered.
const PING_SCRIPT: &str = r#"
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
except OSError as e:
    out["socket"] = fail(e)
else:
    out["socket"] = {"ok": True}
    s.settimeout(1)
    try:
        s.sendto(b"\x08\x00\x00\x00\x00\x00\x00\x01ping", ("198.51.100.20", 0))
        out["echo"] = {"ok": s.recv(2048)[0] == 0}
    except OSError as e:
        out["echo"] = fail(e)
    s.close()
"#;

#[test]
fn reload_turns_ping_sockets_on_and_off() {
    // Ping sockets exist only while some rule allows ICMP (FLAG_ICMP): a reload adding the
    // first icmp rule lets the app create them, one removing the last refuses them again.
    let env = Env::new(ALLOWED_RULE);
    env.world.netns().enable_ping_sockets();
    let agent = env.start_agent(&[]);
    let out = env.app(PING_SCRIPT);
    assert_eq!(out["socket"]["error"], "EPERM", "{out}\n{}", agent.output());

    let seen = agent.events().len();
    env.write_allowlist(&policy(&format!(
        "{ALLOWED_RULE}  - ip: {DENIED_IP}\n    protocol: icmp\n"
    )));
    wait_reloaded(&agent, seen);
    let out = env.app(PING_SCRIPT);
    assert_eq!(out["socket"]["ok"], true, "{out}\n{}", agent.output());
    assert_eq!(out["echo"]["ok"], true, "{out}\n{}", agent.output());

    let seen = agent.events().len();
    env.write_allowlist(&policy(ALLOWED_RULE));
    wait_reloaded(&agent, seen);
    let out = env.app(PING_SCRIPT);
    assert_eq!(out["socket"]["error"], "EPERM", "{out}\n{}", agent.output());
}

#[test]
fn invalid_reload_is_rejected_and_the_old_policy_stays() {
    let env = Env::new(ALLOWED_RULE);
    let agent = env.start_agent(&["--health", HEALTH]);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("allowed name", &out, &agent);

    let seen = agent.events().len();
    let bad = policy(&format!(
        "{ALLOWED_RULE}  - host: second.example.com\n    ports: [70000]\n    name_check: false\n"
    ));
    let at = bad.find("70000").expect("the bad port");
    let line = bad[..at].matches('\n').count() + 1;
    env.write_allowlist(&bad);
    let ev = poll_until(WAIT, || {
        agent
            .events()
            .into_iter()
            .skip(seen)
            .find(|e| e["event"] == "policy-rejected" || e["event"] == "policy-reloaded")
    })
    .unwrap_or_else(|| panic!("no policy-rejected event\n{}", agent.output()));
    let file = env.allowlist();
    assert_eq!(ev["event"], "policy-rejected", "{ev}\n{}", agent.output());
    assert_eq!(ev["file"], file.to_str().expect("utf-8 path"), "{ev}");
    assert_eq!(ev["line"], line, "{ev}");
    let error = ev["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!("{}:{line}:", file.display())) && error.contains("70000"),
        "the error names file:line:col, the field and the value: {ev}"
    );
    let text = env.wait_metric("egress_policy_reloads_total{outcome=\"rejected\"}", |v| {
        v == 1.0
    });
    assert_eq!(
        metric(&text, "egress_policy_reloads_total{outcome=\"applied\"}"),
        Some(0.0),
        "{text}"
    );

    // The old policy keeps running.
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("the entry answered before", &out, &agent);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("the allowed name, looked up again", &out, &agent);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("still denied", &out, &agent);
    let out = env.app_dig(SECOND);
    assert_eq!(
        out["r"]["status"], "REFUSED",
        "the rejected file's name is not permitted: {out}"
    );

    // Fixed: applied, and counted once.
    let seen = agent.events().len();
    env.write_allowlist(&policy(&format!("{ALLOWED_RULE}{SECOND_RULE}")));
    wait_reloaded(&agent, seen);
    let out = env.app_resolve_and_connect(SECOND);
    assert_connected("the fixed file's new name", &out, &agent);
    let text = env.wait_metric("egress_policy_reloads_total{outcome=\"applied\"}", |v| {
        v == 1.0
    });
    assert_eq!(
        metric(&text, "egress_policy_reloads_total{outcome=\"rejected\"}"),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn allowlist_replaced_by_rename_is_applied() {
    let env = Env::new(ALLOWED_RULE);
    let agent = env.start_agent(&[]);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("before", &out, &agent);

    let seen = agent.events().len();
    let new = env.files.path().join("allowlist.yaml.new");
    fs::write(&new, policy(&format!("{ALLOWED_RULE}{DENIED_IP_RULE}"))).expect("new file");
    fs::rename(&new, env.allowlist()).expect("rename over the allowlist");
    let ev = wait_reloaded(&agent, seen);
    assert_eq!(
        ev["file"],
        env.allowlist().to_str().expect("utf-8 path"),
        "{ev}"
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("after the rename", &out, &agent);
}

#[test]
fn configmap_data_symlink_swap_is_applied() {
    let env = Env::new(ALLOWED_RULE);
    // What the kubelet mounts: allowlist.yaml -> ..data/allowlist.yaml, ..data -> ..<ts>.
    let cm = env.files.path().join("configmap");
    let version = |name: &str, yaml: &str| {
        let dir = cm.join(name);
        fs::create_dir_all(&dir).expect("configmap version dir");
        fs::write(dir.join("allowlist.yaml"), yaml).expect("configmap file");
    };
    version("..2026_11_25_a", &policy(ALLOWED_RULE));
    symlink("..2026_11_25_a", cm.join("..data")).expect("..data symlink");
    symlink("..data/allowlist.yaml", cm.join("allowlist.yaml")).expect("key symlink");
    let file = cm.join("allowlist.yaml");

    let mut agent = env
        .attach_bare()
        .arg("--cgroup")
        .arg(env.pod.path())
        .arg("--name")
        .arg(env.pins.name())
        .arg("--allowlist")
        .arg(&file)
        .start();
    agent.wait_ready();
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("before", &out, &agent);
    let out = env.app_dig(SECOND);
    assert_eq!(out["r"]["status"], "REFUSED", "before: {out}");

    // The kubelet's update: a new version directory, a new ..data link renamed over the
    // old one (atomic), then the old version removed.
    let seen = agent.events().len();
    version(
        "..2026_11_25_b",
        &policy(&format!("{ALLOWED_RULE}{SECOND_RULE}{DENIED_IP_RULE}")),
    );
    symlink("..2026_11_25_b", cm.join("..data_tmp")).expect("..data_tmp symlink");
    fs::rename(cm.join("..data_tmp"), cm.join("..data")).expect("swap ..data");
    fs::remove_dir_all(cm.join("..2026_11_25_a")).expect("remove the old version");
    let ev = wait_reloaded(&agent, seen);
    assert_eq!(ev["file"], file.to_str().expect("utf-8 path"), "{ev}");

    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("the new version's address rule", &out, &agent);
    let out = env.app_resolve_and_connect(SECOND);
    assert_connected("the new version's host rule", &out, &agent);
    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.output());
}

/// The copies of static entries in the pinned DNS map: address to port ranges.
fn pinned_copies(env: &Env) -> BTreeMap<String, Vec<(u16, u16)>> {
    egress_agent::bpf::copies::read_pinned(&env.pins.dir())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .map(|(ip, v)| {
            (
                ip.to_string(),
                v.ranges().iter().map(|r| (r.lo, r.hi)).collect(),
            )
        })
        .collect()
}

/// An address rule's exact entry is copied into the DNS-derived map (one lookup decides an
/// `ip:` destination); the copy follows every reload: a changed port is judged by the new
/// one, a removed rule leaves no copy behind that still allows.
#[test]
fn an_address_rules_copy_in_the_dns_map_follows_reloads() {
    let env = Env::new(&format!("{ALLOWED_RULE}{DENIED_IP_RULE}"));
    let mut agent = env.start_agent(&[]);
    assert_eq!(
        pinned_copies(&env).get(DENIED_IP),
        Some(&vec![(8080, 8080)]),
        "the address rule is copied: {:?}",
        pinned_copies(&env)
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("the address rule", &out, &agent);
    assert_eq!(
        env.status()["dns_entries"],
        0,
        "a copy is no DNS-derived entry"
    );

    let seen = agent.events().len();
    env.write_allowlist(&policy(&format!(
        "{ALLOWED_RULE}  - cidr: {DENIED_IP}/32\n    ports: [9090]\n"
    )));
    wait_reloaded(&agent, seen);
    assert_eq!(
        pinned_copies(&env).get(DENIED_IP),
        Some(&vec![(9090, 9090)])
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("the port the new rule dropped", &out, &agent);
    let deny = wait_deny(&agent, &out["pid"], DENIED_IP, 8080);
    assert_eq!(deny["reason"], "port", "{deny}");

    let seen = agent.events().len();
    env.write_allowlist(&policy(ALLOWED_RULE));
    wait_reloaded(&agent, seen);
    assert_eq!(
        pinned_copies(&env),
        BTreeMap::new(),
        "no copy outlives its rule"
    );
    let out = env.app_tcp(DENIED_IP, 9090);
    assert_eperm("the removed address rule", &out, &agent);
    let deny = wait_deny(&agent, &out["pid"], DENIED_IP, 9090);
    assert_eq!(deny["reason"], "no-rule", "{deny}");
    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.output());
}

/// A DNS answer for an address an address rule names replaces its copy (the static entry
/// still decides its own ports); the copy is back once the DNS-derived entry goes.
#[test]
fn a_dns_answer_replaces_the_copy_and_its_removal_brings_it_back() {
    let dns = |env: &Env| {
        egress_agent::bpf::rules::read_pinned_dns(&env.pins.dir())
            .unwrap_or_else(|e| panic!("{e:#}"))
            .contains_key(&DENIED_IP.parse().expect("ip"))
    };
    let name_rule = format!("  - host: {DENIED_NAME}\n    ports: [9090]\n    name_check: false\n");
    let env = Env::new(&format!("{DENIED_IP_RULE}{name_rule}"));
    let mut agent = env.start_agent(&[]);
    assert!(
        pinned_copies(&env).contains_key(DENIED_IP) && !dns(&env),
        "a copy before any answer"
    );
    let out = env.app_dig(DENIED_NAME);
    assert_eq!(out["r"]["status"], "NOERROR", "{out}");
    assert!(
        !pinned_copies(&env).contains_key(DENIED_IP) && dns(&env),
        "the answer's entry in place of the copy"
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("the address rule's port, past the DNS entry", &out, &agent);

    let seen = agent.events().len();
    env.write_allowlist(&policy(DENIED_IP_RULE));
    wait_reloaded(&agent, seen);
    assert!(
        pinned_copies(&env).contains_key(DENIED_IP) && !dns(&env),
        "the copy is back with the entry gone"
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("the address rule", &out, &agent);
    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.output());
}

/// An agent restarted with the address rule removed (while it was down) removes the copy
/// the earlier agent wrote before it judges anything.
#[test]
fn restart_without_the_address_rule_drops_its_adopted_copy() {
    let env = Env::new(&format!("{ALLOWED_RULE}{DENIED_IP_RULE}"));
    let mut first = env.start_agent(&[]);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("the address rule", &out, &first);
    first.kill9();
    assert!(
        pinned_copies(&env).contains_key(DENIED_IP),
        "the copy is pinned after the kill"
    );

    env.write_allowlist(&policy(ALLOWED_RULE));
    let second = env.start_agent(&[]);
    assert_eq!(
        pinned_copies(&env),
        BTreeMap::new(),
        "no adopted copy outlives its rule"
    );
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("the removed address rule, after the restart", &out, &second);
}

#[test]
fn removed_rule_removes_its_dns_entries_but_not_live_connections() {
    let env = Env::new(&format!("{ALLOWED_RULE}{SECOND_RULE}"));
    let agent = env.start_agent(&[]);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("first name", &out, &agent);
    let out = env.app_resolve_and_connect(SECOND);
    assert_connected("second name", &out, &agent);
    assert_eq!(env.status()["dns_entries"], 2);
    let mut live = env.live_connection(SECOND_IP, 8080);

    let seen = agent.events().len();
    env.write_allowlist(&policy(ALLOWED_RULE));
    wait_reloaded(&agent, seen);

    let out = env.app_tcp(SECOND_IP, 8080);
    assert_eperm("the removed name's address", &out, &agent);
    let deny = wait_deny(&agent, &out["pid"], SECOND_IP, 8080);
    assert_eq!(deny["reason"], "no-rule", "the entry is gone: {deny}");
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("the kept name's address", &out, &agent);
    let out = env.app_dig(SECOND);
    assert_eq!(out["r"]["status"], "REFUSED", "the removed name: {out}");
    let echo = live.exchange();
    assert_eq!(
        echo["ok"], true,
        "the connection opened before the removal is not cut: {echo}"
    );
    assert_eq!(env.status()["dns_entries"], 1);
}

/// After a restart the DNS-derived entries are adopted from the pins; a reload that removes
/// the rule behind one must still remove it, as it does for entries the agent answered itself.
#[test]
fn reload_after_a_restart_removes_adopted_entries_of_a_removed_rule() {
    let env = Env::new(&format!("{ALLOWED_RULE}{SECOND_RULE}"));
    let mut first = env.start_agent(&[]);
    let out = env.app_resolve_and_connect(SECOND);
    assert_connected("second name", &out, &first);
    first.kill9();

    let second = env.start_agent(&[]);
    let seen = second.events().len();
    env.write_allowlist(&policy(ALLOWED_RULE));
    wait_reloaded(&second, seen);
    let out = env.app_tcp(SECOND_IP, 8080);
    assert_eperm(
        "reload after a restart: the removed name's adopted address",
        &out,
        &second,
    );
}

/// An agent restarted with a narrower allowlist (edited while it was down) must not keep
/// allowing what an earlier agent answered for a name the new file no longer permits.
#[test]
fn restart_with_a_narrower_allowlist_drops_adopted_entries() {
    let env = Env::new(&format!("{ALLOWED_RULE}{SECOND_RULE}"));
    let mut first = env.start_agent(&[]);
    let out = env.app_resolve_and_connect(SECOND);
    assert_connected("second name", &out, &first);
    first.kill9();

    env.write_allowlist(&policy(ALLOWED_RULE));
    let second = env.start_agent(&[]);
    let out = env.app_tcp(SECOND_IP, 8080);
    assert_eperm(
        "restart with a narrower allowlist: the removed name's adopted address",
        &out,
        &second,
    );
}

/// The aya-log ring of `--trace-verdicts` is not pinned: an agent restarted with the flag
/// adopts the pins of one that ran without it (and the reverse), its maps are the same, and
/// it traces the verdicts of the programs it loaded.
#[test]
fn a_restart_with_trace_verdicts_adopts_the_pins_and_traces() {
    let env = Env::new(ALLOWED_RULE);
    let mut first = env.start_agent(&[]);
    let maps_before = env.pins.maps();
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("before the kill", &out, &first);
    first.kill9();

    let mut second = env.start_agent(&["--trace-verdicts"]);
    wait_adopted(&second);
    assert_eq!(
        env.pins.maps(),
        maps_before,
        "the same maps, no log map pinned"
    );
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_connected("after the restart: adopted entry", &out, &second);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("after the restart: denied address", &out, &second);
    let want = format!("kernel verdict: deny connect4 tcp {DENIED_IP}:8080 reason no-rule");
    let traced = poll_until(WAIT, || second.output().contains(&want).then_some(()));
    assert!(
        traced.is_some(),
        "no trace line {want:?}\n{}",
        second.output()
    );
    second.kill9();

    // And back: without the flag, the same pins again, and no trace line.
    let third = env.start_agent(&[]);
    assert_eq!(env.pins.maps(), maps_before, "the same maps");
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("after the second restart: denied address", &out, &third);
    wait_deny(&third, &out["pid"], DENIED_IP, 8080);
    assert!(
        !third.output().contains("kernel verdict:"),
        "trace lines without the flag\n{}",
        third.output()
    );
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Out of descriptors, the health server's accept fails at once for every queued connection
/// (EMFILE): it backs off instead of spinning a CPU, and serves again once descriptors are
/// free.
#[test]
fn health_server_backs_off_when_out_of_descriptors() {
    let env = Env::new(ALLOWED_RULE);
    let mut agent = env.start_agent(&["--health", HEALTH]);
    assert_eq!(env.health("/healthz").0, 200);
    let pid = agent.pid();
    let open = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    // A few descriptors to spare, then connections that hold them (the server waits up to
    // 5 s for a request) and more that stay queued.
    let limit = open + 4;
    // The soft limit only (raising it back needs no privilege).
    let soft_before = fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Max open files")
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .expect("the agent's open files limit");
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:"))
        .output()
        .expect("cannot run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
    let addr: SocketAddr = HEALTH.parse().expect("health address");
    let held: Vec<_> = (0..12)
        .filter_map(|_| {
            env.world
                .netns()
                .run_in(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        })
        .collect();
    assert!(held.len() >= 8, "connections queued: {}", held.len());
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    // SAFETY: no arguments.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    assert!(
        used * 100 < hz * 2 * 20,
        "the agent used {used} ticks ({hz}/s) in 2 s while out of descriptors: more than 20% \
         of a CPU\n{}",
        agent.output()
    );
    drop(held);
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft_before}:"))
        .output()
        .expect("cannot run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
    let served = poll_until(Duration::from_secs(10), || {
        http_get(env.world.netns(), addr, "/healthz")
            .ok()
            .filter(|(c, _)| *c == 200)
    });
    assert!(
        served.is_some(),
        "/healthz answers again\n{}",
        agent.output()
    );
    agent.terminate();
}

/// What the maps pinned for `env`'s agent hold, read from the kernel.
fn pinned_rules(env: &Env) -> egress_agent::bpf::rules::Rules {
    egress_agent::bpf::rules::read_pinned(&env.pins.dir())
        .unwrap_or_else(|e| panic!("cannot read the pinned maps: {e:#}"))
}

/// What the allowlist `yaml` compiles to.
fn compiled_rules(env: &Env, yaml: &str) -> egress_agent::bpf::rules::Rules {
    let path = env.files.path().join("compiled.yaml");
    fs::write(&path, yaml).expect("write the policy to compile");
    let policy = egress_agent::policy::load(&path).expect("a valid policy");
    egress_agent::bpf::rules::compiled(&policy).expect("the policy compiles")
}

/// Waits until `status --json` shows the agent's `policy_state` as `want`.
#[track_caller]
fn wait_policy_state(env: &Env, agent: &AttachAgent, want: &str) -> Value {
    let mut last = Value::Null;
    let found = poll_until(Duration::from_secs(8), || {
        last = env.status();
        (last["agent"]["policy_state"] == want).then_some(())
    });
    assert!(
        found.is_some(),
        "status never says policy_state {want}: {last}\n{}",
        agent.output()
    );
    last
}

/// Waits for the first `policy-rejected` or `policy-reloaded` event after `seen`.
#[track_caller]
fn wait_policy_event(agent: &AttachAgent, seen: usize) -> Value {
    poll_until(WAIT, || {
        agent
            .events()
            .into_iter()
            .skip(seen)
            .find(|e| e["event"] == "policy-rejected" || e["event"] == "policy-reloaded")
    })
    .unwrap_or_else(|| panic!("no policy event\n{}", agent.output()))
}

/// Static rules of the first policy of the transaction tests (CIDR, inbound, no ICMP).
const RULES_A: &str = "  - cidr: 198.51.100.20/32\n    ports: [8080]\n  - cidr: 203.0.113.0/24\n    \
                       ports: [443]\n  - cidr: 203.0.113.128/25\n    ports: [80]\n  - inbound: \
                       192.0.2.0/24\n    ports: [7000]\n";
/// The second: one CIDR kept with other ports, two gone, new ones, another inbound peer, and
/// an ICMP rule (a config flag).
const RULES_B: &str = "  - cidr: 203.0.113.0/24\n    ports: [443, 8443]\n  - cidr: 198.51.100.21/32\n    \
                       ports: [8080]\n  - cidr: 2001:db8::/48\n    ports: [443]\n  - inbound: \
                       192.0.2.7/32\n    ports: [7001]\n  - cidr: 192.0.2.0/24\n    protocol: icmp\n";

/// A policy change that fails at any step (a write into a full map, a key the kernel refuses,
/// a failed removal, the config write), on reload and on adoption by a restarted agent, leaves
/// the maps holding exactly the previous policy, read back from the kernel; `status`, the
/// event and the gauge say the file was rejected; without the fault the same file is applied
/// exactly. (The faults come from `EGRESS_FAULT_FILE`, read by debug builds only.) Without
/// the rollback, the first fault leaves the new entries beside the old ones.
#[test]
fn a_failed_policy_change_leaves_the_previous_policy_whole() {
    let env = Env::new(&format!("{ALLOWED_RULE}{RULES_A}"));
    let faults = env.files.path().join("faults");
    let start = |env: &Env| {
        let mut agent = env
            .attach()
            .arg("--health")
            .arg(HEALTH)
            .env("EGRESS_FAULT_FILE", &faults)
            .start();
        agent.wait_ready();
        agent
    };
    let mut agent = start(&env);
    let a = policy(&format!("{ALLOWED_RULE}{RULES_A}"));
    let b = policy(&format!("{ALLOWED_RULE}{RULES_B}"));
    let (want_a, want_b) = (compiled_rules(&env, &a), compiled_rules(&env, &b));
    assert_ne!(want_a, want_b);
    assert_eq!(pinned_rules(&env), want_a, "the first policy, exactly");

    for fault in [
        "cidr full 1",
        "cidr full 3",
        "cidr invalid 2",
        "cidr remove 1",
        "cidr remove 2",
        "exact full 1",
        "exact invalid 1",
        "exact remove 1",
        "inbound full 1",
        "inbound invalid 1",
        "inbound remove 1",
        "config config 1",
    ] {
        fs::write(&faults, format!("{fault}\n")).expect("write the fault file");
        let seen = agent.events().len();
        // A comment makes each try a new file content.
        env.write_allowlist(&format!("# {fault}\n{b}"));
        let ev = wait_policy_event(&agent, seen);
        assert_eq!(
            ev["event"],
            "policy-rejected",
            "{fault}: {ev}\n{}",
            agent.output()
        );
        assert_eq!(
            pinned_rules(&env),
            want_a,
            "{fault}: the maps hold the previous policy, whole"
        );
        assert!(
            ev["error"]
                .as_str()
                .is_some_and(|e| e.contains("previous policy is kept whole")),
            "{fault}: {ev}"
        );
        let status = wait_policy_state(&env, &agent, "previous");
        assert!(
            status["agent"]["policy_rejected"]
                .as_str()
                .is_some_and(|e| e.contains("injected fault") || e.contains("cannot write")),
            "{fault}: {status}"
        );
    }
    env.wait_metric("egress_policy_rejected", |v| v == 1.0);
    // What the kernel does agrees: the first policy's address still connects.
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_connected("198.51.100.20 under the kept policy", &out, &agent);

    fs::remove_file(&faults).expect("remove the fault file");
    let seen = agent.events().len();
    env.write_allowlist(&b);
    wait_reloaded(&agent, seen);
    assert_eq!(pinned_rules(&env), want_b, "the new policy, exactly");
    wait_policy_state(&env, &agent, "applied");
    env.wait_metric("egress_policy_rejected", |v| v == 0.0);
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("198.51.100.20 under the new policy", &out, &agent);

    // Adoption: a restarted agent whose new file fails to apply keeps the pinned policy whole
    // and runs under it (the last valid one), DNS included.
    agent.kill9();
    fs::write(&faults, "cidr remove 1\n").expect("write the fault file");
    env.write_allowlist(&a);
    let agent = start(&env);
    let ev = wait_policy_event(&agent, 0);
    assert_eq!(ev["event"], "policy-rejected", "{ev}\n{}", agent.output());
    assert_eq!(
        pinned_rules(&env),
        want_b,
        "adoption failed: the pinned policy, whole"
    );
    wait_policy_state(&env, &agent, "previous");
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("DNS under the kept policy", &out, &agent);

    fs::remove_file(&faults).expect("remove the fault file");
    let seen = agent.events().len();
    env.write_allowlist(&format!("# fixed\n{a}"));
    wait_reloaded(&agent, seen);
    assert_eq!(pinned_rules(&env), want_a, "the file, once it applies");
    wait_policy_state(&env, &agent, "applied");
}

/// `attach` restarted (after kill -9) while its allowlist is invalid adopts the pinned state
/// and runs under the last valid policy, kept beside the pins: it keeps enforcing and
/// answering DNS, reports `policy-rejected` (and in `status` and a gauge), and applies the
/// file once it is valid. A start with no pinned state and an invalid file still refuses.
#[test]
fn a_restart_with_an_invalid_allowlist_runs_the_last_valid_policy() {
    let env = Env::new(ALLOWED_RULE);
    let mut first = env.start_agent(&[]);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("before the kill", &out, &first);
    first.kill9();

    let bad = policy(&format!(
        "{ALLOWED_RULE}{SECOND_RULE}  - host: x.test\n    ports: [70000]\n"
    ));
    env.write_allowlist(&bad);
    let agent = env.start_agent(&["--health", HEALTH]);
    let ev = wait_policy_event(&agent, 0);
    assert_eq!(ev["event"], "policy-rejected", "{ev}\n{}", agent.output());
    assert_eq!(
        ev["file"],
        env.allowlist().to_str().expect("utf-8 path"),
        "{ev}"
    );
    assert!(
        ev["error"].as_str().is_some_and(|e| e.contains("70000")),
        "{ev}"
    );
    // DNS answers under the last valid policy; the bad file's new name is not permitted.
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("the last valid policy's name, looked up anew", &out, &agent);
    let out = env.app_dig(SECOND);
    assert_eq!(out["r"]["status"], "REFUSED", "{out}");
    let out = env.app_tcp(DENIED_IP, 8080);
    assert_eperm("still enforcing", &out, &agent);
    let status = wait_policy_state(&env, &agent, "previous");
    assert!(
        status["agent"]["policy_rejected"]
            .as_str()
            .is_some_and(|e| e.contains("70000")),
        "{status}"
    );
    env.wait_metric("egress_policy_rejected", |v| v == 1.0);
    assert_eq!(
        pinned_rules(&env),
        compiled_rules(&env, &policy(ALLOWED_RULE)),
        "the maps hold the last valid policy"
    );

    // Fixed: applied.
    let seen = agent.events().len();
    env.write_allowlist(&policy(&format!("{ALLOWED_RULE}{SECOND_RULE}")));
    wait_reloaded(&agent, seen);
    let out = env.app_resolve_and_connect(SECOND);
    assert_connected("the fixed file's new name", &out, &agent);
    wait_policy_state(&env, &agent, "applied");
    env.wait_metric("egress_policy_rejected", |v| v == 0.0);
    drop(agent);

    // Nothing pinned under another name and an invalid file: refused.
    let other = Env::new(ALLOWED_RULE);
    other.write_allowlist(&bad);
    let mut refused = other.attach().start();
    let gone = poll_until(WAIT, || (!refused.running()).then_some(()));
    assert!(
        gone.is_some(),
        "a first start with an invalid file refuses\n{}",
        refused.output()
    );
    assert!(!other.pins.dir().exists(), "nothing pinned");
}

/// A stub resolver on a connected UDP socket that sends its query with a control message
/// (`IP_TOS`) runs `sendmsg4` with no address: judged as the socket's steered destination
/// (the agent's resolver), it is answered, and the name then connects.
#[test]
fn dns_from_a_connected_socket_with_control_messages_is_answered() {
    let env = Env::new(ALLOWED_RULE);
    let agent = env.start_agent(&[]);
    let out = env.app(&format!(
        "import struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.connect(('192.0.2.53', 53))\n\
         q = bytes.fromhex('abcd01000001000000000000') + b''.join(bytes([len(l)]) + l.encode() \
         for l in '{ALLOWED}'.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'\n\
         try:\n    \
             s.sendmsg([q], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack('i', 2))])\n    \
             a = s.recv(512)\n    \
             out['dns'] = {{'ok': a[:2] == q[:2] and a[3] & 15 == 0, 'answers': a[7]}}\n\
         except OSError as e:\n    \
             out['dns'] = {{'ok': False, 'error': errno.errorcode.get(e.errno, str(e))}}\n\
         out['r'] = tcp('{ALLOWED_IP}', 8080)"
    ));
    assert_eq!(out["dns"]["ok"], true, "{out}\n{}", agent.output());
    assert_connected("the answered address", &out, &agent);
}

/// Starts an agent for a pod of its own, kills it (-9: the pins stay) and deletes the pod's
/// cgroups; returns the guard of its pins (stale now) and what else must outlive them.
fn stale_pins_of_a_deleted_pod() -> (AgentPins, DnsWorld, TestDir) {
    let env = Env::new(ALLOWED_RULE);
    let mut agent = env.start_agent(&[]);
    agent.kill9();
    drop(agent);
    let Env {
        files,
        pins,
        pod,
        listeners,
        world,
    } = env;
    drop(listeners);
    drop(pod);
    assert!(pins.dir().exists(), "kill -9 leaves the pins");
    // The kernel releases the links of a removed cgroup asynchronously.
    let released = poll_until(Duration::from_secs(10), || {
        egress_agent::bpf::stale::is_stale(&pins.dir()).then_some(())
    });
    assert!(
        released.is_some(),
        "the links of {} never released",
        pins.name()
    );
    (pins, world, files)
}

/// The pins of an agent whose pod (cgroup) was deleted are swept by `detach --stale` and by
/// the next agent's start; a live agent's pins are not.
#[test]
fn stale_pins_of_deleted_cgroups_are_swept() {
    let live = Env::new(ALLOWED_RULE);
    let agent = live.start_agent(&[]);

    assert!(
        !egress_agent::bpf::stale::is_stale(&live.pins.dir()),
        "a live agent's pins are not stale"
    );
    let (gone, _world, _files) = stale_pins_of_a_deleted_pod();
    let (code, out, err) = agent_cli(&["detach", "--stale"]);
    assert_eq!(code, 0, "detach --stale: {err}");
    assert!(out.contains(gone.name()), "{out}");
    assert!(!gone.dir().exists(), "swept by detach --stale");
    assert!(live.pins.dir().exists(), "the live agent's pins stay");
    let out = live.app_resolve_and_connect(ALLOWED);
    assert_connected("the live agent still enforces and answers", &out, &agent);

    // At start: another agent's start sweeps them.
    let (gone, _world, _files) = stale_pins_of_a_deleted_pod();
    let other = Env::new(ALLOWED_RULE);
    let started = other.start_agent(&[]);
    let warned = started.wait_event(WAIT, |e| {
        e["event"] == "warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("removed the pins of") && m.contains(gone.name()))
    });
    assert!(warned.is_some(), "no sweep warning\n{}", started.output());
    assert!(!gone.dir().exists(), "swept at start");
    assert!(live.pins.dir().exists(), "the live agent's pins stay");
}

/// A state directory under /run/egress with no pins whose agent is gone (killed before it
/// pinned, or detached by hand) is removed by `detach --stale` once it is a minute old; a live
/// agent's state stays, and so does a fresh orphan (an agent may be starting).
#[test]
fn state_directories_without_pins_or_agent_are_swept() {
    let live = Env::new(ALLOWED_RULE);
    let _agent = live.start_agent(&[]);
    let make = |name: &str, age: &str| {
        let dir = std::path::Path::new("/run/egress").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // No pid is this large (pid_max is at most 2^22).
        let state = format!(
            r#"{{"name":"{name}","pid":9999999,"cgroup":"/gone","allowlist":null,"policy":"p","latest_denies":[],"written":0}}"#
        );
        std::fs::write(dir.join("state.json"), state).unwrap();
        let touched = std::process::Command::new("touch")
            .args(["-d", age])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(touched.success());
        dir
    };
    let old = make(
        &format!("egress-test-orphan-{}", std::process::id()),
        "-2 minutes",
    );
    let fresh = make(&format!("egress-test-fresh-{}", std::process::id()), "now");
    let live_state = std::path::Path::new("/run/egress").join(live.pins.name());

    let (code, out, err) = agent_cli(&["detach", "--stale"]);
    let _ = std::fs::remove_dir_all(&fresh);
    assert_eq!(code, 0, "detach --stale: {err}");
    let old_name = old.file_name().unwrap().to_str().unwrap();
    assert!(
        out.contains(&format!("removed the state of {old_name}")),
        "{out}"
    );
    assert!(!old.exists(), "the orphaned state is removed");
    assert!(
        !out.contains("egress-test-fresh-"),
        "a fresh one is left: {out}"
    );
    assert!(live_state.exists(), "the live agent's state stays");
}

/// Whether the agent says the packet-socket tripwire is armed (the family guard cannot load).
fn tripwire_armed(agent: &AttachAgent) -> bool {
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "warning"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("the packet-socket tripwire is armed"))
        })
        .is_some()
}

/// `attach --require-no-raw`: a root process of the app holding a packet socket it opened
/// before the agent attached (the packet-socket tripwire sees sockets being created, not
/// those already open) is a `warning` naming its pid, for the socket and for CAP_NET_RAW,
/// counted in `egress_raw_risks`, and /readyz answers 503 until it is gone; a packet socket
/// asked for once the agent runs kills its process (where the family guard cannot load).
/// Control: ready again after.
#[test]
fn packet_socket_in_the_pod_is_warned_counted_and_fails_readyz() {
    let env = Env::new(ALLOWED_RULE);
    let mut holder = env
        .pod
        .command(env.world.netns(), &env.pod.app(), python3())
        .arg("-c")
        .arg(
            "import socket, time\n\
             s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n\
             print('holding', flush=True)\n\
             time.sleep(60)\n",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
    let pid = holder.id();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("the holder's first line");
    assert_eq!(line.trim(), "holding", "the packet socket opens (root)");
    let mut agent = env.start_agent(&["--health", HEALTH, "--require-no-raw"]);
    let warned = |needle: &str| {
        agent.wait_event(WAIT, |e| {
            e["event"] == "warning"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("process {pid} ")) && m.contains(needle))
        })
    };
    let socket = warned("open packet socket");
    let net_raw = warned("CAP_NET_RAW");
    let text = env.wait_metric("egress_raw_risks{kind=\"packet_socket\"}", |v| v == 1.0);
    let (code, body) = env.health("/readyz");
    // The process this test started.
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        socket.is_some(),
        "no packet-socket warning:\n{}",
        agent.output()
    );
    assert!(
        net_raw.is_some(),
        "no CAP_NET_RAW warning:\n{}",
        agent.output()
    );
    assert!(
        metric(&text, "egress_raw_risks{kind=\"cap_net_raw\"}").is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert_eq!(code, 503, "/readyz while the socket is open: {body}");
    assert!(body.contains("--require-no-raw"), "{body}");
    env.wait_metric("egress_raw_risks{kind=\"packet_socket\"}", |v| v == 0.0);
    assert!(
        poll_until(WAIT, || (env.health("/readyz").0 == 200).then_some(())).is_some(),
        "/readyz stays 503 after the socket closed:\n{}",
        agent.output()
    );
    if tripwire_armed(&agent) {
        // Where the family guard cannot load: the tripwire kills a new one at socket().
        assert_eq!(env.packet_socket_signal(), Some(libc::SIGKILL));
        let tripped = agent.wait_event(WAIT, |e| {
            e["event"] == "deny" && e["hook"] == "tripwire" && e["proto"] == "af_packet"
        });
        assert!(tripped.is_some(), "no tripwire deny:\n{}", agent.output());
    }
    assert!(agent.running());
}

/// The stress client: for `sys.argv[1]` seconds, resolves `allowed.example.com` (retrying
/// for up to 12 s: a query the killed agent took and never answered costs the stub resolver
/// its 5 s timeout) and
/// connects to its address, resolves and tries `second.example.com` (permitted by one policy
/// only: its outcome is not judged, it makes grants the reloads must prune), and checks that
/// `denied.example.com` never resolves and 198.51.100.20 never connects.
const STRESS_SCRIPT: &str = r#"
import time
deadline = time.monotonic() + float(sys.argv[1])
out.update({"rounds": 0, "allowed_ok": 0, "denied_eperm": 0, "fails": []})
while time.monotonic() < deadline:
    out["rounds"] += 1
    t0 = time.monotonic()
    while True:
        r = resolve("allowed.example.com")
        if r["ok"] or time.monotonic() - t0 > 12:
            break
        time.sleep(0.05)
    if r["ok"] and r["addrs"] == ["198.51.100.10"]:
        c = tcp("198.51.100.10", 8080)
        if c["ok"]:
            out["allowed_ok"] += 1
        else:
            out["fails"].append({"what": "allowed connect", "r": c, "t": time.monotonic()})
    else:
        out["fails"].append({"what": "allowed resolve", "r": r, "t": time.monotonic()})
    r = resolve("second.example.com")
    if r["ok"]:
        tcp(r["addrs"][0], 8080)
    r = resolve("denied.example.com")
    if r["ok"]:
        out["fails"].append({"what": "denied name resolved", "r": r, "t": time.monotonic()})
    c = tcp("198.51.100.20", 8080)
    if c["ok"]:
        out["fails"].append({"what": "denied address connected", "r": c, "t": time.monotonic()})
    elif c.get("error") == "EPERM":
        out["denied_eperm"] += 1
"#;

/// Item 6 of issue 19, bounded in time (about 10 s of load) and count: the allowlist is
/// replaced every 50 ms, alternating two policies (names, CIDRs, inbound peers and a config
/// flag differ; `allowed.example.com` is in both), while two clients in the app resolve and
/// connect in a loop and the agent is killed (-9) and restarted twice. A name both policies
/// permit never fails (its lookups are retried across a restart, its connects never), a name
/// and an address neither permits never pass, and once the file stops changing the maps hold
/// exactly the last policy: the static rules equal its compiled form, and the DNS map holds
/// only addresses of names it permits.
#[test]
fn reloads_every_50ms_with_restarts_keep_the_maps_equal_to_the_policy() {
    use std::sync::{Arc, atomic::AtomicBool};

    const SECS: f64 = 9.0;
    let rules_1 = format!(
        "{ALLOWED_RULE}{SECOND_RULE}  - cidr: 203.0.113.0/24\n    ports: [443]\n  - inbound: \
         192.0.2.0/24\n    ports: [7000]\n"
    );
    let rules_2 = format!(
        "{ALLOWED_RULE}{SHORT_RULE}  - cidr: 203.0.113.0/25\n    ports: [443, 80]\n  - cidr: \
         2001:db8::/48\n    ports: [443]\n  - cidr: 192.0.2.0/24\n    protocol: icmp\n"
    );
    let (p1, p2) = (policy(&rules_1), policy(&rules_2));
    let env = Env::new(&rules_1);
    // The agent compares the files every 10 ms (a debug-build knob), so each write is applied.
    let start = |env: &Env| {
        let mut agent = env.attach().env("EGRESS_RELOAD_POLL_MS", "10").start();
        agent.wait_ready();
        agent
    };
    let mut agent = start(&env);

    // The writer: a new file every 50 ms (written beside, renamed over: a reader never sees
    // half a file), alternating, each with a serial so that every write is a change.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, writes, path) = (stop.clone(), writes.clone(), env.allowlist());
        let (p1, p2) = (p1.clone(), p2.clone());
        std::thread::spawn(move || {
            let tmp = path.with_extension("tmp");
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let yaml = if n.is_multiple_of(2) { &p2 } else { &p1 };
                fs::write(&tmp, format!("# write {n}\n{yaml}")).expect("write the allowlist");
                fs::rename(&tmp, &path).expect("rename the allowlist");
                n += 1;
                writes.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let spawn_client = |n: usize| {
        let stdout = env.files.path().join(format!("stress-{n}.stdout"));
        let stderr = env.files.path().join(format!("stress-{n}.stderr"));
        let child = env
            .pod
            .command(env.world.netns(), &env.pod.app(), python3())
            .arg("-c")
            .arg(format!(
                "{PRELUDE}\n{STRESS_SCRIPT}\nprint(json.dumps(out), flush=True)\n"
            ))
            .arg(SECS.to_string())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("client stdout file"))
            .stderr(File::create(&stderr).expect("client stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        (child, stdout, stderr)
    };
    let mut clients: Vec<_> = (0..2).map(spawn_client).collect();

    // CLOCK_MONOTONIC, as the clients' `time.monotonic()`: when each agent was down.
    let monotonic = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    };
    let mut down = Vec::new();
    let mut reloaded = 0;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2500));
        reloaded += agent.events_of("policy-reloaded").len();
        let killed = monotonic();
        agent.kill9();
        agent = start(&env);
        down.push((killed, monotonic()));
    }
    let results: Vec<Value> = clients
        .iter_mut()
        .map(|(child, stdout, stderr)| {
            let status = poll_until(Duration::from_secs_f64(SECS + 20.0), || {
                child.try_wait().ok().flatten()
            });
            if status.is_none() {
                // The process this test started.
                let _ = child.kill();
                let _ = child.wait();
            }
            let text = fs::read_to_string(&*stdout).unwrap_or_default();
            text.lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .unwrap_or_else(|| {
                    panic!(
                        "the client printed no JSON ({status:?})\n{text}\n{}",
                        fs::read_to_string(&*stderr).unwrap_or_default()
                    )
                })
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("the writer thread");
    reloaded += agent.events_of("policy-reloaded").len();

    // The last file written was p1 or p2; end on p2 (one more change), and wait until the
    // agent has applied it.
    let seen = agent.events().len();
    // Renamed over, as the writer did: an in-place write can be read empty by the agent's
    // 10 ms poll, which rejects it (a valid outcome, but not the one awaited here).
    let tmp = env.allowlist().with_extension("tmp");
    fs::write(&tmp, format!("# final\n{p2}")).expect("write the allowlist");
    fs::rename(&tmp, env.allowlist()).expect("rename the allowlist");
    wait_reloaded(&agent, seen);

    for r in &results {
        assert_eq!(
            r["fails"],
            serde_json::json!([]),
            "client: {r}\nagents down (CLOCK_MONOTONIC): {down:?}\n{}",
            agent.output()
        );
        assert!(
            r["rounds"].as_u64().is_some_and(|n| n >= 10)
                && r["allowed_ok"] == r["rounds"]
                && r["denied_eperm"] == r["rounds"],
            "each client did at least 10 rounds, each one whole: {r}"
        );
    }
    let writes = writes.load(Ordering::Relaxed);
    eprintln!(
        "stress: {writes} writes, {reloaded} reloads applied, agents down {down:?}, clients \
         {results:?}"
    );
    assert!(
        writes >= 100 && reloaded >= writes / 4,
        "the file changed {writes} times, {reloaded} reloads applied"
    );

    assert_eq!(
        pinned_rules(&env),
        compiled_rules(&env, &p2),
        "the static rule maps hold the last policy, exactly"
    );
    let permitted: BTreeSet<String> = [ALLOWED_IP, SHORT_IP].map(String::from).into();
    let dns: BTreeSet<String> = egress_agent::bpf::rules::read_pinned_dns(&env.pins.dir())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .keys()
        .map(ToString::to_string)
        .collect();
    assert!(
        dns.contains(ALLOWED_IP) && dns.is_subset(&permitted),
        "the DNS map holds only addresses of names the last policy permits: {dns:?}"
    );
    wait_policy_state(&env, &agent, "applied");
    let out = env.app_tcp(SECOND_IP, 8080);
    assert_eperm("the name the last policy dropped", &out, &agent);
}

/// An agent restarted on pinned maps whose DNS map cannot be read whole (a read failure
/// injected through `EGRESS_FAULT_FILE`, debug builds) empties it rather than leave entries
/// behind that no grant accounts for: right after it is ready the DNS map is empty, the
/// earlier answer's address is denied, and the name resolves and connects anew. (Before,
/// entries that could not be read were skipped and stayed allowed, unowned.)
#[test]
fn an_adopted_dns_map_that_cannot_be_read_is_emptied() {
    let env = Env::new(ALLOWED_RULE);
    let mut first = env.start_agent(&[]);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("before the kill", &out, &first);
    first.kill9();
    let dns = || {
        egress_agent::bpf::rules::read_pinned_dns(&env.pins.dir())
            .unwrap_or_else(|e| panic!("{e:#}"))
            .keys()
            .map(ToString::to_string)
            .collect::<BTreeSet<_>>()
    };
    assert!(dns().contains(ALLOWED_IP), "pinned after the kill");

    let faults = env.files.path().join("faults");
    fs::write(&faults, "dns read 1\n").expect("write the fault file");
    let mut agent = env.attach().env("EGRESS_FAULT_FILE", &faults).start();
    agent.wait_ready();
    assert_eq!(dns(), BTreeSet::new(), "emptied\n{}", agent.output());
    assert!(
        agent
            .output()
            .contains("adopted DNS entries are removed, names resolve again"),
        "the agent says so\n{}",
        agent.output()
    );
    let out = env.app_tcp(ALLOWED_IP, 8080);
    assert_eperm("the address of an entry that was removed", &out, &agent);
    let out = env.app_resolve_and_connect(ALLOWED);
    assert_connected("looked up anew", &out, &agent);
}

/// The first `warning` event whose message starts with `prefix`.
fn wait_warning(agent: &AttachAgent, prefix: &str) -> Value {
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "warning" && e["message"].as_str().is_some_and(|m| m.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no warning {prefix:?}\n{}", agent.output()))
}

/// Without unix rules nothing judges unix sockets under attach (issue 15): the agent says so
/// at start, and it is true: the app reaches a unix socket of a process outside its cgroup.
#[test]
fn attach_says_unix_sockets_stay_open_and_they_do() {
    let dir = TestDir::new();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let sock = dir.path().join("outside.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o777)).expect("chmod");
    let env = Env::new(ALLOWED_RULE);
    let agent = env.start_agent(&[]);
    let warning = wait_warning(&agent, "unix sockets are not judged under attach");
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("run keeps them out of reach")),
        "{warning}"
    );
    let out = env.app(&format!(
        "s = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('{}')\n    out['r'] = 'reached'\n\
         except OSError as e:\n    out['r'] = f'refused {{e.errno}}'",
        sock.display()
    ));
    assert_eq!(out["r"], "reached", "{out}\n{}", agent.output());
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_ok(), "the connection arrived outside");
}

/// With unix rules, the hooks judge abstract names under attach (issue 15): the app reaches
/// the named one, is refused (EPERM, a deny line) another bound outside its cgroup in its
/// network namespace, bound before or after the start; the warning says paths stay open.
#[test]
fn attach_with_unix_rules_refuses_other_abstract_names() {
    use std::os::{linux::net::SocketAddrExt as _, unix::net};
    let base = unique_name();
    let (named, other, later) = (
        format!("{base}-named"),
        format!("{base}-other"),
        format!("{base}-later"),
    );
    let env = Env::new(&format!("{ALLOWED_RULE}  - unix: \"@{named}\"\n"));
    let bind = |n: &str| {
        env.world.netns().run_in(|| {
            let a = net::SocketAddr::from_abstract_name(n.as_bytes()).expect("name");
            net::UnixListener::bind_addr(&a).expect("bind")
        })
    };
    let (_named_l, _other_l) = (bind(&named), bind(&other));
    let agent = env.start_agent(&[]);
    let warning = wait_warning(&agent, "unix sockets bound by path are not judged");
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains(&named)),
        "{warning}"
    );
    let _later_l = bind(&later);
    std::thread::sleep(Duration::from_millis(500));
    let connect = |n: &str| {
        env.app(&format!(
            "s = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('\\0{n}')\n    out['r'] = \
             'reached'\nexcept OSError as e:\n    out['r'] = f'refused {{e.errno}}'"
        ))
    };
    assert_eq!(connect(&named)["r"], "reached", "{}", agent.output());
    assert_eq!(connect(&other)["r"], "refused 1", "{}", agent.output());
    assert_eq!(connect(&later)["r"], "refused 1", "{}", agent.output());
    for n in [&other, &later] {
        agent
            .wait_event(WAIT, |e| {
                e["event"] == "deny" && e["proto"] == "unix" && e["dst"] == format!("@{n}")
            })
            .unwrap_or_else(|| panic!("no deny line for @{n}\n{}", agent.output()));
    }
}

/// `allowed.example.com` on 8080, name-bound (the default `name_check`).
const BOUND_RULE: &str = "  - host: allowed.example.com\n    ports: [8080]\n";

/// Python for [`Env::flights`]: `flight(sni)` connects to the allowed address on 8080 and
/// sends a ClientHello naming `sni` as its first flight.
const FLIGHT: &str = r#"
import time
def flight(sni):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(("198.51.100.10", 8080))
        s.sendall(hello(sni))
        time.sleep(0.05)
        return {"ok": True}
    except OSError as e:
        return fail(e)
    finally:
        s.close()
"#;

impl Env {
    /// From the app: a ClientHello for the permitted name, then one for a foreign name, to
    /// the allowed address (admitted by an earlier lookup). Returns `[ok, foreign]`.
    fn flights(&self) -> [Value; 2] {
        let out = self.app(&format!(
            "{CLIENT_HELLO_PY}\n{FLIGHT}\n\
             out['ok'] = flight('allowed.example.com')\n\
             out['foreign'] = flight('foreign.example.net')\n"
        ));
        [out["ok"].clone(), out["foreign"].clone()]
    }
}

/// Waits for `agent`'s name deny of `foreign.example.net` (a restarted agent reports it).
fn wait_foreign_name_deny(agent: &AttachAgent) {
    agent
        .wait_event(WAIT, |e| {
            e["event"] == "deny" && e["reason"] == "name" && e["name"] == "foreign.example.net"
        })
        .unwrap_or_else(|| {
            panic!(
                "the restarted agent reports the name deny\n{}",
                agent.output()
            )
        });
}

#[test]
fn name_binding_holds_through_kill_9_and_a_restart() {
    let env = Env::new(BOUND_RULE);
    let listener = env.listener(ALLOWED_IP, 8080);
    let check = |when: &str, agent: &AttachAgent, conns: usize| {
        let [ok, foreign] = env.flights();
        assert_eq!(
            ok["ok"],
            true,
            "{when}: the permitted name passes: {ok}\n{}",
            agent.output()
        );
        assert_eq!(
            foreign["error"],
            "EACCES",
            "{when}: a foreign SNI is refused: {foreign}\n{}",
            agent.output()
        );
        let lens = poll_until(WAIT, || {
            let lens: Vec<usize> = listener.data().iter().map(Vec::len).collect();
            (lens.len() == conns && lens[conns - 2] > 0).then_some(lens)
        });
        let lens = lens.unwrap_or_else(|| {
            panic!(
                "{when}: {conns} connections, the permitted flight arrived: {:?}\n{}",
                listener.data().iter().map(Vec::len).collect::<Vec<_>>(),
                agent.output()
            )
        });
        assert_eq!(
            lens[conns - 1],
            0,
            "{when}: the foreign flight sent zero bytes: {lens:?}\n{}",
            agent.output()
        );
    };
    let mut first = env.start_agent(&[]);
    let out = env.app(&format!("out['r'] = resolve('{ALLOWED}')"));
    assert_eq!(out["r"]["addrs"], Value::from(vec![ALLOWED_IP]), "{out}");
    check("with the agent", &first, 2);

    first.kill9();
    check("after kill -9, no agent", &first, 4);

    let mut second = env.start_agent(&[]);
    wait_adopted(&second);
    check("after the restart", &second, 6);
    wait_foreign_name_deny(&second);
    // `status`: the kernel's name-binding counters (pinned: all three rounds), and this
    // agent's denies by reason (written every 2 s).
    let status = poll_until(WAIT, || {
        let s = env.status();
        (s["agent"]["denies_by_reason"]["name"] == 1).then_some(s)
    })
    .unwrap_or_else(|| panic!("status counts the name deny: {}", env.status()));
    assert_eq!(status["name_refused"], 3, "{status}");
    assert_eq!(status["name_passed"], 3, "{status}");
    let (code, text, err) = agent_cli(&["status", "--name", env.pins.name()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(
            "names      name-bound first flights passed 3, refused 3; open connections held \
             back 0\n"
        ) && text.contains("name 1 (this agent's events, by reason)"),
        "{text}"
    );
    assert_eq!(second.terminate().code(), Some(0), "{}", second.output());
}

/// Python for [`name_bound_connections_open_across_a_restart_keep_their_binding`]: a connect
/// to a name-bound port nobody listens on (refused), then three connections to the name-bound
/// address, opened at once (the last over MPTCP, whose subflow only the backstop judges); at a
/// line on stdin, a ClientHello for the permitted name on the first and for a foreign name on
/// the others.
const PENDING_SCRIPT: &str = r#"
import errno, json, socket, sys, time
conns = {}
try:
    socket.create_connection(("198.51.100.10", 8081), timeout=3)
    print(json.dumps({"ok": False, "error": "8081 answered"}), flush=True)
    sys.exit(0)
except ConnectionRefusedError:
    pass
try:
    for k, proto in (("ok", 0), ("foreign", 0), ("mptcp", 262)):
        conns[k] = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        conns[k].settimeout(3)
        conns[k].connect(("198.51.100.10", 8080))
    print(json.dumps({"ok": True}), flush=True)
except OSError as e:
    print(json.dumps({"ok": False, "error": str(e)}), flush=True)
    sys.exit(0)
sys.stdin.readline()
out = {}
for k, sni in (("ok", "allowed.example.com"), ("foreign", "foreign.example.net"),
               ("mptcp", "foreign.example.net")):
    try:
        conns[k].sendall(hello(sni))
        time.sleep(0.05)
        out[k] = {"ok": True}
    except OSError as e:
        out[k] = {"ok": False, "error": errno.errorcode.get(e.errno, str(e))}
print(json.dumps(out), flush=True)
"#;

/// Connections to a name-bound address opened before the agent is killed and restarted, whose
/// first flights are sent after the restart: they are judged as if nothing happened. The
/// socket storage that records each one's binding is pinned with the other maps; before, the
/// restarted agent's programs started from an empty one, so the permitted flight failed
/// (`EACCES`, an error) and the backstop no longer knew which payload to hold back.
///
/// `status` counts the connections held back (`name_held`, the count that lets the backstop
/// skip the socket lookup on every payload segment while it is 0): the three open ones, not the
/// refused connect; none once the flights are judged and the connections closed.
#[test]
fn name_bound_connections_open_across_a_restart_keep_their_binding() {
    let env = Env::new("  - host: allowed.example.com\n    ports: [8080, 8081]\n");
    let listener = env.listener(ALLOWED_IP, 8080);
    let mut first = env.start_agent(&[]);
    let out = env.app(&format!("out['r'] = resolve('{ALLOWED}')"));
    assert_eq!(out["r"]["addrs"], Value::from(vec![ALLOWED_IP]), "{out}");
    let script = format!("{CLIENT_HELLO_PY}\n{PENDING_SCRIPT}");
    let mut open = env.live_script(&script, &[]);
    assert_eq!(env.status()["name_held"], 3, "{}", first.output());
    first.kill9();
    let second = env.start_agent(&[]);
    wait_adopted(&second);
    let out = open.exchange();
    assert_eq!(
        out["ok"]["ok"],
        true,
        "the permitted flight passes: {out}\n{}",
        second.output()
    );
    assert_eq!(
        out["foreign"]["error"],
        "EACCES",
        "the foreign flight is refused: {out}\n{}",
        second.output()
    );
    let arrived = poll_until(WAIT, || {
        let lens: Vec<usize> = listener.data().iter().map(Vec::len).collect();
        (lens.len() == 3 && lens.iter().any(|&n| n > 0)).then_some(())
    });
    assert!(
        arrived.is_some(),
        "three connections, the permitted flight arrived: {:?}\n{}",
        listener.data().iter().map(Vec::len).collect::<Vec<_>>(),
        second.output()
    );
    // Give the MPTCP subflow's payload time to arrive, were it let out.
    std::thread::sleep(Duration::from_millis(300));
    let lens: Vec<usize> = listener.data().iter().map(Vec::len).collect();
    assert_eq!(
        lens.iter().filter(|&&n| n > 0).count(),
        1,
        "only the permitted flight arrived; the foreign ones (plain and MPTCP) sent zero \
         bytes: {lens:?}\n{out}\n{}",
        second.output()
    );
    wait_foreign_name_deny(&second);
    drop(open);
    let held = poll_until(WAIT, || (env.status()["name_held"] == 0).then_some(()));
    assert!(
        held.is_some(),
        "no connection is held back once all are judged and closed: {}\n{}",
        env.status(),
        second.output()
    );
}

/// A name-bound connect refused because its socket's binding cannot be recorded (its option
/// memory, which the kernel charges socket storage to, filled first with `TCP_MD5SIG_EXT`
/// keys) is counted as a deny and an error, not also as an allow (as it was: the lookup's
/// allow was counted before the storage failed).
#[test]
fn a_name_bound_connect_refused_for_want_of_socket_storage_is_no_allow_in_status() {
    let env = Env::new("  - host: allowed.example.com\n    ports: [8080]\n");
    let _listener = env.listener(ALLOWED_IP, 8080);
    let agent = env.start_agent(&[]);
    let out = env.app(&format!("out['r'] = resolve('{ALLOWED}')"));
    assert_eq!(out["r"]["addrs"], Value::from(vec![ALLOWED_IP]), "{out}");
    let before = env.status();
    let out = env.app(&format!(
        r#"
{FILL_OPTION_MEMORY_PY}
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
out["keys"], out["full"] = fill_option_memory(s)
try:
    s.connect(("{ALLOWED_IP}", 8080))
    out["r"] = {{"ok": True}}
except OSError as e:
    out["r"] = fail(e)
"#
    ));
    assert_eq!(out["full"], true, "option memory filled: {out}");
    assert_eq!(
        out["r"]["error"],
        "EPERM",
        "refused: {out}\n{}",
        agent.output()
    );
    let after = env.status();
    let delta = |k: &str| {
        after[k].as_u64().unwrap_or_default() as i64 - before[k].as_u64().unwrap_or_default() as i64
    };
    assert_eq!(
        (delta("allowed"), delta("denied"), delta("errors")),
        (0, 1, 1),
        "one deny, one error, no allow\nbefore: {before}\nafter: {after}\n{}",
        agent.output()
    );
}
