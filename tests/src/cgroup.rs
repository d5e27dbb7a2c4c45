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
/// `/sys/fs/cgroup/unified`, so it is never assumed).
pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("cannot read /proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .expect("no cgroup2 filesystem in /proc/mounts: the tests need cgroup v2")
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
    let kill = cgroup.join("cgroup.kill");
    if !(kill.exists() && fs::write(&kill, "1").is_ok()) {
        for pid in read_pids(cgroup) {
            // SAFETY: plain syscall; the pid is a member of a cgroup this process created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
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

#[cfg(test)]
mod tests {
    use super::unescape_mount_path;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/mnt/trailing\\"), "/mnt/trailing\\");
    }
}
