//! A small DNS world for the resolver tests: a network namespace of our own with
//! documentation addresses on its `lo`, a dnsmasq answering configured records on
//! `192.0.2.53:53` (the agent's upstream) with a query log the tests read back, echo listeners
//! standing in for the "remote" hosts, and the real `egress-agent run` started inside it.
//!
//! Nothing here leaves the namespace: it holds only `lo`, so the "remote" addresses are
//! local ones, and an address that is not on `lo` is unreachable (`ENETUNREACH`, never
//! `EPERM`). Dropping a [`DnsWorld`] stops dnsmasq (the process it started, by pid), deletes
//! the namespace and removes its files, without panicking.

use std::{
    cell::RefCell,
    collections::BTreeSet,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    net::{self, IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use serde_json::Value;

use crate::{
    TestDir, TestNetns, UdpListener, agent_bin, cgroup2_mount, poll_until, remove_cgroup,
    require_root,
};

/// The address dnsmasq listens on (UDP and TCP port 53): the agent's upstream.
pub const UPSTREAM_IP: &str = "192.0.2.53";
/// `dns.upstream` for an allowlist that forwards to the world's dnsmasq.
pub const UPSTREAM: &str = "192.0.2.53:53";

/// How long dnsmasq may take to start listening.
const DNSMASQ_WAIT: Duration = Duration::from_secs(10);
/// How long one `egress-agent run` may take from start to exit (a debug build loads its
/// eBPF object first).
const AGENT_WAIT: Duration = Duration::from_secs(60);

/// What dnsmasq answers, as its command-line options. Build with the methods, then
/// [`DnsWorldBuilder::start`].
#[derive(Debug)]
pub struct DnsWorldBuilder {
    args: Vec<String>,
    addrs: Vec<IpAddr>,
    local_ttl: u32,
}

impl DnsWorldBuilder {
    /// `--address=/name/ip`: `name` and every name below it answer `ip` (one per family).
    pub fn address(mut self, name: &str, ip: &str) -> Self {
        self.args.push(format!("--address=/{name}/{ip}"));
        self
    }

    /// `--host-record=name,ip...[,ttl]`: exactly `name` answers `ips`, with `ttl` seconds
    /// (else the world's local TTL).
    pub fn host_record(mut self, name: &str, ips: &[&str], ttl: Option<u32>) -> Self {
        let mut arg = format!("--host-record={name},{}", ips.join(","));
        if let Some(ttl) = ttl {
            arg.push_str(&format!(",{ttl}"));
        }
        self.args.push(arg);
        self
    }

    /// `--cname=alias,target[,ttl]`: `alias` is a CNAME for `target`, which must have a
    /// record of its own here (dnsmasq only answers CNAMEs to names it knows).
    pub fn cname(mut self, alias: &str, target: &str, ttl: Option<u32>) -> Self {
        let mut arg = format!("--cname={alias},{target}");
        if let Some(ttl) = ttl {
            arg.push_str(&format!(",{ttl}"));
        }
        self.args.push(arg);
        self
    }

    /// `--txt-record=name,text`.
    pub fn txt_record(mut self, name: &str, text: &str) -> Self {
        self.args.push(format!("--txt-record={name},{text}"));
        self
    }

    /// The TTL of `--address` and `--host-record` answers without a TTL of their own
    /// (`--local-ttl`; dnsmasq's default is 0). Default here: 300 s.
    pub fn local_ttl(mut self, secs: u32) -> Self {
        self.local_ttl = secs;
        self
    }

    /// Puts `ip` on the namespace's `lo` (listeners add their own address themselves).
    pub fn local_addr(mut self, ip: &str) -> Self {
        self.addrs.push(
            ip.parse()
                .unwrap_or_else(|e| panic!("bad address {ip}: {e}")),
        );
        self
    }

    /// Creates the namespace, its addresses and dnsmasq, and waits until dnsmasq listens.
    pub fn start(self) -> DnsWorld {
        require_root();
        let dnsmasq = dnsmasq_bin();
        let mut world = DnsWorld {
            netns: TestNetns::new(),
            dir: TestDir::new(),
            dnsmasq: None,
            addrs: RefCell::new(BTreeSet::new()),
            runs: AtomicUsize::new(0),
        };
        world.add_addr(UPSTREAM_IP.parse().expect("upstream address"));
        for ip in &self.addrs {
            world.add_addr(*ip);
        }
        let log = world.log_path();
        File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut cmd = world.netns.command(&dnsmasq);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--port=53",
            "--user=root",
            "--log-queries",
        ])
        .arg(format!("--listen-address={UPSTREAM_IP}"))
        .arg(format!("--local-ttl={}", self.local_ttl))
        .arg(format!("--log-facility={}", log.display()))
        // Ours, not the default /run/dnsmasq.pid of a system dnsmasq.
        .arg(format!(
            "--pid-file={}",
            world.dir.path().join("dnsmasq.pid").display()
        ))
        .args(&self.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            File::create(world.dir.path().join("dnsmasq.stderr")).expect("dnsmasq stderr file"),
        );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", dnsmasq.display()));
        // From here on Drop stops it, whatever happens next.
        world.dnsmasq = Some(child);
        world.wait_dnsmasq();
        world
    }
}

