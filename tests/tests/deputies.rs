//! No deputies (issue #15): a command under `run` cannot have a daemon outside its sandbox act
//! for it through a unix socket (path stream, abstract, datagram), unless a `unix:` rule names
//! the socket; its own unix sockets keep working; its names go only through the agent's
//! resolver, also on a host whose nsswitch.conf says `resolve` and whose resolv.conf says
//! 127.0.0.53.
//!
//! The deputy here is a thread of the test, outside every cgroup of ours: asked `connect
//! ADDR` on any of its sockets, it opens a TCP connection to ADDR (a listener of the test on
//! the host's loopback) and answers `done`. Each test first runs its command *outside* the
//! sandbox (the control: the deputy is reached and connects), then under `egress-agent run`.
//!
//! Run as root, after `cargo build -p egress-agent`:
//! `cargo test -p egress-tests --test deputies -- --test-threads=1`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            fs::PermissionsExt as _,
            net::{SocketAddr, UnixDatagram, UnixListener},
        },
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use egress_tests::{
    AgentRun, TestDir, TestNetns, poll_until, unique_name, value,
    world::{DnsWorld, UPSTREAM, python3},
};

/// A TCP listener on the host's loopback standing in for the address a deputy is asked to
/// reach: it counts the connections it accepts.
struct Target {
    addr: String,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Target {
    fn start() -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the target");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("target address").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One socket of the deputy and what it was asked.
struct Deputy {
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Opens a TCP connection to what `line` (`connect ADDR`) names: what a deputy does for
/// its client.
fn act(line: &str) {
    if let Some(addr) = line.trim().strip_prefix("connect ") {
        let _ = TcpStream::connect_timeout(
            &addr.parse().expect("a socket address"),
            Duration::from_secs(2),
        );
    }
}

impl Deputy {
    fn new() -> Self {
        Self {
            requests: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Serves a stream listener: each connection's first line is acted on and answered.
    fn serve_stream(&mut self, l: UnixListener, label: &str) {
        l.set_nonblocking(true).expect("nonblocking");
        let (req, stop, label) = (self.requests.clone(), self.stop.clone(), label.to_owned());
        self.threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((conn, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                req.lock()
                    .expect("lock")
                    .push(format!("{label} {}", line.trim()));
                act(&line);
                let _ = (&conn).write_all(b"done\n");
            }
        }));
    }

    /// Serves a datagram socket: each datagram is acted on.
    fn serve_dgram(&mut self, s: UnixDatagram, label: &str) {
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let (req, stop, label) = (self.requests.clone(), self.stop.clone(), label.to_owned());
        self.threads.push(thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = s.recv(&mut buf) {
                    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                    req.lock()
                        .expect("lock")
                        .push(format!("{label} {}", line.trim()));
                    act(&line);
                }
            }
        }));
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }

    fn clear(&self) {
        self.requests.lock().expect("lock").clear();
    }
}

impl Drop for Deputy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The command: asks the deputy's sockets given as `kind=address` arguments (`@name` for
/// an abstract one; kinds starting with `dgram` are datagram sockets) to connect to the
/// target, then uses its own socketpair, its own listener path and its own abstract name,
/// each across a fork. Prints `kind=reached|sent|refused ERRNO` and `own_*=ok`.
const COMMAND: &str = r#"
import os, socket, sys, time
target, workdir, own_name = sys.argv[1], sys.argv[2], sys.argv[3]
def addr(a):
    return "\0" + a[1:] if a.startswith("@") else a
for arg in sys.argv[4:]:
    kind, a = arg.split("=", 1)
    dgram = kind.startswith("dgram")
    here = os.getcwd()
    if kind.startswith("rel"):
        # A path relative to the working directory.
        os.chdir(os.path.dirname(a))
        a = os.path.basename(a)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if dgram else socket.SOCK_STREAM)
        s.settimeout(5)
        req = f"connect {target}\n".encode()
        if dgram:
            s.sendto(req, addr(a))
            print(f"{kind}=sent", flush=True)
        else:
            s.connect(addr(a))
            s.sendall(req)
            got = "reached" if s.recv(5) == b"done\n" else "closed"
            print(f"{kind}={got}", flush=True)
    except OSError as e:
        print(f"{kind}=refused {e.errno}", flush=True)
    if kind.startswith("rel"):
        # The agent reads the working directory when it names the refusal.
        time.sleep(0.5)
    os.chdir(here)
