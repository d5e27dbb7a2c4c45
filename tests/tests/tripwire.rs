//! The packet-socket tripwire (`raw_tracepoint/sys_enter`, `io_uring_submit_req`) against the
//! kernel, where the family guard (BPF LSM) cannot load: root with every capability and no
//! seccomp filter (a sidecar pod's other container, `attach` mode) asks for a packet socket
//! in the enforced cgroup, by each way the kernel offers, and tries to send a whole Ethernet
//! frame on a veth whose peer (in another namespace the test made) is sniffed. The process is
//! killed before the socket exists, no frame reaches the peer, and a deny event names it.
//! Controls: the same probe outside the cgroup (and in a sibling cgroup) sends its frame.
//!
//! Where the family guard loads, the tripwire is not armed (the guard refuses with EPERM,
//! `tests/tests/families.rs`), and these tests say so and stop.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
    time::Duration,
};

use egress_agent::{
    bpf::enforcer::{Enforcer, EnforcerOptions},
    events::DenyRecord,
    policy,
};
use egress_tests::{Outcome, Probe, TestCgroup, TestNetns, poll_until, require_root};

/// How long to wait for a frame or an event.
const WAIT: Duration = Duration::from_secs(2);
/// Where the frames are addressed (the peer namespace holds it; the sniffer sees them anyway).
const TARGET: &str = "198.51.100.2:5000";
/// The probe's UDP payload, which marks its frames.
const PAYLOAD: &[u8] = b"probe\n";
/// The ways a packet socket is asked for (`egress-probe WAY@IFACE`).
const WAYS: [&str; 5] = [
    "packet",
    "packet-int80",
    "packet-socketcall",
    "sock-packet",
    "packet-uring",
];

/// io_uring submissions that create the packet socket and send on it without returning to
/// user space: the kill cannot stop the send (docs/THREATS.md), the event still names it.
const SAME_SUBMISSION: [&str; 2] = ["packet-uring-batch", "packet-uring-link"];

/// A veth pair: `tw0` in `near` (where the probes run), `tw1` in `far`, both up.
struct Link {
    near: TestNetns,
    far: TestNetns,
}

impl Link {
    fn new() -> Self {
        let (near, far) = (TestNetns::new(), TestNetns::new());
        ip(&[
            "-n",
            near.name(),
            "link",
            "add",
            "tw0",
            "type",
            "veth",
            "peer",
            "name",
            "tw1",
            "netns",
            far.name(),
        ]);
        ip(&["-n", near.name(), "link", "set", "tw0", "up"]);
        ip(&["-n", far.name(), "link", "set", "tw1", "up"]);
        Self { near, far }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A packet socket on `tw1` in the far namespace: counts the probe's frames that arrive.
struct Sniffer {
    sock: OwnedFd,
    seen: usize,
}

impl Sniffer {
    fn new(link: &Link) -> Self {
        let sock = link.far.run_in(|| -> io::Result<OwnedFd> {
            let proto = i32::from((libc::ETH_P_ALL as u16).to_be());
            // SAFETY: plain syscalls; the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    proto,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = c"tw1";
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = proto as u16;
            ll.sll_ifindex = ifindex as i32;
            // SAFETY: a valid sockaddr_ll of its size.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    std::ptr::from_ref(&ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(sock)
        });
        let sock = sock.unwrap_or_else(|e| panic!("cannot sniff tw1: {e}"));
        Self { sock, seen: 0 }
    }

    /// Reads what arrived; the probe frames seen so far.
    fn count(&mut self) -> usize {
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: a valid buffer on a socket we own.
            let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), 2048, 0) };
            if n <= 0 {
                return self.seen;
            }
            if buf[..n as usize].ends_with(PAYLOAD) {
                self.seen += 1;
            }
        }
    }

    /// Whether `n` probe frames have arrived within [`WAIT`].
    fn wait_for(&mut self, n: usize) -> bool {
        poll_until(WAIT, || (self.count() >= n).then_some(())).is_some()
    }
}

/// The programs on a test cgroup (allowlist permitting nothing), a link, a sniffer. Fields
/// drop in order: detach, remove the cgroup, the namespaces.
struct Tripped {
    enf: Enforcer,
    cg: TestCgroup,
    sniffer: Sniffer,
    link: Link,
}