/// The namespace, dnsmasq and the files of one test. See the module documentation.
#[derive(Debug)]
pub struct DnsWorld {
    dnsmasq: Option<Child>,
    netns: TestNetns,
    dir: TestDir,
    /// Addresses already on `lo`.
    addrs: RefCell<BTreeSet<IpAddr>>,
    /// Counter for the allowlist and output files of each agent run.
    runs: AtomicUsize,
}

impl DnsWorld {
    /// A world without records yet; dnsmasq answers REFUSED for names it does not know.
    pub fn builder() -> DnsWorldBuilder {
        DnsWorldBuilder {
            args: Vec::new(),
            addrs: Vec::new(),
            local_ttl: 300,
        }
    }

    /// The network namespace.
    pub fn netns(&self) -> &TestNetns {
        &self.netns
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.log")
    }

    /// Puts `ip` on the namespace's `lo` (once), as a `/32` or `/128`.
    pub fn add_addr(&self, ip: IpAddr) {
        if !self.addrs.borrow_mut().insert(ip) {
            return;
        }
        let (cidr, extra): (String, &[&str]) = match ip {
            IpAddr::V4(_) => (format!("{ip}/32"), &[]),
            // No duplicate address detection on lo, but say so: a tentative address
            // cannot be bound.
            IpAddr::V6(_) => (format!("{ip}/128"), &["nodad"]),
        };
        let mut args = vec!["-n", self.netns.name(), "addr", "add", &cidr, "dev", "lo"];
        args.extend_from_slice(extra);
        let out = Command::new("ip")
            .args(&args)
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

    /// Waits until dnsmasq accepts TCP on port 53 (it binds UDP first); panics with its
    /// stderr if it exits or takes too long.
    fn wait_dnsmasq(&mut self) {
        let addr: SocketAddr = format!("{UPSTREAM_IP}:53").parse().expect("address");
        let up = poll_until(DNSMASQ_WAIT, || {
            if let Some(child) = self.dnsmasq.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(Err(status));
            }
            let ok = self.netns.run_in(|| {
                net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            ok.then_some(Ok(()))
        });
        let stderr =
            || fs::read_to_string(self.dir.path().join("dnsmasq.stderr")).unwrap_or_default();
        match up {
            Some(Ok(())) => {}
            Some(Err(status)) => {
                self.dnsmasq = None;
                panic!("dnsmasq exited with {status} at start:\n{}", stderr())
            }
            None => panic!(
                "dnsmasq does not listen on {addr} after {DNSMASQ_WAIT:?}:\n{}",
                stderr()
            ),
        }
    }

    /// dnsmasq's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The names dnsmasq was asked for, in order (lowercase, from its `query[TYPE] NAME from`
    /// lines): every query that reached the upstream.
    pub fn queries(&self) -> Vec<String> {
        parse_queries(&self.log())
    }

    /// Waits until dnsmasq logged a query for `name`; false on timeout. dnsmasq writes its
    /// log as it goes, so a test that asserts a name is *absent* first waits for a name the
    /// command asked for later.
    pub fn wait_query(&self, name: &str, timeout: Duration) -> bool {
        poll_until(timeout, || {
            self.queries().iter().any(|q| q == name).then_some(())
        })
        .is_some()
    }

    /// A TCP echo server on `addr` inside the namespace (its address is put on `lo`).
    pub fn listen_tcp(&self, addr: &str) -> EchoListener {
        let want: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad listener address {addr}: {e}"));
        self.add_addr(want.ip());
        EchoListener::bind(&self.netns, want)
    }

    /// A UDP socket on `addr` inside the namespace that records what it receives.
    pub fn listen_udp(&self, addr: &str) -> UdpListener {
        let want: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad listener address {addr}: {e}"));
        self.add_addr(want.ip());
        UdpListener::bind(&self.netns, addr)
    }

    /// Runs `dig ARGS` inside the namespace but *outside* any enforced cgroup (a control:
    /// what the world answers without egress in the way); returns its stdout.
    pub fn dig(&self, args: &[&str]) -> String {
        let out = self
            .netns
            .command("dig")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run dig (install dnsutils: cargo xtask deps): {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// This world's scratch directory (removed with it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `yaml` to a fresh allowlist file of this world and returns its path.
    pub fn write_allowlist(&self, yaml: &str) -> PathBuf {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("allow-{n}.yaml"));
        fs::write(&path, yaml).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Runs `egress-agent run --allowlist A --events E -- CMD...` inside the namespace (as
    /// root: the `SUDO_*` variables are removed) and waits for it to exit. Whatever a killed
    /// or crashed agent leaves behind (its cgroup and pins) is removed, with a warning.
    /// Panics if it does not exit within a minute (after killing it).
    pub fn run_agent(&self, allowlist: &str, cmd: &[&str]) -> AgentExit {
        self.agent(&["run"], allowlist, cmd)
    }

    /// Like [`DnsWorld::run_agent`], with `args` (such as `--keep-cap CAP_NET_RAW`) after
    /// `run`.
    pub fn run_agent_with(&self, args: &[&str], allowlist: &str, cmd: &[&str]) -> AgentExit {
        let verb: Vec<&str> = std::iter::once("run").chain(args.iter().copied()).collect();
        self.agent(&verb, allowlist, cmd)
    }

    /// Runs a python3 command script, `prelude` then `body` (they fill a dict `out`, which
    /// is printed as one JSON line at the end), under `allowlist` with `args` after `run`;
    /// checks that the agent got ready and exited 0. Returns the run and the script's JSON.
    pub fn run_script(
        &self,
        args: &[&str],
        allowlist: &str,
        prelude: &str,
        body: &str,
    ) -> (AgentExit, Value) {
        let script = format!("{prelude}\n{body}\nprint(json.dumps(out), flush=True)\n");
        let run = self.run_agent_with(args, allowlist, &[python3(), "-c", &script]);
        assert_eq!(
            run.events.first().map(|e| e["event"].clone()),
            Some(Value::from("ready")),
            "the first event line is ready\n{}",
            run.context()
        );
        assert_eq!(run.code(), 0, "the script exits 0\n{}", run.context());
        let out = run.json();
        (run, out)
    }

    /// Like [`DnsWorld::run_agent`], for `egress-agent learn --output OUTPUT --allowlist A
    /// --events E -- CMD...`.
    pub fn learn_agent(&self, output: &Path, allowlist: &str, cmd: &[&str]) -> AgentExit {
        let output = output.to_string_lossy();
        self.agent(&["learn", "--output", &output], allowlist, cmd)
    }

    fn agent(&self, verb: &[&str], allowlist: &str, cmd: &[&str]) -> AgentExit {
        let allow = self.write_allowlist(allowlist);
        let stem = allow.with_extension("");
        let events = stem.with_extension("events");
        let stdout = stem.with_extension("stdout");
        let stderr = stem.with_extension("stderr");
        let mut child = self
            .netns
            .command(agent_bin())
            .args(verb)
            .arg("--allowlist")
            .arg(&allow)
            .arg("--events")
            .arg(&events)
            .arg("--")
            .args(cmd)
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID")
            .env_remove("SUDO_USER")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start egress-agent: {e}"));
        let pid = child.id();
        let status = poll_until(AGENT_WAIT, || child.try_wait().ok().flatten());
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        let events_text = read(&events);
        let exit = AgentExit {
            status,
            stdout: read(&stdout),
            stderr: read(&stderr),
            events: events_text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
            events_text,
            allowlist: allowlist.to_owned(),
        };
        if exit.status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Nothing, unless the agent was killed or crashed: it cleans up after itself.
        remove_leftovers(pid);
        if exit.status.is_none() {
            panic!(
                "egress-agent still runs after {AGENT_WAIT:?}; killed\n{}",
                exit.context()
            );
        }
        exit
    }
}

impl Drop for DnsWorld {
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            // The process this world started (`--keep-in-foreground`: it is our child, so
            // its pid cannot have been reused before we reap it).
            let _ = child.kill();
            let _ = child.wait();
        }
        // Then the namespace (TestNetns) and the files (TestDir) drop, in that order.
    }
}

/// Removes what a killed `egress-agent run` (pid `pid`) leaves behind on purpose (fail
/// closed): its cgroup `egress-run-PID` and its pins `/sys/fs/bpf/egress/run-PID`.
fn remove_leftovers(pid: u32) {
    let cg = cgroup2_mount().join(format!("egress-run-{pid}"));
    if cg.exists() {
        eprintln!("warning: removing leftover cgroup {}", cg.display());
        if let Err(e) = remove_cgroup(&cg) {
            eprintln!("warning: {e}");
        }
    }
    let pins = Path::new("/sys/fs/bpf/egress").join(format!("run-{pid}"));
    if pins.exists() {
        eprintln!("warning: removing leftover pins {}", pins.display());
        let _ = fs::remove_dir_all(&pins);
    }
}

/// The dnsmasq binary (Debian's `dnsmasq-base`); panics with the fix if it is missing.
fn dnsmasq_bin() -> PathBuf {
    let found = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "dnsmasq is not installed: the DNS tests need it as their upstream server; \
             install it with `cargo xtask deps` (Debian package dnsmasq-base)"
        )
    })
}

