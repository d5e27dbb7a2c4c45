//! What each socket's own hook last allowed (socket storage), so that the packet backstop
//! passes a packet whose destination the socket hooks judged a moment ago instead of judging
//! it a second time: an unconnected UDP datagram right after `sendmsg4/6` allowed it, a TCP SYN
//! (and its retransmissions) after `connect4/6` did.
//!
//! Only a real allow is remembered (not an audit-mode pass), and only the last one: a socket
//! that sends to another destination is judged again by its hook, which overwrites the entry
//! or denies before any packet exists. A socket the hooks never judged (opened before the
//! programs were attached, or in another cgroup) has no entry, and the backstop judges its
//! packets in full.

use core::ptr;

use aya_ebpf::{
    bindings::bpf_sock, btf_maps::SkStorage, helpers::generated::bpf_sk_storage_get,
    macros::btf_map, programs::SockAddrContext,
};
use egress_common::Addr;

/// The last destination a socket's hook allowed.
#[repr(C)]
pub struct Judged {
    /// Destination, IPv4 mapped, network byte order.
    pub addr: Addr,
    /// Destination port, host byte order.
    pub port: u16,
    ip_proto: u8,
    /// Name binding state of a TCP socket, one of the `BIND_*` constants.
    pub bind: u8,
    _pad: [u8; 4],
    /// The socket's cookie, its key in `BOUND` (written by `sock_ops` when it binds it).
    pub cookie: u64,
}

/// Not name-bound: admitted by an `ip`/`cidr` rule or a `name_check: false` host rule.
pub const BIND_NONE: u8 = 0;
/// Name-bound, first flight not judged yet: `sock_ops` puts it in `BOUND` at the handshake.
pub const BIND_PENDING: u8 = 1;
/// Name-bound, first flight judged and let through.
pub const BIND_PASSED: u8 = 2;
/// Name-bound, first flight refused: every later send is refused too.
pub const BIND_REFUSED: u8 = 3;
/// UDP to a destination only name-checking host rules admit: QUIC long-header packets are
/// dropped by the backstop (their name is encrypted), other datagrams pass.
pub const BIND_NO_QUIC: u8 = 4;

#[btf_map]
static JUDGED: SkStorage<Judged> = SkStorage::new();

/// 0 where the kernel does not offer socket storage to these program types: the agent then
/// loads the programs with this off, and the verifier, which knows read-only globals, never
/// meets the helper calls.
#[unsafe(no_mangle)]
static JUDGED_ON: u8 = 1;

#[inline(always)]
fn on() -> bool {
    // SAFETY: a read-only global the loader sets before loading.
    unsafe { ptr::read_volatile(&raw const JUDGED_ON) != 0 }
}

/// Remembers that the hook of `ctx`'s socket allowed `addr`, `port` over `ip_proto`, and
/// whether that binds the connection to names (`bind`, a `BIND_*` constant).
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, addr: &Addr, port: u16, ip_proto: u32, bind: u8) {
    if !on() {
        return;
    }
    // SAFETY: the helper creates or finds the socket's entry; the verifier checks the pointer
    // is tested for null before use.
    unsafe {
        let p = JUDGED.get_or_insert_ptr_mut(ctx, None);
        if p.is_null() {
            return;
        }
        (*p).addr = *addr;
        (*p).port = port;
        (*p).ip_proto = ip_proto as u8;
        (*p).bind = bind;
    }
}

/// The name binding state (`BIND_*`) of `sk` (a full socket), `BIND_NONE` without storage.
#[inline(always)]
pub fn bind_of(sk: *mut bpf_sock) -> u8 {
    let j = of(sk);
    if j.is_null() {
        return BIND_NONE;
    }
    // SAFETY: non-null socket storage.
    unsafe { (*j).bind }
}

/// The socket storage of `sk` (any socket pointer the verifier accepts for
/// `bpf_sk_storage_get`: `bpf_sock_ops.sk`, `sk_msg_md.sk`), not created; null if none or if
/// the storage is off.
#[inline(always)]
pub fn of(sk: *mut bpf_sock) -> *mut Judged {
    if !on() {
        return ptr::null_mut();
    }
    // SAFETY: as in `judged`; the caller checked `sk` for null.
    unsafe {
        let map = ptr::addr_of!(JUDGED).cast_mut().cast();
        bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0).cast::<Judged>()
    }
}

/// Whether the socket `sk` (a full socket) last had `addr`, `port` over `ip_proto` allowed.
#[inline(always)]
pub fn judged(sk: *mut bpf_sock, addr: &Addr, port: u16, ip_proto: u8) -> bool {
    if !on() {
        return false;
    }
    // SAFETY: `sk` is a full socket the caller got from `bpf_sk_fullsock` and checked for
    // null; the map pointer is the map's own definition, as for every map helper.
    unsafe {
        let map = ptr::addr_of!(JUDGED).cast_mut().cast();
        let p = bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0).cast::<Judged>();
        !p.is_null() && (*p).port == port && (*p).ip_proto == ip_proto && (*p).addr == *addr
    }
}
