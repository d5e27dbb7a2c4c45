//! Workload confinement (issue #8): a command that `egress-agent run` starts as root cannot
//! leave the enforced cgroup, detach or replace the programs, or open raw and packet sockets,
//! while an ordinary command behaves as before.
//!
//! Each test starts the real agent inside a test network namespace with a command that tries
//! an escape and reports what the kernel said as `key=value` lines on stdout (the agent's
//! stdout, which the command inherits). Where the test must look from outside while the
//! command still runs, the command waits for a "go" file the test creates. Every escape is
//! tried only from inside the confinement, where it must fail; where a failure could come
//! from a malformed call rather than from the confinement, the same call is made from outside
//! first (as a control) and must succeed there.
//!
//! Run as root, after `cargo build -p egress-agent`:
//! `cargo test -p egress-tests --test confine -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs,
    io::{self, Read as _, Write as _},
    net::{self, SocketAddr},
    os::unix::{
        ffi::OsStrExt as _,
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use egress_tests::{
    AgentRun, Outcome, TestCgroup, TestDir, TestNetns, agent::pin_dir, cgroup2_mount, poll_until,
    probe_bin, target_profile_dir, unique_name, value, world::python3,
};
use serde_json::Value;

/// Allows only 127.0.0.1 port 8080.
const ALLOW_8080: &str =
    "version: 1\nname: confine-test\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n";
/// A documentation address no rule allows.
const DENIED: &str = "198.51.100.20:443";
/// How long a test waits for the command to reach a step.
const STEP_WAIT: Duration = Duration::from_secs(30);

/// The capabilities the issue says a confined command never has: NET_ADMIN, NET_RAW,
/// SYS_MODULE, SYS_RAWIO, SYS_PTRACE, SYS_ADMIN, PERFMON, BPF (by number, not taken from the
/// product so that the test checks the requirement rather than the implementation).
const DROPPED: [(u32, &str); 8] = [
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

/// Shell function for command scripts: waits (at most 30 s) for the file `$1` to exist.
const WAIT_GO: &str = r#"wait_go() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 600 ]; then echo "timeout waiting for $1"; exit 99; fi
        sleep 0.05
    done
}
"#;

/// `clone3(CLONE_INTO_CGROUP)` into each `NAME=DIR` argument after the first (`HOST:PORT`);
/// prints `clone3_NAME=ERRNO` (0 when the child was created). A child that was created only
/// tries a TCP connect to `HOST:PORT` (inside the test network namespace) and exits with the
/// connect's errno, printed as `clone3_NAME_child_connect=ERRNO`: `EPERM` if it is still
/// enforced, `ENETUNREACH` if it escaped.
const CLONE3_PY: &str = r#"
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_clone3 = 435
CLONE_INTO_CGROUP = 0x200000000
SIGCHLD = 17
host, port = sys.argv[1].rsplit(":", 1)
for arg in sys.argv[2:]:
    name, path = arg.split("=", 1)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    # tls, set_tid, set_tid_size, cgroup
    args = (ctypes.c_uint64 * 11)(CLONE_INTO_CGROUP, 0, 0, 0, SIGCHLD, 0, 0, 0, 0, 0, fd)
    pid = libc.syscall(ctypes.c_long(SYS_clone3), ctypes.byref(args),
                       ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        s = socket.socket()
        s.settimeout(2)
        os._exit(s.connect_ex((host, int(port))) & 0xFF)
    err = ctypes.get_errno()
    os.close(fd)
    print(f"clone3_{name}={0 if pid > 0 else err}", flush=True)
    if pid > 0:
        _, status = os.waitpid(pid, 0)
        print(f"clone3_{name}_child_connect={os.waitstatus_to_exitcode(status)}", flush=True)
"#;

/// `bpf()` calls against the agent's objects, named in the JSON file `argv[2]`
/// (`progs`, `maps`, `links`: ids; `pins`: paths; `cgroup`: the enforced cgroup). Mode
/// `control` makes only the calls that are harmless when they succeed (get an fd, close it;
/// load a program that is never attached); mode `escape` also enumerates ids and tries to
/// detach programs from the cgroup. Prints `bpf: [[LABEL, ERRNO], ...]` (0: it worked).
const BPF_PY: &str = r#"
import ctypes, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_bpf = 321
mode = sys.argv[1]
ids = json.load(open(sys.argv[2]))
results = []

def bpf(label, cmd, attr, returns_fd=True):
    buf = ctypes.create_string_buffer(attr, len(attr))
    r = libc.syscall(ctypes.c_long(SYS_bpf), ctypes.c_long(cmd), buf, ctypes.c_uint(len(attr)))
    if r < 0:
        results.append([label, ctypes.get_errno()])
        return
    if returns_fd:
        os.close(r)
    results.append([label, 0])

for i in ids["progs"]:
    bpf(f"BPF_PROG_GET_FD_BY_ID {i}", 13, struct.pack("=III", i, 0, 0))
for i in ids["maps"]:
    bpf(f"BPF_MAP_GET_FD_BY_ID {i}", 14, struct.pack("=III", i, 0, 0))
for i in ids["links"]:
    bpf(f"BPF_LINK_GET_FD_BY_ID {i}", 30, struct.pack("=III", i, 0, 0))
for p in ids["pins"]:
    path = ctypes.create_string_buffer(p.encode())
    bpf(f"BPF_OBJ_GET {p}", 7, struct.pack("=QII", ctypes.addressof(path), 0, 0))

# A cgroup connect4 program (r0 = 1; exit), what a replacement would need first.
insns = struct.pack("=BBhi", 0xB7, 0, 0, 1) + struct.pack("=BBhi", 0x95, 0, 0, 0)
insns_buf = ctypes.create_string_buffer(insns, len(insns))
license = ctypes.create_string_buffer(b"GPL")
BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT = 18, 10
bpf("BPF_PROG_LOAD cgroup/connect4", 5, struct.pack(
    "=IIQQIIQII16sII", BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 2, ctypes.addressof(insns_buf),
    ctypes.addressof(license), 0, 0, 0, 0, 0, b"", 0, BPF_CGROUP_INET4_CONNECT))

if mode == "escape":
    for cmd, name in ((11, "BPF_PROG_GET_NEXT_ID"), (12, "BPF_MAP_GET_NEXT_ID"),
                      (31, "BPF_LINK_GET_NEXT_ID")):
        bpf(name, cmd, struct.pack("=II", 0, 0), returns_fd=False)
    cg = os.open(ids["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
    # inet egress, sock_create, connect4/6, sendmsg4/6, recvmsg4/6
    for t in (1, 2, 10, 11, 14, 15, 19, 20):
        bpf(f"BPF_PROG_DETACH type {t}", 9, struct.pack("=III", cg, 0, t), returns_fd=False)
    os.close(cg)

print("bpf: " + json.dumps(results), flush=True)
"#;

/// Opens raw and packet sockets; prints `sock_NAME=ERRNO` (0: it opened, and was closed).
const SOCKETS_PY: &str = r#"
import socket
tries = [
    ("packet", socket.AF_PACKET, socket.SOCK_RAW, 0),
    ("inet_raw_icmp", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    ("inet_raw_raw", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
    ("inet6_raw_255", socket.AF_INET6, socket.SOCK_RAW, 255),
]
for name, family, kind, proto in tries:
    try:
        socket.socket(family, kind, proto).close()
        err = 0
    except OSError as e:
        err = e.errno
    print(f"sock_{name}={err}", flush=True)
"#;

/// Shell function `status FILE PREFIX`: prints the capability sets, `NoNewPrivs` and `Uid`
/// from the status file `FILE` (`/proc/self/status`: the `grep` reading it) as
/// `PREFIX_FIELD=VALUE` lines.
const STATUS_SH: &str = r#"status() {
    grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Uid):' "$1" \
        | sed "s/^/$2_/; s/:[[:space:]]*/=/"
}
"#;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A `KEY=ERRNO` value as a number.
fn errno_value(run: &AgentRun, key: &str) -> i32 {
    let v = run.expect_value(key);
    v.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key}={v} is not a number\n{}", run.output()))
}

/// Waits until the command printed a line `KEY=...`; panics if the agent exits first.
fn wait_for(run: &mut AgentRun, key: &str) -> String {
    let got = poll_until(STEP_WAIT, || {
        if let Some(v) = value(&run.stdout(), key) {
            return Some(Some(v));
        }
        (!run.running()).then_some(None)
    });
    match got {
        Some(Some(v)) => v,
        Some(None) => panic!(
            "the agent exited before the command printed {key}=...\n{}",
            run.output()
        ),
        None => panic!(
            "the command printed no {key}=... within {STEP_WAIT:?}\n{}",
            run.output()
        ),
    }
}

/// Creates `path` (the "go" file a command waits for).
fn go(path: &Path) {
    fs::write(path, "go\n").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Writes `text` to `path` so that a reader polling for `path` never sees a partial file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("cannot rename to {}: {e}", path.display()));
}

/// The probe's outcome: the last `{"ok"...}` line of the command's stdout.
fn probe_outcome(run: &AgentRun) -> Outcome {
    let out = run.stdout();
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"ok\""))
        .unwrap_or_else(|| panic!("the probe printed no outcome\n{}", run.output()));
    Outcome::parse(line).unwrap_or_else(|e| panic!("{e}\n{}", run.output()))
}

