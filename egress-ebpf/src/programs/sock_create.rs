//! `cgroup/sock_create`: raw sockets (any protocol) never reach the connect/sendmsg hooks
//! with a destination to judge, so they are refused when created, always. ICMP "ping"
//! sockets (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) are refused too, unless some rule allows ICMP
//! (`FLAG_ICMP`): then each destination is judged, at connect by connect4/6 and per echo
//! request by the `cgroup_skb/egress` backstop (an unconnected `sendto` on a ping socket
//! runs no sendmsg hook: `ping_v4_sendmsg` has none).
//! The hook sees AF_INET and AF_INET6 only; packet sockets (AF_PACKET) are closed by
//! confinement (no CAP_NET_RAW), see docs/KERNEL-NOTES.md.

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use egress_common::{
    consts::VERDICT_ALLOW,
    events::{hook, reason},
};

use super::verdict::{Destination, deny, exempt, icmp_allowed};

const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands this program a valid `bpf_sock`; the verifier checks each load.
    let (ty, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    let icmp = ty == SOCK_DGRAM && (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6);
    // The common case (a TCP or UDP socket) is decided on the two loads above, before any map
    // or helper: issue 14 wants this program at the floor of what a program costs. Not
    // counted: the allow counter counts connects and sends.
    if ty != SOCK_RAW && !icmp {
        return VERDICT_ALLOW;
    }
    if exempt() || (ty != SOCK_RAW && icmp_allowed()) {
        return VERDICT_ALLOW;
    }
    let dst = Destination {
        addr: [0; 16],
        port: 0,
        ip_proto: protocol,
        hook: hook::SOCK_CREATE,
    };
    deny(&dst, reason::PROTOCOL)
}
