//! `cgroup_skb/egress`: the backstop behind the socket hooks. Every IP packet a socket of the
//! cgroup sends passes here, whatever path created it:
//! - TCP: a SYN (without ACK) opens a connection, so its destination must be allowed now (a
//!   connect that skipped connect4/6 is caught here). A SYN-ACK answers a peer that connected
//!   in: the peer (its destination) must be allowed inbound to the local port (its source
//!   port), see `super::inbound` (which already dropped the peer's SYN at `ingress`; this
//!   catches a SYN-ACK whose SYN it did not see). Every other segment belongs to a
//!   connection that was judged when it opened and passes without reading more than the
//!   flags: expiry never cuts a live connection;
//! - UDP: a connected UDP socket's datagram to its peer was judged at connect and passes; any
//!   other datagram (an unconnected send, or a connected socket's `sendto` elsewhere) must be
//!   allowed now (sendmsg4/6 judged it a moment ago; the backstop catches a path that did not).
//!   "Connected UDP socket" means a SOCK_DGRAM/IPPROTO_UDP socket with a peer: a raw socket
//!   carrying hand-made UDP can be connected too, but no hook judged its connect;
//! - ICMP echo requests (type 8 over IPv4, ICMPv6 type 128 over IPv6) must go to a
//!   destination whose entry permits ICMP (`protocol: icmp`), judged on every packet: an
//!   unconnected `sendto` on a ping socket runs no sendmsg hook (`ping_v4_sendmsg` and
//!   `ping_v6_sendmsg` call none), so this is where it is judged, and on kernels before 5.17
//!   connect4/6 did not run for ping sockets either. Every other ICMP type is dropped;
//! - anything else (SCTP, raw IP of any other protocol) is dropped: no rule allows it;
//! - a packet that could be source-routed past its judged destination is dropped, whatever
//!   its socket: IPv4 with options (`IP_OPTIONS` or an `IP_RETOPTS` control message: LSRR,
//!   SSRR), IPv6 with a routing header (`IPV6_RTHDR` by socket option or control message,
//!   which needs no capability), reason `route`. `run` also refuses those socket options in
//!   its seccomp filter; this catches the per-packet control messages and `attach` mode.
//!
//! Packets the kernel itself sends (ICMPv6 neighbour discovery and MLD, ICMP errors, TCP
//! resets from the stack) go out through per-namespace control sockets, which belong to the
//! cgroup of whoever created the network namespace. Usually that is not the enforced cgroup,
//! but a container runtime that creates the pod's namespace from inside the pod's cgroup
//! (podman with runc: the infra container unshares it) makes them the pod's, and this program
//! sees them. Neighbour discovery (ICMPv6 133 to 137 with hop limit 255) and MLD (130 to 132
//! and 143, behind an 8-byte hop-by-hop header, hop limit 1) then pass: without them an IPv6
//! pod cannot reach its neighbours at all. Nothing in the cgroup can send either: they need a
//! raw ICMPv6 socket (refused by `sock_create`) or hop-by-hop options (CAP_NET_RAW), a ping
//! socket sends echo requests only, and their hop limits keep them on the link.
//!
//! A SYN or an unconnected datagram whose IPv4 destination, port and protocol a socket hook
//! allowed last on this CPU, in the current jiffy, passes on that allow (`super::recent`): the
//! packet of the connect or send just judged, without its second lookup.
//!
//! DNS to the agent's resolver passes. Denies are counted and reported; audit mode reports
//! and passes. An error drops.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::{
        bpf_ktime_get_boot_ns, bpf_sk_fullsock, bpf_skb_cgroup_id, generated::bpf_get_socket_cookie,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use egress_common::{
    Addr, Config, DenyEvent, addr_from_v4,
    config::FLAG_NAME_BIND,
    consts::{COUNTER_BACKSTOP_DROP, COUNTER_RINGBUF_DROP, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    events::{NAME_MAX, NameDenyEvent, hook, name_why, reason},
    keys::is_v4_mapped,
};

use super::{
    addr::{from_words, sk_dst_port},
    binding::{self, BIND_PENDING, BIND_REFUSED, Binding},
    inbound, recent, trace,
    verdict::{audit_mode, count, lookup, lookup_named, named_only_udp},
};
use crate::maps::{CONFIG, EVENTS};

/// Let the packet through.
pub const PASS: i32 = 1;
/// Drop the packet (the sender sees EPERM where it waits for the send).
pub const DROP: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_HOPOPTS: u8 = 0;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const SOCK_DGRAM: u32 = 2;
/// `TCP_ESTABLISHED`, the state a connected datagram socket is in.
const STATE_ESTABLISHED: u32 = 1;

#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    match try_egress(&ctx) {
        Ok(v) => v,
        Err(()) => {
            count(COUNTER_BACKSTOP_DROP);
            DROP
        }
    }
}

