//! The family guard (`lsm_cgroup/socket_create`) against the kernel: socket families other
//! than unix, inet, inet6, netlink and alg cannot be opened from the enforced cgroup, not even
//! by root with every capability (these probes run as root, unconfined, as in a sidecar pod
//! whose app container kept CAP_NET_RAW).
//!
//! The guard needs a kernel that loads BPF LSM programs (6.0+, BPF LSM active). Where the
//! kernel refuses them (`bpftool feature probe` says `program_type lsm is NOT available`, as
//! on the locked-down kernel of the machine kind CI runs on), the agent must say why, and the
//! tests assert what holds instead: the packet-socket tripwire kills root that asks for such a
//! socket in an `attach`ed cgroup before the socket exists (`tests/tests/tripwire.rs` tries
//! every way of asking, with a sniffed veth peer).

use std::{path::Path, process::Command, time::Duration};

use egress_agent::{
    bpf::enforcer::{Enforcer, EnforcerOptions},
    events::DenyRecord,
    policy,
};
use egress_tests::{Outcome, Probe, TestCgroup, TestNetns, UdpListener, poll_until, require_root};

/// How long to wait for a listener or an event.
const WAIT: Duration = Duration::from_secs(2);
/// The "remote" UDP listener a packet socket aims its hand-made frame at.
const TARGET: &str = "198.51.100.20:5000";

/// The programs on a test cgroup under an allowlist that permits nothing, a namespace with
/// [`TARGET`] on its `lo`. Fields drop in order: detach, remove the cgroup, the namespace.
struct Guarded {
    enf: Enforcer,
    cg: TestCgroup,
    netns: TestNetns,
}

impl Guarded {
    fn new(header: &str) -> Self {
        require_root();
        let yaml = format!("version: 1\nname: families\n{header}allow: []\n");
        let policy = policy::parse_str(&yaml, Path::new("families.yaml")).expect("allowlist");
        let netns = TestNetns::new();
        netns.add_lo_address("198.51.100.20/32");
        let cg = TestCgroup::new();
        let enf = Enforcer::attach(cg.path(), &policy, &EnforcerOptions::default())
            .unwrap_or_else(|e| panic!("cannot attach to {}: {e:#}", cg.path().display()));
        Self { enf, cg, netns }
    }

    /// Whether the guard runs; when it does not, checks that the agent's reason agrees with
    /// the kernel's own feature probe, and says so on stderr.
    fn guard(&self) -> bool {
        let lsm = kernel_loads_lsm_programs();
        match self.enf.family_guard_missing() {
            None => {
                assert_ne!(lsm, Some(false), "bpftool says LSM programs cannot load");
                true
            }
            Some(why) => {
                assert_ne!(
                    lsm,
                    Some(true),
                    "bpftool says LSM programs load, yet the guard is missing: {why}"
                );
                assert!(
                    why.contains("BPF LSM"),
                    "the reason names the BPF LSM: {why}"
                );
                eprintln!("NOTE: the family guard does not run on this kernel: {why}");
                false
            }
        }
    }

    /// Runs the probe as root inside the enforced cgroup.
    fn inside(&self, action: &str) -> Outcome {
        Probe::new(&self.netns)
            .in_cgroup(&self.cg)
            .run(&[action, TARGET])
    }

    /// Runs the probe inside, where the tripwire should kill it: its pid.
    fn inside_killed(&self, action: &str) -> u32 {
        let res = Probe::new(&self.netns)
            .in_cgroup(&self.cg)
            .run_killable(&[action, TARGET]);
        let Err(u) = res else {
            panic!("{action}: without the family guard, the tripwire kills: {res:?}");
        };
        assert!(
            self.enf.tripwire_missing().is_none(),
            "{:?}",
            self.enf.tripwire_missing()
        );
        assert_eq!(u.signal(), Some(libc::SIGKILL), "{u:?}");
        u.pid
    }

    /// Runs the probe as root outside it (the control).
    fn outside(&self, action: &str) -> Outcome {
        Probe::new(&self.netns).run(&[action, TARGET])
    }

    /// The one deny event that arrives (waits for it, then drains the rest).
    fn one_event(&mut self) -> DenyRecord {
        let enf = &mut self.enf;
        let mut events = poll_until(WAIT, || {
            let v = enf.poll_denies();
            (!v.is_empty()).then_some(v)
        })
        .expect("a deny event");
        events.extend(self.enf.poll_denies());
        assert_eq!(events.len(), 1, "exactly one event: {events:#?}");
        events.remove(0)
    }
}

