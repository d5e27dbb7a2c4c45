//! `cgroup_skb/egress`: the backstop behind the socket hooks. Every IP packet a socket of the
//! cgroup sends passes here, whatever path created it:
//! - TCP: a SYN (without ACK) opens a connection, so its destination must be allowed now (a
//!   connect that skipped connect4/6 is caught here; every other segment belongs to a
//!   connection that was judged when it opened, or to one accepted from outside, and passes:
//!   expiry never cuts a live connection);
//! - UDP: a connected socket was judged at connect and passes; an unconnected send must be
//!   allowed now (sendmsg4/6 judged it a moment ago; the backstop catches a path that did not);
//! - a SYN or unconnected datagram to the destination its socket's own hook allowed last passes
//!   without a second lookup (`super::judged`);
//! - anything else (ICMP, SCTP, raw IP of any protocol) is dropped: no rule allows it.
//!
//! DNS to the agent's resolver passes. Denies are counted and reported; audit mode reports
//! and passes. An error drops.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::{bpf_ktime_get_boot_ns, bpf_sk_fullsock, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use egress_common::{
    Addr, DenyEvent, addr_from_v4,
    consts::{COUNTER_BACKSTOP_DROP, PROTO_TCP, PROTO_UDP},
    events::{hook, reason},
};

use super::{
    judged::judged,
    verdict::{audit_mode, count, lookup},
};
use crate::maps::{CONFIG, EVENTS};

const PASS: i32 = 1;
const DROP: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

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
    let (addr, l4, l4_off): (Addr, u8, usize) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(0).map_err(|_| ())?;
            let proto: u8 = ctx.load(9).map_err(|_| ())?;
            let dst: [u8; 4] = ctx.load(16).map_err(|_| ())?;
            (addr_from_v4(dst), proto, usize::from(vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(6).map_err(|_| ())?;
            let dst: [u8; 16] = ctx.load(24).map_err(|_| ())?;
            (dst, next, 40)
        }
        // Not IP: nothing to judge here.
        _ => return Ok(PASS),
    };
    match l4 {
        IPPROTO_TCP => {
            let flags: u8 = ctx.load(l4_off + 13).map_err(|_| ())?;
            let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
            if !syn || ack {
                return Ok(PASS);
            }
            let port = u16::from_be(ctx.load::<u16>(l4_off + 2).map_err(|_| ())?);
            let sk = full_socket(skb);
            if !sk.is_null() && judged(sk, &addr, port, IPPROTO_TCP) {
                // connect4/6 allowed this very destination for this socket.
                return Ok(PASS);
            }
            Ok(judge(&addr, port, PROTO_TCP, IPPROTO_TCP))
        }
        IPPROTO_UDP => {
            let sk = full_socket(skb);
            // SAFETY: a full socket the verifier knows is not null.
            if !sk.is_null() && unsafe { (*sk).dst_port } != 0 {
                // A connected UDP socket, judged at connect.
                return Ok(PASS);
            }
            let port = u16::from_be(ctx.load::<u16>(l4_off + 2).map_err(|_| ())?);
            if !sk.is_null() && judged(sk, &addr, port, IPPROTO_UDP) {
                // sendmsg4/6 allowed this very destination for this socket.
                return Ok(PASS);
            }
            Ok(judge(&addr, port, PROTO_UDP, IPPROTO_UDP))
        }
        other => Ok(drop_packet(&addr, 0, other, reason::PROTOCOL)),
    }
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

fn judge(addr: &Addr, port: u16, bit: u8, ip_proto: u8) -> i32 {
    if to_resolver(addr, port) {
        return PASS;
    }
    match lookup(addr, port, bit) {
        None => PASS,
        // In audit mode the connect/sendmsg hooks already reported this destination: one
        // event per would-be deny, not two.
        Some(_) if audit_mode() => PASS,
        Some(why) => drop_packet(addr, port, ip_proto, why),
    }
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

fn drop_packet(addr: &Addr, port: u16, ip_proto: u8, why: u8) -> i32 {
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
            hook: hook::EGRESS,
            reason: why,
            audited: u8::from(audit),
            _pad: [0; 2],
            comm: [0; 16],
        });
        entry.submit(0);
    }
    if audit { PASS } else { DROP }
}
