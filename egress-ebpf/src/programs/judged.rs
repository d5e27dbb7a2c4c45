//! What a socket hook allowed a moment ago, so that the packet backstop passes the packet that
//! very call sends instead of judging its destination a second time: the SYN of a connect that
//! `connect4/6` allowed, the datagram of an unconnected send that `sendmsg4/6` allowed.
//!
//! One slot per CPU holds the last real allow made on that CPU (not an audit-mode pass): the
//! socket (by cookie), destination, port and protocol. A hook runs in the calling task, and the
//! SYN or datagram it lets through reaches `cgroup_skb/egress` within the same system call, on
//! the same CPU unless the task was moved in between. The backstop passes a packet only when
//! the slot names its socket, destination, port and protocol; anything else (another socket's
//! allow in between, a task moved to another CPU, a SYN retransmitted from a timer, a socket no
//! hook judged) is judged in full. Nothing is allocated per socket: the socket storage this
//! replaced cost about 1.1 µs per connect to allocate, for 0.1 µs saved on the SYN.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, helpers::bpf_get_socket_cookie, macros::map,
    maps::PerCpuArray, programs::SockAddrContext,
};
use egress_common::Addr;

/// The last allow a hook made on this CPU.
#[repr(C)]
pub struct Judged {
    /// The socket's cookie (never 0 for a socket).
    cookie: u64,
    addr: Addr,
    port: u16,
    ip_proto: u8,
    _pad: [u8; 5],
}

#[map]
static JUDGED: PerCpuArray<Judged> = PerCpuArray::with_max_entries(1, 0);

/// 0: the backstop judges every SYN and unconnected datagram in full (the agent's
/// `EnforcerOptions::judged`); the verifier, which knows read-only globals, prunes the rest.
#[unsafe(no_mangle)]
static JUDGED_ON: u8 = 1;

#[inline(always)]
fn on() -> bool {
    // SAFETY: a read-only global the loader sets before loading.
    unsafe { ptr::read_volatile(&raw const JUDGED_ON) != 0 }
}

/// Remembers that the hook of `ctx`'s socket allowed `addr`, `port` over `ip_proto`.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, addr: &Addr, port: u16, ip_proto: u32) {
    if !on() {
        return;
    }
    let Some(p) = JUDGED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a sock_addr context is a valid argument for this helper; the slot is this
    // CPU's, and no other program runs on this CPU while this one does.
    unsafe {
        (*p).cookie = bpf_get_socket_cookie(ctx.as_ptr());
        (*p).addr = *addr;
        (*p).port = port;
        (*p).ip_proto = ip_proto as u8;
    }
}

/// Whether the hook of `skb`'s socket allowed `addr`, `port` over `ip_proto` last on this CPU.
#[inline(always)]
pub fn judged(skb: *mut __sk_buff, addr: &Addr, port: u16, ip_proto: u8) -> bool {
    if !on() {
        return false;
    }
    let Some(p) = JUDGED.get_ptr(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; the skb is the program's context, a valid argument for the
    // helper (0 for a packet without a socket, which no slot names).
    unsafe {
        (*p).port == port
            && (*p).ip_proto == ip_proto
            && (*p).addr == *addr
            && (*p).cookie != 0
            && bpf_get_socket_cookie(skb.cast()) == (*p).cookie
    }
}
