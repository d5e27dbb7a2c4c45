//! Reads and writes of the destination in a `cgroup/sock_addr` context, shared by the
//! programs that judge it (`sock_addr`), steer it (`dns`) and restore it (`restore`), so no
//! program module imports another; and reads of a `bpf_sock`: its own address for name
//! binding's events, its peer for the backstop.

use aya_ebpf::{bindings::bpf_sock, programs::SockAddrContext};
use egress_common::Addr;

/// The IPv6 address in `user_ip6`, network byte order.
#[inline(always)]
pub fn read_v6(ctx: &SockAddrContext) -> Addr {
    // SAFETY: the context of a sock_addr hook holds a valid `bpf_sock_addr`.
    let sa = unsafe { &*ctx.sock_addr };
    // Four 4-byte loads: the verifier rejects wider or narrower access to `user_ip6`.
    let w = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Writes an IPv6 destination (network byte order) and port (host order) into the context:
/// four 4-byte stores, the only width the verifier accepts for `user_ip6`. Only the hooks
/// that may rewrite the address call it (connect6, sendmsg6, recvmsg6, getpeername6).
#[inline(always)]
pub fn write_v6(ctx: &SockAddrContext, a: &Addr, port: u16) {
    // SAFETY: the caller is a hook allowed to write `user_ip6[i]` and `user_port`.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        sa.user_port = u32::from(port.to_be());
    }
}

/// `AF_INET6`.
const AF_INET6: u32 = 10;

/// A socket's own address as a `NameDenyEvent` carries it: for `AF_INET6` the four words of
/// the IPv6 address (network byte order, as loaded), else the IPv4 word, mapped. The caller
/// loads each word at its own fixed offset of its context (a load chosen by a branch became a
/// variable context offset, which the verifier refuses).
#[inline(always)]
pub fn local_addr(family: u32, ip4: u32, ip6: [u32; 4]) -> Addr {
    if family != AF_INET6 {
        return egress_common::addr_from_v4(ip4.to_ne_bytes());
    }
    from_words(ip6)
}

/// An IPv6 address from the four words of a `bpf_sock` field (network byte order, as loaded).
#[inline(always)]
pub fn from_words(w: [u32; 4]) -> Addr {
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&w[0].to_ne_bytes());
    a[4..8].copy_from_slice(&w[1].to_ne_bytes());
    a[8..12].copy_from_slice(&w[2].to_ne_bytes());
    a[12..16].copy_from_slice(&w[3].to_ne_bytes());
    a
}

/// `bpf_sock.dst_port`, read as the 4-byte load every kernel accepts (a `__u32` until 5.18,
/// a `__be16` and padding since, with 4-byte loads kept for compatibility): the port in
/// network byte order in its low 16 bits.
///
/// # Safety
/// `sk` is a socket pointer the verifier knows (a context's socket, an skb's).
#[inline(always)]
pub unsafe fn sk_dst_port(sk: *mut bpf_sock) -> u16 {
    // SAFETY: the caller passes a socket pointer; `dst_port` starts a 4-byte slot.
    let raw = unsafe { core::ptr::read_volatile((&raw const (*sk).dst_port).cast::<u32>()) };
    u16::from_be(raw as u16)
}
