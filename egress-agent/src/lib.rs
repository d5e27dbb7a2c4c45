//! egress-agent as a library: the CLI in `main.rs` is a thin layer over these modules.

pub mod attach;
pub mod caps;
pub mod cgroup;
pub mod cli;
pub mod confine;
pub mod enforcer;
pub mod events;
pub mod explain;
pub mod grants;
pub mod health;
pub mod kernel;
pub mod launch;
pub mod learn;
pub mod metrics;
pub mod monitor;
pub mod names;
pub mod policy;
pub mod reload;
pub mod resolver;
pub mod run;
pub mod schema;
pub mod seccomp;
pub mod session;
pub mod status;
pub mod throttle;
pub mod trace;
