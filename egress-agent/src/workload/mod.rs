//! `run`: the command under enforcement. Its cgroup, its confinement (namespaces, mounts,
//! capabilities, seccomp), starting it as the invoking user, forwarding signals, teardown at
//! exit, and `learn` (an allowlist written from what an audit run saw).
//!
//! May use: `daemon` (a `run` is a session on the command's cgroup), `policy`, `events`,
//! `sys`.
//! May not touch: `bpf` or `dns` directly: the session owns them.

pub mod confine;
pub mod deputies;
pub mod launch;
pub mod learn;
pub mod persistence;
pub mod pty;
pub mod run;
pub mod seccomp;
