//! Unix sockets as `/proc` shows them: the `/proc/net/unix` table and the sockets processes
//! hold.

use std::{collections::BTreeSet, fs, path::Path};

/// The socket inode and name column of each socket in a `/proc/net/unix` table (`Num
/// RefCount Protocol Flags Type St Inode Path`: what follows the seventh field, which may
/// hold spaces; an abstract name starts with `@`).
pub fn named_sockets(table: &str) -> impl Iterator<Item = (u64, &str)> {
    table.lines().skip(1).filter_map(|line| {
        let mut rest = line.trim_start();
        let mut inode = 0;
        for i in 0..7 {
            let end = rest.find(char::is_whitespace)?;
            if i == 6 {
                inode = rest[..end].parse().unwrap_or(0);
            }
            rest = rest[end..].trim_start();
        }
        Some((inode, rest))
    })
}

/// The socket inodes the processes `pids` hold (`socket:[INODE]` in `/proc/PID/fd`).
pub fn held_sockets<'a>(pids: impl IntoIterator<Item = &'a str>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(|e| e.ok()) {
            if let Ok(link) = fs::read_link(fd.path())
                && let Some(n) = link
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
            {
                out.insert(n);
            }
        }
    }
    out
}

/// The processes of `cgroup` and of every cgroup below it.
pub fn cgroup_tree_pids(cgroup: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(p) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(p.split_whitespace().map(str::to_owned));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            dirs.extend(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    out
}
