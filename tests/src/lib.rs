//! Harness for the egress kernel tests: every test builds its own sandbox and tears it down,
//! panicking or not.
//!
//! - [`TestCgroup`]: a child cgroup `egress-test-{pid}-{n}` of the cgroup v2 mount; programs
//!   are only ever attached to one of these, never to the root or a cgroup we did not create.
//! - [`TestNetns`]: a network namespace of our own holding only `lo`. Every connect the tests
//!   make goes from inside one, so even if enforcement failed, a packet to a "remote" address
//!   could not leave (it would fail with `ENETUNREACH`, not `EPERM`).
//! - [`TcpListener`], [`UdpListener`]: loopback servers inside a namespace that record what
//!   reached them.
//! - [`Probe`]: runs the `egress-probe` binary inside a namespace, optionally inside a
//!   cgroup, and returns what its connect or send did.
//! - [`AgentRun`]: the real `egress-agent run` binary started inside a namespace and driven
//!   from outside (events file, output, exit status).
//!
//! The tests need root and run with one test thread (kernel state is shared):
//! `cargo build -p egress-agent && cargo test -p egress-tests -- --test-threads=1`.

pub mod agent;
mod cgroup;
mod listener;
mod netns;
pub mod pod;
mod probe;
pub mod upstream;
pub mod world;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

pub use agent::{AgentBuilder, AgentRun};
pub use cgroup::{TestCgroup, cgroup2_mount, remove_cgroup};
pub use listener::{TcpListener, UdpListener};
pub use netns::TestNetns;
pub use probe::{Outcome, Probe, Unfinished};

/// Counter behind the unique sandbox names `egress-test-{pid}-{n}`.
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A fresh name `egress-test-{pid}-{n}` for a cgroup or network namespace.
pub fn unique_name() -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("egress-test-{}-{n}", std::process::id())
}

/// Panics unless the tests run as root (they create cgroups and namespaces and load eBPF).
pub fn require_root() {
    // SAFETY: no arguments.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the egress kernel tests need root: sudo -E cargo test -p egress-tests -- --test-threads=1"
    );
}

/// A directory `egress-test-{pid}-{n}` under the temp dir, removed with its contents on drop.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    /// Creates the directory; panics if it cannot.
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique_name());
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of the first `KEY=VALUE` line of `out` (how test commands report).
pub fn value(out: &str, key: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix('='))
            .map(str::to_owned)
    })
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `target/<profile>`: the directory holding the workspace's binaries. A test executable
/// lives in its `deps/` subdirectory.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the running test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has a parent directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The real `egress-agent` binary, next to the test executables. Cargo does not build
/// another package's binary for these tests, so it must be built first.
pub fn agent_bin() -> PathBuf {
    let path = target_profile_dir().join("egress-agent");
    assert!(
        path.is_file(),
        "{} is missing: build it first: cargo build -p egress-agent",
        path.display()
    );
    path
}

/// The `egress-probe` binary of this package (cargo builds it for the integration tests).
pub fn probe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_egress-probe") {
        return PathBuf::from(p);
    }
    let path = target_profile_dir().join("egress-probe");
    assert!(
        path.is_file(),
        "{} is missing: cargo test -p egress-tests builds it",
        path.display()
    );
    path
}
