//! The kernel range: Linux 5.8 or newer (BPF ring buffer, `bpf_ktime_get_boot_ns`, cgroup
//! `getpeername` hooks, cgroup `bpf_link`). Checked at start so an older kernel gets a clear
//! message instead of an obscure load error.

use anyhow::bail;

/// The oldest kernel the programs are built for.
pub const MINIMUM: (u32, u32) = (5, 8);

/// `(major, minor)` from a release string like `6.18.44-fc-v657`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails on kernels older than [`MINIMUM`].
pub fn check() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match parse_release(&release) {
        Some(v) if v < MINIMUM => bail!(
            "this kernel is {} but egress needs Linux {}.{} or newer (BPF ring buffer, \
             bpf_ktime_get_boot_ns, cgroup getpeername hooks)",
            release.trim(),
            MINIMUM.0,
            MINIMUM.1
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_and_compare() {
        assert_eq!(parse_release("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_release("5.4.0").unwrap() < MINIMUM);
        assert!(parse_release("5.8").unwrap() >= MINIMUM);
        assert_eq!(parse_release("garbage"), None);
    }
}