impl Tripped {
    /// `None` (said on stderr) where the family guard loads: the tripwire is not armed.
    fn new(header: &str) -> Option<Self> {
        Self::with_options(header, &EnforcerOptions::default())
    }

    /// [`Tripped::new`] with `opts`.
    fn with_options(header: &str, opts: &EnforcerOptions) -> Option<Self> {
        require_root();
        let yaml = format!("version: 1\nname: tripwire\n{header}allow: []\n");
        let policy = policy::parse_str(&yaml, Path::new("tripwire.yaml")).expect("allowlist");
        let link = Link::new();
        let sniffer = Sniffer::new(&link);
        let cg = TestCgroup::new();
        let enf = Enforcer::attach(cg.path(), &policy, opts)
            .unwrap_or_else(|e| panic!("cannot attach to {}: {e:#}", cg.path().display()));
        if enf.family_guard_missing().is_none() {
            eprintln!("NOTE: the family guard loads here; the tripwire is not armed");
            return None;
        }
        if let Some(why) = enf.tripwire_missing() {
            panic!("the family guard cannot load, and the tripwire is not armed: {why}");
        }
        Some(Self {
            enf,
            cg,
            sniffer,
            link,
        })
    }

    fn probe(&self) -> Probe<'_> {
        Probe::new(&self.link.near)
    }

    /// `WAY@tw0` outside any test cgroup: the control.
    fn outside(&self, way: &str) -> Outcome {
        self.probe().run(&[&format!("{way}@tw0"), TARGET])
    }

    /// `WAY@tw0` in `cg`: `Err` with the probe's pid when a signal killed it.
    fn run_in(&self, cg: &TestCgroup, way: &str) -> Result<Outcome, (Option<i32>, u32)> {
        self.probe()
            .in_cgroup(cg)
            .run_killable(&[&format!("{way}@tw0"), TARGET])
            .map_err(|u| (u.signal(), u.pid))
    }

    /// The deny events that arrive within [`WAIT`] (at least one), all of them.
    fn events(&mut self) -> Vec<DenyRecord> {
        let enf = &mut self.enf;
        let mut events = poll_until(WAIT, || {
            let v = enf.poll_denies();
            (!v.is_empty()).then_some(v)
        })
        .unwrap_or_default();
        std::thread::sleep(Duration::from_millis(100));
        events.extend(self.enf.poll_denies());
        events
    }
}

/// Whether the control of `way` shows the technique working here; if the kernel lacks it
/// (no 32-bit entry, io_uring disabled), says so.
fn works_outside(t: &mut Tripped, way: &str) -> bool {
    let before = t.sniffer.count();
    let out = t.outside(way);
    if !out.ok {
        let e = out.error.clone().unwrap_or_default();
        assert!(
            matches!(out.errno, Some(libc::ENOSYS | libc::EPERM | libc::EINVAL))
                && (e.starts_with("socket") || e.starts_with("io_uring")),
            "control {way}: only a missing kernel feature may fail it: {out:?}"
        );
        eprintln!("NOTE: {way} does not work on this kernel even outside: {out:?}");
        return false;
    }
    assert!(
        t.sniffer.wait_for(before + 1),
        "control {way}: the frame reached the peer"
    );
    true
}

fn assert_tripped(ev: &DenyRecord, proto: &str, pid: u32, verdict: &str) {
    assert_eq!(ev.hook, "tripwire", "{ev:#?}");
    assert_eq!(ev.reason, "family", "{ev:#?}");
    assert_eq!(ev.proto, proto, "{ev:#?}");
    assert_eq!(ev.pid, pid, "the event names the probe: {ev:#?}");
    assert_eq!(ev.verdict, verdict, "{ev:#?}");
    assert_eq!(ev.uid, 0, "{ev:#?}");
    assert!(ev.comm.starts_with("egress-probe"), "{ev:#?}");
}

