//! podman, configured only through files in the e2e's private directory and the environment
//! variables that point at them (`CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF`,
//! `CONTAINERS_REGISTRIES_CONF`): its image store, state and events live there too, so the
//! machine's own podman configuration and images are never read or changed, and removing the
//! directory removes everything the e2e stored.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// podman with a private configuration under `dir`.
#[derive(Debug)]
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Writes the configuration files into `dir` (which exists and is empty).
    ///
    /// What this machine needed (shared research, sidecar-e2e-findings): `cgroup_manager =
    /// "cgroupfs"` (no systemd), `runtime = "runc"` (crun refuses a hybrid cgroup layout),
    /// `default_ulimits` no higher than our own hard limits (the containers hold no
    /// CAP_SYS_RESOURCE to raise them), and an infra image of our own (no registry to pull
    /// the pause image from).
    pub fn setup(dir: &Path, infra_image: &str) -> Result<Self> {
        let nofile = hard_limit(libc::RLIMIT_NOFILE).min(1 << 20);
        let nproc = hard_limit(libc::RLIMIT_NPROC).min(32768);
        let d = dir.display();
        write(
            &dir.join("containers.conf"),
            &format!(
                "[containers]\n\
                 default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
                 netns = \"none\"\n\
                 [engine]\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\n\
                 runtime = \"runc\"\n\
                 infra_image = \"{infra_image}\"\n\
                 tmp_dir = \"{d}/tmp\"\n\
                 volume_path = \"{d}/volumes\"\n"
            ),
        )?;
        write(
            &dir.join("storage.conf"),
            // vfs: no overlay mounts to leave behind, and it works on any filesystem.
            &format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/storage\"\nrunroot = \"{d}/run\"\n"
            ),
        )?;
        // No registries: every image is built here.
        write(
            &dir.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// `podman ARGS`, with the private configuration.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            );
        cmd
    }

    /// Runs `podman ARGS`; its stdout, trimmed; an error with what it printed otherwise.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::null());
        let shown = shown(args);
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {shown}"))?;
        if !out.status.success() {
            bail!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `podman logs NAME`: stdout and stderr together.
    pub fn logs(&self, name: &str) -> String {
        let mut cmd = self.command();
        cmd.args(["logs", name]).stdin(Stdio::null());
        match cmd.output() {
            Ok(o) => {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s
            }
            Err(e) => format!("(cannot run podman logs {name}: {e})"),
        }
    }

    /// Imports the directory `root` as image `name` (`tar | podman import`), with
    /// Containerfile-style `changes` (`ENTRYPOINT [...]`, `USER 0:0`).
    pub fn import(&self, root: &Path, name: &str, changes: &[&str]) -> Result<()> {
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(root)
            .args(["--numeric-owner", "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run tar")?;
        let mut import = self.command();
        import.arg("import");
        for c in changes {
            import.args(["--change", c]);
        }
        let out = import
            .args(["-", name])
            .stdin(tar.stdout.take().context("no tar stdout")?)
            .output()
            .context("cannot run podman import")?;
        let tar_status = tar.wait()?;
        if !out.status.success() || !tar_status.success() {
            bail!(
                "podman import of {} as {name} failed: {}",
                root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Removes every pod and image of this store, then unmounts what is still mounted below
    /// the directory and removes it. Never panics; says what it could not remove.
    pub fn destroy(&self) {
        for args in [
            &["pod", "rm", "--all", "--force", "--time", "0"][..],
            &["rm", "--all", "--force", "--time", "0"][..],
            &["rmi", "--all", "--force"][..],
        ] {
            if let Err(e) = self.run(args) {
                eprintln!("warning: {e:#}");
            }
        }
        for mount in mounts_below(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: {} is left behind: {e}", self.dir.display());
        }
    }
}

fn shown<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let mut s = String::from("podman");
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

fn write(path: &Path, text: &str) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and touches nothing else.
    if unsafe { libc::getrlimit(resource, &raw mut r) } != 0 {
        return 1024;
    }
    r.rlim_max
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mounts).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}
