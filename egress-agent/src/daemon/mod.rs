//! A session on one cgroup: the parts that enforce an allowlist for as long as the agent runs
//! (`bpf` programs and maps, the `dns` resolver, the event monitor, the health server, the
//! state files), each started in order and stopped in reverse; hot reload; `status`; and
//! `attach`, the daemon mode built on it.
//!
//! May use: `bpf`, `dns`, `policy`, `events`, `sys`.
//! May not touch: the command of `run` (that is `workload`, which starts a session) or the
//! CLI's rendering.

pub mod approvals;
pub mod attach;
pub mod control;
pub mod health;
pub mod lastgood;
pub mod monitor;
pub mod raw_watch;
pub mod reload;
pub mod session;
pub mod status;
pub mod throttle;
pub mod unix_watch;