/// Root in a sibling cgroup the programs are not on sends its frame by `way`, unharmed and
/// unreported.
fn sibling_sends(t: &mut Tripped, way: &str) {
    let sibling = TestCgroup::new();
    let before = t.sniffer.count();
    let out = t.run_in(&sibling, way);
    assert!(
        matches!(out, Ok(ref o) if o.ok),
        "{way} in a sibling cgroup: {out:?}"
    );
    assert!(
        t.sniffer.wait_for(before + 1),
        "the sibling's frame arrives"
    );
    assert!(t.enf.poll_denies().is_empty(), "and no event");
}

/// `way` in the enforced cgroup, where the control shows it working: the probe is killed and
/// named in one deny event; whether its frame reached the peer (`None`: no control here).
fn trip(t: &mut Tripped, way: &str) -> Option<bool> {
    if !works_outside(t, way) {
        return None;
    }
    Some(trip_inside(t, way))
}

/// `way` in the enforced cgroup: the probe is killed and named in one deny event; whether its
/// frame reached the peer.
fn trip_inside(t: &mut Tripped, way: &str) -> bool {
    let before = t.sniffer.count();
    let res = t.run_in(&t.cg, way);
    let Err((signal, pid)) = res else {
        panic!("{way} in the enforced cgroup finished: {res:?}");
    };
    assert_eq!(signal, Some(libc::SIGKILL), "{way}: killed by SIGKILL");
    let events = t.events();
    assert_eq!(events.len(), 1, "{way}: exactly one event: {events:#?}");
    assert_tripped(&events[0], "af_packet", pid, "deny");
    t.sniffer.wait_for(before + 1)
}

#[test]
fn a_packet_socket_in_the_cgroup_kills_the_process_before_a_frame_leaves() {
    let Some(mut t) = Tripped::new("") else {
        return;
    };
    for way in WAYS {
        let left = trip(&mut t, way);
        assert_ne!(left, Some(true), "{way}: no frame reached the peer");
        // The plain system call always works outside: the test is never empty.
        assert!(way != "packet" || left.is_some(), "the packet control");
    }
    for way in SAME_SUBMISSION {
        let left = trip(&mut t, way);
        eprintln!("NOTE: {way}: the send in the same submission reached the peer: {left:?}");
    }
    // The tripwire killed no one else: the control still works, and so does root in a sibling
    // cgroup the programs are not on.
    assert!(works_outside(&mut t, "packet"), "the control after");
    sibling_sends(&mut t, "packet");
}

/// Another thread of the process sends, in a loop, on the descriptor the packet socket will
/// get while the socket is created: the kill almost always reaches it before a send does. The
/// kernel does not promise it (docs/KERNEL-NOTES.md: the window is the IPI's latency, and a
/// sender preempted inside its call; one CI run on a 2-CPU VM got one frame out of ten
/// rounds), so every round must kill and report, and at most two of ten may leak a frame,
/// where outside the cgroup (the control) the race is won every time.
#[test]
fn a_thread_racing_the_kill_gets_no_frame_out() {
    let Some(mut t) = Tripped::new("") else {
        return;
    };
    assert!(works_outside(&mut t, "packet-race"), "the race's control");
    let leaked: Vec<usize> = (0..10)
        .filter(|_| trip_inside(&mut t, "packet-race"))
        .collect();
    if !leaked.is_empty() {
        eprintln!("NOTE: a frame reached the peer in round(s) {leaked:?} of 10");
    }
    assert!(
        leaked.len() <= 2,
        "frames reached the peer in rounds {leaked:?} of 10"
    );
}

/// `--refuse-io-uring`: the ring itself trips (io_uring_setup), so the submission that would
/// make a packet socket and send on it never exists. Control: the same probe in a sibling
/// cgroup gets its frame out.
#[test]
fn refusing_io_uring_kills_at_the_ring_so_no_submission_sends() {
    let opts = EnforcerOptions {
        refuse_io_uring: true,
        ..EnforcerOptions::default()
    };
    let Some(mut t) = Tripped::with_options("", &opts) else {
        return;
    };
    let way = "packet-uring-batch";
    if !works_outside(&mut t, way) {
        return;
    }
    sibling_sends(&mut t, way);

    let before = t.sniffer.count();
    let res = t.run_in(&t.cg, way);
    let Err((signal, pid)) = res else {
        panic!("io_uring in the enforced cgroup finished: {res:?}");
    };
    assert_eq!(signal, Some(libc::SIGKILL));
    let events = t.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    let ev = &events[0];
    assert_eq!(
        (ev.hook, ev.reason, ev.proto.as_str(), ev.port, ev.pid),
        ("tripwire", "io-uring", "io_uring", 425, pid),
        "{ev:#?}"
    );
    assert!(!t.sniffer.wait_for(before + 1), "no frame reached the peer");
}