fn try_egress(ctx: &SkBuffContext) -> Result<i32, ()> {
    let skb: *mut __sk_buff = ctx.skb.skb;
    let cfg = CONFIG.get(0);
    if let Some(c) = cfg
        && c.exempt_cgroup != 0
        // SAFETY: the context is a valid skb for this helper.
        && unsafe { bpf_skb_cgroup_id(skb) } == c.exempt_cgroup
    {
        return Ok(PASS);
    }
    let (addr, l4, l4_off, echo): (Addr, u8, usize, (u8, u8)) =
        match u16::from_be(ctx.skb.protocol() as u16) {
            ETH_P_IP => {
                // The established path, first: a segment of a connection judged when it
                // opened is decided on three bytes (header length, protocol, TCP flags), before
                // the rest of the header is read (a read of all 20 bytes up front made LLVM
                // load and assemble every one of them before the first test).
                let p: [u8; 10] = read(ctx, 0)?;
                if p[0] & 0x0f == 5 && p[9] == IPPROTO_TCP && established(ctx, skb, cfg, 20)? {
                    return Ok(PASS);
                }
                let h: [u8; 20] = read(ctx, 0)?;
                let ihl = h[0] & 0x0f;
                let dst = addr_from_v4([h[16], h[17], h[18], h[19]]);
                if ihl > 5 {
                    // IP options: a source route (LSRR, SSRR) would carry the packet on past
                    // the judged destination, and nothing the cgroup sends needs options.
                    return Ok(drop_packet(&dst, 0, h[9], reason::ROUTE, hook::EGRESS));
                }
                (dst, h[9], usize::from(ihl) * 4, (IPPROTO_ICMP, ICMP_ECHO))
            }
            ETH_P_IPV6 => {
                // As for IPv4: the established path decides first.
                let p: [u8; 8] = read(ctx, 0)?;
                if p[6] == IPPROTO_TCP && established(ctx, skb, cfg, 40)? {
                    return Ok(PASS);
                }
                let h: [u8; 40] = read(ctx, 0)?;
                let (next, mut dst) = (h[6], [0u8; 16]);
                dst.copy_from_slice(&h[24..40]);
                if next == IPPROTO_ROUTING {
                    // A routing header (IPV6_RTHDR, needs no capability) readdresses the
                    // packet to its segments. Hop-by-hop and destination options, which the
                    // kernel would put before it, need CAP_NET_RAW and are dropped below as
                    // another protocol.
                    return Ok(drop_packet(&dst, 0, next, reason::ROUTE, hook::EGRESS));
                }
                if link_control(ctx, next, h[7])? {
                    return Ok(PASS);
                }
                // An extension header before ICMPv6 leaves `next` at that header: dropped
                // below as another protocol (a ping socket adds none unless asked to).
                (dst, next, 40, (IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST))
            }
            // Not IP: nothing to judge here.
            _ => return Ok(PASS),
        };
    match l4 {
        IPPROTO_TCP => {
            // Ports, sequence and ack numbers, offset, flags.
            let t: [u8; 14] = read(ctx, l4_off)?;
            let (syn, ack) = (t[13] & 0x02 != 0, t[13] & 0x10 != 0);
            // Payload bytes: a name-bound connection's first flight must have met
            // `first_flight` (sk_msg) before any of them leaves.
            let headers = l4_off as u32 + u32::from(t[12] >> 4) * 4;
            let payload = ctx.skb.len() > headers;
            if !syn {
                let port = u16::from_be_bytes([t[2], t[3]]);
                if payload {
                    let sk = unjudged_flight(skb, cfg, &addr, port);
                    if !sk.is_null() {
                        return Ok(drop_unjudged(skb, sk, &addr, port));
                    }
                }
                return Ok(PASS);
            }
            let port = u16::from_be_bytes([t[2], t[3]]);
            if ack {
                return Ok(judge_syn_ack(&addr, u16::from_be_bytes([t[0], t[1]]), port));
            }
            if payload {
                // TCP Fast Open data in the SYN of a name-bound connection: no sk_msg program
                // saw it (the socket joins BOUND only when the handshake completes).
                let sk = unjudged_flight(skb, cfg, &addr, port);
                if !sk.is_null() {
                    return Ok(drop_unjudged(skb, sk, &addr, port));
                }
            }
            Ok(judge(&addr, port, PROTO_TCP, IPPROTO_TCP))
        }
        IPPROTO_UDP => {
            let connected = connected_to(skb, u32::from(IPPROTO_UDP), &addr, port_at(ctx, l4_off)?);
            let binding = name_binding_on(cfg);
            if connected && !binding {
                return Ok(PASS);
            }
            let port = port_at(ctx, l4_off)?;
            // Judged at connect: a name-bound destination's QUIC is checked.
            if connected {
                return Ok(quic_checked(ctx, &addr, port, l4_off));
            }
            // An unconnected send, judged now (sendmsg4/6 judged it a moment ago; this catches
            // a path that did not): a destination only name-checking host rules admit gets its
            // QUIC checked too.
            Ok(judge_udp(ctx, &addr, port, l4_off, binding))
        }
        proto if proto == echo.0 => {
            // Type, code, checksum.
            let i: [u8; 4] = read(ctx, l4_off)?;
            if i[0] != echo.1 {
                return Ok(drop_packet(&addr, 0, proto, reason::PROTOCOL, hook::EGRESS));
            }
            Ok(judge_echo(skb, &addr, proto))
        }
        other => Ok(drop_packet(&addr, 0, other, reason::PROTOCOL, hook::EGRESS)),
    }
}

