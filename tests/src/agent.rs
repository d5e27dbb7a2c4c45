//! The real `egress-agent run` binary, started as a user would and driven from outside:
//! through its events file, the command's output, its exit status and signals.
//!
//! The agent runs inside a test network namespace (joined before `exec`, see
//! [`TestNetns::command`]; not through `ip netns exec`, which remounts `/sys` and so hides the
//! cgroup v2 and bpf filesystems from the agent). Build the agent first:
//! `cargo build -p egress-agent`.

use std::{
    collections::BTreeSet,
    ffi::{OsStr, OsString},
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    Outcome, TestDir, TestNetns, agent_bin, cgroup2_mount, poll_until, remove_cgroup, require_root,
};

/// How long the agent may take to attach and report ready (a debug build loads its eBPF).
pub const READY_WAIT: Duration = Duration::from_secs(30);
/// How long a run may take from start to exit.
pub const RUN_WAIT: Duration = Duration::from_secs(60);

/// What to start: `egress-agent run --allowlist A --events E [ARGS...] -- CMD...` (or
/// `learn --output O ...`), inside a network namespace. Build with [`AgentRun::builder`],
/// then [`AgentBuilder::start`].
#[derive(Debug)]
pub struct AgentBuilder<'a> {
    netns: &'a TestNetns,
    learn_output: Option<PathBuf>,
    allowlist: String,
    command: Vec<OsString>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
}

impl AgentBuilder<'_> {
    /// `egress-agent learn --output OUTPUT` instead of `run` (same confinement, audit mode).
    pub fn learn(mut self, output: impl AsRef<Path>) -> Self {
        self.learn_output = Some(output.as_ref().to_owned());
        self
    }

    /// An agent option before the `--` (e.g. `--keep-cap`, `CAP_NET_RAW`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// An environment variable for the agent (and so the command), on top of the test's
    /// environment without the `SUDO_*` variables.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The agent's (and so the command's) working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.current_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Starts the agent; its output and events go to files in a fresh [`TestDir`].
    pub fn start(self) -> AgentRun {
        require_root();
        let dir = TestDir::new();
        let allow = dir.path().join("allow.yaml");
        fs::write(&allow, &self.allowlist).expect("cannot write the allowlist");
        let events = dir.path().join("events.jsonl");
        let out = File::create(dir.path().join("stdout")).expect("stdout file");
        let err = File::create(dir.path().join("stderr")).expect("stderr file");
        let mut cmd = self.netns.command(agent_bin());
        match &self.learn_output {
            Some(out) => cmd.arg("learn").arg("--output").arg(out),
            None => cmd.arg("run"),
        };
        cmd.arg("--allowlist")
            .arg(&allow)
            .arg("--events")
            .arg(&events)
            .args(&self.args)
            .arg("--")
            .args(&self.command)
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID")
            .env_remove("SUDO_USER")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(d) = &self.current_dir {
            cmd.current_dir(d);
        }
        let child = cmd.spawn().expect("cannot start egress-agent");
        AgentRun {
            child,
            dir,
            status: None,
        }
    }
}

/// One `egress-agent run --allowlist A --events E -- CMD...`. Dropping it kills an agent
/// still running and removes what a killed agent leaves behind (its cgroup and pins).
#[derive(Debug)]
pub struct AgentRun {
    child: Child,
    dir: TestDir,
    status: Option<ExitStatus>,
}