/// The denied connect to [`DENIED`] failed with EPERM and is the one deny line (from the
/// probe, in the agent's cgroup).
fn check_denied_connect(run: &AgentRun, ready: &Value, what: &str) {
    let out = probe_outcome(run);
    assert!(
        out.is_eperm(),
        "{what}: the connect to {DENIED} was not denied with EPERM: {out:?}\n{}",
        run.output()
    );
    let denies: Vec<_> = run
        .events_of("deny")
        .into_iter()
        .filter(|d| d["hook"] == "connect4")
        .collect();
    assert_eq!(
        denies.len(),
        1,
        "{what}: one denied connect, one connect4 deny line\n{}",
        run.output()
    );
    let d = &denies[0];
    assert_eq!(d["dst"], "198.51.100.20", "{what}: deny line {d}");
    assert_eq!(d["port"], 443, "{what}: deny line {d}");
    // The command has its own pid namespace: the event names the host pid, the probe knows
    // only its namespaced one.
    assert!(
        d["pid"].as_u64().is_some_and(|p| p > 2),
        "{what}: deny line {d}: a host pid"
    );
    assert_eq!(d["comm"], "egress-probe", "{what}: deny line {d}");
    assert_eq!(
        d["cgroup"], ready["cgroup_id"],
        "{what}: deny line {d}: still the agent's cgroup"
    );
}

/// The agent exited 0 (the command's status).
fn assert_exit_0(run: &mut AgentRun) {
    let code = run.exit_code();
    assert_eq!(code, 0, "the command's exit status\n{}", run.output());
}

/// The pids listed in a cgroup's `cgroup.procs`.
fn procs(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("cannot read {}/cgroup.procs: {e}", cgroup.display()))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A `/proc/PID/status` capability mask printed as `KEY=HEX`.
fn caps(run: &AgentRun, key: &str) -> u64 {
    let v = run.expect_value(key);
    u64::from_str_radix(v.trim(), 16).unwrap_or_else(|e| panic!("{key}={v}: {e}\n{}", run.output()))
}

/// Names of the [`DROPPED`] capabilities present in `mask`.
fn dropped_in(mask: u64) -> Vec<&'static str> {
    DROPPED
        .iter()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// The ready line's cgroup directory.
fn ready_cgroup(ready: &Value) -> PathBuf {
    PathBuf::from(ready["cgroup"].as_str().expect("ready.cgroup"))
}

/// The shell command line for a python script: `PYTHON -c SCRIPT`.
fn py(script: &str) -> String {
    format!("{} -c {}", python3(), sh_quote(script))
}

/// `s` as one single-quoted shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// 1. Leaving the cgroup