/// The names in dnsmasq's `query[TYPE] NAME from ADDR` log lines.
fn parse_queries(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("query[")?..];
            let rest = &rest[rest.find("] ")? + 2..];
            let (name, _) = rest.split_once(" from ")?;
            Some(name.trim_end_matches('.').to_ascii_lowercase())
        })
        .collect()
}

/// Python for command scripts: `fill_option_memory(s)` adds `TCP_MD5SIG_EXT` keys (136 bytes
/// each, no capability needed) to TCP socket `s`, for documentation peers outside
/// 198.51.100.0/24 (each address and prefix length a key of its own), until the kernel answers
/// `ENOMEM`: the socket's option memory (`sk_omem_alloc`, bounded by `net.core.optmem_max`),
/// which socket storage is charged to, is then full. Returns `(keys added, full)`.
pub const FILL_OPTION_MEMORY_PY: &str = r#"
import errno, socket, struct

def fill_option_memory(s):
    keys = 0
    for prefix in range(32, 24, -1):
        for net in ("192.0.2", "203.0.113"):
            for h in range(1, 255):
                peer = struct.pack("=H2x4s", socket.AF_INET,
                                   socket.inet_aton(f"{net}.{h}")).ljust(128, b"\0")
                # TCP_MD5SIG_FLAG_PREFIX, the prefix length, a 1-byte key.
                cmd = struct.pack("=BBHi", 1, prefix, 1, 0) + b"k".ljust(80, b"\0")
                try:
                    s.setsockopt(socket.IPPROTO_TCP, 32, peer + cmd)  # TCP_MD5SIG_EXT
                except OSError as e:
                    if e.errno != errno.ENOMEM:
                        raise
                    return keys, True
                keys += 1
    return keys, False
