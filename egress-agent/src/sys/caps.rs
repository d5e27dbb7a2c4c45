//! The capabilities the agent needs to load and attach its programs, checked before trying,
//! so a missing one gets a clear message instead of a verifier log.
//!
//! Measured (kernel 6.18): CAP_BPF (maps, program load), CAP_NET_ADMIN (cgroup socket program
//! types and attaching them), CAP_PERFMON (the verifier allows the pointer arithmetic of the
//! port-range loop only with it). CAP_SYS_ADMIN covers all three. Mounting a missing bpffs at
//! /sys/fs/bpf also needs CAP_SYS_ADMIN (a Kubernetes hostPath mount avoids that).

use anyhow::bail;

/// (capability number, name, what it is for).
pub const REQUIRED: [(u32, &str, &str); 3] = [
    (39, "CAP_BPF", "create maps and load programs"),
    (
        12,
        "CAP_NET_ADMIN",
        "load and attach cgroup socket programs",
    ),
    (
        38,
        "CAP_PERFMON",
        "let the verifier accept the port-range check",
    ),
];

const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability set of this process (from /proc/self/status).
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The required capabilities `eff` lacks (none when it has CAP_SYS_ADMIN).
pub fn missing(eff: u64) -> Vec<&'static str> {
    if eff & (1 << CAP_SYS_ADMIN) != 0 {
        return Vec::new();
    }
    REQUIRED
        .iter()
        .filter(|(n, _, _)| eff & (1 << n) == 0)
        .map(|(_, name, _)| *name)
        .collect()
}

/// Fails with a message naming each missing capability and what it is for.
pub fn check() -> anyhow::Result<()> {
    let lacking = missing(effective());
    if lacking.is_empty() {
        return Ok(());
    }
    let why: Vec<String> = REQUIRED
        .iter()
        .filter(|(_, n, _)| lacking.contains(n))
        .map(|(_, n, what)| format!("{n} ({what})"))
        .collect();
    bail!(
        "missing capabilities: {}; the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (or CAP_SYS_ADMIN)",
        why.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_or_sys_admin_suffice() {
        let three = (1 << 39) | (1 << 12) | (1 << 38);
        assert!(missing(three).is_empty());
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
        assert_eq!(missing((1 << 39) | (1 << 12)), vec!["CAP_PERFMON"]);
        assert_eq!(missing(0).len(), 3);
    }
}
