//! What a socket hook allowed a moment ago, so that the packet backstop passes the packet that
//! very call sends instead of judging its destination a second time: the SYN of a connect that
//! `connect4/6` allowed, the datagram of an unconnected send that `sendmsg4/6` allowed.
//!
//! One slot per CPU holds the last real allow made on that CPU (not an audit-mode pass): the
//! socket (by cookie), destination, port and protocol. A hook runs in the calling task, and the
//! SYN or datagram it lets through reaches `cgroup_skb/egress` within the same system call, on
//! the same CPU unless the task was moved in between. The backstop passes a packet only when
//! the slot names its socket, destination, port and protocol, and uses the slot up; anything
//! else (another socket's allow in between, a task moved to another CPU, a SYN retransmitted
//! from a timer, a Fast Open SYN sent by a later `write`, a socket no hook judged) is judged in
//! full. Nothing is allocated per socket: the socket storage this replaced cost about 1.1 µs
//! per connect to allocate, for 0.1 µs saved on the SYN.
//!
//! The slot is shared by everything that runs on the CPU, and a cgroup program runs with
//! migration off but preemption and softirqs on (`bpf_prog_run_array_cg`): a hook can be
//! preempted by another task's hook, and interrupted by a softirq's backstop, in the middle of
//! its writes. So the slot carries a tag: a writer zeroes it first, writes the fields, and
//! closes with a fresh random tag only if nobody wrote in between; a reader accepts the fields
//! only when the tag is non-zero and the same before and after reading them (a seqcount whose
//! values never repeat, so a writer that read a stale count cannot make a torn slot look
//! whole). A torn or busy slot reads as "not judged": the packet is judged in full.
//! docs/KERNEL-NOTES.md ("The JUDGED slot") has the kernel paths this relies on.

use core::ptr::{self, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, bpf_sock},
    btf_maps::SkStorage,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, generated::bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::PerCpuArray,
    programs::SockAddrContext,
};
use egress_common::Addr;

/// The last allow a hook made on this CPU. Read and written field by field with volatile
/// accesses, so that the compiler keeps the tag's accesses around the fields'.
#[repr(C)]
pub struct Judged {
    /// 0 while a hook writes the slot (or after the backstop used it), else the random tag of
    /// the write that completed last.
    tag: u32,
    port: u16,
    ip_proto: u8,
    _pad: u8,
    /// The socket's cookie (never 0 for a socket).
    cookie: u64,
    /// The destination (IPv4 mapped), as two words.
    addr: [u64; 2],
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

#[inline(always)]
fn words(addr: &Addr) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&addr[..8]);
    hi.copy_from_slice(&addr[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

/// Remembers that the hook of `ctx`'s socket allowed `addr`, `port` over `ip_proto`, and
/// whether that binds the connection to names (`bind`, a `BIND_*` constant). `ip_proto` 0 (an
/// audit-mode pass) fills no slot: only the binding is recorded.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, addr: &Addr, port: u16, ip_proto: u32, bind: u8) {
    remember_binding(ctx, addr, port, ip_proto, bind);
    if !on() || ip_proto == 0 {
        return;
    }
    let Some(p) = JUDGED.get_ptr_mut(0) else {
        return;
    };
    let [a0, a1] = words(addr);
    // SAFETY: a sock_addr context is a valid argument for the cookie helper; `p` is this
    // CPU's slot, which stays this CPU's for the whole run (migration is off), and every access
    // is volatile so that the order below is the order of the stores.
    unsafe {
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        write_volatile(&raw mut (*p).tag, 0);
        write_volatile(&raw mut (*p).cookie, cookie);
        write_volatile(&raw mut (*p).addr[0], a0);
        write_volatile(&raw mut (*p).addr[1], a1);
        write_volatile(&raw mut (*p).port, port);
        write_volatile(&raw mut (*p).ip_proto, ip_proto as u8);
        // A hook that preempted this one between the first store and here wrote its own tag:
        // some fields are ours, some its, so the slot stays unusable (0).
        if read_volatile(&raw const (*p).tag) == 0 {
            write_volatile(&raw mut (*p).tag, bpf_get_prandom_u32() | 1);
        } else {
            write_volatile(&raw mut (*p).tag, 0);
        }
    }
}

/// Whether the hook of `skb`'s socket allowed `addr`, `port` over `ip_proto` last on this
/// CPU, with nobody using that allow since; a yes uses it up.
#[inline(always)]
pub fn judged(skb: *mut __sk_buff, addr: &Addr, port: u16, ip_proto: u8) -> bool {
    if !on() {
        return false;
    }
    let Some(p) = JUDGED.get_ptr_mut(0) else {
        return false;
    };
    let [a0, a1] = words(addr);
    // SAFETY: this CPU's slot (see `remember`); the skb is the program's context, a valid
    // argument for the helper (0 for a packet without a socket, which no slot names).
    unsafe {
        let tag = read_volatile(&raw const (*p).tag);
        if tag == 0
            || read_volatile(&raw const (*p).port) != port
            || read_volatile(&raw const (*p).ip_proto) != ip_proto
            || read_volatile(&raw const (*p).addr[0]) != a0
            || read_volatile(&raw const (*p).addr[1]) != a1
        {
            return false;
        }
        let cookie = read_volatile(&raw const (*p).cookie);
        if read_volatile(&raw const (*p).tag) != tag || bpf_get_socket_cookie(skb.cast()) != cookie
        {
            return false;
        }
        write_volatile(&raw mut (*p).tag, 0);
        true
    }
}

/// Name binding state of a socket the hooks judged (issue 13), in socket storage: created only
/// for a socket name binding concerns (a name-bound connect, a UDP send to a destination only
/// name-checking host rules admit), so the common connect allocates nothing.
#[repr(C)]
pub struct Binding {
    /// Destination, IPv4 mapped, network byte order.
    pub addr: Addr,
    /// Destination port, host byte order.
    pub port: u16,
    ip_proto: u8,
    /// One of the `BIND_*` constants.
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

#[btf_map]
static BINDING: SkStorage<Binding> = SkStorage::new();

#[inline(always)]
fn remember_binding(ctx: &SockAddrContext, addr: &Addr, port: u16, ip_proto: u32, bind: u8) {
    if bind == BIND_NONE {
        // Admitted by address (or UDP, which records nothing): no lookup of the socket's
        // storage (a helper call on every connect and send). A binding left from an earlier
        // connect of the same socket names that connection's destination, and every reader
        // compares it with its own (`sock_ops` with the socket's peer, the backstop with the
        // packet's destination); a socket that left `BOUND` when it disconnected never meets
        // `first_flight` again unless `sock_ops` binds it anew.
        return;
    }
    // SAFETY: the helper finds or creates the socket's entry; the pointer is tested for null
    // before use.
    unsafe {
        let p = BINDING.get_or_insert_ptr_mut(ctx, None);
        if p.is_null() {
            return;
        }
        (*p).addr = *addr;
        (*p).port = port;
        (*p).ip_proto = ip_proto as u8;
        (*p).bind = bind;
    }
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
