//! `cgroup/connect4`, `connect6`, `sendmsg4`, `sendmsg6`: TCP connects (TCP Fast Open
//! included, which connects through the same `pre_connect` path), connected UDP, and
//! unconnected UDP sends. All four read the destination and share [`super::verdict`].

use core::ptr::read_volatile;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use egress_common::{Addr, addr_from_v4, events::hook};

use super::{
    addr::read_v6,
    binding,
    dns::{is_dns, steer_v4, steer_v6, steering},
    verdict::{
        ADMIT_NAMED, ADMIT_NONE, Destination, decide, deny_on_error, exempt, name_binding,
        port_of_proto, revoke_error,
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

// Inlined: as a BPF-to-BPF call returning its `Result` through a stack pointer, LLVM may leave
// that pointer in r0 at the callee's exit, which the verifier refuses ("cannot return stack
// pointer to the caller"); inlined, the hook also saves the call.
#[inline(always)]
fn try_v4(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    if exempt() {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid `bpf_sock_addr`; the
    // verifier checks each field access (4-byte loads, as it requires). Each field is loaded
    // once, here, into a value: a pointer into the context kept for a later load is one the
    // verifier refuses ("dereference of modified ctx ptr").
    let (family, ip4, user_port, protocol) = unsafe {
        let sa = ctx.sock_addr;
        (
            read_volatile(&raw const (*sa).user_family),
            read_volatile(&raw const (*sa).user_ip4),
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).protocol),
        )
    };
    if hook == hook::SENDMSG4 && without_address(family, user_port, ip4) {
        return connected_send();
    }
    // `user_ip4` holds the address in network byte order: its in-memory bytes are the octets.
    let addr = addr_from_v4(ip4.to_ne_bytes());
    let port = port_of(user_port);
    if is_dns(port, protocol)
        && let Some(cfg) = steering()
    {
        steer_v4(ctx, cfg, &addr, port);
        return Ok(VERDICT_ALLOW);
    }
    judge(ctx, addr, port, protocol, hook)
}

#[inline(always)]
fn try_v6(ctx: &SockAddrContext, hook: u8) -> Result<i32, ()> {
    if exempt() {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: as in `try_v4` (`user_ip4` is not a field IPv6 hooks may read).
    let (family, user_port, protocol) = unsafe {
        let sa = ctx.sock_addr;
        (
            read_volatile(&raw const (*sa).user_family),
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).protocol),
        )
    };
    if hook == hook::SENDMSG6 && without_address(family, user_port, 0) {
        return connected_send();
    }
    let addr = read_v6(ctx);
    let port = port_of(user_port);
    if is_dns(port, protocol)
        && let Some(cfg) = steering()
    {
        steer_v6(ctx, cfg, &addr, port);
        return Ok(VERDICT_ALLOW);
    }
    judge(ctx, addr, port, protocol, hook)
}

/// Whether a send came without an address (`msg_name` NULL): the kernel then shows a zeroed
/// `sockaddr_storage`, family, address and port all 0.
///
/// Family 0 alone does not say so. `udp_sendmsg` takes an address given with family
/// `AF_UNSPEC` as an IPv4 one and sends the datagram there, even from a socket connected
/// elsewhere; the hook sees family 0 with that address and its port (never 0: the kernel
/// refuses port 0 before the hook). Read as "no address", that send passed as the connected
/// socket's (once, judged as its peer: a DNS socket steered to the resolver passed), and the
/// backstop passed the datagram as a connected socket's: any UDP destination was reachable.
/// Such a send is judged on the address it carries, as an `AF_INET` one is. (`udpv6_sendmsg`
/// turns an `AF_UNSPEC` address into none before its hook: there family 0 is always the zeroed
/// one.)
/// `ip4` is `user_ip4` for `sendmsg4`, 0 for `sendmsg6`.
#[inline(always)]
fn without_address(family: u32, user_port: u32, ip4: u32) -> bool {
    family == 0 && user_port == 0 && ip4 == 0
}

/// The verdict on a connected socket's send that left the kernel's fast path: allowed, as a
/// send on the fast path is (that one runs no hook at all).
///
/// `udp_sendmsg` skips the hook for a connected socket only on its fast path: a send with
/// control messages (`IP_TOS`, `IP_PKTINFO`, `IP_TTL`, ...; before 5.x `UDP_SEGMENT` as well)
/// leaves it and runs the hook with a NULL address, which
/// `__cgroup_bpf_run_filter_sock_addr` shows as a zeroed `sockaddr_storage`, while the
/// datagram goes to the socket's own peer (`inet_daddr`, `inet_dport`; a rewrite is ignored).
/// `udpv6_sendmsg` does the same, and hands a socket connected to an IPv4-mapped peer to
/// `udp_sendmsg`. So the datagram goes only where the socket's judged connect pointed, and the
/// backstop passes it there too. Judging the peer again, as these hooks did before, cut a live
/// flow when its DNS entry expired or a reload dropped its rule (QUIC stacks set ECN with
/// `IP_TOS` on every send), while plain sends on the same socket went on: expiry and reloads
/// never cut a live connection. (A socket connected before `attach` keeps its one peer either
/// way: docs/THREATS.md.)
#[inline(always)]
fn connected_send() -> Result<i32, ()> {
    Ok(VERDICT_ALLOW)
}

/// The verdict; a name-bound TCP connect (or an audit-mode pass of one that would be denied)
/// is recorded on its socket for `sock_ops`, `first_flight` and the backstop.
#[inline(always)]
fn judge(ctx: &SockAddrContext, addr: Addr, port: u16, ip_proto: u32, hook: u8) -> Result<i32, ()> {
    let dst = Destination {
        addr,
        port: port_of_proto(ip_proto, port),
        ip_proto,
        hook,
    };
    let (verdict, admit) = decide(&dst)?;
    if ip_proto != IPPROTO_TCP || !name_binding() {
        return Ok(verdict);
    }
    match admit {
        // A name-bound connect whose binding cannot be recorded is refused: it would carry
        // any name to the address (see `binding::pending`). Never allowed in audit mode: an
        // error, and no longer counted as an allow.
        ADMIT_NAMED if verdict == VERDICT_ALLOW => {
            if !binding::pending(ctx, &dst.addr, dst.port, ip_proto) {
                return Ok(revoke_error(&dst));
            }
        }
        // An audit-mode pass of a deny: its first flight is judged and reported too (so
        // `learn` sees whether the traffic carried a name), with protocol 0: never an allow.
        // Without storage it goes unreported, as audit mode lets it through anyway.
        ADMIT_NONE if verdict == VERDICT_ALLOW => {
            let _ = binding::pending(ctx, &dst.addr, dst.port, 0);
        }
        _ => {}
    }
    Ok(verdict)
}

const IPPROTO_TCP: u32 = 6;

/// `user_port` holds the port in network byte order in its low 16 bits (as stored in memory).
#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}
