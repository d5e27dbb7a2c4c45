//! egress-agent as a library: the CLI in `main.rs` is a thin layer over these modules.

pub mod bpf;
pub mod cli;
pub mod daemon;
pub mod dns;
pub mod events;
pub mod metrics;
pub mod policy;
pub mod sys;
pub mod workload;