a, b = socket.socketpair()
a.sendall(b"pair")
print(f"own_socketpair={'ok' if b.recv(4) == b'pair' else 'bad'}", flush=True)
def own(kind, a, stype):
    try:
        l = socket.socket(socket.AF_UNIX, stype)
        l.bind(a)
        if stype == socket.SOCK_STREAM:
            l.listen(1)
        pid = os.fork()
        if pid == 0:
            try:
                c = socket.socket(socket.AF_UNIX, stype)
                if stype == socket.SOCK_STREAM:
                    c.connect(a)
                    c.sendall(b"own")
                else:
                    c.sendto(b"own", a)
                os._exit(0)
            except OSError:
                os._exit(1)
        l.settimeout(5)
        if stype == socket.SOCK_STREAM:
            conn, _ = l.accept()
            data = conn.recv(3)
        else:
            data = l.recv(3)
        _, status = os.waitpid(pid, 0)
        print(f"{kind}={'ok' if data == b'own' and status == 0 else 'bad'}", flush=True)
    except OSError as e:
        print(f"{kind}=failed {e.errno}", flush=True)
own("own_path", os.path.join(workdir, "own.sock"), socket.SOCK_STREAM)
own("own_dgram", os.path.join(workdir, "own-dgram.sock"), socket.SOCK_DGRAM)
own("own_abstract", "\0" + own_name, socket.SOCK_STREAM)
"#;

/// A directory anyone may write (the command runs as root in a user namespace: nobody
/// outside), for the command's own listeners.
fn open_dir() -> TestDir {
    let d = TestDir::new();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod the work dir");
    d
}

fn command_args(
    target: &Target,
    work: &Path,
    own: &str,
    sockets: &[(&str, String)],
) -> Vec<String> {
    let mut v = vec![
        python3().to_owned(),
        "-c".to_owned(),
        COMMAND.to_owned(),
        target.addr.clone(),
        work.display().to_string(),
        own.to_owned(),
    ];
    v.extend(sockets.iter().map(|(k, a)| format!("{k}={a}")));
    v
}

