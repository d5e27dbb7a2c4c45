//! Least privilege, measured: `egress-agent attach` works with exactly CAP_BPF, CAP_NET_ADMIN
//! and CAP_PERFMON, and fails with a message naming the missing one when any is dropped.
//! The agent runs as root with its capability bounding set cut down by `setpriv` (util-linux),
//! so after `exec` it holds nothing else.

use std::{
    fs,
    process::{Child, Stdio},
    time::Duration,
};

use egress_tests::{Probe, TestCgroup, TestDir, TestNetns, agent_bin, poll_until, require_root};

const ALLOWLIST: &str = "version: 1\nname: caps\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n";

/// The agent under `setpriv` with only `caps` in its bounding set.
struct Agent {
    child: Child,
    name: String,
    dir: TestDir,
}

impl Agent {
    fn start(netns: &TestNetns, cg: &TestCgroup, caps: &str) -> Self {
        require_root();
        let dir = TestDir::new();
        let allow = dir.path().join("allow.yaml");
        fs::write(&allow, ALLOWLIST).expect("write allowlist");
        let name = format!("caps-{}", std::process::id());
        let child = netns
            .command("setpriv")
            .arg("--inh-caps=-all")
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg("--")
            .arg(agent_bin())
            .arg("attach")
            .arg("--cgroup")
            .arg(cg.path())
            .arg("--allowlist")
            .arg(&allow)
            .arg("--events")
            .arg(dir.path().join("events.jsonl"))
            .arg("--name")
            .arg(&name)
            .arg("--detach-on-exit")
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("stderr")).expect("stderr file"))
            .spawn()
            .expect("cannot start setpriv (util-linux)");
        Self { child, name, dir }
    }

    fn events(&self) -> String {
        fs::read_to_string(self.dir.path().join("events.jsonl")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Waits for the ready line, or for the agent to exit; true when ready.
    fn ready(&mut self) -> bool {
        poll_until(Duration::from_secs(20), || {
            if self.events().contains("\"event\":\"ready\"") {
                return Some(true);
            }
            match self.child.try_wait() {
                Ok(Some(_)) => Some(false),
                _ => None,
            }
        })
        .unwrap_or(false)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain syscall to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/egress/{}", self.name));
        let _ = fs::remove_dir("/sys/fs/bpf/egress");
        let _ = fs::remove_dir_all(format!("/run/egress/{}", self.name));
    }
}

#[test]
fn attach_works_with_exactly_bpf_net_admin_and_perfmon() {
    let netns = TestNetns::new();
    let cg = TestCgroup::new();
    let mut agent = Agent::start(&netns, &cg, "+bpf,+net_admin,+perfmon");
    assert!(
        agent.ready(),
        "the agent did not get ready with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON\nstderr:\n{}\nevents:\n{}",
        agent.stderr(),
        agent.events()
    );
    let out = Probe::new(&netns)
        .in_cgroup(&cg)
        .run(&["tcp-connect", "198.51.100.20:443"]);
    assert!(out.is_eperm(), "enforcement must work: {out:?}");
    // Where the family guard cannot load, the packet-socket tripwire (raw tracepoints, which
    // need CAP_PERFMON) is armed with these three too.
    let events = agent.events();
    if events.contains("not refused by the kernel here") {
        assert!(
            events.contains("the packet-socket tripwire is armed"),
            "{events}"
        );
        let res = Probe::new(&netns)
            .in_cgroup(&cg)
            .run_killable(&["vsock-socket", "198.51.100.20:443"]);
        let Err(u) = res else {
            panic!("AF_VSOCK in the cgroup finished: {res:?}");
        };
        assert_eq!(u.signal(), Some(libc::SIGKILL), "{u:?}");
    }
}

#[test]
fn attach_names_each_missing_capability() {
    for (caps, missing) in [
        ("+bpf,+net_admin", "CAP_PERFMON"),
        ("+bpf,+perfmon", "CAP_NET_ADMIN"),
        ("+net_admin,+perfmon", "CAP_BPF"),
    ] {
        let netns = TestNetns::new();
        let cg = TestCgroup::new();
        let mut agent = Agent::start(&netns, &cg, caps);
        assert!(
            !agent.ready(),
            "the agent must not get ready with only {caps}"
        );
        let status = agent.child.wait().expect("wait");
        assert_eq!(status.code(), Some(125), "exit status with {caps}");
        let err = agent.stderr();
        assert!(
            err.contains("missing capabilities") && err.contains(missing),
            "with {caps} the error must name {missing}:\n{err}"
        );
        let out = Probe::new(&netns)
            .in_cgroup(&cg)
            .run(&["tcp-connect", "127.0.0.1:9"]);
        assert!(
            !out.is_eperm(),
            "nothing may be attached after a failed start: {out:?}"
        );
    }
}
