//! Test cgroups: children of the cgroup v2 mount that this process creates and removes.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::unique_name;

/// The cgroup v2 mount point, from `/proc/mounts` (hybrid hosts mount it at
/// `/sys/fs/cgroup/unified`, so it is never assumed): the agent's own discovery.
pub fn cgroup2_mount() -> PathBuf {
    egress_agent::sys::cgroup::cgroup2_mount()
        .unwrap_or_else(|e| panic!("{e:#}: the tests need cgroup v2"))
}

/// A cgroup `egress-test-{pid}-{n}` directly under the cgroup v2 mount. Dropping it kills
/// whatever is left in it and removes it.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates a fresh cgroup; panics if it cannot.
    pub fn new() -> Self {
        crate::require_root();
        let path = cgroup2_mount().join(unique_name());
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create test cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// A cgroup `name` below this one; panics if it cannot. Bind it after this one, so that it
    /// is dropped (and removed) first.
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create test cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup v2 id: the inode number of its directory (what `bpf_get_current_cgroup_id`
    /// reports for its members).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", self.path.display()))
            .ino()
    }

    /// The pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.path)
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.path) {
            eprintln!("warning: {e}");
        }
    }
}

fn read_pids(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in `cgroup`, then removes it, retrying while the killed tasks exit.
/// Only for cgroups the tests created, or that an agent they started created. Never panics:
/// it runs in `Drop`, maybe while unwinding.
pub fn remove_cgroup(cgroup: &Path) -> Result<(), String> {
    if !cgroup.exists() {
        return Ok(());
    }
    // The agent's own emptying (cgroup.kill, else SIGKILL each member): a failure here is
    // retried below.
    let _ = egress_agent::sys::cgroup::kill_all(cgroup);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed tasks are still exiting.
            Err(_) if Instant::now() < deadline => {
                for pid in read_pids(cgroup) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("cannot remove cgroup {}: {e}", cgroup.display())),
        }
    }
}