/// `bpftool feature probe kernel`'s word on BPF_PROG_TYPE_LSM (`None`: no answer).
fn kernel_loads_lsm_programs() -> Option<bool> {
    let out = Command::new("bpftool")
        .args(["feature", "probe", "kernel"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("eBPF program_type lsm "))?;
    Some(!line.contains("NOT"))
}

fn assert_family_event(ev: &DenyRecord, proto: &str, out: &Outcome, verdict: &str) {
    assert_eq!(ev.hook, "socket_create", "{ev:#?}");
    assert_eq!(ev.reason, "family", "{ev:#?}");
    assert_eq!(ev.proto, proto, "{ev:#?}");
    assert_eq!(ev.pid, out.pid, "the event names the probe: {ev:#?}");
    assert_eq!(ev.verdict, verdict, "{ev:#?}");
}

#[test]
fn root_in_the_cgroup_gets_no_frame_out_of_a_packet_socket() {
    let mut g = Guarded::new("");
    let target = UdpListener::bind(&g.netns, TARGET);

    // Control: root outside the cgroup injects a whole frame, and it arrives.
    let out = g.outside("packet");
    assert!(out.ok, "control: the packet socket works outside: {out:?}");
    assert!(
        target.wait_received(1, WAIT),
        "control: the injected frame reached the listener"
    );

    if !g.guard() {
        // The tripwire (docs/THREATS.md): killed before the socket exists.
        let pid = g.inside_killed("packet");
        let ev = g.one_event();
        assert_eq!(
            (ev.hook, ev.reason, ev.proto.as_str(), ev.pid),
            ("tripwire", "family", "af_packet", pid),
            "{ev:#?}"
        );
        assert!(!target.wait_received(2, WAIT), "and no frame arrives");
        return;
    }
    let out = g.inside("packet");
    assert!(out.is_eperm(), "AF_PACKET inside the cgroup: {out:?}");
    assert!(out.failed_at("socket"), "refused when opened: {out:?}");
    let ev = g.one_event();
    assert_family_event(&ev, "af_packet", &out, "deny");
    assert!(
        !target.wait_received(2, WAIT),
        "nothing more reached the listener"
    );
}

#[test]
fn a_vsock_cannot_even_be_opened() {
    let mut g = Guarded::new("");
    // Control: outside, the family guard is not what answers (a vsock opens, or the kernel
    // lacks the family: EAFNOSUPPORT). Nothing is ever connected or sent.
    let out = g.outside("vsock-socket");
    assert!(
        !out.is_eperm(),
        "control: no EPERM outside the cgroup: {out:?}"
    );

    if !g.guard() {
        let pid = g.inside_killed("vsock-socket");
        let ev = g.one_event();
        assert_eq!(
            (ev.hook, ev.proto.as_str(), ev.pid),
            ("tripwire", "af_vsock", pid),
            "{ev:#?}"
        );
        return;
    }
    let out = g.inside("vsock-socket");
    assert!(out.is_eperm(), "AF_VSOCK inside the cgroup: {out:?}");
    let ev = g.one_event();
    assert_family_event(&ev, "af_vsock", &out, "deny");
}

#[test]
fn unix_and_netlink_sockets_still_open() {
    let mut g = Guarded::new("");
    let out = g.inside("local-sockets");
    assert!(
        out.ok,
        "unix and netlink sockets open in the cgroup: {out:?}"
    );
    // A connect to a loopback port no rule allows is still judged by the socket hooks.
    let out = g.inside("udp-sendto");
    assert!(out.is_eperm(), "UDP to {TARGET} is still denied: {out:?}");
    let ev = g.one_event();
    assert_eq!(ev.hook, "sendmsg4", "{ev:#?}");
}

#[test]
fn audit_mode_reports_the_packet_socket_and_lets_it_open() {
    let mut g = Guarded::new("mode: audit\n");
    let target = UdpListener::bind(&g.netns, TARGET);
    let out = g.inside("packet");
    assert!(out.ok, "audit mode lets the socket open: {out:?}");
    assert!(target.wait_received(1, WAIT), "and the frame goes out");
    let ev = g.one_event();
    if !g.guard() {
        // The tripwire reports, and kills nothing in audit mode.
        assert_eq!(
            (ev.hook, ev.proto.as_str(), ev.pid, ev.verdict),
            ("tripwire", "af_packet", out.pid, "audit"),
            "{ev:#?}"
        );
        return;
    }
    assert_family_event(&ev, "af_packet", &out, "audit");
}
