//! `cgroup/connect4`, `connect6`, `sendmsg4`, `sendmsg6`: TCP connects (TCP Fast Open
//! included, which connects through the same `pre_connect` path), connected UDP, and
//! unconnected UDP sends. All four read the destination and share [`super::verdict`].

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use egress_common::{Addr, addr_from_v4, events::hook};

use super::{
    addr::read_v6,
    dns::{is_dns, steer_v4, steer_v6, steering},
    judged,
    verdict::{
        ADMIT_NAMED, ADMIT_PLAIN, Destination, decide, deny_on_error, exempt, name_binding,
        port_of_proto,
    },
};
use egress_common::consts::VERDICT_ALLOW;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_v4(&ctx, hook::CONNECT4) {
        Ok(v) => v,
        Err(()) => deny_on_error(hook::CONNECT4),
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_v6(&ctx, hook::CONNECT6) {
        Ok(v) => v,
        Err(()) => deny_on_error(hook::CONNECT6),
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_v4(&ctx, hook::SENDMSG4) {
        Ok(v) => v,
        Err(()) => deny_on_error(hook::SENDMSG4),
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_v6(&ctx, hook::SENDMSG6) {
        Ok(v) => v,
        Err(()) => deny_on_error(hook::SENDMSG6),
    }
}

fn try_v4(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    if exempt() {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`; the
    // verifier checks each field access (4-byte loads, as it requires).
    let sa = unsafe { &*ctx.sock_addr };
    // `user_ip4` holds the address in network byte order: its in-memory bytes are the octets.
    let addr = addr_from_v4(sa.user_ip4.to_ne_bytes());
    let port = port_of(sa.user_port);
    if is_dns(port, sa.protocol)
        && let Some(cfg) = steering()
    {
        steer_v4(ctx, cfg, &addr, port);
        return Ok(VERDICT_ALLOW);
    }
    judge(ctx, addr, port, sa.protocol, hook)
}

fn try_v6(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    if exempt() {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: as in `try_v4`.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = read_v6(ctx);
    let port = port_of(sa.user_port);
    if is_dns(port, sa.protocol)
        && let Some(cfg) = steering()
    {
        steer_v6(ctx, cfg, &addr, port);
        return Ok(VERDICT_ALLOW);
    }
    judge(ctx, addr, port, sa.protocol, hook)
}

/// The verdict; an allow is remembered on the socket for the packet backstop.
#[inline(always)]
fn judge(ctx: &SockAddrContext, addr: Addr, port: u16, ip_proto: u32, hook: u8) -> Result<i32, ()> {
    let dst = Destination {
        addr,
        port: port_of_proto(ip_proto, port),
        ip_proto,
        hook,
    };
    let (verdict, admit) = decide(&dst)?;
    if verdict != VERDICT_ALLOW {
        return Ok(verdict);
    }
    let named = admit == ADMIT_NAMED && name_binding();
    match admit {
        ADMIT_PLAIN | ADMIT_NAMED => {
            let bind = match (named, ip_proto) {
                (true, IPPROTO_TCP) => judged::BIND_PENDING,
                (true, IPPROTO_UDP) => judged::BIND_NO_QUIC,
                _ => judged::BIND_NONE,
            };
            judged::remember(ctx, &dst.addr, dst.port, ip_proto, bind);
        }
        // An audit-mode pass of a deny: its first flight is judged and reported too (so
        // `learn` sees whether the traffic carried a name), but with protocol 0, so that the
        // backstop's shortcut (`judged`) never takes it for an allow.
        _ if ip_proto == IPPROTO_TCP && name_binding() => {
            judged::remember(ctx, &dst.addr, dst.port, 0, judged::BIND_PENDING);
        }
        _ => {}
    }
    Ok(verdict)
}

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// `user_port` holds the port in network byte order in its low 16 bits (as stored in memory).
#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}