#[test]
fn a_root_command_cannot_move_into_another_cgroup() {
    let netns = TestNetns::new();
    let sibling = TestCgroup::new();
    let mount = cgroup2_mount();
    let scratch = TestDir::new();
    let go_file = scratch.path().join("go");
    let script = format!(
        r#"{WAIT_GO}
set -u
echo "pid=$$"
echo "cgroup_v2=$(grep '^0::' /proc/self/cgroup)"
[ -e "$1/cgroup.procs" ] && echo "root_procs=present"
[ -e "$2/cgroup.procs" ] && echo "sibling_procs=present"
err=$({{ echo $$ > "$1/cgroup.procs"; }} 2>&1); echo "root_write=$? $err"
err=$({{ echo $$ > "$2/cgroup.procs"; }} 2>&1); echo "sibling_write=$? $err"
echo "cgroup_v2_after=$(grep '^0::' /proc/self/cgroup)"
echo "attempted=1"
wait_go "$3"
"$4" tcp-connect {DENIED}
"#
    );
    let probe = probe_bin();
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            mount.as_os_str(),
            sibling.path().as_os_str(),
            go_file.as_os_str(),
            probe.as_os_str(),
        ],
    )
    .start();
    let ready = run.wait_ready();
    let agent_cgroup = ready_cgroup(&ready);
    wait_for(&mut run, "attempted");

    // The files were there to write to: the failures are not a wrong path.
    assert_eq!(
        value(&run.stdout(), "root_procs").as_deref(),
        Some("present"),
        "{}/cgroup.procs is not visible inside\n{}",
        mount.display(),
        run.output()
    );
    assert_eq!(
        value(&run.stdout(), "sibling_procs").as_deref(),
        Some("present"),
        "the sibling's cgroup.procs is not visible inside\n{}",
        run.output()
    );
    for key in ["root_write", "sibling_write"] {
        let v = run.expect_value(key);
        assert!(
            !v.starts_with("0 ") && v != "0",
            "{key}: a root command wrote its pid into another cgroup: {v}\n{}",
            run.output()
        );
    }
    // Its own cgroup namespace: the enforced cgroup is its root.
    for key in ["cgroup_v2", "cgroup_v2_after"] {
        assert_eq!(
            run.expect_value(key),
            "0::/",
            "{key}: the command does not see the enforced cgroup as its root\n{}",
            run.output()
        );
    }
    // Seen from outside: still in the enforced cgroup (the relay, the namespace's init and
    // the shell, by host pid: the shell's own `$$` is its pid in its pid namespace), not in
    // the sibling.
    assert!(
        sibling.pids().is_empty(),
        "processes moved into the sibling cgroup: {:?}\n{}",
        sibling.pids(),
        run.output()
    );
    let members = procs(&agent_cgroup);
    assert!(
        members.len() >= 3 && members.iter().all(|p| !procs(&mount).contains(p)),
        "the command's processes left the agent's cgroup {} ({members:?})\n{}",
        agent_cgroup.display(),
        run.output()
    );

    go(&go_file);
    assert_exit_0(&mut run);
    check_denied_connect(&run, &ready, "after the cgroup escapes");
}

/// `clone3(CLONE_INTO_CGROUP)` checks only the permission bits of the target's
/// `cgroup.procs` (not the mount's read-only flag), so the cgroup namespace must be what
/// stops it (docs/KERNEL-NOTES.md, Confinement).
#[test]
fn a_root_command_cannot_clone_a_child_into_another_cgroup() {
    let netns = TestNetns::new();
    let sibling = TestCgroup::new();
    let mount = cgroup2_mount();
    let scratch = TestDir::new();
    let clone3 = scratch.path().join("clone3.py");
    fs::write(&clone3, CLONE3_PY).expect("cannot write clone3.py");

    // Control: the same call from outside (root, unconfined) places a child in the sibling
    // cgroup (which has no programs: its connect is unreachable, not denied), so a failure
    // inside is the confinement's doing.
    let control = netns
        .command(python3())
        .arg(&clone3)
        .arg(DENIED)
        .arg(format!("sibling={}", sibling.path().display()))
        .output()
        .expect("cannot run python3");
    let control_out = String::from_utf8_lossy(&control.stdout);
    assert_eq!(
        value(&control_out, "clone3_sibling").as_deref(),
        Some("0"),
        "control: clone3(CLONE_INTO_CGROUP) from outside failed, so the call itself is \
         wrong: {control_out}{}",
        String::from_utf8_lossy(&control.stderr)
    );

    let script = format!(
        r#"{python} "$1" {DENIED} "root=$2" "sibling=$3"
"$4" tcp-connect {DENIED}
"#,
        python = python3(),
    );
    let probe = probe_bin();
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            clone3.as_os_str(),
            mount.as_os_str(),
            sibling.path().as_os_str(),
            probe.as_os_str(),
        ],
    )
    .start();
    let ready = run.wait_ready();
    assert_exit_0(&mut run);
    let mut escaped = Vec::new();
    for name in ["root", "sibling"] {
        let key = format!("clone3_{name}");
        let errno = errno_value(&run, &key);
        if errno == 0 {
            let connect = value(&run.stdout(), &format!("{key}_child_connect"));
            escaped.push(format!(
                "{name} cgroup: child created; its connect to {DENIED} got errno {connect:?} \
                 (EPERM {} if enforced, ENETUNREACH {} if not)",
                libc::EPERM,
                libc::ENETUNREACH
            ));
            continue;
        }
        // ENOSYS is confinement's answer (a seccomp filter refuses clone3, as container
        // runtimes do); the control run above proved the call itself well formed.
        assert!(
            ![libc::EINVAL, libc::E2BIG, libc::EFAULT].contains(&errno),
            "{key}: clone3 failed with errno {errno}, which says the call was malformed \
             rather than refused\n{}",
            run.output()
        );
    }
    assert!(
        escaped.is_empty(),
        "clone3(CLONE_INTO_CGROUP) from a confined root command placed a child outside the \
         enforced cgroup:\n  {}\n{}",
        escaped.join("\n  "),
        run.output()
    );
    check_denied_connect(&run, &ready, "after the clone3 attempts");
}

// ---------------------------------------------------------------------------------------------
// 2. Remounting, and what the bpffs shows

#[test]
fn the_cgroup_fs_stays_read_only_and_the_pins_stay_hidden() {
    let netns = TestNetns::new();
    let mount = cgroup2_mount();
    let scratch = TestDir::new();
    let go_file = scratch.path().join("go");
    let script = format!(
        r#"{WAIT_GO}
err=$(mount -o remount,rw "$1" 2>&1); echo "remount_rw=$? $err"
err=$(mount -o remount,bind,rw "$1" 2>&1); echo "remount_bind_rw=$? $err"
err=$(umount /sys/fs/bpf 2>&1); echo "umount_bpf=$? $err"
err=$(umount -l /sys/fs/bpf 2>&1); echo "umount_lazy_bpf=$? $err"
echo "cgroup2_opts=$(awk '$5 == "'"$1"'" {{ print $6 }}' /proc/self/mountinfo | tail -n 1)"
echo "bpf_entries=$(ls -A /sys/fs/bpf | tr '\n' ' ')"
if [ -e /sys/fs/bpf/egress ]; then echo "bpf_egress=visible"; else echo "bpf_egress=hidden"; fi
echo "checked=1"
wait_go "$2"
"#
    );
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            mount.as_os_str(),
            go_file.as_os_str(),
        ],
    )
    .start();
    let ready = run.wait_ready();
    wait_for(&mut run, "checked");

    for key in [
        "remount_rw",
        "remount_bind_rw",
        "umount_bpf",
        "umount_lazy_bpf",
    ] {
        let v = run.expect_value(key);
        assert!(
            !v.starts_with("0 ") && v != "0",
            "{key}: a root command changed its mounts: {v}\n{}",
            run.output()
        );
    }
    let opts = run.expect_value("cgroup2_opts");
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "the cgroup v2 mount is not read-only inside (mount options {opts:?})\n{}",
        run.output()
    );
    assert_eq!(
        run.expect_value("bpf_egress"),
        "hidden",
        "/sys/fs/bpf/egress is visible inside\n{}",
        run.output()
    );
    assert_eq!(
        run.expect_value("bpf_entries").trim(),
        "",
        "the bpffs is not hidden inside\n{}",
        run.output()
    );

    // Outside, at the same time, the pins are there.
    let name = ready["name"].as_str().expect("ready.name");
    let pins = pin_dir(name);
    let listed: Vec<_> = fs::read_dir(&pins)
        .unwrap_or_else(|e| {
            panic!(
                "the pins {} are missing outside during the run: {e}\n{}",
                pins.display(),
                run.output()
            )
        })
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(
        !listed.is_empty(),
        "{} is empty outside during the run\n{}",
        pins.display(),
        run.output()
    );

    go(&go_file);
    assert_exit_0(&mut run);
}

