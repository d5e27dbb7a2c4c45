//! The reference floor of `cargo xtask bench` (issue 14), never loaded by the agent: a
//! `cgroup/connect4` and a `cgroup/sendmsg4` program that do one hash lookup of the IPv4
//! destination (mapped, as egress keys it) in a map of `ALLOW_DNS`'s key and value types, and
//! allow only what they find. What any cgroup-BPF enforcement pays at least; egress's programs
//! are measured against it. Loaded by `egress-bench-floor` (a bench-only binary of
//! egress-agent), which gives it the measured agent's own pinned `ALLOW_DNS` as its map: the
//! same key in the same map (hash seed, bucket, chain) as egress's first lookup.
//!
//! Beside them, a `cgroup/sock_create` and a `cgroup_skb/egress` program that do nothing but
//! allow: what the kernel's run-time statistics read for an empty program (the timing's own
//! cost per run), the reference of egress's `sock_create` and of its backstop per packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::HashMap,
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use egress_common::{Addr, AllowValue, addr_from_v4};

/// The allowed destinations: replaced at load by the pinned map the loader is given.
#[map]
static FLOOR: HashMap<Addr, AllowValue> = HashMap::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn floor_connect4(ctx: SockAddrContext) -> i32 {
    verdict(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn floor_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(&ctx)
}

#[cgroup_sock(sock_create)]
pub fn floor_sock_create(_ctx: SockContext) -> i32 {
    1
}

#[cgroup_skb(egress)]
pub fn floor_egress(_ctx: SkBuffContext) -> i32 {
    1
}

#[inline(always)]
fn verdict(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    // SAFETY: the value is only tested for presence.
    i32::from(unsafe { FLOOR.get(addr_from_v4(ip.to_ne_bytes())) }.is_some())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
