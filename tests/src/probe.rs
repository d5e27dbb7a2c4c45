//! Running `egress-probe` inside a test namespace, optionally inside a test cgroup.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use crate::{TestCgroup, TestNetns, poll_until, probe_bin};

/// A probe that hangs longer than this is killed and the test fails.
const PROBE_DEADLINE: Duration = Duration::from_secs(15);

/// What the probe's connect or send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The whole action succeeded.
    pub ok: bool,
    /// The OS error number when it failed with one.
    pub errno: Option<i32>,
    /// The error text when it failed.
    pub error: Option<String>,
    /// The probe's pid (what a deny event must name).
    pub pid: u32,
}

impl Outcome {
    /// Whether the action failed with `EPERM`, the verdict of a deny.
    pub fn is_eperm(&self) -> bool {
        !self.ok && self.errno == Some(libc::EPERM)
    }

    /// Whether the action failed at `step` (`socket`, `connect`...): the probe names the
    /// failing call first in its error text.
    pub fn failed_at(&self, step: &str) -> bool {
        !self.ok && self.error.as_deref().is_some_and(|e| e.starts_with(step))
    }

    /// Parses the probe's JSON line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("probe output {line:?}: {e}"))?;
        let ok = v["ok"]
            .as_bool()
            .ok_or_else(|| format!("probe output {line:?} has no boolean \"ok\""))?;
        let pid = v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| format!("probe output {line:?} has no \"pid\""))?;
        Ok(Self {
            ok,
            errno: v["errno"].as_i64().and_then(|e| i32::try_from(e).ok()),
            error: v["error"].as_str().map(str::to_owned),
            pid,
        })
    }
}

/// A probe that did not finish with a report (killed, or failed to start its action).
#[derive(Debug)]
pub struct Unfinished {
    /// How it ended.
    pub status: std::process::ExitStatus,
    /// What it wrote to stderr.
    pub stderr: String,
    /// Its pid.
    pub pid: u32,
}

impl Unfinished {
    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<i32> {
        std::os::unix::process::ExitStatusExt::signal(&self.status)
    }
}

/// Builds and runs one `egress-probe ACTION ADDR:PORT`, e.g.
/// `Probe::new(&netns).in_cgroup(&cg).run(&["tcp-connect", "127.0.0.1:8080"])`.
///
/// The child joins the namespace (and the cgroup) between `fork` and `exec`, through
/// descriptors opened before the fork and raw syscalls only, so the probe's very first
/// socket is already in both.
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    netns: &'a TestNetns,
    cgroup: Option<&'a TestCgroup>,
}

impl<'a> Probe<'a> {
    /// A probe that runs in `netns`, outside any test cgroup (unenforced).
    pub fn new(netns: &'a TestNetns) -> Self {
        Self {
            netns,
            cgroup: None,
        }
    }

    /// Runs the probe as a member of `cgroup`.
    pub fn in_cgroup(mut self, cgroup: &'a TestCgroup) -> Self {
        self.cgroup = Some(cgroup);
        self
    }

    /// Runs `egress-probe ARGS...` and returns its outcome; panics if the probe could not
    /// run or did not report one.
    pub fn run(&self, args: &[&str]) -> Outcome {
        match self.run_killable(args) {
            Ok(o) => o,
            Err(e) => panic!(
                "egress-probe {args:?} exited with {}; stderr: {:?}",
                e.status, e.stderr
            ),
        }
    }

    /// [`Probe::run`] for a probe that may be killed: how one that did not finish with a
    /// report ended.
    pub fn run_killable(&self, args: &[&str]) -> Result<Outcome, Unfinished> {
        let bin = probe_bin();
        let procs: Option<(File, PathBuf)> = self.cgroup.map(|cg| {
            let path = cg.path().join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            (f, path)
        });
        let procs_fd = procs.as_ref().map(|(f, _)| f.as_raw_fd());

        let mut cmd = self.netns.command(&bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fd) = procs_fd {
            // SAFETY: the closure runs between fork and exec and makes one raw syscall on a
            // descriptor opened before the fork (`procs` keeps it open until `spawn`
            // returns); it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    // "0": the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            let cg = procs
                .as_ref()
                .map(|(_, p)| format!(" joining {}", p.display()))
                .unwrap_or_default();
            panic!(
                "cannot start {} in netns {}{cg}: {e}",
                bin.display(),
                self.netns.name()
            )
        });
        drop(procs);

        let status = poll_until(PROBE_DEADLINE, || child.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("egress-probe {args:?} did not finish within {PROBE_DEADLINE:?}");
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut stdout);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if !status.success() {
            return Err(Unfinished {
                status,
                stderr,
                pid: child.id(),
            });
        }
        let line = stdout.lines().next().unwrap_or("");
        let outcome = Outcome::parse(line).unwrap_or_else(|e| panic!("{e}; stderr: {stderr:?}"));
        assert_eq!(
            outcome.pid,
            child.id(),
            "egress-probe reported another pid than the one spawned"
        );
        Ok(outcome)
    }
}