// ---------------------------------------------------------------------------------------------
// 3. The bpf syscall

/// The agent's objects, seen from outside with bpftool while it runs.
#[derive(Debug)]
struct AgentObjects {
    progs: BTreeSet<u64>,
    links: BTreeSet<u64>,
    maps: BTreeSet<u64>,
    pins: Vec<PathBuf>,
}

/// `bpftool -j ARGS` as JSON.
fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bpftool (install it: cargo xtask deps): {e}"));
    assert!(
        out.status.success(),
        "bpftool -j {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool -j {}: {e}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn agent_objects(ready: &Value) -> AgentObjects {
    let cgroup = ready["cgroup"].as_str().expect("ready.cgroup");
    let cgroup_id = ready["cgroup_id"].as_u64().expect("ready.cgroup_id");
    let ids = |v: &Value, key: &str| -> BTreeSet<u64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[key].as_u64())
            .collect()
    };
    let progs = ids(&bpftool(&["cgroup", "show", cgroup]), "id");
    let links = bpftool(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["cgroup_id"].as_u64() == Some(cgroup_id))
        .filter_map(|l| l["id"].as_u64())
        .collect();
    let maps = bpftool(&["prog", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_u64().is_some_and(|id| progs.contains(&id)))
        .flat_map(|p| p["map_ids"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m.as_u64())
        .collect();
    let name = ready["name"].as_str().expect("ready.name");
    AgentObjects {
        progs,
        links,
        maps,
        pins: files_below(&pin_dir(name)),
    }
}

/// Asks for a vsock (no capability needed) and a packet socket, prints `vsock=` and
/// `packet=` (`ok` or the errno), `checked=1`, then waits for the file `argv[1]`.
const FAMILIES_PY: &str = r#"
import os, socket, sys, time
for name, fam, ty in (("vsock", 40, socket.SOCK_STREAM), ("packet", 17, socket.SOCK_RAW)):
    try:
        socket.socket(fam, ty, 0).close()
        print(f"{name}=ok", flush=True)
    except OSError as e:
        print(f"{name}={e.errno}", flush=True)
print("checked=1", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
"#;

/// The links attached to the raw tracepoint `sys_enter` on the whole machine: a program
/// there makes every task enter every system call through the slow path.
fn sys_enter_links() -> BTreeSet<u64> {
    bpftool(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["type"] == "raw_tracepoint" && l["tp_name"] == "sys_enter")
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

/// Where the family guard cannot load, `run` puts no program on `sys_enter`: the command's
/// seccomp filter refuses the families the tripwire's half there watches, before that
/// tracepoint, and a program there would slow every system call of every task on the machine.
/// Inside, a vsock and a packet socket are still refused (`EPERM`, the command goes on, not
/// killed); the io_uring half of the tripwire stays armed (for `--allow-io-uring`).
#[test]
fn run_puts_no_program_on_the_machine_s_system_calls() {
    let netns = TestNetns::new();
    let scratch = TestDir::new();
    let go_file = scratch.path().join("go");
    let before = sys_enter_links();
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            python3().as_ref(),
            "-c".as_ref(),
            FAMILIES_PY.as_ref(),
            go_file.as_os_str(),
        ],
    )
    .start();
    let ready = run.wait_ready();
    wait_for(&mut run, "checked");
    let during = sys_enter_links();
    let pins = files_below(&pin_dir(ready["name"].as_str().expect("ready.name")));
    go(&go_file);
    assert_exit_0(&mut run);

    let eperm = libc::EPERM.to_string();
    for family in ["vsock", "packet"] {
        assert_eq!(
            run.expect_value(family),
            eperm,
            "{family} inside the run\n{}",
            run.output()
        );
    }
    let new: Vec<_> = during.difference(&before).collect();
    assert!(
        new.is_empty(),
        "the run attached {new:?} to sys_enter\n{}",
        run.output()
    );
    let guard_missing = run.events_of("warning").iter().any(|w| {
        w["message"]
            .as_str()
            .unwrap_or("")
            .contains("family guard (BPF LSM) cannot run")
    });
    let pinned = |prefix: &str| {
        pins.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
    };
    assert!(!pinned("sys_enter@"), "{pins:?}");
    if guard_missing {
        assert!(
            pinned("io_uring_submit_req@"),
            "the io_uring half of the tripwire is not armed: {pins:?}\n{}",
            run.output()
        );
    }
}

/// The `bpf: [[LABEL, ERRNO], ...]` line a [`BPF_PY`] run printed.
fn bpf_results(out: &str) -> Option<Vec<(String, i32)>> {
    let line = out.lines().find_map(|l| l.strip_prefix("bpf: "))?;
    let v: Value = serde_json::from_str(line).ok()?;
    v.as_array()?
        .iter()
        .map(|r| {
            Some((
                r[0].as_str()?.to_owned(),
                i32::try_from(r[1].as_i64()?).ok()?,
            ))
        })
        .collect()
}

#[test]
fn a_root_command_cannot_reach_the_programs_through_bpf() {
    let netns = TestNetns::new();
    let scratch = TestDir::new();
    let ids_file = scratch.path().join("ids.json");
    let bpf_py = scratch.path().join("bpf.py");
    fs::write(&bpf_py, BPF_PY).expect("cannot write bpf.py");
    let script = format!(
        r#"{WAIT_GO}
wait_go "$1"
{python} "$2" escape "$1"
err=$(bpftool prog show 2>&1); echo "bpftool_prog=$? $err"
err=$(bpftool map show 2>&1); echo "bpftool_map=$? $err"
"$3" tcp-connect {DENIED}
"#,
        python = python3(),
    );
    let probe = probe_bin();
    // The agent's objects are not known before it starts: the command waits for their ids.
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            ids_file.as_os_str(),
            bpf_py.as_os_str(),
            probe.as_os_str(),
        ],
    )
    .start();
    let ready = run.wait_ready();
    let objects = agent_objects(&ready);
    assert!(
        !objects.progs.is_empty() && !objects.links.is_empty() && !objects.pins.is_empty(),
        "bpftool shows no programs, links or pins of the agent: {objects:?}\n{}",
        run.output()
    );
    let cgroup = ready["cgroup"].as_str().expect("ready.cgroup");
    let ids = serde_json::json!({
        "progs": objects.progs,
        "links": objects.links,
        "maps": objects.maps,
        "pins": objects.pins.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "cgroup": cgroup,
    });

    // Control: from outside, with every capability, the same calls work.
    let control_ids = scratch.path().join("control-ids.json");
    fs::write(&control_ids, ids.to_string()).expect("cannot write control ids");
    let control = netns
        .command(python3())
        .arg(&bpf_py)
        .arg("control")
        .arg(&control_ids)
        .output()
        .expect("cannot run python3");
    let control_out = String::from_utf8_lossy(&control.stdout);
    let control_res = bpf_results(&control_out).unwrap_or_else(|| {
        panic!(
            "control: no bpf: line: {control_out}{}",
            String::from_utf8_lossy(&control.stderr)
        )
    });
    let failed: Vec<_> = control_res.iter().filter(|(_, e)| *e != 0).collect();
    assert!(
        failed.is_empty(),
        "control: bpf() calls failed from outside too, so the test's calls are wrong: \
         {failed:?}"
    );

    write_atomically(&ids_file, &ids.to_string());
    assert_exit_0(&mut run);

    let res = bpf_results(&run.stdout())
        .unwrap_or_else(|| panic!("the command printed no bpf: line\n{}", run.output()));
    eprintln!("bpf() from inside the confinement (label, errno): {res:?}");
    let mut wrong = Vec::new();
    for (label, errno) in &res {
        let want = if label.starts_with("BPF_OBJ_GET") {
            // Hidden: the path does not exist in the command's mount namespace.
            Some(libc::ENOENT)
        } else if label.starts_with("BPF_PROG_DETACH") {
            // Any refusal; which one depends on the kernel's order of checks.
            None
        } else {
            Some(libc::EPERM)
        };
        let ok = match want {
            Some(w) => *errno == w,
            None => *errno != 0,
        };
        if !ok {
            wrong.push(format!("{label}: errno {errno}, want {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "bpf() from inside the confinement:\n  {}\n{}",
        wrong.join("\n  "),
        run.output()
    );
    for key in ["bpftool_prog", "bpftool_map"] {
        let rc = errno_value(&run, key);
        assert!(
            ![0, 126, 127].contains(&rc),
            "{key}: bpftool worked inside, or did not run (exit status {rc})\n{}",
            run.output()
        );
    }
    check_denied_connect(&run, &ready, "after the bpf() attempts");
}

// ---------------------------------------------------------------------------------------------
// 3b. Through another process's root

/// `BPF_OBJ_GET` on every file below the directory `argv[1]`; prints `objget_pins=N` (files
/// seen), `objget_ok=N` (fds obtained, closed at once) and `objget_errnos=[...]`.
const OBJ_GET_PY: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
seen, ok, errnos = 0, 0, []
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        seen += 1
        path = ctypes.create_string_buffer(os.path.join(d, f).encode())
        attr = struct.pack("=QII", ctypes.addressof(path), 0, 0)
        buf = ctypes.create_string_buffer(attr, len(attr))
        fd = libc.syscall(ctypes.c_long(321), ctypes.c_long(7), buf, ctypes.c_uint(len(attr)))
        if fd >= 0:
            ok += 1
            os.close(fd)
        else:
            errnos.append(ctypes.get_errno())
print(f"objget_pins={seen}")
print(f"objget_ok={ok}")
print(f"objget_errnos={errnos}", flush=True)
"#;

/// A root process the test starts in its own mount namespace with empty capability sets
/// (`setpriv --bounding-set=-all --inh-caps=-all sleep 60`). Dropping it kills it, by pid.
struct CaplessRoot(std::process::Child);

impl CaplessRoot {
    fn start() -> Self {
        let child = Command::new("setpriv")
            .args([
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--",
                "sleep",
                "60",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run setpriv (util-linux): {e}"));
        let helper = Self(child);
        let status = format!("/proc/{}/status", helper.pid());
        let prm = poll_until(STEP_WAIT, || {
            let text = fs::read_to_string(&status).ok()?;
            // Wait for the exec of sleep, after setpriv dropped the sets.
            text.lines()
                .any(|l| l == "Name:\tsleep")
                .then(|| value(&text.replace(":\t", "="), "CapPrm"))
                .flatten()
        })
        .expect("the capability-less helper did not start");
        assert_eq!(
            u64::from_str_radix(prm.trim(), 16),
            Ok(0),
            "the helper kept capabilities"
        );
        helper
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for CaplessRoot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command's mount namespace hides the pins and makes the cgroup fs read-only, but
/// `/proc/PID/root` of a process in the host's mount namespace leads back to the host's
/// mounts. The ptrace access check closes it for processes with more capabilities than
/// the command (the agent), not for a root process with fewer (here: a capability-less root
/// `sleep` the test starts; on a real host, a service run with a reduced bounding set).
#[test]
fn a_root_command_cannot_reach_the_host_mounts_through_another_root_process() {
    let netns = TestNetns::new();
    let helper = CaplessRoot::start();
    let mount = cgroup2_mount();
    let scratch = TestDir::new();
    let objget = scratch.path().join("objget.py");
    fs::write(&objget, OBJ_GET_PY).expect("cannot write objget.py");
    let host = format!("/proc/{}/root", helper.pid());
    let script = format!(
        r#"
H="$1"
# The agent is the command's parent: its pins are egress/run-$PPID.
pins="$H/sys/fs/bpf/egress/run-$PPID"
if [ -e "$pins" ]; then echo "pins_visible=yes"; else echo "pins_visible=no"; fi
{python} "$3" "$pins"
# A short-lived shell writes its own pid; whether that worked or not, it only tries the
# denied connect (inside the test network namespace) and exits.
sh -c 'echo $$ > "$1" 2>/dev/null; echo "host_procs_write=$?"; exec "$2" tcp-connect {DENIED}' \
    sh "$H$2/cgroup.procs" "$4"
"#,
        python = python3(),
    );
    let probe = probe_bin();
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            host.as_ref(),
            mount.as_os_str(),
            objget.as_os_str(),
            probe.as_os_str(),
        ],
    )
    .start();
    let ready = run.wait_ready();
    assert_exit_0(&mut run);

    let mut escapes = Vec::new();
    if run.expect_value("pins_visible") == "yes" {
        escapes.push(format!(
            "the pins are visible at {host}/sys/fs/bpf/egress/run-{}",
            run.pid()
        ));
    }
    let ok = errno_value(&run, "objget_ok");
    if ok > 0 {
        escapes.push(format!(
            "BPF_OBJ_GET through {host} returned fds for {ok} of {} pins (a pinned link's fd \
             is all BPF_LINK_DETACH needs)",
            run.expect_value("objget_pins")
        ));
    }
    if errno_value(&run, "host_procs_write") == 0 {
        escapes.push(format!(
            "a shell wrote its pid into {host}{}/cgroup.procs (the root cgroup); its \
             connect: {:?}",
            mount.display(),
            probe_outcome(&run)
        ));
    }
    assert!(
        escapes.is_empty(),
        "through /proc/PID/root of a capability-less root process:\n  {}\n{}",
        escapes.join("\n  "),
        run.output()
    );
    check_denied_connect(&run, &ready, "after the /proc/PID/root attempts");
}

// ---------------------------------------------------------------------------------------------
// 4. Raw and packet sockets, and --keep-cap

#[test]
fn a_root_command_cannot_open_raw_or_packet_sockets() {
    let netns = TestNetns::new();
    let script = format!(
        "{STATUS_SH}\nstatus /proc/self/status status\n{}\n",
        py(SOCKETS_PY)
    );
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &["sh", "-c", &script]).start();
    assert_exit_0(&mut run);
    for key in [
        "sock_packet",
        "sock_inet_raw_icmp",
        "sock_inet_raw_raw",
        "sock_inet6_raw_255",
    ] {
        assert_eq!(
            errno_value(&run, key),
            libc::EPERM,
            "{key}: want EPERM\n{}",
            run.output()
        );
    }
    // Root, but without the dropped capabilities in any set.
    for key in [
        "status_CapBnd",
        "status_CapEff",
        "status_CapPrm",
        "status_CapInh",
        "status_CapAmb",
    ] {
        let left = dropped_in(caps(&run, key));
        assert!(
            left.is_empty(),
            "{key} of a root command still has {left:?}\n{}",
            run.output()
        );
    }
    // Root stays root otherwise (CAP_DAC_OVERRIDE, CAP_CHOWN, ...).
    let eff = caps(&run, "status_CapEff");
    for bit in [0, 1, 3] {
        assert!(
            eff & (1 << bit) != 0,
            "CapEff {eff:x} lacks capability {bit}, which confinement does not drop\n{}",
            run.output()
        );
    }
    assert_eq!(
        run.expect_value("status_NoNewPrivs"),
        "1",
        "{}",
        run.output()
    );
    assert!(
        run.events_of("warning")
            .iter()
            .all(|w| !w["message"].as_str().unwrap_or("").contains("CAP_")),
        "a warning about kept capabilities without --keep-cap\n{}",
        run.output()
    );
}

#[test]
fn keep_cap_net_raw_is_reported_and_the_sock_create_hook_still_refuses_raw_inet() {
    let netns = TestNetns::new();
    let script = format!(
        "{STATUS_SH}\nstatus /proc/self/status status\n{}\n",
        py(SOCKETS_PY)
    );
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &["sh", "-c", &script])
        .arg("--keep-cap")
        .arg("CAP_NET_RAW")
        .start();
    assert_exit_0(&mut run);

    let warnings = run.events_of("warning");
    assert!(
        warnings
            .iter()
            .any(|w| w["message"].as_str().unwrap_or("").contains("CAP_NET_RAW")),
        "no warning event names CAP_NET_RAW\n{}",
        run.output()
    );
    let bnd = caps(&run, "status_CapBnd");
    assert_eq!(
        dropped_in(bnd),
        vec!["CAP_NET_RAW"],
        "CapBnd {bnd:x} with --keep-cap CAP_NET_RAW\n{}",
        run.output()
    );
    assert_eq!(
        errno_value(&run, "sock_packet"),
        libc::EPERM,
        "AF_PACKET with CAP_NET_RAW kept: refused by the family guard, or by the seccomp \
         filter where the kernel cannot load it\n{}",
        run.output()
    );
    for key in [
        "sock_inet_raw_icmp",
        "sock_inet_raw_raw",
        "sock_inet6_raw_255",
    ] {
        assert_eq!(
            errno_value(&run, key),
            libc::EPERM,
            "{key}: the sock_create program must refuse it even with CAP_NET_RAW\n{}",
            run.output()
        );
    }
    let refused: Vec<_> = run
        .events_of("deny")
        .into_iter()
        .filter(|d| d["hook"] == "sock_create" && d["reason"] == "protocol")
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "one sock_create deny line per refused raw socket\n{}",
        run.output()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. setuid

/// A directory for a setuid binary on a filesystem mounted without `nosuid`: the temp dir
/// when it allows setuid, else one under `target/`. Removed on drop.
struct SuidDir(PathBuf);

impl SuidDir {
    fn new() -> Self {
        let tmp = std::env::temp_dir();
        let base = if nosuid(&tmp) {
            target_profile_dir()
        } else {
            tmp
        };
        assert!(
            !nosuid(&base),
            "{} is mounted nosuid: no place for the setuid test binary",
            base.display()
        );
        let dir = base.join(unique_name());
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // The command runs as 65534: it must reach the binary.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod 755");
        Self(dir)
    }

    /// A setuid-root copy of `src` in this directory.
    fn setuid_copy(&self, src: &str) -> PathBuf {
        let name = Path::new(src).file_name().expect("a file name");
        let dst = self.0.join(format!("suid-{}", name.to_string_lossy()));
        fs::copy(src, &dst).unwrap_or_else(|e| panic!("cannot copy {src}: {e}"));
        std::os::unix::fs::chown(&dst, Some(0), Some(0)).expect("chown root");
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o4755)).expect("chmod 4755");
        let mode = fs::metadata(&dst).expect("stat").mode();
        assert!(mode & 0o4000 != 0, "{} is not setuid", dst.display());
        dst
    }
}

impl Drop for SuidDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn nosuid(path: &Path) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: a valid path and an out-parameter of the right type.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    st.f_flag & libc::ST_NOSUID != 0
}

