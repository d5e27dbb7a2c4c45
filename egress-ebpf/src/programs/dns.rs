//! DNS steering: every DNS packet or connection (port 53, UDP or TCP, to any address) is
//! rewritten to the agent's resolver, and its real destination remembered by socket cookie so
//! that replies and `getpeername` can show it again (see `restore.rs`).

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use egress_common::{
    Addr, Config,
    config::{DNS_PORT, OrigDst},
    consts::COUNTER_DNS_STEERED,
    keys::is_v4_mapped,
};

use super::{addr::write_v6, verdict::count};
use crate::maps::{CONFIG, DNS_ORIG};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// The resolver settings, when steering is on.
#[inline(always)]
pub fn steering() -> Option<&'static Config> {
    let c = CONFIG.get(0)?;
    if c.dns_port == 0 { None } else { Some(c) }
}

/// Whether this destination is DNS to be steered.
#[inline(always)]
pub fn is_dns(port: u16, ip_proto: u32) -> bool {
    port == DNS_PORT && (ip_proto == IPPROTO_UDP || ip_proto == IPPROTO_TCP)
}

/// Records where the socket wanted to go. A full LRU map evicts the oldest entry; failing to
/// record only means a reply would show the resolver's address, so it is not fatal.
#[inline(always)]
fn remember(ctx: &SockAddrContext, addr: &Addr, port: u16) {
    // SAFETY: a sock_addr context is a valid argument for this helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: *addr,
        port,
        _pad: [0; 6],
    };
    let _ = DNS_ORIG.insert(cookie, orig, 0);
    count(COUNTER_DNS_STEERED);
}

/// Rewrites an IPv4 destination to the resolver.
#[inline(always)]
pub fn steer_v4(ctx: &SockAddrContext, cfg: &Config, addr: &Addr, port: u16) {
    remember(ctx, addr, port);
    // SAFETY: connect4/sendmsg4 may write `user_ip4` and `user_port` (4-byte stores).
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(cfg.dns_v4);
        (*ctx.sock_addr).user_port = u32::from(cfg.dns_port.to_be());
    }
}

/// Rewrites an IPv6 destination to the resolver: an IPv4-mapped destination to the mapped
/// IPv4 resolver address (the socket is talking IPv4), anything else to the IPv6 one.
#[inline(always)]
pub fn steer_v6(ctx: &SockAddrContext, cfg: &Config, addr: &Addr, port: u16) {
    remember(ctx, addr, port);
    let to: Addr = if is_v4_mapped(addr) {
        egress_common::addr_from_v4(cfg.dns_v4)
    } else {
        cfg.dns_v6
    };
    write_v6(ctx, &to, cfg.dns_port);
}
