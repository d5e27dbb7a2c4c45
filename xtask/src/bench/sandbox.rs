//! The bench's own kernel objects: cgroups `egress-bench-{pid}-*`, network namespaces of the
//! same names, the processes it starts and the agents' pins. Everything is removed in `Drop`,
//! on error and after Ctrl-C too, and only what this process created.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use egress_netns::Netns;

/// Every object the bench creates; dropping it removes them, children first.
#[derive(Debug)]
pub struct Sandbox {
    /// `egress-bench-{pid}`: the prefix of every name.
    pub prefix: String,
    /// The cgroup v2 mount (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    pub cgroup_root: PathBuf,
    /// A private directory for allowlists, event files and logs.
    pub dir: PathBuf,
    cgroups: Vec<PathBuf>,
    netns: Vec<Netns>,
    children: Vec<Child>,
    /// Agents by instance name, with their pid: stopped with SIGTERM (they run with
    /// `--detach-on-exit`), then `egress-agent detach` if their pins are still there.
    agents: Vec<(String, u32)>,
    agent_bin: PathBuf,
    /// bpffs pins the bench made itself (the floor's map), removed at the end.
    pub pins: Vec<PathBuf>,
}

impl Sandbox {
    /// An empty sandbox; nothing is created yet.
    pub fn new(cgroup_root: PathBuf, agent_bin: PathBuf) -> Result<Self> {
        let prefix = format!("egress-bench-{}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            prefix,
            cgroup_root,
            dir,
            cgroups: Vec::new(),
            netns: Vec::new(),
            children: Vec::new(),
            agents: Vec::new(),
            agent_bin,
            pins: Vec::new(),
        })
    }

    /// `egress-bench-{pid}-{suffix}`.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// Creates the cgroup `egress-bench-{pid}-{suffix}` directly below the cgroup v2 root
    /// (level 1, which nftables' `socket cgroupv2 level 1` matches).
    pub fn cgroup(&mut self, suffix: &str) -> Result<PathBuf> {
        let path = self.cgroup_root.join(self.name(suffix));
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        self.cgroups.push(path.clone());
        Ok(path)
    }

    /// Creates the network namespace `egress-bench-{pid}-{suffix}` with `lo` up and `addrs`
    /// (documentation addresses, /32) on `lo`; returns its `/run/netns` path.
    pub fn netns(&mut self, suffix: &str, addrs: &[&str]) -> Result<PathBuf> {
        let netns = Netns::create(&self.name(suffix))?;
        let path = netns.path();
        self.netns.push(netns);
        for a in addrs {
            self.netns[self.netns.len() - 1].add_lo_address(&format!("{a}/32"))?;
        }
        Ok(path)
    }

    /// A command whose process joins `netns` and, if given, `cgroup` before `exec`.
    pub fn command(
        program: impl AsRef<std::ffi::OsStr>,
        netns: &Path,
        cgroup: Option<&Path>,
    ) -> Result<Command> {
        let procs = match cgroup {
            Some(cg) => {
                let p = cg.join("cgroup.procs");
                Some(Arc::new(
                    OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .with_context(|| format!("cannot open {}", p.display()))?,
                ))
            }
            None => None,
        };
        // The namespace first (egress_netns's own pre_exec step), then the cgroup.
        let mut cmd = egress_netns::command_in(netns, program)?;
        // SAFETY: between fork and exec the closure makes one raw syscall on a descriptor it
        // owns (through the Arc) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(p) = &procs
                    && libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Starts `cmd` (stdin, stdout piped) and keeps it to kill at the end.
    pub fn spawn(&mut self, mut cmd: Command, log: &str) -> Result<(u32, ChildStdin, ChildStdout)> {
        let log = File::create(self.dir.join(log))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let pid = child.id();
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        self.children.push(child);
        Ok((pid, stdin, stdout))
    }

    /// Starts `cmd` with its output in the log file `log`, and keeps it to kill at the end.
    pub fn spawn_daemon(&mut self, mut cmd: Command, log: &str) -> Result<u32> {
        let out = File::create(self.dir.join(log))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// A worker (`bench-worker`) in `netns` and `cgroup`.
    pub fn worker(
        &mut self,
        bin: &Path,
        netns: &Path,
        cgroup: Option<&Path>,
        label: &str,
    ) -> Result<Worker> {
        let cmd = Self::command(bin, netns, cgroup)?;
        let (_, stdin, stdout) = self.spawn(cmd, &format!("worker-{label}.log"))?;
        Ok(Worker {
            label: label.to_owned(),
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// Starts `egress-agent attach` on `cgroup` from inside `netns` (the agent itself stays
    /// outside the cgroup), and waits for its `ready` event. Returns its pid and how long
    /// it took to be ready.
    pub fn agent(
        &mut self,
        instance: &str,
        netns: &Path,
        cgroup: &Path,
        allowlist: &Path,
    ) -> Result<(u32, Duration, PathBuf)> {
        let events = self.dir.join(format!("{instance}.events.jsonl"));
        let mut cmd = Self::command(&self.agent_bin, netns, None)?;
        cmd.arg("attach")
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--allowlist")
            .arg(allowlist)
            .args(["--name", instance, "--detach-on-exit", "--events"])
            .arg(&events);
        let (pid, took) = self.until_ready(cmd, instance, &events, "attach")?;
        Ok((pid, took, events))
    }

    /// Starts `egress-agent run` of a `sleep` in `netns` (the agent makes its own cgroup),
    /// waiting for its ready event; stop it with [`Sandbox::stop_agent`].
    pub fn run_agent(&mut self, instance: &str, netns: &Path, allowlist: &Path) -> Result<u32> {
        let events = self.dir.join(format!("{instance}.events.jsonl"));
        let mut cmd = Self::command(&self.agent_bin, netns, None)?;
        cmd.arg("run")
            .arg("--allowlist")
            .arg(allowlist)
            .args(["--name", instance, "--events"])
            .arg(&events)
            .args(["--", "sleep", "600"]);
        Ok(self.until_ready(cmd, instance, &events, "run")?.0)
    }

    /// Spawns the agent `cmd` and waits for the ready event in `events`: its pid, and how
    /// long it took.
    fn until_ready(
        &mut self,
        cmd: Command,
        instance: &str,
        events: &Path,
        what: &str,
    ) -> Result<(u32, Duration)> {
        let start = Instant::now();
        let pid = self.spawn_daemon(cmd, &format!("{instance}.log"))?;
        self.agents.push((instance.to_owned(), pid));
        loop {
            let text = fs::read_to_string(events).unwrap_or_default();
            if text.contains(r#""event":"ready""#) {
                return Ok((pid, start.elapsed()));
            }
            if let Some(c) = self.children.iter_mut().find(|c| c.id() == pid)
                && let Ok(Some(status)) = c.try_wait()
            {
                let log = fs::read_to_string(self.dir.join(format!("{instance}.log")))
                    .unwrap_or_default();
                bail!("egress-agent {what} exited ({status}) before ready:\n{log}");
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("egress-agent {what} was not ready within 120 s");
            }
            crate::interrupt::check()?;
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent `instance` (SIGTERM; it detaches), waiting up to 10 s.
    pub fn stop_agent(&mut self, instance: &str) {
        let Some(i) = self.agents.iter().position(|(n, _)| n == instance) else {
            return;
        };
        let (name, pid) = self.agents.remove(i);
        self.stop_pid(pid);
        self.detach_leftover(&name);
    }

    fn stop_pid(&mut self, pid: u32) {
        let Some(i) = self.children.iter().position(|c| c.id() == pid) else {
            return;
        };
        let mut child = self.children.remove(i);
        // SAFETY: plain kill(2) of a child we started and have not reaped yet.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits (up to 15 s) for the child `pid` to exit; kills it after that.
    pub fn wait_pid(&mut self, pid: u32) {
        let Some(i) = self.children.iter().position(|c| c.id() == pid) else {
            return;
        };
        let mut child = self.children.remove(i);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn detach_leftover(&self, name: &str) {
        if Path::new("/sys/fs/bpf/egress").join(name).exists() {
            let _ = Command::new(&self.agent_bin)
                .args(["detach", "--name", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Never panics: this runs while unwinding from errors and after Ctrl-C.
        let agents = std::mem::take(&mut self.agents);
        for (name, pid) in agents {
            self.stop_pid(pid);
            self.detach_leftover(&name);
        }
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for cg in self.cgroups.drain(..).rev() {
            // Anything still inside (a worker's child) is killed first.
            let _ = fs::write(cg.join("cgroup.kill"), "1");
            let start = Instant::now();
            while fs::remove_dir(&cg).is_err() && start.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(20));
            }
            if cg.exists() {
                let _ = writeln!(
                    io::stderr(),
                    "xtask: warning: cgroup {} is left behind",
                    cg.display()
                );
            }
        }
        // Each deletes its namespace (and warns if it cannot).
        self.netns.clear();
        for pin in self.pins.drain(..) {
            let _ = fs::remove_file(pin);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running `bench-worker`: one command a line, one answer a line.
#[derive(Debug)]
pub struct Worker {
    /// For error messages.
    pub label: String,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Sends `command`, returns the answer's `key=value` pairs.
    pub fn ask(&mut self, command: &str) -> Result<Answer> {
        crate::interrupt::check()?;
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("worker {} is gone", self.label))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .with_context(|| format!("worker {} is gone", self.label))?;
        let line = line.trim();
        match line.strip_prefix("ok ") {
            Some(rest) => Ok(Answer(
                rest.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )),
            None => bail!("worker {}: `{command}`: {line}", self.label),
        }
    }
}

/// The `key=value` pairs of a worker's answer.
#[derive(Debug, Clone)]
pub struct Answer(Vec<(String, String)>);

impl Answer {
    /// The value of `key` as a number (0 when missing).
    pub fn f(&self, key: &str) -> f64 {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Listens inside `netns`, from threads of this process (so the listening sockets belong to
/// xtask's cgroup, not to the measured one): TCP on each `tcp` address, accepting and
/// dropping every connection, and a UDP socket on each `udp` address that nobody reads
/// (datagrams beyond its buffer are dropped by the kernel, the same on every side), and TCP on
/// each `sink` address, reading every connection to its end (a thread per connection).
pub fn listen(
    netns: &Path,
    tcp: &[SocketAddrV4],
    udp: &[SocketAddrV4],
    sink: &[SocketAddrV4],
) -> Result<()> {
    let netns = netns.to_path_buf();
    let (tcp, udp, sink) = (tcp.to_vec(), udp.to_vec(), sink.to_vec());
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    thread::Builder::new()
        .name("bench-listeners".into())
        .spawn(move || {
            if let Err(e) = egress_netns::enter(&netns) {
                let _ = tx.send(Err(e.into()));
                return;
            }
            let mut sockets = Vec::new();
            for a in &tcp {
                match bind_tcp(a) {
                    Ok(l) => {
                        thread::spawn(move || {
                            for s in l.incoming() {
                                drop(s);
                            }
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("cannot listen on {a}: {e}")));
                        return;
                    }
                }
            }
            for a in &sink {
                match bind_tcp(a) {
                    Ok(l) => {
                        thread::spawn(move || {
                            for mut s in l.incoming().flatten() {
                                thread::spawn(move || {
                                    let _ = io::copy(&mut s, &mut io::sink());
                                });
                            }
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("cannot listen on {a}: {e}")));
                        return;
                    }
                }
            }
            for a in &udp {
                match UdpSocket::bind(a) {
                    Ok(s) => sockets.push(s),
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("cannot bind {a}: {e}")));
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(()));
            // Keep the UDP sinks open for the life of the process.
            loop {
                thread::sleep(Duration::from_secs(3600));
                let _ = &sockets;
            }
        })
        .context("cannot start the listener thread")?;
    rx.recv().context("the listener thread ended")?
}

/// Accept queue of a bench listener: std's 128 overflowed a few hundred times per full run
/// (a 2,000-connect batch fills 128 in a few ms whenever the accept thread is not running), and
/// every overflow costs the connecting side a SYN retransmitted a second later. The worker's
/// namespace caps it at its own `net.core.somaxconn` (4096 by default).
const BACKLOG: libc::c_int = 4096;

/// A TCP listener on `a` with a [`BACKLOG`]-deep accept queue (`listen` again on a listening
/// socket only resizes its queue).
fn bind_tcp(a: &SocketAddrV4) -> io::Result<TcpListener> {
    let l = TcpListener::bind(a)?;
    // SAFETY: a listening socket this function owns.
    if unsafe { libc::listen(l.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l)
}

/// An IPv4 socket address.
pub fn sa(ip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.parse().unwrap_or(Ipv4Addr::LOCALHOST), port)
}