#[test]
fn a_setuid_helper_regains_nothing() {
    let dir = SuidDir::new();
    let id = dir.setuid_copy("/usr/bin/id");
    let cat = dir.setuid_copy("/bin/cat");

    // Control: outside, as 65534, the setuid copies do make the caller root.
    let control = Command::new(&id)
        .arg("-u")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("cannot run the setuid id");
    assert_eq!(
        String::from_utf8_lossy(&control.stdout).trim(),
        "0",
        "control: the setuid id run by 65534 outside is not root, so the test proves \
         nothing: {control:?}"
    );

    let netns = TestNetns::new();
    let script = format!(
        r#"{STATUS_SH}
echo "suid_id=$("$1" -u)"
"$2" /proc/self/status > /dev/null && echo "suid_cat=ran"
status /proc/self/status self
"$2" /proc/self/status | grep -E '^(CapEff|CapPrm|Uid):' | sed 's/^/suid_/; s/:[[:space:]]*/=/'
"#
    );
    let command = [
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
        "sh".as_ref(),
        id.as_os_str(),
        cat.as_os_str(),
    ];

    // As the sudo invoker 65534: no_new_privs makes the setuid bit worthless.
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &command)
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .start();
    assert_exit_0(&mut run);
    assert_eq!(
        run.expect_value("suid_cat"),
        "ran",
        "the setuid cat did not run\n{}",
        run.output()
    );
    assert_eq!(
        run.expect_value("suid_id"),
        "65534",
        "a setuid-root binary made the confined command root\n{}",
        run.output()
    );
    let uid = run.expect_value("suid_Uid");
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "uids of the setuid cat: {uid}\n{}",
        run.output()
    );
    assert_eq!(
        caps(&run, "suid_CapEff"),
        0,
        "the setuid cat gained capabilities\n{}",
        run.output()
    );
    assert_eq!(run.expect_value("self_NoNewPrivs"), "1", "{}", run.output());
    for key in ["self_CapBnd", "self_CapInh", "self_CapAmb"] {
        let left = dropped_in(caps(&run, key));
        assert!(
            left.is_empty(),
            "{key} still has {left:?}\n{}",
            run.output()
        );
    }

    // As root: a setuid-root binary cannot bring back what the bounding set dropped.
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &command).start();
    assert_exit_0(&mut run);
    for key in ["suid_CapEff", "suid_CapPrm", "self_CapBnd"] {
        let left = dropped_in(caps(&run, key));
        assert!(
            left.is_empty(),
            "{key} of a root command through a setuid binary has {left:?}\n{}",
            run.output()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Ordinary commands

/// A minimal HTTP/1.1 file server inside a namespace: `GET /PATH` answers the file
/// `ROOT/PATH` (query strings ignored), 404 otherwise; one request a connection. Enough for
/// curl and git's "dumb" HTTP protocol. Runs in the test process, outside enforcement.
struct HttpServer {
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    fn serve(netns: &TestNetns, addr: &str, root: &Path) -> Self {
        let addr: SocketAddr = addr.parse().expect("a socket address");
        let listener = netns
            .run_in(|| net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        listener.set_nonblocking(true).expect("non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (st, reqs, root) = (stop.clone(), requests.clone(), root.to_owned());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(line) = answer(stream, &root) {
                            reqs.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request; returns its request line and status.
fn answer(mut stream: net::TcpStream, root: &Path) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next()?.to_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let path = target.split('?').next()?.trim_start_matches('/');
    let file = root.join(path);
    let body = (method == "GET" && !path.split('/').any(|c| c == ".."))
        .then(|| fs::read(&file).ok())
        .flatten();
    let status = if body.is_some() {
        "200 OK"
    } else {
        "404 Not Found"
    };
    let body = body.unwrap_or_default();
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
    let _ = stream.write_all(&body);
    Some(format!("{line} -> {status}"))
}

/// Runs `git ARGS` in the test process (building the fixture repository).
fn git(args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run git");
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ordinary_commands_behave_as_before() {
    let netns = TestNetns::new();
    let site = TestDir::new();
    fs::write(
        site.path().join("hello.txt"),
        "hello from the allowed host\n",
    )
    .expect("hello");
    // A bare repository served over git's dumb HTTP protocol.
    let src = site.path().join("src");
    let src_s = src.to_str().expect("utf-8 path");
    git(&["init", "-q", src_s]);
    fs::write(src.join("README"), "cloned through the allowed host\n").expect("README");
    git(&["-C", src_s, "add", "README"]);
    git(&[
        "-C",
        src_s,
        "-c",
        "user.name=egress test",
        "-c",
        "user.email=test@example.com",
        "commit",
        "-q",
        "-m",
        "fixture",
    ]);
    let bare = site.path().join("repo.git");
    let bare_s = bare.to_str().expect("utf-8 path");
    git(&["clone", "-q", "--bare", src_s, bare_s]);
    git(&["-C", bare_s, "update-server-info"]);
    let server = HttpServer::serve(&netns, "127.0.0.1:8080", site.path());

    // Where the root command writes (root inside its user namespace is 65534 outside, so the
    // directory is 65534's), and a file only its owner (65534) may read.
    let work = TestDir::new();
    std::os::unix::fs::chown(work.path(), Some(65534), Some(65534)).expect("chown 65534");
    let secret = work.path().join("nobody-only");
    fs::write(&secret, "read by root\n").expect("secret");
    std::os::unix::fs::chown(&secret, Some(65534), Some(65534)).expect("chown 65534");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod 600");

    let script = format!(
        r#"
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
echo "pwd=$(pwd)"
echo "var=$EGRESS_CONFINE_VAR"
echo "python=$({python} -c 'print(1)' 2>&1)"
echo "curl=$(curl -sS --noproxy '*' --max-time 10 http://127.0.0.1:8080/hello.txt 2>&1)"
err=$(GIT_TERMINAL_PROMPT=0 GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null \
    git clone -q http://127.0.0.1:8080/repo.git clone 2>&1); echo "git_clone=$? $err"
echo "git_file=$(cat clone/README 2>&1)"
err=$(echo written-by-root 2>&1 > written); echo "write=$? $err"
echo "read_secret=$(cat nobody-only 2>&1)"
err=$(chown 0:0 written 2>&1); echo "chown=$? $err"
echo "uid=$(id -u)"
"#,
        python = python3(),
    );
    let mut run = AgentRun::builder(&netns, ALLOW_8080, &["sh", "-c", &script])
        .current_dir(work.path())
        .env("EGRESS_CONFINE_VAR", "kept as it was")
        // Root's own home (/root, mode 0700, the real root's) is out of reach of a root
        // command, which is 65534 outside its user namespace.
        .env("HOME", work.path())
        .start();
    assert_exit_0(&mut run);
    let ctx = || format!("{}\nserver saw: {:#?}", run.output(), server.requests());

    assert_eq!(
        run.expect_value("pwd"),
        work.path().display().to_string(),
        "working directory\n{}",
        ctx()
    );
    assert_eq!(run.expect_value("var"), "kept as it was", "{}", ctx());
    assert_eq!(run.expect_value("python"), "1", "{}", ctx());
    assert_eq!(
        run.expect_value("curl"),
        "hello from the allowed host",
        "curl to the allowed host\n{}",
        ctx()
    );
    assert_eq!(
        run.expect_value("git_clone").trim(),
        "0",
        "git clone over the allowed host\n{}",
        ctx()
    );
    assert_eq!(
        run.expect_value("git_file"),
        "cloned through the allowed host",
        "{}",
        ctx()
    );
    // Root stays root for ordinary files of its own (uid 0 inside, 65534 outside).
    assert_eq!(run.expect_value("uid"), "0", "{}", ctx());
    assert_eq!(run.expect_value("write").trim(), "0", "{}", ctx());
    assert_eq!(run.expect_value("read_secret"), "read by root", "{}", ctx());
    assert_eq!(run.expect_value("chown").trim(), "0", "{}", ctx());
    let written = work.path().join("written");
    assert_eq!(
        fs::read_to_string(&written).unwrap_or_default(),
        "written-by-root\n",
        "{}",
        ctx()
    );
    let meta = fs::metadata(&written).expect("stat written");
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{}", ctx());
    let denies = run.events_of("deny");
    assert!(
        denies.is_empty(),
        "denies in an allowed run: {denies:?}\n{}",
        ctx()
    );
}

// ---------------------------------------------------------------------------------------------
// `learn` confines too

#[test]
fn learn_confines_the_command_too() {
    let netns = TestNetns::new();
    let mount = cgroup2_mount();
    let out = TestDir::new();
    let learned = out.path().join("learned.yaml");
    let script = format!(
        r#"{STATUS_SH}
status /proc/self/status self
err=$({{ echo $$ > "$1/cgroup.procs"; }} 2>&1); echo "root_write=$? $err"
echo "cgroup_v2=$(grep '^0::' /proc/self/cgroup)"
echo "bpf_entries=$(ls -A /sys/fs/bpf | tr '\n' ' ')"
"#
    );
    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            mount.as_os_str(),
        ],
    )
    .learn(&learned)
    .start();
    assert_exit_0(&mut run);
    assert_eq!(run.expect_value("self_NoNewPrivs"), "1", "{}", run.output());
    let left = dropped_in(caps(&run, "self_CapBnd"));
    assert!(
        left.is_empty(),
        "CapBnd under learn has {left:?}\n{}",
        run.output()
    );
    let v = run.expect_value("root_write");
    assert!(
        !v.starts_with("0 ") && v != "0",
        "under learn a root command wrote its pid into the root cgroup: {v}\n{}",
        run.output()
    );
    assert_eq!(run.expect_value("cgroup_v2"), "0::/", "{}", run.output());
    assert_eq!(
        run.expect_value("bpf_entries").trim(),
        "",
        "the bpffs is not hidden under learn\n{}",
        run.output()
    );
}

/// What a process can do to the process `sys.argv[1]` by its pid: signal it, open its
/// `/proc/PID/mem`, `pidfd_open` it, `ptrace` it (attached, then detached at once). One
/// `key=value` line each: 0, or the errno's name.
const REACH_PY: &str = r#"
import ctypes, errno, os, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def res(rc):
    return "0" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
try:
    os.kill(pid, 0); print("kill=0")
except OSError as e:
    print("kill=" + errno.errorcode[e.errno])
try:
    os.close(os.open("/proc/%d/mem" % pid, os.O_RDWR)); print("mem=0")
except OSError as e:
    print("mem=" + errno.errorcode[e.errno])
rc = libc.syscall(434, pid, 0)  # pidfd_open
print("pidfd=" + res(rc))
if rc >= 0:
    os.close(rc)
rc = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
print("ptrace=" + res(rc))
if rc >= 0:
    os.waitpid(pid, 0x40000000)  # __WALL
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
"#;

/// A process of the same user outside the sandbox is out of reach of a command `run` through
/// sudo as that user: no signal, no `/proc/PID/mem`, no pidfd, no ptrace, since its pid names
/// nothing in the command's pid namespace (and the fresh `/proc` shows only the command's own).
/// Control: the same script outside, as the same user, reaches it.
#[test]
fn a_same_user_process_outside_is_out_of_reach() {
    let netns = TestNetns::new();
    let scratch = TestDir::new();
    let py = scratch.path().join("reach.py");
    fs::write(&py, REACH_PY).expect("cannot write reach.py");
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::set_permissions(&py, fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut victim = Command::new("sleep")
        .arg("60")
        .uid(65534)
        .gid(65534)
        .spawn()
        .expect("cannot start sleep as 65534");
    let pid = victim.id().to_string();
    let reach = |out: &str, key: &str| value(out, key).unwrap_or_default();

    let control = Command::new(python3())
        .arg(&py)
        .arg(&pid)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("cannot run python3");
    let control = String::from_utf8_lossy(&control.stdout).into_owned();
    for key in ["kill", "mem", "pidfd", "ptrace"] {
        assert_eq!(
            reach(&control, key),
            "0",
            "control: outside, 65534 cannot {key} its own process, so the test proves \
             nothing\n{control}"
        );
    }

    let mut run = AgentRun::builder(
        &netns,
        ALLOW_8080,
        &[python3().as_ref(), py.as_os_str(), pid.as_ref()],
    )
    .env("SUDO_UID", "65534")
    .env("SUDO_GID", "65534")
    .start();
    assert_exit_0(&mut run);
    let _ = victim.kill();
    let _ = victim.wait();
    for (key, want) in [
        ("kill", "ESRCH"),
        ("mem", "ENOENT"),
        ("pidfd", "ESRCH"),
        ("ptrace", "ESRCH"),
    ] {
        assert_eq!(
            run.expect_value(key),
            want,
            "{key} of a process outside\n{}",
            run.output()
        );
    }
}