"#;

/// Python for command scripts: `hello(sni=None, pad=0, ech=False, sni_twice=False,
/// upper=False)` builds one TLS record holding a ClientHello by hand (TLS 1.3 shape: random,
/// a session id, one cipher suite), with a `server_name` for `sni` (twice, or upper-cased),
/// an `encrypted_client_hello` extension, or a padding extension of `pad` bytes.
pub const CLIENT_HELLO_PY: &str = r#"
import os

def hello(sni=None, pad=0, ech=False, sni_twice=False, upper=False):
    exts = b""
    names = [sni, sni] if sni_twice else ([sni] if sni is not None else [])
    for n in names:
        n = (n.upper() if upper else n).encode()
        entry = b"\x00" + len(n).to_bytes(2, "big") + n
        lst = len(entry).to_bytes(2, "big") + entry
        exts += b"\x00\x00" + len(lst).to_bytes(2, "big") + lst
    if ech:
        body = os.urandom(40)
        exts += b"\xfe\x0d" + len(body).to_bytes(2, "big") + body
    if pad:
        exts += b"\x00\x15" + pad.to_bytes(2, "big") + b"\x00" * pad
    body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32) + b"\x00\x02\x13\x01"
            + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
"#;

/// The python3 interpreter for command scripts: the system one when there is one (a shim
/// in `PATH`, such as pyenv's, would run more than python inside the enforced cgroup).
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// How one `egress-agent run` ended, and what it wrote.
#[derive(Debug)]
pub struct AgentExit {
    /// The agent's exit status (`None` only inside `run_agent`, when it timed out).
    pub status: Option<ExitStatus>,
    /// The agent's stdout, which the command inherits.
    pub stdout: String,
    /// The agent's stderr (its logs), which the command inherits too.
    pub stderr: String,
    /// The events file, one parsed JSON object a line.
    pub events: Vec<Value>,
    /// The events file as written.
    pub events_text: String,
    /// The allowlist it ran with.
    pub allowlist: String,
}