/// Whether an IPv6 packet (next header `next`, hop limit `hop_limit`) is the kernel's own
/// link control: neighbour discovery (router and neighbour solicitations and advertisements,
/// redirects: ICMPv6 133 to 137, hop limit 255 as RFC 4861 requires) or an MLD message (130
/// to 132, 143) behind the 8-byte hop-by-hop header with the router alert, hop limit 1
/// (RFC 3810). See the module comment for why only the kernel can send these.
#[inline(always)]
fn link_control(ctx: &SkBuffContext, next: u8, hop_limit: u8) -> Result<bool, ()> {
    match next {
        IPPROTO_ICMPV6 if hop_limit == 255 => {
            let t: [u8; 4] = read(ctx, 40)?;
            Ok((133..=137).contains(&t[0]))
        }
        IPPROTO_HOPOPTS if hop_limit == 1 => {
            // Next header, length (in 8-byte units after the first 8), then the options; the
            // ICMPv6 header follows at 48 when the length is 0.
            let hbh: [u8; 8] = read(ctx, 40)?;
            if hbh[0] != IPPROTO_ICMPV6 || hbh[1] != 0 {
                return Ok(false);
            }
            let t: [u8; 4] = read(ctx, 48)?;
            Ok(matches!(t[0], 130..=132 | 143))
        }
        _ => Ok(false),
    }
}

