//! Name binding state of a socket (issue 13), kept in socket storage (`BINDING`): what the
//! connect hook admitted a name-bound connection to, and how far its first flight got. Created
//! only for a socket name binding concerns, so the common connect allocates nothing.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    bindings::bpf_sock,
    btf_maps::SkStorage,
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::Array,
    programs::SockAddrContext,
};
use egress_common::Addr;

/// Name binding state of a socket, in socket storage: created only by a name-bound TCP connect
/// (or an audit-mode pass of a deny, whose first flight is judged and reported).
#[repr(C)]
pub struct Binding {
    /// Destination, IPv4 mapped, network byte order.
    pub addr: Addr,
    /// Destination port, host byte order.
    pub port: u16,
    ip_proto: u8,
    /// One of the `BIND_*` constants (a socket admitted by address has no storage).
    pub bind: u8,
    /// 1 while this socket is counted in `HELD` (see [`hold`]).
    held: u8,
    _pad: [u8; 3],
    /// The socket's cookie, its key in `BOUND` (written by `sock_ops` when it binds it).
    pub cookie: u64,
}

/// Name-bound, first flight not judged yet: `sock_ops` puts it in `BOUND` at the handshake.
pub const BIND_PENDING: u8 = 1;
/// Name-bound, first flight judged and let through.
pub const BIND_PASSED: u8 = 2;
/// Name-bound, first flight refused: every later send is refused too.
pub const BIND_REFUSED: u8 = 3;

#[btf_map]
static BINDING: SkStorage<Binding> = SkStorage::new();

/// At index 0, how many sockets are counted as holding payload back: a socket is counted from
/// the start of its name-bound active open (`sock_ops`, `TCP_CONNECT_CB`, before its SYN can
/// carry a byte) until its first flight passes or it closes. While it reads 0 no socket can
/// send a byte its binding holds back, and the backstop passes payload without looking a
/// socket's storage up (26 ns of its 91 ns/run per established segment, issue 14). Pinned with
/// `BINDING`, whose `held` marks say what it counts.
#[map]
static HELD: Array<u64> = Array::with_max_entries(1, 0);

/// Marks `ctx`'s socket name-bound (`BIND_PENDING`) to `addr`, `port` over `ip_proto` (0 for
/// an audit-mode pass of a deny, whose first flight is judged and reported but never let
/// through as an allow), creating its storage. Returns false when the storage cannot be
/// created: the caller must then refuse the connect, since nothing would hold its first flight
/// back. The kernel charges socket storage to the socket's option memory (`sk_omem_alloc`,
/// bounded by `net.core.optmem_max`), which the socket's own process can fill beforehand
/// (`TCP_MD5SIG` keys need no capability), so this fails on demand, not only under memory
/// pressure.
///
/// A connect admitted by address records nothing: no lookup of the socket's storage (a helper
/// call) on every connect. A binding left from an earlier connect of the same socket names that
/// connection's destination, and every reader compares it with its own (`sock_ops` with the
/// socket's peer, the backstop with the packet's destination); a socket that left `BOUND` when
/// it disconnected never meets `first_flight` again unless `sock_ops` binds it anew.
#[inline(always)]
#[must_use]
pub fn pending(ctx: &SockAddrContext, addr: &Addr, port: u16, ip_proto: u32) -> bool {
    // SAFETY: the helper finds or creates the socket's entry; the pointer is tested for null
    // before use.
    unsafe {
        let p = BINDING.get_or_insert_ptr_mut(ctx, None);
        if p.is_null() {
            return false;
        }
        (*p).addr = *addr;
        (*p).port = port;
        (*p).ip_proto = ip_proto as u8;
        (*p).bind = BIND_PENDING;
    }
    true
}

/// The binding storage of `sk` (any socket pointer the verifier accepts for
/// `bpf_sk_storage_get`: `bpf_sock_ops.sk`, `sk_msg_md.sk`, a full socket from an skb), not
/// created; null if none.
#[inline(always)]
pub fn of(sk: *mut bpf_sock) -> *mut Binding {
    // SAFETY: the caller checked `sk` for null; the map pointer is the map's own definition.
    unsafe {
        let map = ptr::addr_of!(BINDING).cast_mut().cast();
        bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0).cast::<Binding>()
    }
}

/// Counts `j`'s socket in `HELD`, once (a socket already counted is not counted again).
/// Returns false when the count cannot be reached. Called under the socket's lock, as every
/// change of `held` is (`sock_ops`, `first_flight`), so each socket adds its 1 and takes it
/// back at most once.
#[inline(always)]
pub fn hold(j: *mut Binding) -> bool {
    let Some(n) = HELD.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a non-null socket storage pointer; `n` is the map's value, an aligned `u64`
    // changed only by atomic adds.
    unsafe {
        if (*j).held == 0 {
            (*j).held = 1;
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(n, 1);
        }
    }
    true
}

/// Takes `j`'s socket's 1 back from `HELD`, if it is counted: its first flight passed, or it
/// closed.
#[inline(always)]
pub fn unhold(j: *mut Binding) {
    let Some(n) = HELD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in [`hold`]; adding `u64::MAX` subtracts 1.
    unsafe {
        if (*j).held != 0 {
            (*j).held = 0;
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(n, u64::MAX);
        }
    }
}

/// Whether some socket is counted in `HELD` (true when the count cannot be read: then every
/// socket is looked up, as if some were).
#[inline(always)]
pub fn any_held() -> bool {
    match HELD.get_ptr(0) {
        // SAFETY: the map's value, read as a whole aligned word.
        Some(n) => unsafe { ptr::read_volatile(n) != 0 },
        None => true,
    }
}