impl AgentExit {
    /// Everything worth reading when an assertion fails.
    pub fn context(&self) -> String {
        format!(
            "--- exit status: {:?}\n--- allowlist:\n{}\n--- events:\n{}--- stdout:\n{}--- stderr:\n{}",
            self.status, self.allowlist, self.events_text, self.stdout, self.stderr
        )
    }

    /// The exit code; panics (with the context) if a signal ended the agent.
    pub fn code(&self) -> i32 {
        self.status.and_then(|s| s.code()).unwrap_or_else(|| {
            panic!(
                "egress-agent ended without an exit code\n{}",
                self.context()
            )
        })
    }

    /// The events whose `event` is `kind` (`deny`, `dns-refused`, `warning`, ...).
    pub fn events_of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind).collect()
    }

    /// The last line of stdout that is a JSON object: what a command script reported.
    pub fn json(&self) -> Value {
        self.stdout
            .lines()
            .rev()
            .filter(|l| l.starts_with('{'))
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("the command printed no JSON result\n{}", self.context()))
    }
}

/// What an [`EchoListener`] has seen, shared with its threads.
#[derive(Debug, Default)]
struct EchoState {
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Bytes received, per connection, as they arrive.
    data: Mutex<Vec<Vec<u8>>>,
    stop: AtomicBool,
}

/// A TCP server inside a namespace that echoes what each connection sends, and records
/// every connection as soon as it is accepted (so a long-lived connection counts while it
/// is still open).
#[derive(Debug)]
pub struct EchoListener {
    addr: SocketAddr,
    state: Arc<EchoState>,
    thread: Option<JoinHandle<()>>,
}

impl EchoListener {
    /// Listens on `addr` inside `netns`; the address must already be on one of its links.
    pub fn bind(netns: &TestNetns, addr: SocketAddr) -> Self {
        let listener = netns
            .run_in(|| net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on tcp {addr} in {}: {e}", netns.name()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let state = Arc::new(EchoState::default());
        let st = state.clone();
        let thread = thread::Builder::new()
            .name(format!("echo-{addr}"))
            .spawn(move || accept_loop(&listener, &st))
            .expect("cannot start a listener thread");
        Self {
            addr,
            state,
            thread: Some(thread),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections were accepted; false on timeout.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || (self.accepted() >= n).then_some(())).is_some()
    }

    /// What each connection has sent so far.
    pub fn data(&self) -> Vec<Vec<u8>> {
        self.state
            .data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for EchoListener {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The threads look at the flag at least every 20 ms.
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &net::TcpListener, st: &Arc<EchoState>) {
    let mut conns = Vec::new();
    while !st.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                let slot = {
                    let mut data = st.data.lock().unwrap_or_else(|p| p.into_inner());
                    data.push(Vec::new());
                    data.len() - 1
                };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                conns.push(thread::spawn(move || echo(stream, slot, &st)));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn echo(mut stream: net::TcpStream, slot: usize, st: &EchoState) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = [0u8; 4096];
    while !st.stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                st.data.lock().unwrap_or_else(|p| p.into_inner())[slot]
                    .extend_from_slice(&buf[..n]);
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_queries;

    #[test]
    fn query_lines_parse() {
        let log = "Nov 25 14:09:24 dnsmasq[12882]: started, version 2.90 cachesize 150\n\
                   Nov 25 14:09:24 dnsmasq[12882]: query[A] Allowed.Example.com from 192.0.2.53\n\
                   Nov 25 14:09:24 dnsmasq[12882]: config allowed.example.com is 198.51.100.10\n\
                   Nov 25 14:09:25 dnsmasq[12882]: query[AAAA] x.y.wild.example.com from 192.0.2.53\n";
        assert_eq!(
            parse_queries(log),
            vec!["allowed.example.com", "x.y.wild.example.com"]
        );
    }
}
