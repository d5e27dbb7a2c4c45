//! Connections coming in. A command that listens (`0.0.0.0:8080`) would otherwise hand data
//! to any peer that connects: an accepted connection's segments carry no SYN of the
//! command's own, so the backstop never judged them. Here the peer is judged before the
//! handshake can complete, against the `inbound:` rules (`ALLOW_INBOUND`, peer prefix to
//! local ports):
//! - `cgroup_skb/ingress` (this file): every segment addressed to a *listening* socket of the
//!   cgroup, the peer's SYN (with TCP Fast Open data or not) and the ACK that completes a
//!   handshake, SYN cookies included, is dropped when the peer is not allowed. The listener
//!   then never creates a request or child socket, and sends nothing. A segment for any
//!   other socket (an established connection, a UDP socket) passes after one load of the
//!   socket's state: the established path reads no packet byte and no map.
//! - the backstop (`cgroup_skb/egress`) also judges SYN-ACKs (see `backstop.rs`): a second
//!   line that costs nothing on the established path (only SYN-flagged segments reach it).
//!
//! A peer is allowed when it is loopback (127.0.0.0/8, `::1`: the machine itself, not an
//! egress path), when an `inbound:` rule covers it and the local port, or when the outbound
//! rules would let the command reach the peer's own address and port anyway (nothing new
//! leaves then; it also keeps a simultaneous open of an allowed connect working).
//! Denies are counted and reported (`hook::ACCEPT`); audit mode reports and passes. An
//! error drops.

use aya_ebpf::{
    bindings::__sk_buff, helpers::bpf_skb_cgroup_id, macros::cgroup_skb, maps::lpm_trie::Key,
    programs::SkBuffContext,
};
use egress_common::{
    Addr, addr_from_v4,
    consts::{COUNTER_BACKSTOP_DROP, PROTO_TCP},
    events::{hook, reason},
};

use super::{
    backstop::{DROP, PASS, drop_packet, read},
    verdict::{count, lookup},
};
use crate::maps::{ALLOW_INBOUND, CONFIG};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// `TCP_LISTEN` in `bpf_sock.state`.
const STATE_LISTEN: u32 = 10;
/// `::1`.
const V6_LOOPBACK: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

#[cgroup_skb(ingress)]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(v) => v,
        Err(()) => {
            count(COUNTER_BACKSTOP_DROP);
            DROP
        }
    }
}

fn try_ingress(ctx: &SkBuffContext) -> Result<i32, ()> {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: the context's socket pointer, checked for null; `state` is a `sock_common`
    // field the verifier lets any socket pointer read (no `bpf_sk_fullsock` needed). The
    // kernel sets `skb->sk` to the receiving socket for the program's run.
    let listening = unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        !sk.is_null() && (*sk).state == STATE_LISTEN
    };
    if !listening {
        return Ok(PASS);
    }
    if let Some(c) = CONFIG.get(0)
        && c.exempt_cgroup != 0
        // SAFETY: the context is a valid skb for this helper.
        && unsafe { bpf_skb_cgroup_id(skb) } == c.exempt_cgroup
    {
        return Ok(PASS);
    }
    let (peer, l4, l4_off): (Addr, u8, usize) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let h: [u8; 20] = read(ctx, 0)?;
            let src = [h[12], h[13], h[14], h[15]];
            (addr_from_v4(src), h[9], usize::from(h[0] & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let h: [u8; 40] = read(ctx, 0)?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            (src, h[6], 40)
        }
        _ => return Ok(PASS),
    };
    if l4 != IPPROTO_TCP {
        // A listening socket is TCP (SCTP never leaves: the backstop drops its packets).
        return Ok(PASS);
    }
    // Source port, destination port.
    let t: [u8; 4] = read(ctx, l4_off)?;
    let (peer_port, local_port) = (
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
    );
    Ok(match verdict(&peer, local_port, peer_port) {
        None => PASS,
        Some(why) => drop_packet(&peer, local_port, IPPROTO_TCP, why, hook::ACCEPT),
    })
}

/// `None` when `peer` may hold a connection to `local_port` of the cgroup, else the reason.
#[inline(always)]
pub fn verdict(peer: &Addr, local_port: u16, peer_port: u16) -> Option<u8> {
    if loopback(peer) {
        return None;
    }
    let why = match ALLOW_INBOUND.get(Key::new(128, *peer)) {
        Some(v) if v.permits(local_port, PROTO_TCP) => return None,
        Some(_) => reason::PORT,
        None => reason::NO_RULE,
    };
    // Allowed too when the outbound rules already let the command reach this very address
    // and port.
    lookup(peer, peer_port, PROTO_TCP).map(|_| why)
}

/// 127.0.0.0/8 (also as `::ffff:127.x.y.z`) or `::1`.
#[inline(always)]
fn loopback(a: &Addr) -> bool {
    *a == V6_LOOPBACK || (egress_common::keys::is_v4_mapped(a) && a[12] == 127)
}
