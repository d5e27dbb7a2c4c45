//! Types shared by the egress eBPF programs (`egress-ebpf`) and the agent (`egress-agent`).
//!
//! Every struct here crosses the kernel boundary as raw bytes: they are `#[repr(C)]`, `Copy`,
//! have no implicit padding (explicit `_pad` fields, checked by `const` size asserts), and each
//! field documents its byte order.
#![no_std]

pub mod config;
pub mod consts;
pub mod events;
pub mod keys;
#[cfg(feature = "std")]
pub mod mounts;
pub mod names;
pub mod rules;

#[cfg(feature = "std")]
extern crate std;

pub use config::Config;
pub use events::DenyEvent;
pub use keys::{Addr, addr_from_v4};
pub use rules::{AllowValue, PortRange};
