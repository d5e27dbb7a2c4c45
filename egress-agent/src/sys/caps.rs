//! The capabilities the agent needs to load and attach its programs, checked before trying,
//! so a missing one gets a clear message instead of a verifier log.
//!
//! Measured (kernel 6.18): CAP_BPF (maps, program load), CAP_NET_ADMIN (cgroup socket program
//! types and attaching them), CAP_PERFMON (the verifier allows the pointer arithmetic of the
//! port-range loop only with it). CAP_SYS_ADMIN covers all three. Mounting a missing bpffs at
//! /sys/fs/bpf also needs CAP_SYS_ADMIN (a Kubernetes hostPath mount avoids that).

use anyhow::bail;

/// A Linux capability, by number; the ones this product deals with have names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Capability(pub u32);

impl Capability {
    /// `CAP_NET_ADMIN`.
    pub const NET_ADMIN: Self = Self(12);
    /// `CAP_NET_RAW`.
    pub const NET_RAW: Self = Self(13);
    /// `CAP_SYS_MODULE`.
    pub const SYS_MODULE: Self = Self(16);
    /// `CAP_SYS_RAWIO`.
    pub const SYS_RAWIO: Self = Self(17);
    /// `CAP_SYS_PTRACE`.
    pub const SYS_PTRACE: Self = Self(19);
    /// `CAP_SYS_ADMIN`.
    pub const SYS_ADMIN: Self = Self(21);
    /// `CAP_PERFMON`.
    pub const PERFMON: Self = Self(38);
    /// `CAP_BPF`.
    pub const BPF: Self = Self(39);

    /// Every named one, with its name without the `CAP_` prefix.
    pub const NAMED: [(Self, &'static str); 8] = [
        (Self::NET_ADMIN, "NET_ADMIN"),
        (Self::NET_RAW, "NET_RAW"),
        (Self::SYS_MODULE, "SYS_MODULE"),
        (Self::SYS_RAWIO, "SYS_RAWIO"),
        (Self::SYS_PTRACE, "SYS_PTRACE"),
        (Self::SYS_ADMIN, "SYS_ADMIN"),
        (Self::PERFMON, "PERFMON"),
        (Self::BPF, "BPF"),
    ];

    /// The name without the `CAP_` prefix (the number for an unnamed one).
    pub fn name(self) -> String {
        Self::NAMED
            .iter()
            .find(|(c, _)| *c == self)
            .map_or_else(|| self.0.to_string(), |(_, n)| (*n).to_owned())
    }

    /// Its bit in a capability set.
    pub fn bit(self) -> u64 {
        1 << self.0
    }
}

impl std::str::FromStr for Capability {
    type Err = String;

    /// `CAP_NET_RAW`, `net_raw`: one of [`Capability::NAMED`].
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        Self::NAMED
            .iter()
            .find(|(_, n)| *n == bare)
            .map(|(c, _)| *c)
            .ok_or_else(|| {
                let names: Vec<_> = Self::NAMED
                    .iter()
                    .map(|(_, n)| format!("CAP_{n}"))
                    .collect();
                format!(
                    "{s:?} is not a capability that confinement drops (one of {})",
                    names.join(", ")
                )
            })
    }
}

/// What the agent needs each for.
pub const REQUIRED: [(Capability, &str); 3] = [
    (Capability::BPF, "create maps and load programs"),
    (
        Capability::NET_ADMIN,
        "load and attach cgroup socket programs",
    ),
    (
        Capability::PERFMON,
        "let the verifier accept the port-range check",
    ),
];

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
pub fn missing(eff: u64) -> Vec<String> {
    if eff & Capability::SYS_ADMIN.bit() != 0 {
        return Vec::new();
    }
    REQUIRED
        .iter()
        .filter(|(c, _)| eff & c.bit() == 0)
        .map(|(c, _)| format!("CAP_{}", c.name()))
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
        .map(|(c, what)| (format!("CAP_{}", c.name()), what))
        .filter(|(n, _)| lacking.contains(n))
        .map(|(n, what)| format!("{n} ({what})"))
        .collect();
    bail!(
        "missing capabilities: {}; the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (or CAP_SYS_ADMIN)",
        why.join(", ")
    )
}

/// Why `bpf()` said EPERM although [`check`] found the capabilities: the error `e` (of
/// loading the maps or programs) with a sentence added that names the cause, when it is an
/// EPERM. Container runtimes' default seccomp profiles (podman's and CRI-O's, from
/// containers-common) allow `bpf()` only to holders of CAP_SYS_ADMIN, and the kernel's
/// refusal then reads exactly like a missing capability.
pub fn explain_bpf_eperm(e: anyhow::Error) -> anyhow::Error {
    let eperm = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    }) || format!("{e:#}").contains("Operation not permitted");
    if !eperm || !missing(effective()).is_empty() {
        return e;
    }
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim() == "2")
        })
        .unwrap_or(false);
    let hint = if seccomp {
        "bpf() was refused (EPERM) although this process holds CAP_BPF, CAP_NET_ADMIN and \
         CAP_PERFMON, and a seccomp filter is active: the container runtime's default seccomp \
         profile allows bpf() only with CAP_SYS_ADMIN (podman, CRI-O). Give this container a \
         seccomp profile that allows bpf() (deploy/seccomp/egress-agent.json, as a Localhost \
         profile), not CAP_SYS_ADMIN"
    } else {
        "bpf() was refused (EPERM) although this process holds CAP_BPF, CAP_NET_ADMIN and \
         CAP_PERFMON, and no seccomp filter is active: a security module or kernel lockdown \
         refuses it, or the process runs in a user namespace (its capabilities do not reach \
         bpf())"
    };
    e.context(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_or_sys_admin_suffice() {
        let three = (1 << 39) | (1 << 12) | (1 << 38);
        assert!(missing(three).is_empty());
        assert!(missing(Capability::SYS_ADMIN.bit()).is_empty());
        assert_eq!(missing((1 << 39) | (1 << 12)), vec!["CAP_PERFMON"]);
        assert_eq!(missing(0).len(), 3);
    }
}