impl AgentRun {
    /// An agent to start in `netns` with `allowlist` (YAML text) and `command`.
    pub fn builder<'a, S: AsRef<OsStr>>(
        netns: &'a TestNetns,
        allowlist: &str,
        command: &[S],
    ) -> AgentBuilder<'a> {
        AgentBuilder {
            netns,
            learn_output: None,
            allowlist: allowlist.to_owned(),
            command: command.iter().map(|c| c.as_ref().to_owned()).collect(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
        }
    }

    /// Starts the agent in `netns` with `allowlist` and `command`; `env` is set on top of an
    /// environment without the `SUDO_*` variables (so the command runs as root unless a test
    /// asks for the sudo path).
    pub fn start(
        netns: &TestNetns,
        allowlist: &str,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        env.iter()
            .fold(Self::builder(netns, allowlist, command), |b, (k, v)| {
                b.env(k, v)
            })
            .start()
    }

    /// The value of the first `KEY=VALUE` line the command printed; panics, showing the run,
    /// when there is none.
    pub fn expect_value(&self, key: &str) -> String {
        crate::value(&self.stdout(), key)
            .unwrap_or_else(|| panic!("the command printed no {key}=...\n{}", self.output()))
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory holding the allowlist, the events file and the captured output.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One of the files in [`AgentRun::dir`] (`stdout`, `stderr`, `events.jsonl`), or "".
    pub fn read(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// What the agent and its command wrote on stdout.
    pub fn stdout(&self) -> String {
        self.read("stdout")
    }

    /// Everything the agent and its command wrote, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "agent stdout:\n{}\nagent stderr:\n{}\nevents:\n{}",
            self.read("stdout"),
            self.read("stderr"),
            self.read("events.jsonl")
        )
    }

    /// The event lines written so far (a partly written last line is skipped).
    pub fn events(&self) -> Vec<Value> {
        self.read("events.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The events whose `event` is `kind` (`ready`, `deny`, `warning`, ...).
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// Whether the agent is still running (records its status when it is not).
    pub fn running(&mut self) -> bool {
        still_running(&mut self.child, &mut self.status)
    }

    /// Waits for the `ready` line; panics if the agent exits first or takes too long.
    pub fn wait_ready(&mut self) -> Value {
        let ready = poll_until(READY_WAIT, || {
            if let Some(ev) = self.events().into_iter().find(|e| e["event"] == "ready") {
                return Some(Ok(ev));
            }
            match self.child.try_wait() {
                Ok(Some(status)) => Some(Err(status)),
                _ => None,
            }
        });
        match ready {
            Some(Ok(ev)) => ev,
            Some(Err(status)) => {
                self.status = Some(status);
                panic!(
                    "egress-agent exited with {status} before ready\n{}",
                    self.output()
                )
            }
            None => panic!("no ready line within {READY_WAIT:?}\n{}", self.output()),
        }
    }

    /// Waits for the agent to exit.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let status =
            poll_until(RUN_WAIT, || self.child.try_wait().ok().flatten()).unwrap_or_else(|| {
                panic!(
                    "egress-agent still runs after {RUN_WAIT:?}\n{}",
                    self.output()
                )
            });
        self.status = Some(status);
        status
    }

    /// Waits for the agent to exit and returns its exit code (panics if a signal killed it).
    pub fn exit_code(&mut self) -> i32 {
        let status = self.wait();
        status
            .code()
            .unwrap_or_else(|| panic!("egress-agent died of {status}\n{}", self.output()))
    }

    /// The probe's JSON line on the agent's stdout (the command inherits it).
    pub fn probe_outcome(&self) -> Outcome {
        let stdout = self.read("stdout");
        let line = stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("the probe printed no outcome\n{}", self.output()));
        Outcome::parse(line).unwrap_or_else(|e| panic!("{e}\n{}", self.output()))
    }

    /// The cgroups this agent may have created, by name.
    pub fn own_cgroups(&self, names: &BTreeSet<String>) -> Vec<String> {
        let prefix = format!("egress-run-{}", self.pid());
        names
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A killed agent leaves enforcement in place (fail closed): its cgroup and pins.
        let mount = cgroup2_mount();
        for name in self.own_cgroups(&egress_cgroups()) {
            eprintln!("warning: removing leftover cgroup {name}");
            if let Err(e) = remove_cgroup(&mount.join(&name)) {
                eprintln!("warning: {e}");
            }
        }
        let pins = pin_dir(&format!("run-{}", self.pid()));
        if pins.exists() {
            eprintln!("warning: removing leftover pins {}", pins.display());
            let _ = fs::remove_dir_all(&pins);
        }
    }
}

/// The `egress-*` cgroups directly under the mount.
pub fn egress_cgroups() -> BTreeSet<String> {
    let Ok(entries) = fs::read_dir(cgroup2_mount()) else {
        // Never panic here: this runs in `Drop`, maybe while unwinding.
        eprintln!("warning: cannot list the cgroup v2 mount");
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("egress-"))
        .collect()
}

/// Where `egress-agent run` pins an instance's programs and maps.
pub fn pin_dir(name: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/egress").join(name)
}

/// Whether `child` still runs; records its exit status in `status` when it does not.
pub(crate) fn still_running(child: &mut Child, status: &mut Option<ExitStatus>) -> bool {
    if status.is_some() {
        return false;
    }
    match child.try_wait() {
        Ok(Some(s)) => {
            *status = Some(s);
            false
        }
        _ => true,
    }
}