/// Runs the command outside the sandbox (in `netns`, for its abstract names): the control.
fn control(netns: &TestNetns, args: &[String]) -> String {
    let out = netns
        .command(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .expect("run the control");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The deputy: a path stream socket, an abstract stream socket (in `netns`, where the
/// command's abstract names live) and a path datagram socket, in `dir`.
fn deputy(netns: &TestNetns, dir: &Path) -> (Deputy, Vec<(&'static str, String)>) {
    let mut d = Deputy::new();
    let stream = dir.join("deputy.sock");
    let dgram = dir.join("deputy-dgram.sock");
    let abstract_name = unique_name();
    d.serve_stream(
        UnixListener::bind(&stream).expect("bind the path socket"),
        "stream",
    );
    let l = netns.run_in(|| {
        let a = SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("name");
        UnixListener::bind_addr(&a).expect("bind the abstract socket")
    });
    d.serve_stream(l, "abstract");
    d.serve_dgram(
        UnixDatagram::bind(&dgram).expect("bind the datagram socket"),
        "dgram",
    );
    for p in [&stream, &dgram] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let sockets = vec![
        ("stream", stream.display().to_string()),
        ("abstract", format!("@{abstract_name}")),
        ("dgram", dgram.display().to_string()),
    ];
    (d, sockets)
}

/// The unix deny lines of `run`: (dst, hook).
fn unix_denies(run: &AgentRun) -> Vec<(String, String)> {
    run.events_of("deny")
        .iter()
        .filter(|e| e["proto"] == "unix")
        .map(|e| {
            (
                e["dst"].as_str().unwrap_or("").to_owned(),
                e["hook"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

const NO_RULES: &str = "version: 1\nname: deputies-test\nallow: []\n";

#[test]
fn a_deputy_outside_is_out_of_reach_and_own_sockets_work() {
    let netns = TestNetns::new();
    let dir = open_dir();
    let target = Target::start();
    let (deputy, mut sockets) = deputy(&netns, dir.path());
    // The stream socket again, through the root of a process outside (this test): the
    // command's pid namespace has no such process.
    let through_root = format!("/proc/{}/root{}", std::process::id(), sockets[0].1);
    sockets.push(("proc_root", through_root));
    // And by a path relative to the working directory.
    let stream = sockets[0].1.clone();
    sockets.push(("rel_stream", stream));
    let work = open_dir();
    let own = unique_name();

    // Control: outside the sandbox the deputy is reached on all four and acts.
    let args = command_args(&target, work.path(), &format!("{own}-c"), &sockets);
    let out = control(&netns, &args);
    for (k, want) in [
        ("stream", "reached"),
        ("abstract", "reached"),
        ("dgram", "sent"),
        ("proc_root", "reached"),
        ("rel_stream", "reached"),
    ] {
        assert_eq!(value(&out, k).as_deref(), Some(want), "control {k}\n{out}");
    }
    assert!(
        poll_until(Duration::from_secs(5), || (target.accepted() >= 5)
            .then_some(()))
        .is_some(),
        "control: the deputy did not reach the target ({} connections)\n{:?}",
        target.accepted(),
        deputy.requests()
    );
    deputy.clear();
    let before = target.accepted();
    std::fs::remove_file(work.path().join("own.sock")).expect("control's own socket");
    std::fs::remove_file(work.path().join("own-dgram.sock")).expect("control's own socket");

    let args = command_args(&target, work.path(), &own, &sockets);
    let mut run = AgentRun::builder(&netns, NO_RULES, &args)
        .current_dir(work.path())
        .start();
    assert!(run.wait().success(), "{}", run.output());
    for (k, errno) in [
        // A path socket bound outside at start has /dev/null over it: ECONNREFUSED.
        ("stream", "refused 111"),
        // Landlock scope: EPERM.
        ("abstract", "refused 1"),
        ("dgram", "refused 111"),
        // No process outside is there (pid namespace).
        ("proc_root", "refused 2"),
        ("rel_stream", "refused 111"),
    ] {
        assert_eq!(run.expect_value(k), errno, "{k}\n{}", run.output());
    }
    for k in ["own_socketpair", "own_path", "own_dgram", "own_abstract"] {
        assert_eq!(run.expect_value(k), "ok", "{k}\n{}", run.output());
    }
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        deputy.requests(),
        Vec::<String>::new(),
        "the deputy was asked"
    );
    assert_eq!(target.accepted(), before, "the target got a connection");
    // Each refusal is named: a deny line with proto unix, the address and the hook.
    let denies = unix_denies(&run);
    for (kind, hook) in [
        ("stream", "connect_unix"),
        ("abstract", "connect_unix"),
        ("dgram", "sendmsg_unix"),
        ("proc_root", "connect_unix"),
        ("rel_stream", "connect_unix"),
    ] {
        let mut dst = sockets
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("socket")
            .1
            .clone();
        if kind == "rel_stream" {
            // As written: the name in its directory.
            dst = "deputy.sock".to_owned();
        }
        let dst = &dst;
        assert!(
            denies.contains(&(dst.clone(), hook.to_owned())),
            "no deny line for {kind} {dst} ({hook}): {denies:?}\n{}",
            run.output()
        );
    }
    // The command's own sockets are not reported.
    assert_eq!(denies.len(), 5, "{denies:?}");
    let ready = run.events_of("ready");
    let protected = ready[0]["protected"].to_string();
    assert!(
        protected.contains("/run (private") && protected.contains("Landlock scope"),
        "the ready event says what is protected: {protected}"
    );
}

#[test]
fn a_unix_rule_lets_exactly_the_named_socket_through() {
    let netns = TestNetns::new();
    let dir = open_dir();
    let target = Target::start();
    let mut deputy = Deputy::new();
    let allowed = dir.path().join("allowed.sock");
    let other = dir.path().join("other.sock");
    // A socket in /run, which the command sees only as the rule binds it back in (the
    // agent's own state directory, not a host daemon's).
    let run_dir = PathBuf::from("/run/egress").join(unique_name());
    std::fs::create_dir_all(&run_dir).expect("create the /run socket's directory");
    let _cleanup = RemoveOnDrop(run_dir.clone());
    let in_run = run_dir.join("deputy.sock");
    for (p, label) in [
        (&allowed, "allowed"),
        (&other, "other"),
        (&in_run, "in_run"),
    ] {
        deputy.serve_stream(UnixListener::bind(p).expect("bind"), label);
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let sockets = [
        ("allowed", allowed.display().to_string()),
        ("other", other.display().to_string()),
        ("in_run", in_run.display().to_string()),
    ];
    let work = open_dir();
    let args = command_args(&target, work.path(), &unique_name(), &sockets);
    let policy = format!(
        "version: 1\nname: deputies-test\nallow:\n  - unix: {}\n  - unix: {}\n",
        allowed.display(),
        in_run.display()
    );
    let mut run = AgentRun::builder(&netns, &policy, &args)
        .current_dir(work.path())
        .start();
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(run.expect_value("allowed"), "reached", "{}", run.output());
    assert_eq!(run.expect_value("in_run"), "reached", "{}", run.output());
    assert_eq!(run.expect_value("other"), "refused 111", "{}", run.output());
    let mut asked: Vec<String> = deputy
        .requests()
        .iter()
        .map(|r| r.split(' ').next().unwrap_or("").to_owned())
        .collect();
    asked.sort();
    assert_eq!(asked, ["allowed", "in_run"], "{:?}", deputy.requests());
    let denied: Vec<String> = run
        .events_of("deny")
        .iter()
        .filter(|e| e["proto"] == "unix")
        .map(|e| e["dst"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(denied, [other.display().to_string()], "{}", run.output());
}

/// Removes a directory on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake nscd for the host view: listens on `/run/nscd/socket` of the mount namespace it
/// starts in, appends a line to `LOG` for each connection, and exits when its parent is gone
/// (bounded: 60 s at most).
const FAKE_NSCD: &str = r#"
import os, socket, sys, time
log, parent = sys.argv[1], os.getppid()
os.makedirs("/run/nscd", exist_ok=True)
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind("/run/nscd/socket")
os.chmod("/run/nscd/socket", 0o666)
l.listen(8)
l.settimeout(0.1)
open(log + ".ready", "w").close()
end = time.time() + 60
while time.time() < end and os.getppid() == parent:
    try:
        c, _ = l.accept()
        with open(log, "a") as f:
            f.write("connection\n")
        c.close()
    except socket.timeout:
        pass
"#;

#[test]
fn names_resolve_only_through_the_agent_on_a_resolved_host() {
    let world = DnsWorld::builder()
        .address("allowed.test", "192.0.2.10")
        .address("denied.test", "192.0.2.11")
        .start();
    let files = TestDir::new();
    let nsswitch = files.path().join("nsswitch.conf");
    let resolv = files.path().join("resolv.conf");
    std::fs::write(
        &nsswitch,
        "passwd: files\ngroup: files\nhosts: files resolve [!UNAVAIL=return] dns\n",
    )
    .expect("nsswitch");
    std::fs::write(&resolv, "nameserver 127.0.0.53\noptions edns0 trust-ad\n").expect("resolv");
    let nscd_log = files.path().join("nscd.log");
    let allow = world.write_allowlist(&format!(
        "version: 1\nname: deputies-test\ndns:\n  upstream: [\"{UPSTREAM}\"]\nallow:\n  - host: \
         allowed.test\n"
    ));
    let events = files.path().join("events.jsonl");
    let agent = egress_tests::agent_bin();
    // The host: a mount namespace of this test (private propagation) where /etc/nsswitch.conf
    // says `resolve`, /etc/resolv.conf 127.0.0.53, and /run (a tmpfs) holds an nscd socket.
    // First the control (getent outside the sandbox asks nscd), then the agent.
    let script = format!(
        "set -e; mount --bind {nsswitch} /etc/nsswitch.conf; mount --bind {resolv} \
         /etc/resolv.conf; mount -t tmpfs tmpfs /run; {py} -c '{nscd}' {log} & \
         for i in $(seq 100); do [ -e {log}.ready ] && break; sleep 0.05; done; \
         getent ahosts control.test >/dev/null || true; \
         echo control_nscd=$(cat {log} 2>/dev/null | wc -l); \
         exec {agent} run --allowlist {allow} --events {events} -- sh -c 'grep ^hosts: \
         /etc/nsswitch.conf; getent ahosts allowed.test >/dev/null && echo allowed=resolved \
         || echo allowed=failed; getent ahosts denied.test >/dev/null && echo denied=resolved \
         || echo denied=refused'",
        nsswitch = nsswitch.display(),
        resolv = resolv.display(),
        py = python3(),
        nscd = FAKE_NSCD.replace('\'', "\""),
        log = nscd_log.display(),
        agent = agent.display(),
        allow = allow.display(),
        events = events.display(),
    );
    let out = world
        .netns()
        .command("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .env_remove("SUDO_USER")
        .stdin(Stdio::null())
        .output()
        .expect("run the host view");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let context = format!(
        "{stdout}\n{}\nevents:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&events).unwrap_or_default()
    );
    assert!(out.status.success(), "{context}");
    // Control: glibc on this host asks nscd.
    let control: usize = value(&stdout, "control_nscd")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(control >= 1, "control: getent did not ask nscd\n{context}");
    assert!(stdout.contains("hosts: files dns\n"), "{context}");
    assert_eq!(
        value(&stdout, "allowed").as_deref(),
        Some("resolved"),
        "{context}"
    );
    assert_eq!(
        value(&stdout, "denied").as_deref(),
        Some("refused"),
        "{context}"
    );
    // The command never reached nscd: every line is the control's.
    let nscd = std::fs::read_to_string(&nscd_log).unwrap_or_default();
    assert_eq!(
        nscd.lines().count(),
        control,
        "nscd was asked from inside\n{context}"
    );
    assert!(
        world.wait_query("allowed.test", Duration::from_secs(5)),
        "{context}"
    );
    assert!(
        !world.queries().iter().any(|q| q == "denied.test"),
        "a denied name reached the upstream\n{context}"
    );
    let refused = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(
        refused.contains("\"dns-refused\"") && refused.contains("denied.test"),
        "{context}"
    );
}

/// Waits for `GO` to exist, then asks the socket at `PATH` to act; prints `late=...`.
const LATE_COMMAND: &str = r#"
import os, socket, sys, time
def addr(a):
    return "\0" + a[1:] if a.startswith("@") else a
path, go, target, own = [addr(a) for a in sys.argv[1:3]] + [sys.argv[3], addr(sys.argv[4])]
# Its own listener, bound before the wait: the agent's looks must leave it alone.
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(own)
l.listen(1)
print("waiting=1", flush=True)
for _ in range(1000):
    if os.path.exists(go):
        break
    time.sleep(0.02)
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(f"connect {target}\n".encode())
    got = "reached" if s.recv(5) == b"done\n" else "closed"
    print(f"late={got}", flush=True)
except OSError as e:
    print(f"late=refused {e.errno}", flush=True)
pid = os.fork()
if pid == 0:
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(own)
        c.sendall(b"own")
        os._exit(0)
    except OSError:
        os._exit(1)
l.settimeout(5)
try:
    conn, _ = l.accept()
    ok = conn.recv(3) == b"own"
except OSError:
    ok = False
_, status = os.waitpid(pid, 0)
print(f"own_path={'ok' if ok and status == 0 else 'bad'}", flush=True)
"#;

/// Starts [`LATE_COMMAND`] under `policy` (asking `late` once `go` exists; its own
/// listener at `own`) and waits until it waits.
fn start_late(
    netns: &TestNetns,
    policy: &str,
    late: &str,
    go: &Path,
    target: &Target,
    own: &str,
) -> AgentRun {
    let args = [
        python3().to_owned(),
        "-c".to_owned(),
        LATE_COMMAND.to_owned(),
        late.to_owned(),
        go.display().to_string(),
        target.addr.clone(),
        own.to_owned(),
    ];
    let run = AgentRun::builder(netns, policy, &args).start();
    assert!(
        poll_until(Duration::from_secs(30), || {
            value(&run.stdout(), "waiting").map(|_| ())
        })
        .is_some(),
        "the command did not start\n{}",
        run.output()
    );
    run
}

#[test]
fn a_deputy_bound_after_the_start_is_masked_as_it_appears() {
    let netns = TestNetns::new();
    let dir = open_dir();
    let target = Target::start();
    let late = dir.path().join("late.sock");
    let go = dir.path().join("go");
    let work = open_dir();
    let own = work.path().join("own.sock");
    let mut run = start_late(
        &netns,
        NO_RULES,
        &late.display().to_string(),
        &go,
        &target,
        &own.display().to_string(),
    );
    // `status` shows what the view protects and what stays open (the state file is written
    // every 2 s).
    let name = format!("run-{}", run.pid());
    let status = poll_until(Duration::from_secs(5), || {
        let out = std::process::Command::new(egress_tests::agent_bin())
            .args(["status", "--name", &name])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("/run (private").then_some(text)
    });
    let status = status.unwrap_or_else(|| panic!("status never showed the view\n{}", run.output()));
    assert!(status.contains("still open: "), "{status}");
    // The deputy starts now, while the command runs (an ssh-agent started in another
    // terminal, say).
    let mut deputy = Deputy::new();
    deputy.serve_stream(UnixListener::bind(&late).expect("bind"), "late");
    std::fs::set_permissions(&late, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    // A few of the agent's looks.
    thread::sleep(Duration::from_millis(500));
    std::fs::write(&go, b"").expect("go");
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(run.expect_value("late"), "refused 111", "{}", run.output());
    assert_eq!(run.expect_value("own_path"), "ok", "{}", run.output());
    assert_eq!(deputy.requests(), Vec::<String>::new());
    assert_eq!(target.accepted(), 0);
    let denied: Vec<String> = run
        .events_of("deny")
        .iter()
        .filter(|e| e["proto"] == "unix")
        .map(|e| e["dst"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(denied, [late.display().to_string()], "{}", run.output());
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A host of the test's making: a mount namespace of its own (private to the machine) in
/// which a shell script sets the scene and ends by starting the agent on a command.
struct HostView {
    files: TestDir,
}

impl HostView {
    fn new() -> Self {
        let files = TestDir::new();
        std::fs::write(files.path().join("allow.yaml"), NO_RULES).expect("allowlist");
        Self { files }
    }

    /// `exec egress-agent run` on `command` (its words quoted), with no rules.
    fn agent(&self, command: &[String]) -> String {
        let words: Vec<String> = command.iter().map(|a| sh_quote(a)).collect();
        format!(
            "exec {} run --allowlist {} --events {} -- {}",
            egress_tests::agent_bin().display(),
            self.files.path().join("allow.yaml").display(),
            self.files.path().join("events.jsonl").display(),
            words.join(" ")
        )
    }

    /// Runs `script` in `netns`, in a new mount namespace, from `work`; returns its output
    /// and the agent's events, and the two as a context for failures.
    fn run(&self, netns: &TestNetns, work: &Path, script: &str) -> (String, String, String) {
        let out = netns
            .command("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .current_dir(work)
            .stdin(Stdio::null())
            .output()
            .expect("run the host view");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let events =
            std::fs::read_to_string(self.files.path().join("events.jsonl")).unwrap_or_default();
        let context = format!(
            "{stdout}\n{}\nevents:\n{events}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{context}");
        (stdout, events, context)
    }
}

#[test]
fn a_deputy_shown_through_another_mount_is_out_of_reach_there_too() {
    let netns = TestNetns::new();
    let dir = open_dir();
    let target = Target::start();
    let mut deputy = Deputy::new();
    // A socket in a directory that another mount shows again (a bind mount of the directory
    // elsewhere), and one in /run whose directory is bound elsewhere (what a container
    // engine's socket directory or a flatpak's view of /run/user looks like).
    let real = dir.path().join("real");
    let alias = dir.path().join("alias");
    let run_alias = dir.path().join("run-alias");
    for d in [&real, &alias, &run_alias] {
        std::fs::create_dir(d).expect("mkdir");
    }
    let run_dir = PathBuf::from("/run/egress").join(unique_name());
    std::fs::create_dir_all(&run_dir).expect("create the /run socket's directory");
    let _cleanup = RemoveOnDrop(run_dir.clone());
    for (p, label) in [
        (real.join("deputy.sock"), "bound"),
        (run_dir.join("deputy.sock"), "in_run"),
    ] {
        deputy.serve_stream(UnixListener::bind(&p).expect("bind"), label);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let sockets = [
        ("alias", alias.join("deputy.sock").display().to_string()),
        (
            "run_alias",
            run_alias.join("deputy.sock").display().to_string(),
        ),
    ];
    let work = open_dir();
    let view = HostView::new();
    let quoted = |own: &str| {
        command_args(&target, work.path(), own, &sockets)
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // The host: a mount namespace of this test where both aliases are mounted. First the
    // control (the command outside reaches the deputy through both), then the agent.
    let script = format!(
        "set -e; mount --bind {real} {alias}; mount --bind {run_dir} {run_alias}; \
         {control} | sed 's/^/control_/'; rm -f {work}/own.sock {work}/own-dgram.sock; \
         {agent}",
        real = real.display(),
        alias = alias.display(),
        run_dir = run_dir.display(),
        run_alias = run_alias.display(),
        control = quoted(&format!("{}-c", unique_name())),
        work = work.path().display(),
        agent = view.agent(&command_args(
            &target,
            work.path(),
            &unique_name(),
            &sockets
        )),
    );
    let (stdout, events, context) = view.run(&netns, work.path(), &script);
    for k in ["control_alias", "control_run_alias"] {
        assert_eq!(
            value(&stdout, k).as_deref(),
            Some("reached"),
            "{k}\n{context}"
        );
    }
    // Masked at the alias too; the /run alias is as private as /run.
    assert_eq!(
        value(&stdout, "alias").as_deref(),
        Some("refused 111"),
        "{context}"
    );
    assert_eq!(
        value(&stdout, "run_alias").as_deref(),
        Some("refused 2"),
        "{context}"
    );
    for k in ["own_socketpair", "own_path", "own_dgram", "own_abstract"] {
        assert_eq!(value(&stdout, k).as_deref(), Some("ok"), "{k}\n{context}");
    }
    // Only the control's two requests reached the deputy, and only its two connections the
    // target.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        deputy.requests().len(),
        2,
        "the deputy was asked from inside: {:?}",
        deputy.requests()
    );
    assert_eq!(
        target.accepted(),
        2,
        "the target got a connection from inside"
    );
    for (_, path) in &sockets {
        assert!(
            events.contains(&format!("\"dst\":\"{path}\"")),
            "no deny line for {path}\n{context}"
        );
    }
}

#[test]
fn a_mount_of_run_made_after_the_start_is_private_too() {
    let netns = TestNetns::new();
    let dir = open_dir();
    let target = Target::start();
    let mut deputy = Deputy::new();
    let run_dir = PathBuf::from("/run/egress").join(unique_name());
    std::fs::create_dir_all(&run_dir).expect("create the /run socket's directory");
    let _cleanup = RemoveOnDrop(run_dir.clone());
    let sock = run_dir.join("deputy.sock");
    deputy.serve_stream(UnixListener::bind(&sock).expect("bind"), "in_run");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let late_alias = dir.path().join("late-alias");
    std::fs::create_dir(&late_alias).expect("mkdir");
    let go = dir.path().join("go");
    let work = open_dir();
    let own = work.path().join("own.sock");
    let view = HostView::new();
    let command = [
        python3().to_owned(),
        "-c".to_owned(),
        LATE_COMMAND.to_owned(),
        late_alias.join("deputy.sock").display().to_string(),
        go.display().to_string(),
        target.addr.clone(),
        own.display().to_string(),
    ];
    // The host: a mount namespace of this test whose mounts propagate to the command's (as
    // the host's do). Once the command runs (its own listener exists), /run's directory is
    // bound elsewhere (a container engine starting, say); the control reaches the deputy
    // there, then the command tries.
    let script = format!(
        "set -e; mount --make-rshared /; \
         ( for i in $(seq 600); do [ -S {own} ] && break; sleep 0.05; done; \
           mount --bind {run_dir} {late_alias}; \
           {py} -c 'import socket; s = socket.socket(socket.AF_UNIX); \
             s.connect(\"{late_alias}/deputy.sock\"); print(\"control=reached\")' \
             || echo control=refused; \
           sleep 0.5; touch {go} ) & \
         {agent}",
        own = own.display(),
        run_dir = run_dir.display(),
        late_alias = late_alias.display(),
        py = python3(),
        go = go.display(),
        agent = view.agent(&command),
    );
    let (stdout, events, context) = view.run(&netns, work.path(), &script);
    assert_eq!(
        value(&stdout, "control").as_deref(),
        Some("reached"),
        "{context}"
    );
    assert_eq!(
        value(&stdout, "late").as_deref(),
        Some("refused 2"),
        "{context}"
    );
    assert_eq!(
        value(&stdout, "own_path").as_deref(),
        Some("ok"),
        "{context}"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(deputy.requests().len(), 1, "{:?}", deputy.requests());
    assert_eq!(
        target.accepted(),
        0,
        "the target got a connection from inside"
    );
    assert!(
        events.contains(&format!("\"dst\":\"{}/deputy.sock\"", late_alias.display())),
        "no deny line\n{context}"
    );
}

#[test]
fn an_abstract_rule_opens_only_the_named_abstract_socket() {
    let netns = TestNetns::new();
    let target = Target::start();
    let mut deputy = Deputy::new();
    let (allowed, other, other_dgram) = (unique_name(), unique_name(), unique_name());
    let (l_allowed, l_other, d_other) = netns.run_in(|| {
        let a = |n: &str| SocketAddr::from_abstract_name(n.as_bytes()).expect("name");
        (
            UnixListener::bind_addr(&a(&allowed)).expect("bind"),
            UnixListener::bind_addr(&a(&other)).expect("bind"),
            UnixDatagram::bind_addr(&a(&other_dgram)).expect("bind"),
        )
    });
    deputy.serve_stream(l_allowed, "allowed");
    deputy.serve_stream(l_other, "other");
    deputy.serve_dgram(d_other, "dgram_other");
    let sockets = [
        ("allowed", format!("@{allowed}")),
        ("other", format!("@{other}")),
        ("dgram_other", format!("@{other_dgram}")),
    ];
    let work = open_dir();
    // Control: outside, all three are reached.
    let out = control(
        &netns,
        &command_args(&target, work.path(), &unique_name(), &sockets),
    );
    for (k, want) in [
        ("allowed", "reached"),
        ("other", "reached"),
        ("dgram_other", "sent"),
    ] {
        assert_eq!(value(&out, k).as_deref(), Some(want), "control {k}\n{out}");
    }
    assert!(
        poll_until(Duration::from_secs(5), || (deputy.requests().len() >= 3)
            .then_some(()))
        .is_some(),
        "control: {:?}",
        deputy.requests()
    );
    deputy.clear();
    std::fs::remove_file(work.path().join("own.sock")).expect("control's own socket");
    std::fs::remove_file(work.path().join("own-dgram.sock")).expect("control's own socket");

    // The rule turns Landlock's scope off; the cgroup hooks refuse the other names.
    let policy = format!("version: 1\nname: deputies-test\nallow:\n  - unix: \"@{allowed}\"\n");
    let args = command_args(&target, work.path(), &unique_name(), &sockets);
    let mut run = AgentRun::builder(&netns, &policy, &args)
        .current_dir(work.path())
        .start();
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(run.expect_value("allowed"), "reached", "{}", run.output());
    assert_eq!(run.expect_value("other"), "refused 1", "{}", run.output());
    assert_eq!(
        run.expect_value("dgram_other"),
        "refused 1",
        "{}",
        run.output()
    );
    for k in ["own_socketpair", "own_path", "own_dgram", "own_abstract"] {
        assert_eq!(run.expect_value(k), "ok", "{k}\n{}", run.output());
    }
    thread::sleep(Duration::from_millis(300));
    let asked: Vec<String> = deputy
        .requests()
        .iter()
        .map(|r| r.split(' ').next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(asked, ["allowed"], "{:?}", deputy.requests());
    let mut denied = unix_denies(&run);
    denied.sort();
    let mut want = vec![
        (format!("@{other}"), "connect_unix".to_owned()),
        (format!("@{other_dgram}"), "sendmsg_unix".to_owned()),
    ];
    want.sort();
    assert_eq!(denied, want, "{}", run.output());
    let warned = run.events_of("warning").iter().any(|w| {
        w["message"].as_str().is_some_and(|m| {
            m.contains(
                "an abstract unix socket bound outside after the command started is refused only",
            )
        })
    });
    assert!(warned, "{}", run.output());
}

#[test]
fn an_abstract_name_bound_after_the_start_is_refused_where_the_scope_is_off() {
    let netns = TestNetns::new();
    let dir = open_dir();
    let target = Target::start();
    let (late, named, own) = (unique_name(), unique_name(), unique_name());
    let go = dir.path().join("go");
    // A rule for another abstract name turns Landlock's scope off: the hooks judge.
    let policy = format!("version: 1\nname: deputies-test\nallow:\n  - unix: \"@{named}\"\n");
    let mut run = start_late(
        &netns,
        &policy,
        &format!("@{late}"),
        &go,
        &target,
        &format!("@{own}"),
    );
    // The deputy binds its abstract name now, outside.
    let mut deputy = Deputy::new();
    let l = netns.run_in(|| {
        let a = SocketAddr::from_abstract_name(late.as_bytes()).expect("name");
        UnixListener::bind_addr(&a).expect("bind the abstract socket")
    });
    deputy.serve_stream(l, "late");
    thread::sleep(Duration::from_millis(500));
    std::fs::write(&go, b"").expect("go");
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(run.expect_value("late"), "refused 1", "{}", run.output());
    // Its own abstract listener, bound before, is left alone.
    assert_eq!(run.expect_value("own_path"), "ok", "{}", run.output());
    assert_eq!(deputy.requests(), Vec::<String>::new());
    assert_eq!(target.accepted(), 0);
    assert_eq!(
        unix_denies(&run),
        [(format!("@{late}"), "connect_unix".to_owned())],
        "{}",
        run.output()
    );
}
