//! The e2e's images, built from files of this machine with no registry (`tar | podman
//! import`):
//! - the agent: the release binary, the shared libraries `ldd` names (what distroless
//!   `cc-debian12` provides), and a passwd with root and nonroot (65532), as distroless has;
//! - the app: busybox (sh, wget, timeout, sleep; its `wget -T` crashes, hence timeout) and python3 with its standard library, for the probe
//!   (`probe.py`); the stand-in for the manifest's curl image;
//! - the pod's infra ("pause") container: busybox sleeping.

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::podman::Podman;

pub const AGENT_IMAGE: &str = "localhost/egress-agent:e2e";
pub const APP_IMAGE: &str = "localhost/egress-e2e-app:e2e";
pub const PAUSE_IMAGE: &str = "localhost/egress-e2e-pause:e2e";
/// The infra container's command, in the pause image.
pub const PAUSE_COMMAND: &str = "/pause";

const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";
const BUSYBOX: &str = "/bin/busybox";
const PYTHON: &str = "/usr/bin/python3";

/// Builds the three images from `agent` (the release binary), staging them under `dir`.
pub fn build(podman: &Podman, dir: &Path, agent: &Path) -> Result<()> {
    let root = dir.join("agent");
    copy_with_libs(agent, &root, Path::new("/usr/local/bin/egress-agent"))?;
    etc(&root)?;
    podman.import(
        &root,
        AGENT_IMAGE,
        &[
            "ENTRYPOINT [\"/usr/local/bin/egress-agent\"]",
            "CMD [\"--help\"]",
            "USER 0:0",
        ],
    )?;

    let root = dir.join("pause");
    busybox(&root, &["sh", "sleep"])?;
    let pause = root.join(PAUSE_COMMAND.trim_start_matches('/'));
    fs::write(&pause, "#!/bin/sh\nexec /bin/sleep 2147483647\n")?;
    fs::set_permissions(&pause, fs::Permissions::from_mode(0o755))?;
    podman.import(&root, PAUSE_IMAGE, &[])?;

    let root = dir.join("app");
    busybox(&root, &["sh", "wget", "timeout", "sleep", "cat"])?;
    etc(&root)?;
    let python = fs::canonicalize(PYTHON).with_context(|| format!("{PYTHON} is missing"))?;
    copy_with_libs(&python, &root, Path::new(PYTHON))?;
    let stdlib = python_stdlib(&python)?;
    let into = root.join(stdlib.parent().context("no parent")?.strip_prefix("/")?);
    fs::create_dir_all(&into)?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(&stdlib)
        .arg(&into)
        .status()?;
    if !status.success() {
        bail!("cannot copy {}", stdlib.display());
    }
    for big in [
        "test",
        "idlelib",
        "tkinter",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
    ] {
        let _ = fs::remove_dir_all(root.join(stdlib.strip_prefix("/")?).join(big));
    }
    let probe = root.join("usr/local/bin/probe");
    fs::create_dir_all(probe.parent().context("no parent")?)?;
    fs::write(
        &probe,
        format!("#!{PYTHON} -I\n{}", include_str!("probe.py")),
    )?;
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o755))?;
    fs::create_dir_all(root.join("tmp"))?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    podman.import(&root, APP_IMAGE, &["USER 65532:65532"])
}

/// `/etc/passwd` and `/etc/group` with root and nonroot.
fn etc(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("etc"))?;
    fs::write(root.join("etc/passwd"), PASSWD)?;
    fs::write(root.join("etc/group"), GROUP)?;
    Ok(())
}

/// busybox (static) at /bin/busybox, and `/bin/<applet>` links to it.
fn busybox(root: &Path, applets: &[&str]) -> Result<()> {
    let bin = root.join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(BUSYBOX, bin.join("busybox"))
        .with_context(|| format!("cannot copy {BUSYBOX} (Debian package busybox-static)"))?;
    for applet in applets {
        symlink("busybox", bin.join(applet))?;
    }
    Ok(())
}

/// Copies `bin` to `root/at` and every library `ldd` lists to its own path under `root`.
fn copy_with_libs(bin: &Path, root: &Path, at: &Path) -> Result<()> {
    let dest = root.join(at.strip_prefix("/")?);
    fs::create_dir_all(dest.parent().context("no parent")?)?;
    fs::copy(bin, &dest).with_context(|| format!("cannot copy {}", bin.display()))?;
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd")?;
    for lib in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        fs::create_dir_all(to.parent().context("no parent")?)?;
        fs::copy(lib, &to).with_context(|| format!("cannot copy {lib}"))?;
    }
    Ok(())
}

/// `/usr/lib/python3.X` of the interpreter `python` (`/usr/bin/python3.X`).
fn python_stdlib(python: &Path) -> Result<PathBuf> {
    let name = python
        .file_name()
        .and_then(|n| n.to_str())
        .context("python has no name")?;
    let dir = Path::new("/usr/lib").join(name);
    if !dir.join("os.py").is_file() {
        bail!("no Python standard library at {}", dir.display());
    }
    Ok(dir)
}
