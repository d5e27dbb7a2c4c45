//! Where a filesystem type is mounted, read from a `/proc/mounts` text: the one
//! implementation the agent, the tests and xtask share (cgroup v2 sits at `/sys/fs/cgroup` or,
//! in a hybrid layout, `/sys/fs/cgroup/unified`: it is found, never assumed). Userspace only
//! (`std` feature).

use std::{string::String, vec::Vec};

/// The mount point of the first mount of `fstype` in `mounts` (the text of `/proc/mounts`).
pub fn find(mounts: &str, fstype: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| unescape(target))
    })
}

/// Where cgroup v2 is mounted in this mount namespace, from `/proc/mounts`.
pub fn cgroup2() -> std::io::Result<Option<std::path::PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    Ok(find(&mounts, "cgroup2").map(std::path::PathBuf::from))
}

/// `/proc/mounts` and `mountinfo` escape space, tab, newline and backslash as octal (`\040`).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .and_then(|digits| core::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mount_and_unescapes_it() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            find(mounts, "cgroup2").as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(find("proc /proc proc rw 0 0\n", "cgroup2"), None);
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        // Not an octal byte: kept as written.
        assert_eq!(unescape(r"/x\777\0"), r"/x\777\0");
    }
}