/// Reads a `T` (a header: whole headers, not single bytes, so that the bounds check keeps
/// the `pkt + len > pkt_end` form the verifier understands) at `off` bytes into the packet
/// (its network header): straight from the linear data when it holds them, as it does for
/// the headers of a locally built packet, else through the copying helper.
#[inline(always)]
pub fn read<T: Copy>(ctx: &SkBuffContext, off: usize) -> Result<T, ()> {
    let skb = ctx.skb.skb;
    // SAFETY: context fields the verifier turns into packet pointers; the read is bounds
    // checked against `data_end` first, as the verifier requires.
    unsafe {
        let (start, end) = ((*skb).data as usize, (*skb).data_end as usize);
        if start + off + core::mem::size_of::<T>() <= end {
            return Ok(((start + off) as *const T).read_unaligned());
        }
    }
    ctx.load(off).map_err(|_| ())
}

/// PASS, unless the datagram is a QUIC long-header packet (form and fixed bits set, a
/// non-zero version: an Initial carries the server name encrypted, so it cannot be judged)
/// and its destination is admitted only by name-checking host rules, expired or not
/// ([`named_only_udp`]). Then DROP (`EPERM` to the sender), reason `name`; clients fall back
/// to TCP. The header is read first, so every other datagram passes on it without a lookup;
/// the lookup follows reloads, which nothing recorded on the socket at its hook would. (A
/// steered DNS socket's queries, whose first bytes look like a long header when the ID is
/// 0xc000 or more, go to the resolver, which no entry names.)
#[inline(always)]
fn quic_checked(ctx: &SkBuffContext, addr: &Addr, port: u16, l4_off: usize) -> i32 {
    if !quic_long(ctx, l4_off) || !named_only_udp(addr, port) {
        return PASS;
    }
    drop_packet(addr, port, IPPROTO_UDP, reason::NAME, hook::EGRESS)
}

/// Whether the datagram at `l4_off` is a QUIC long-header packet (after the UDP header, the
/// first byte and the version).
#[inline(always)]
fn quic_long(ctx: &SkBuffContext, l4_off: usize) -> bool {
    match read::<[u8; 13]>(ctx, l4_off) {
        Ok(q) => q[8] & 0xc0 == 0xc0 && (q[9] | q[10] | q[11] | q[12]) != 0,
        // Shorter than a QUIC long header: not one.
        Err(()) => false,
    }
}

/// DROP (reason `name`) if the datagram at `l4_off` (to `port`) is a QUIC long-header
/// packet, else PASS.
#[inline(always)]
fn quic_refused(ctx: &SkBuffContext, addr: &Addr, port: u16, l4_off: usize) -> i32 {
    if !quic_long(ctx, l4_off) {
        return PASS;
    }
    drop_packet(addr, port, IPPROTO_UDP, reason::NAME, hook::EGRESS)
}

/// Whether `CONFIG` has name binding on.
#[inline(always)]
fn name_binding_on(cfg: Option<&Config>) -> bool {
    cfg.is_some_and(|c| c.flags & FLAG_NAME_BIND != 0)
}

/// The packet's socket (full) if it is name-bound to `addr`, `port` and its first flight was
/// not judged and let through (else null): payload sent past `first_flight` (TCP Fast Open
/// data, a send that was already waiting in `tcp_sendmsg` for the handshake, a socket
/// `sock_ops` could not put in `BOUND`, an MPTCP subflow), or sent after a refused one. A
/// binding recorded for another destination (a socket that connected again: `connect4/6` leave
/// a TCP socket's old binding in place rather than look it up on every connect) is not this
/// connection's. Costs nothing while name binding is off (`cfg`'s `FLAG_NAME_BIND`); else a
/// socket storage lookup, which finds nothing for a socket name binding never concerned.
#[inline(always)]
fn unjudged_flight(
    skb: *mut __sk_buff,
    cfg: Option<&Config>,
    addr: &Addr,
    port: u16,
) -> *mut bpf_sock {
    let b = holding(skb, cfg);
    // SAFETY: non-null socket storage.
    if !b.is_null() && unsafe { (*b).port == port && (*b).addr == *addr } {
        // A socket with storage is a full one; the event reads its own address.
        return full_socket(skb);
    }
    core::ptr::null_mut()
}

