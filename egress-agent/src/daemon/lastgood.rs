//! The last valid policy, kept beside the pins' state (`/run/egress/<name>/last-valid.json`,
//! removed with the pins by `detach`): the text of every file it was read from. An agent
//! restarted while its allowlist file is invalid adopts the pinned state and runs under this
//! policy (enforcing, answering DNS) until the file is valid again.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{daemon::status, policy::Policy};

/// The saved files.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// The root file, as the agent was given it.
    root: PathBuf,
    /// Each file: its path as the policy names it, its absolute form, its text.
    files: Vec<(PathBuf, PathBuf, String)>,
}

/// Where the last valid policy of `name` is kept.
pub fn path(name: &str) -> PathBuf {
    Path::new(status::STATE_DIR)
        .join(name)
        .join("last-valid.json")
}

/// Keeps `policy` (read from `root`) as the last valid one of `name`. The files are read
/// again, so they are parsed back and compared: a file that changed since `policy` was read
/// is not kept (the next reload keeps the newer one).
pub fn save(name: &str, root: &Path, policy: &Policy) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for f in &policy.files {
        let text = fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let abs = std::path::absolute(f).with_context(|| format!("no path for {}", f.display()))?;
        files.push((f.clone(), abs, text));
    }
    let saved = Saved {
        root: root.to_owned(),
        files,
    };
    let back = restore(name, &saved).context("the saved files do not read back")?;
    if back.rules != policy.rules || back.mode != policy.mode || back.dns != policy.dns {
        bail!("the allowlist changed while it was being saved");
    }
    status::write_file(&path(name), &serde_json::to_vec(&saved)?)
}

/// The last valid policy of `name`, if one was kept.
pub fn load(name: &str) -> anyhow::Result<Policy> {
    let bytes = fs::read(path(name)).context("no last valid policy is kept")?;
    let saved: Saved = serde_json::from_slice(&bytes).context("the kept policy is unreadable")?;
    restore(name, &saved)
}

/// Parses `saved` from a mirror of its files (their absolute paths under a scratch
/// directory, so includes resolve as they did), naming the original paths in the result.
fn restore(name: &str, saved: &Saved) -> anyhow::Result<Policy> {
    let scratch = Path::new(status::STATE_DIR)
        .join(name)
        .join(format!("last-valid.{}.d", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    let mirror = |abs: &Path| scratch.join(abs.strip_prefix("/").unwrap_or(abs));
    let parsed = (|| {
        for (_, abs, text) in &saved.files {
            let at = mirror(abs);
            if let Some(dir) = at.parent() {
                fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            fs::write(&at, text).with_context(|| format!("cannot write {}", at.display()))?;
        }
        // The root is read first, so it is the first file.
        let root = &saved.files.first().context("no files kept")?.1;
        anyhow::Ok(crate::policy::load(&mirror(root))?)
    })();
    let _ = fs::remove_dir_all(&scratch);
    let mut policy = parsed?;
    let original = |p: &Path| -> PathBuf {
        saved
            .files
            .iter()
            .find(|(_, abs, _)| mirror(abs) == p)
            .map_or_else(|| p.to_owned(), |(orig, _, _)| orig.clone())
    };
    policy.files = policy.files.iter().map(|f| original(f)).collect();
    for r in &mut policy.rules {
        r.origin.file = original(&r.origin.file);
    }
    Ok(policy)
}
