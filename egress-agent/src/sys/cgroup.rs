//! cgroup v2: finding the mount, creating the enforced cgroup, emptying and removing it.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The mount point of the cgroup v2 hierarchy, read from `/proc/mounts` (it is not always
/// `/sys/fs/cgroup`: hybrid systems mount it at `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    match egress_common::mounts::cgroup2().context("cannot read /proc/mounts")? {
        Some(mount) => Ok(mount),
        None => bail!(
            "no cgroup v2 hierarchy is mounted in this mount namespace (no cgroup2 in \
             /proc/mounts); note that `ip netns exec` remounts /sys without it: enter a network \
             namespace with `nsenter --net=/run/netns/NAME` instead"
        ),
    }
}

/// The cgroup v2 id of a cgroup directory: its inode number (what `bpf_get_current_cgroup_id`
/// returns for tasks in it).
pub fn cgroup_id(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot stat cgroup {}", path.display()))?
        .ino())
}

/// A cgroup this process created; [`OwnedCgroup::remove`] kills what is left in it and
/// removes it.
#[derive(Debug)]
pub struct OwnedCgroup {
    path: PathBuf,
    removed: bool,
}

impl OwnedCgroup {
    /// Creates `<cgroup2 mount>/<name>`. Fails if it exists: a cgroup we did not create is
    /// never adopted (it may hold someone else's processes).
    pub fn create(name: &str) -> anyhow::Result<Self> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("invalid cgroup name {name:?}");
        }
        let path = cgroup2_mount()?.join(name);
        fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills every process left in the cgroup (its command may have left children behind:
    /// they must not outlive enforcement), then removes the directory.
    pub fn remove(&mut self) -> anyhow::Result<()> {
        if self.removed {
            return Ok(());
        }
        kill_all(&self.path)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // EBUSY while the killed tasks are still exiting.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("cgroup {} not yet empty: {e}", self.path.display());
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot remove cgroup {}", self.path.display()));
                }
            }
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for OwnedCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!("{e:#}");
        }
    }
}

/// SIGKILLs every process in the cgroup: through `cgroup.kill` (kernel >= 5.14), else one
/// pid at a time until `cgroup.procs` stays empty.
pub fn kill_all(path: &Path) -> anyhow::Result<()> {
    let kill = path.join("cgroup.kill");
    if kill.exists() && fs::write(&kill, "1").is_ok() {
        return Ok(());
    }
    let procs = path.join("cgroup.procs");
    for _ in 0..100 {
        let text = match fs::read_to_string(&procs) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", procs.display())),
        };
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            // SAFETY: plain syscall; the pid was read from this cgroup's own member list.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(10));
    }
    bail!("processes keep appearing in {}", path.display())
}

/// Waits until no process is left in the cgroup (the killed ones exit asynchronously), for
/// at most `timeout`.
pub fn wait_empty(path: &Path, timeout: Duration) {
    let procs = path.join("cgroup.procs");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match fs::read_to_string(&procs) {
            Ok(t) if !t.trim().is_empty() => thread::sleep(Duration::from_millis(5)),
            _ => return,
        }
    }
}

/// The cgroup ids of an enforced cgroup and every cgroup below it: whether a deny's task
/// belongs to the workload, or is a kernel worker acting for one of its sockets (an MPTCP
/// subflow opened by the path manager runs the connect hook in a kworker, in the root
/// cgroup). Rescanned at most once a second, when an id is not known yet.
#[derive(Debug)]
pub struct Subtree {
    root: PathBuf,
    root_id: u64,
    ids: std::collections::HashSet<u64>,
    scanned: Option<Instant>,
}

impl Subtree {
    /// The subtree at `root` (read now).
    pub fn new(root: &Path) -> Self {
        let root_id = fs::metadata(root).map_or(0, |m| m.ino());
        let mut s = Self {
            root: root.to_owned(),
            root_id,
            ids: std::collections::HashSet::new(),
            scanned: None,
        };
        s.scan();
        s
    }

    /// The enforced cgroup's own id.
    pub fn root_id(&self) -> u64 {
        self.root_id
    }

    /// Whether `id` is the enforced cgroup or one below it.
    pub fn contains(&mut self, id: u64) -> bool {
        if id == self.root_id || self.ids.contains(&id) {
            return true;
        }
        if self
            .scanned
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.scan();
        }
        self.ids.contains(&id)
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        let mut stack = vec![self.root.clone()];
        // Bounded: a workload can make cgroups below its own only if delegated; 4096 is plenty.
        while let Some(dir) = stack.pop() {
            if self.ids.len() >= 4096 {
                break;
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    if let Ok(m) = e.metadata() {
                        self.ids.insert(m.ino());
                    }
                    stack.push(e.path());
                }
            }
        }
    }
}