/// The binding of the packet's socket when name binding is on and that binding holds payload
/// back (`BIND_PENDING`, `BIND_REFUSED`), whatever destination it names; else null. Looked
/// up on the skb's own socket pointer: `bpf_sk_storage_get` takes a `sock_common` and finds
/// nothing for a request or time-wait socket, so no `bpf_sk_fullsock` call is needed first.
#[inline(always)]
fn holding(skb: *mut __sk_buff, cfg: Option<&Config>) -> *mut Binding {
    let none = core::ptr::null_mut();
    if !name_binding_on(cfg) || !binding::any_held() {
        return none;
    }
    // SAFETY: reading the skb's socket pointer, checked for null.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return none;
    }
    let b = binding::of(sk);
    // SAFETY: non-null socket storage.
    if !b.is_null() && matches!(unsafe { (*b).bind }, BIND_PENDING | BIND_REFUSED) {
        return b;
    }
    none
}
/// Drops (in audit mode passes) a segment of [`unjudged_flight`]'s socket `sk` to `addr`,
/// `port`, reported as a [`NameDenyEvent`] (hook `egress`, `name_why` `unjudged`) that names
/// the socket, so the agent resets the connection: the sender fails at once instead of
/// retransmitting into the drop.
fn drop_unjudged(skb: *mut __sk_buff, sk: *mut bpf_sock, addr: &Addr, port: u16) -> i32 {
    count(COUNTER_BACKSTOP_DROP);
    let audit = audit_mode();
    if let Some(mut entry) = EVENTS.reserve::<NameDenyEvent>(0) {
        let e = entry.as_mut_ptr();
        // SAFETY: `e` is the reserved record, written whole before submit; `sk` is a full
        // socket (each field read at its own fixed offset).
        unsafe {
            let d = &mut (*e).event;
            d.ts_ns = bpf_ktime_get_boot_ns();
            d.cgroup_id = 0;
            d.pid = 0;
            d.tid = 0;
            d.uid = 0;
            d.gid = 0;
            d.addr = *addr;
            d.port = port;
            d.ip_proto = IPPROTO_TCP;
            d.hook = hook::EGRESS;
            d.reason = reason::NAME;
            d.audited = u8::from(audit);
            d._pad = [0; 2];
            d.comm = [0; 16];
            let family = core::ptr::read_volatile(&raw const (*sk).family);
            let ip4 = core::ptr::read_volatile(&raw const (*sk).src_ip4);
            let w = [
                core::ptr::read_volatile(&raw const (*sk).src_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[3]),
            ];
            (*e).why = name_why::UNJUDGED;
            (*e).family = family as u8;
            (*e).name_len = 0;
            (*e).local_port = core::ptr::read_volatile(&raw const (*sk).src_port) as u16;
            (*e)._pad2 = 0;
            (*e).cookie = bpf_get_socket_cookie(skb.cast());
            (*e).local = super::addr::local_addr(family, ip4, w);
            (*e).name = [0; NAME_MAX];
        }
        entry.submit(0);
    } else {
        count(COUNTER_RINGBUF_DROP);
    }
    let verdict = if audit { PASS } else { DROP };
    trace::verdict(
        hook::EGRESS,
        addr,
        port,
        u32::from(IPPROTO_TCP),
        verdict,
        reason::NAME,
    );
    verdict
}

/// The established path: whether the TCP segment at `l4_off` (behind a header without
/// options) passes on its flags alone. Not a SYN, and either without payload (an ACK, a FIN,
/// a reset: no flight can hide in it) or of a socket no name binding holds back. Anything
/// else is judged in full below.
#[inline(always)]
fn established(
    ctx: &SkBuffContext,
    skb: *mut __sk_buff,
    cfg: Option<&Config>,
    l4_off: usize,
) -> Result<bool, ()> {
    // Ports, sequence and ack numbers, offset, flags (the whole fixed header up to the flags,
    // for the bounds check's sake, see [`read`]).
    let t: [u8; 14] = read(ctx, l4_off)?;
    if t[13] & 0x02 != 0 {
        return Ok(false);
    }
    let headers = l4_off as u32 + u32::from(t[12] >> 4) * 4;
    Ok(ctx.skb.len() <= headers || holding(skb, cfg).is_null())
}

