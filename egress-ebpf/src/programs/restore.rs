//! `recvmsg4/6` and `getpeername4/6`: a reply from the agent's resolver, or the peer of a
//! steered TCP connection, is shown with the address the client originally asked, so stub
//! resolvers that check the reply's source (glibc, musl, Go) accept it. These hooks can only
//! return 1 (the kernel rejects other values at load time): they rewrite, never deny.

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use egress_common::{addr_from_v4, config::OrigDst};

use super::{
    addr::{read_v6, write_v6},
    dns::steering,
    verdict::exempt,
};
use crate::maps::DNS_ORIG;

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    1
}

#[inline(always)]
fn restore_v4(ctx: &SockAddrContext) {
    if exempt() {
        return;
    }
    let Some(cfg) = steering() else { return };
    // SAFETY: valid context; 4-byte loads as the verifier requires.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    if ip != u32::from_ne_bytes(cfg.dns_v4) || port != u32::from(cfg.dns_port.to_be()) {
        return;
    }
    let Some(orig) = original(ctx) else { return };
    let a = orig.addr;
    // SAFETY: these hooks may write `user_ip4` and `user_port`.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        (*ctx.sock_addr).user_port = u32::from(orig.port.to_be());
    }
}

#[inline(always)]
fn restore_v6(ctx: &SockAddrContext) {
    if exempt() {
        return;
    }
    let Some(cfg) = steering() else { return };
    let addr = read_v6(ctx);
    // SAFETY: valid context.
    let port = unsafe { (*ctx.sock_addr).user_port };
    if port != u32::from(cfg.dns_port.to_be())
        || (addr != cfg.dns_v6 && addr != addr_from_v4(cfg.dns_v4))
    {
        return;
    }
    let Some(orig) = original(ctx) else { return };
    write_v6(ctx, &orig.addr, orig.port);
}

/// Where this steered socket really wanted to go (recorded by the steering hooks).
#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<&'static OrigDst> {
    // SAFETY: a sock_addr context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only use of the value.
    unsafe { DNS_ORIG.get(cookie) }
}