/// The tripwire holds for the cgroups below the enforced one (containers of a pod), and lets
/// the exempt one through (the sidecar's own).
#[test]
fn below_the_enforced_cgroup_it_trips_and_the_exempt_cgroup_is_let_through() {
    let Some(mut t) = Tripped::new("") else {
        return;
    };
    let below = t.cg.child("app");
    let exempt = t.cg.child("sidecar");
    t.enf.set_exempt_cgroup(exempt.id()).expect("exempt");
    let res = t.run_in(&below, "packet");
    let Err((signal, pid)) = res else {
        panic!("a packet socket below the enforced cgroup finished: {res:?}");
    };
    assert_eq!(signal, Some(libc::SIGKILL));
    let events = t.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_tripped(&events[0], "af_packet", pid, "deny");
    assert_eq!(events[0].cgroup, below.id(), "{events:#?}");

    let before = t.sniffer.count();
    let out = t.run_in(&exempt, "packet");
    assert!(
        matches!(out, Ok(ref o) if o.ok),
        "the exempt cgroup: {out:?}"
    );
    assert!(t.sniffer.wait_for(before + 1), "its frame arrives");
    assert!(t.enf.poll_denies().is_empty(), "and no event");
}

#[test]
fn a_vsock_kills_too_and_unix_netlink_and_inet_do_not() {
    let Some(mut t) = Tripped::new("") else {
        return;
    };
    let res = Probe::new(&t.link.near)
        .in_cgroup(&t.cg)
        .run_killable(&["vsock-socket", TARGET]);
    let Err(u) = res else {
        panic!("AF_VSOCK in the enforced cgroup finished: {res:?}");
    };
    assert_eq!(u.signal(), Some(libc::SIGKILL));
    let events = t.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_tripped(&events[0], "af_vsock", u.pid, "deny");

    let out = Probe::new(&t.link.near)
        .in_cgroup(&t.cg)
        .run(&["local-sockets", TARGET]);
    assert!(out.ok, "unix and netlink sockets open: {out:?}");
    // An inet socket is judged by the socket hooks (EPERM), not killed.
    let out = Probe::new(&t.link.near)
        .in_cgroup(&t.cg)
        .run(&["udp-sendto", TARGET]);
    assert!(out.is_eperm(), "UDP is denied, not killed: {out:?}");
    let events = t.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].hook, "sendmsg4", "{events:#?}");
}

#[test]
fn audit_mode_reports_and_kills_nothing() {
    let Some(mut t) = Tripped::new("mode: audit\n") else {
        return;
    };
    let before = t.sniffer.count();
    let out = t.run_in(&t.cg, "packet");
    let Ok(out) = out else {
        panic!("audit mode killed the probe: {out:?}");
    };
    assert!(out.ok, "audit mode lets the socket open: {out:?}");
    assert!(t.sniffer.wait_for(before + 1), "and the frame goes out");
    let events = t.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_tripped(&events[0], "af_packet", out.pid, "audit");
}

#[test]
fn the_tripwire_goes_with_the_agent() {
    let Some(t) = Tripped::new("") else {
        return;
    };
    let Tripped {
        enf,
        cg,
        mut sniffer,
        link,
    } = t;
    drop(enf);
    let before = sniffer.count();
    let out = Probe::new(&link.near)
        .in_cgroup(&cg)
        .run_killable(&["packet@tw0", TARGET]);
    assert!(
        matches!(out, Ok(ref o) if o.ok),
        "detached, the tripwire is gone: {out:?}"
    );
    assert!(sniffer.wait_for(before + 1), "and the frame arrives");
}