/// The packet's full socket, or null (a request socket, a time-wait socket, none).
#[inline(always)]
fn full_socket(skb: *mut __sk_buff) -> *mut bpf_sock {
    // SAFETY: reading the skb's socket pointer, then a helper the verifier checks.
    unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return core::ptr::null_mut();
        }
        bpf_sk_fullsock(sk)
    }
}

/// The destination port of the UDP header at `l4_off`.
#[inline(always)]
fn port_at(ctx: &SkBuffContext, l4_off: usize) -> Result<u16, ()> {
    let u: [u8; 4] = read(ctx, l4_off)?;
    Ok(u16::from_be_bytes([u[2], u[3]]))
}

/// Whether the packet's socket is a connected SOCK_DGRAM socket of `protocol` ([`connected`])
/// and the packet goes to its peer, `addr`, `port`. A connected UDP socket can still send
/// elsewhere (`sendto` with an address, which `sendmsg4/6` judge): only what goes to the peer
/// its connect was judged for passes as the connected socket's.
///
/// State, peer and port are read first, on the socket as the skb holds it (`sock_common`
/// fields, valid for every kind of socket): an unconnected send's socket is not established,
/// and is decided without the `bpf_sk_fullsock` call that its type and protocol need (the
/// backstop's run on an unconnected datagram went from 101 to 82-85 ns/run, issue 14).
#[inline(always)]
fn connected_to(skb: *mut __sk_buff, protocol: u32, addr: &Addr, port: u16) -> bool {
    // SAFETY: reading the skb's socket pointer, checked for null; state, peer and port are
    // `sock_common` fields the verifier allows on it, each loaded at its fixed offset.
    unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() || (*sk).state != STATE_ESTABLISHED || sk_dst_port(sk) != port {
            return false;
        }
        // Every word is loaded before either is chosen: loads on two branches that fill the
        // same bytes were merged into one load at a chosen offset, pointer arithmetic the
        // verifier refuses on a socket.
        let ip4 = read_volatile(&raw const (*sk).dst_ip4);
        let w = [
            read_volatile(&raw const (*sk).dst_ip6[0]),
            read_volatile(&raw const (*sk).dst_ip6[1]),
            read_volatile(&raw const (*sk).dst_ip6[2]),
            read_volatile(&raw const (*sk).dst_ip6[3]),
        ];
        let peer = if is_v4_mapped(addr) {
            addr_from_v4(ip4.to_ne_bytes())
        } else {
            from_words(w)
        };
        peer == *addr && connected(bpf_sk_fullsock(sk), protocol)
    }
}

/// Whether `sk` (a full socket, or null) is a connected SOCK_DGRAM socket of `protocol`: UDP
/// (then judged at connect), or a ping socket (judged at connect on Linux >= 5.17).
#[inline(always)]
fn connected(sk: *mut bpf_sock, protocol: u32) -> bool {
    if sk.is_null() {
        return false;
    }
    // SAFETY: a full socket the verifier knows is not null.
    unsafe {
        (*sk).type_ == SOCK_DGRAM && (*sk).protocol == protocol && (*sk).state == STATE_ESTABLISHED
    }
}

/// An ICMP echo request: its destination must permit ICMP, on every packet.
fn judge_echo(skb: *mut __sk_buff, addr: &Addr, ip_proto: u8) -> i32 {
    match lookup(addr, 0, PROTO_ICMP) {
        None => PASS,
        // A connected ping socket's destination was reported by connect4/6 already: one
        // event per would-be deny in audit mode, not two.
        Some(_) if audit_mode() && connected(full_socket(skb), u32::from(ip_proto)) => PASS,
        Some(why) => drop_packet(addr, 0, ip_proto, why, hook::EGRESS),
    }
}

