//! Linux facts several rooms need, each implemented once: where cgroup v2 is mounted and a
//! cgroup's id, creating, emptying and removing a cgroup, capabilities (numbers, names, the
//! process's effective set).
//!
//! May use: nothing else of the crate.

pub mod caps;
pub mod cgroup;
pub mod sockdiag;
pub mod unix;
