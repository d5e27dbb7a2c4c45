//! The kernel side, seen from userspace: loading the eBPF object, attaching its programs to a
//! cgroup, pinning and adopting programs, links and maps under the bpffs, writing map
//! entries, reading counters and the event ring, and the kernel feature probes that decide
//! what can be loaded.
//!
//! Owns: every `aya` call and every bpf(2) object of a session.
//! May use: `policy` (compiled map entries), `events` (the raw deny record), `sys`.
//! May not touch: DNS, the command's process, the CLI, the session's other parts. Nothing
//! here decides a verdict: the programs do, from what `policy` compiled.

pub mod btf;
pub mod copies;
pub mod enforcer;
pub mod kernel;
pub mod name_bind;
pub mod rules;
pub mod stale;
pub mod trace;
pub mod unix;