/// A SYN-ACK to `peer` from `local_port`: the reply to a peer connecting in (a listener's
/// request socket, or a TCP Fast Open child socket), or the second SYN of a simultaneous open
/// (then the socket's own connect judged `peer` and `peer_port`).
fn judge_syn_ack(peer: &Addr, local_port: u16, peer_port: u16) -> i32 {
    match inbound::verdict(peer, local_port, peer_port) {
        None => PASS,
        // In audit mode `ingress` already reported this peer when its SYN came in.
        Some(_) if audit_mode() => PASS,
        Some(why) => drop_packet(peer, local_port, IPPROTO_TCP, why, hook::ACCEPT),
    }
}

fn judge(addr: &Addr, port: u16, bit: u8, ip_proto: u8) -> i32 {
    // The packet of a connect or send the socket hook allowed a moment ago on this CPU.
    if recent::allowed(addr, port, bit).is_some() || to_resolver(addr, port) {
        return PASS;
    }
    match lookup(addr, port, bit) {
        None => PASS,
        Some(why) => refused(addr, port, ip_proto, why),
    }
}

/// An unconnected UDP datagram to `addr`, `port`: [`judge`]'s verdict, with the QUIC check of a
/// destination only name-checking host rules admit while name binding is on (`binding`),
/// from the same lookup.
#[inline(always)]
fn judge_udp(ctx: &SkBuffContext, addr: &Addr, port: u16, l4_off: usize, binding: bool) -> i32 {
    if !binding {
        return judge(addr, port, PROTO_UDP, IPPROTO_UDP);
    }
    let admitted = match recent::allowed(addr, port, PROTO_UDP) {
        Some(named) => Ok(named),
        None if to_resolver(addr, port) => return PASS,
        None => lookup_named(addr, port, PROTO_UDP),
    };
    match admitted {
        Ok(true) => quic_refused(ctx, addr, port, l4_off),
        Ok(false) => PASS,
        Err(why) => refused(addr, port, IPPROTO_UDP, why),
    }
}

/// The backstop's deny of a destination the socket hooks judge too: in audit mode they already
/// reported it (one event per would-be deny, not two), so the packet passes.
#[inline(always)]
fn refused(addr: &Addr, port: u16, ip_proto: u8, why: u8) -> i32 {
    if audit_mode() {
        return PASS;
    }
    drop_packet(addr, port, ip_proto, why, hook::EGRESS)
}

/// DNS steered to the agent's resolver (the destination after the rewrite).
fn to_resolver(addr: &Addr, port: u16) -> bool {
    match CONFIG.get(0) {
        Some(c) if c.dns_port != 0 && port == c.dns_port => {
            *addr == c.dns_v6 || *addr == addr_from_v4(c.dns_v4)
        }
        _ => false,
    }
}

/// Counts, reports (as `hook`) and drops a packet; in audit mode reports and passes.
pub fn drop_packet(addr: &Addr, port: u16, ip_proto: u8, why: u8, hook: u8) -> i32 {
    count(COUNTER_BACKSTOP_DROP);
    let audit = audit_mode();
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        // The sending task is not known in packet context: no pid, uid or comm.
        entry.write(DenyEvent {
            // SAFETY: helper without arguments.
            ts_ns: unsafe { bpf_ktime_get_boot_ns() },
            cgroup_id: 0,
            pid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            addr: *addr,
            port,
            ip_proto,
            hook,
            reason: why,
            audited: u8::from(audit),
            _pad: [0; 2],
            comm: [0; 16],
        });
        entry.submit(0);
    } else {
        // Counted, so that deny lines plus `denies-unrecorded` counts add up to every drop.
        count(COUNTER_RINGBUF_DROP);
    }
    let verdict = if audit { PASS } else { DROP };
    trace::verdict(hook::EGRESS, addr, port, u32::from(ip_proto), verdict, why);
    verdict
}
