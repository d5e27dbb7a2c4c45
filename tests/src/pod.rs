//! A simulated Kubernetes pod for the sidecar tests: a pod cgroup with an `app` and a
//! `sidecar` child (inside a [`TestCgroup`] of our own, optionally below a kubelet-style
//! layout), commands started inside one of its cgroups and a network namespace, and the real
//! `egress-agent attach` running in the sidecar and driven from outside.
//!
//! Cleanup never panics: [`Pod`] kills what is left in its cgroups and removes them, deepest
//! first; [`AttachAgent`] kills an agent still running (the process it started, by pid);
//! [`AgentPins`] removes what an agent of its name pinned (`/sys/fs/bpf/egress/<name>`) and
//! its state file (`/run/egress/<name>`), which a killed or SIGTERMed agent leaves on purpose.

use std::{
    collections::BTreeSet,
    ffi::{OsStr, OsString},
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;

use crate::{TestCgroup, TestNetns, agent::READY_WAIT, agent_bin, poll_until, remove_cgroup};

/// How long an agent may take to exit after SIGTERM.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// A pod cgroup with `app` and `sidecar` children. Dropping it kills what is left in them
/// and removes every cgroup it created.
#[derive(Debug)]
pub struct Pod {
    /// Every cgroup created below `base`, parents first.
    created: Vec<PathBuf>,
    pod: PathBuf,
    /// Dropped last (after `created` are removed): `egress-test-{pid}-{n}`.
    base: TestCgroup,
}

impl Pod {
    /// The pod is the test cgroup itself: `<mount>/egress-test-{pid}-{n}/{app,sidecar}`.
    pub fn new() -> Self {
        Self::below(Path::new(""))
    }

    /// The pod lies at `layout` (relative, e.g. the kubelet's
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`) inside a
    /// fresh test cgroup, which then stands for the host's cgroup root (`--cgroup-root`).
    pub fn below(layout: &Path) -> Self {
        let base = TestCgroup::new();
        let mut pod = Self {
            created: Vec::new(),
            pod: base.path().to_path_buf(),
            base,
        };
        for part in layout.components() {
            let dir = pod.pod.join(part);
            pod.mkdir(&dir);
            pod.pod = dir;
        }
        for child in ["app", "sidecar"] {
            pod.mkdir(&pod.pod.join(child));
        }
        pod
    }

    /// Creates a cgroup below the test cgroup (removed on drop); panics if it cannot.
    pub fn mkdir(&mut self, dir: &Path) {
        assert!(
            dir.starts_with(self.base.path()),
            "{} is not inside the test cgroup",
            dir.display()
        );
        fs::create_dir(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        self.created.push(dir.to_path_buf());
    }

    /// The test cgroup everything lives in (what `--cgroup-root` names for a layout).
    pub fn base(&self) -> &Path {
        self.base.path()
    }

    /// The pod cgroup (what the agent enforces on).
    pub fn path(&self) -> &Path {
        &self.pod
    }

    /// The workload's cgroup.
    pub fn app(&self) -> PathBuf {
        self.pod.join("app")
    }

    /// The agent's cgroup.
    pub fn sidecar(&self) -> PathBuf {
        self.pod.join("sidecar")
    }

    /// The names of the pod cgroup's child cgroups.
    pub fn children(&self) -> BTreeSet<String> {
        fs::read_dir(&self.pod)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A command that runs in `netns` as a member of `cgroup` (one of this pod's).
    pub fn command(&self, netns: &TestNetns, cgroup: &Path, program: impl AsRef<OsStr>) -> Command {
        assert!(
            cgroup.starts_with(self.base.path()),
            "{} is not one of the pod's cgroups",
            cgroup.display()
        );
        let mut cmd = netns.command(program);
        join_cgroup(&mut cmd, cgroup);
        cmd
    }
}

impl Default for Pod {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            if let Err(e) = remove_cgroup(dir) {
                eprintln!("warning: {e}");
            }
        }
        // Then `base` drops and removes the test cgroup.
    }
}

/// Makes `cmd`'s process join `cgroup` between `fork` and `exec` (through a descriptor of
/// its `cgroup.procs` opened now and owned by the command), so its first instruction after
/// `exec` already runs there.
pub fn join_cgroup(cmd: &mut Command, cgroup: &Path) {
    let path = cgroup.join("cgroup.procs");
    let procs = Arc::new(
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display())),
    );
    // SAFETY: between fork and exec the closure makes one raw syscall on a descriptor it
    // owns (through the Arc) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // "0": the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The bpffs directory of an agent instance.
pub fn pin_dir(name: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/egress").join(name)
}

/// The state directory `status` reads.
pub fn state_dir(name: &str) -> PathBuf {
    Path::new("/run/egress").join(name)
}

/// Removes, on drop, what agents named `name` pinned and their state file. Declare it before
/// the agents it covers (so they are killed first) and after the [`Pod`].
#[derive(Debug)]
pub struct AgentPins {
    name: String,
}

impl AgentPins {
    /// Guards the instance `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/sys/fs/bpf/egress/<name>`.
    pub fn dir(&self) -> PathBuf {
        pin_dir(&self.name)
    }

    /// The names of the pinned links (`<program>@<generation>`), sorted.
    pub fn links(&self) -> Vec<String> {
        list(&self.dir().join("links"))
    }

    /// How many link pins one generation has: 8 sock_addr + sock_create + the egress
    /// backstop + the ingress judge of accepted connections + name binding's `sock_ops` and
    /// `setsockopt`, plus the family guard (`socket_create`) where the kernel loads BPF LSM
    /// programs, or else the packet-socket tripwire (`sys_enter`, and `io_uring_submit_req`
    /// where the kernel has io_uring).
    pub fn links_per_generation(&self) -> usize {
        let links = self.links();
        let has = |p: &str| usize::from(links.iter().any(|l| l.starts_with(p)));
        13 + has("socket_create@") + has("sys_enter@") + has("io_uring_submit_req@")
    }

    /// The names of the pinned maps, sorted.
    pub fn maps(&self) -> Vec<String> {
        list(&self.dir().join("maps"))
    }

    /// The generations among the pinned links.
    pub fn generations(&self) -> BTreeSet<String> {
        self.links()
            .iter()
            .filter_map(|l| l.split_once('@').map(|(_, g)| g.to_owned()))
            .collect()
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl Drop for AgentPins {
    fn drop(&mut self) {
        let pins = self.dir();
        if pins.exists() {
            // Unpinning releases the links (no agent holds them any more): detached.
            if let Err(e) = fs::remove_dir_all(&pins) {
                eprintln!("warning: cannot remove {}: {e}", pins.display());
            }
        }
        let _ = fs::remove_dir_all(state_dir(&self.name));
    }
}

/// Counter for the events and output files of each agent started.
static NEXT_AGENT: AtomicUsize = AtomicUsize::new(0);

/// What to start: `egress-agent attach --events E ARGS...` in a network namespace, as a member
/// of a cgroup (the pod's sidecar). Build with [`AttachAgent::builder`].
#[derive(Debug)]
pub struct AttachBuilder<'a> {
    netns: &'a TestNetns,
    cgroup: PathBuf,
    out_dir: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl AttachBuilder<'_> {
    /// An environment variable for the agent.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// One more argument after `attach`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More arguments after `attach`.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Starts the agent (without waiting for it to be ready).
    pub fn start(self) -> AttachAgent {
        let n = NEXT_AGENT.fetch_add(1, Ordering::Relaxed);
        let events = self.out_dir.join(format!("agent-{n}.events"));
        let stderr = self.out_dir.join(format!("agent-{n}.output"));
        let out = File::create(&stderr).expect("agent output file");
        let mut cmd = self.netns.command(agent_bin());
        join_cgroup(&mut cmd, &self.cgroup);
        cmd.arg("attach")
            .arg("--events")
            .arg(&events)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("agent output file"))
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start egress-agent attach: {e}"));
        AttachAgent {
            child,
            args: self.args,
            events,
            stderr,
            status: None,
        }
    }
}

/// One `egress-agent attach` process. Dropping it kills the agent if it still runs (what it
/// pinned stays: see [`AgentPins`]).
#[derive(Debug)]
pub struct AttachAgent {
    child: Child,
    args: Vec<OsString>,
    events: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl AttachAgent {
    /// An agent to start in `netns` inside `cgroup`; its events and output go to files in
    /// `out_dir`.
    pub fn builder<'a>(netns: &'a TestNetns, cgroup: &Path, out_dir: &Path) -> AttachBuilder<'a> {
        AttachBuilder {
            netns,
            cgroup: cgroup.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The event lines written so far (a partly written last line is skipped).
    pub fn events(&self) -> Vec<Value> {
        fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The events whose `event` is `kind`.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// Waits up to `timeout` for an event that `pred` accepts.
    pub fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        poll_until(timeout, || self.events().into_iter().find(|e| pred(e)))
    }

    /// Everything worth reading when an assertion fails.
    pub fn output(&self) -> String {
        format!(
            "--- agent attach {:?} (pid {}, status {:?})\n--- events:\n{}--- output:\n{}",
            self.args,
            self.pid(),
            self.status,
            fs::read_to_string(&self.events).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Whether the agent still runs (records its status when it does not).
    pub fn running(&mut self) -> bool {
        crate::agent::still_running(&mut self.child, &mut self.status)
    }

    /// Waits for the `ready` line; panics if the agent exits first or takes too long.
    pub fn wait_ready(&mut self) -> Value {
        let found = poll_until(READY_WAIT, || {
            if let Some(ev) = self.events().into_iter().find(|e| e["event"] == "ready") {
                return Some(Some(ev));
            }
            (!self.running()).then_some(None)
        });
        match found {
            Some(Some(ev)) => ev,
            Some(None) => panic!("egress-agent exited before ready\n{}", self.output()),
            None => panic!("no ready line within {READY_WAIT:?}\n{}", self.output()),
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        // The process this guard started (`Child::kill` sends SIGKILL to its pid).
        let _ = self.child.kill();
        let s = self.child.wait().expect("cannot reap egress-agent");
        self.status = Some(s);
        s
    }

    /// SIGTERM, and waits for the agent to exit; panics (after SIGKILL) if it does not
    /// within [`STOP_WAIT`].
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: plain syscall on the pid of a child we have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        match poll_until(STOP_WAIT, || self.child.try_wait().ok().flatten()) {
            Some(s) => {
                self.status = Some(s);
                s
            }
            None => {
                self.kill9();
                panic!(
                    "egress-agent did not exit within {STOP_WAIT:?} of SIGTERM\n{}",
                    self.output()
                )
            }
        }
    }
}

impl Drop for AttachAgent {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One plain HTTP/1.1 `GET path` to `addr` from inside `netns`: the status code and the
/// body, or the error.
pub fn http_get(netns: &TestNetns, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    netns.run_in(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP response: {resp:?}")))?;
        Ok((code, body.to_owned()))
    })
}

/// The value of the Prometheus sample `series` (`name` or `name{labels}`) in `text`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs `egress-agent ARGS` (from the test process, outside any namespace or test cgroup)
/// and returns its exit code and output.
pub fn agent_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run egress-agent {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
