//! Name binding (issue 13): a TCP connection admitted only by host rules that check names
//! must send, as its first bytes, a TLS ClientHello whose `server_name` or an HTTP/1.x request
//! whose `Host` the policy permits on that port. Judged before a byte leaves:
//!
//! - `connect4/6` mark such a socket `BIND_PENDING` in its `BINDING` socket storage (`binding`);
//! - `sock_ops` (cgroup `sock_ops`) puts it in `BOUND` (a sockhash) when its handshake
//!   completes, before the application can send;
//! - `first_flight` (`sk_msg`, attached to `BOUND`) runs on each send of a socket in `BOUND`:
//!   it corks until the whole ClientHello record or request head is in (at most
//!   `FIRST_FLIGHT_MAX` bytes, larger is refused), reads the name, and looks it up in `NAMES`.
//!   A permitted name takes the socket out of `BOUND` (later sends go straight to TCP, at full
//!   speed); anything else is `SK_DROP`: the send fails with `EACCES` and nothing reaches the
//!   wire. A refused socket stays refused.
//!
//! The flight is copied into a per-CPU buffer (`SCRATCH`), which a run holds from the copy to
//! its verdict (`take_scratch`): a run preempted mid-parse keeps its slot, and a run that
//! preempts it on the same CPU takes another, so no run ever sees another socket's bytes. Each
//! run judges the whole message from its first byte (a corked flight is handed back whole),
//! so nothing of the flight outlives the run. A socket storage buffer, created and freed per
//! flight, cost about 2 µs of the program's 2.9 (docs/KERNEL-NOTES.md). All parse state lives
//! in that map value: the verifier does not track map memory, so the paths of a byte-scanning
//! loop meet again at its head and are pruned instead of doubling each iteration.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock, sk_action,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
        generated::{
            bpf_get_socket_cookie, bpf_loop, bpf_map_delete_elem, bpf_msg_cork_bytes,
            bpf_msg_pull_data,
        },
    },
    macros::{cgroup_sockopt, map, sk_msg, sock_ops},
    maps::{LpmTrie, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkMsgContext, SockOpsContext, SockoptContext},
};
use egress_common::{
    AllowValue,
    consts::{
        BOUND_CAPACITY, COUNTER_ERROR, COUNTER_NAME_DENY, COUNTER_NAME_PASS,
        DEFAULT_NAMES_CAPACITY, FIRST_FLIGHT_MAX, PROTO_TCP, VERDICT_ALLOW, VERDICT_DENY,
    },
    events::{NAME_MAX, NameDenyEvent, hook, name_why, reason},
    names::{EXACT_END, NAME_KEY_BYTES, NameBytes},
};

use super::{
    binding::{self, BIND_PASSED, BIND_PENDING, BIND_REFUSED},
    verdict::{Destination, audit_mode, count, deny},
};
use crate::maps::EVENTS;

/// Names host rules permit, reversed (see `egress_common::names`), to their TCP ports.
#[map]
pub static NAMES: LpmTrie<NameBytes, AllowValue> =
    LpmTrie::with_max_entries(DEFAULT_NAMES_CAPACITY, 0);

/// Name-bound sockets whose first flight is not judged yet, by socket cookie.
#[map]
pub static BOUND: SockHash<u64> = SockHash::with_max_entries(BOUND_CAPACITY, 0);

/// Buffer length: `FIRST_FLIGHT_MAX` and slack, so that a read a few bytes past a masked
/// offset stays inside (the verifier needs every offset provably in bounds).
const BUF: usize = FIRST_FLIGHT_MAX as usize + 64;
/// Mask that keeps an offset below `FIRST_FLIGHT_MAX` (a power of two).
const MASK: u32 = FIRST_FLIGHT_MAX - 1;
const _: () = assert!(FIRST_FLIGHT_MAX.is_power_of_two());

/// Longest host name (RFC 1035 2.3.4).
const MAX_NAME: u32 = 253;
/// Most TLS extensions walked; a ClientHello with more is refused.
const MAX_EXTENSIONS: u32 = 64;
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u32 = 0;
const EXT_ECH: u32 = 0xfe0d;

/// A socket's first flight while it is judged, and the parse state (see the module doc).
#[repr(C)]
pub struct Flight {
    /// In this CPU's scratch: how many runs are trying to hold it or hold it (see
    /// `take_scratch`; 64 bits: the BPF target's atomics). Unused in a socket's own storage.
    owner: u64,
    /// The lookup key built from the name.
    key: Key<NameBytes>,
    /// Bytes of the flight in `buf`.
    len: u32,
    /// Where the name starts in `buf`, and its length.
    name_at: u32,
    name_len: u32,
    /// HTTP scan state: `Host` headers seen, where the last one starts, head complete.
    hosts: u32,
    host_at: u32,
    done: u32,
    /// Name copy state: the byte before (for empty labels); the walks' phase.
    prev: u32,
    /// Walk position and end (TLS extensions, Host value).
    pos: u32,
    end: u32,
    /// The `server_name` extension's body and length.
    sni: u32,
    sni_len: u32,
    /// The flight's first bytes.
    buf: [u8; BUF],
}

/// Flight buffers, `SCRATCH_SLOTS` per CPU: a run holds one while it judges (see the module
/// doc and `take_scratch`).
#[map]
static SCRATCH: PerCpuArray<Flight> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);
/// One slot per run that can be preempted mid-parse on a CPU and still hold its slot. A run
/// that finds all of them held fails its send (`EACCES`, counted as an error): it would take
/// four senders preempted in the middle of their parse on one CPU.
const SCRATCH_SLOTS: u32 = 4;

/// `SOL_TCP` and `TCP_ULP` (include/uapi/linux/tcp.h).
const SOL_TCP: i32 = 6;
const TCP_ULP: i32 = 31;

/// Refuses `setsockopt(SOL_TCP, TCP_ULP)` on a name-bound socket until its first flight was
/// judged and let through. Kernel TLS (the `tls` ULP) on a socket in `BOUND` makes
/// `tls_sw_sendmsg` run `first_flight` on the *plaintext* record and send its encryption: with
/// a key of its own choosing the sender can make a plaintext that reads as a permitted
/// ClientHello encrypt to one naming another tenant (docs/KERNEL-NOTES.md). A real kTLS user
/// sets the ULP after its handshake, whose ClientHello was judged. Every other option passes.
#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    match try_setsockopt(&ctx) {
        Ok(v) => v,
        Err(()) => {
            count(COUNTER_ERROR);
            VERDICT_DENY
        }
    }
}

fn try_setsockopt(ctx: &SockoptContext) -> Result<i32, ()> {
    // SAFETY: the context the kernel passed; `level` and `optname` are plain fields.
    let (level, optname, sk) = unsafe {
        let o = &*ctx.sockopt;
        (o.level, o.optname, o.__bindgen_anon_1.sk)
    };
    if level != SOL_TCP || optname != TCP_ULP {
        return Ok(VERDICT_ALLOW);
    }
    if sk.is_null() {
        return Err(());
    }
    let j = binding::of(sk);
    if j.is_null() {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: non-null socket storage.
    let (bind, addr, port) = unsafe { ((*j).bind, (*j).addr, (*j).port) };
    // A binding for another destination is an earlier connection's (see `names_peer`).
    if (bind != BIND_PENDING && bind != BIND_REFUSED) || !names_sock_peer(sk, &addr, port) {
        return Ok(VERDICT_ALLOW);
    }
    Ok(deny(
        &Destination {
            addr,
            port,
            ip_proto: 6,
            hook: hook::SETSOCKOPT,
        },
        reason::NAME,
    ))
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    if try_sockops(&ctx).is_err() {
        count(COUNTER_ERROR);
    }
    // The return value of a sock_ops program only matters for ops that ask for a reply.
    1
}

/// At the end of an active open, puts a name-bound socket into `BOUND`: the first send then
/// meets `first_flight`. The application cannot send before: `tcp_sendmsg` waits for the
/// handshake (see docs/KERNEL-NOTES.md for the thread that was already waiting).
///
/// `first_flight` cannot take a socket out of `BOUND` itself (the verifier refuses a sockmap
/// delete from `sk_msg`: "cannot update sockmap in this context"), so the socket also asks for
/// RTT callbacks: the ACK of its first flight runs this program again, which removes a
/// passed socket from `BOUND` and stops the callbacks. From then on its sends go straight to
/// `tcp_sendmsg`.
///
/// Before that, at the start of the active open (`TCP_CONNECT_CB`, before a SYN is built, Fast
/// Open data included), a socket whose binding holds payload back (pending or refused) is
/// counted in `HELD` and asks for state callbacks; it stays counted until its first flight
/// passes (`first_flight`) or it closes (the state callback to `TCP_CLOSE`, whatever the path:
/// a refused SYN, a reset, a close, a disconnect). The state callback flag marks a counted
/// socket here: the end of the handshake looks up the storage of no other socket.
fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_RTT_CB => {}
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {}
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0 => {}
        _ => return Ok(()),
    }
    // SAFETY: `sk` is a field of every sock_ops context (Linux 5.10+); checked for null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Err(());
    }
    let j = binding::of(sk);
    if j.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null socket storage pointer.
    unsafe {
        match op {
            BPF_SOCK_OPS_TCP_CONNECT_CB => {
                // Every binding the backstop would act on is counted, whatever destination it
                // names (one left from an earlier connection is counted for nothing, until
                // this one closes): the count must never read 0 while the backstop would have
                // held a byte back.
                if (*j).bind != BIND_PENDING && (*j).bind != BIND_REFUSED {
                    return Ok(());
                }
                // Counted first: a socket whose callbacks could not be set stays counted, and
                // the backstop keeps looking its payload up (closed, never open).
                if !binding::hold(j) {
                    return Err(());
                }
                return ctx
                    .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                    .map_err(|_| ());
            }
            BPF_SOCK_OPS_STATE_CB => {
                binding::unhold(j);
                let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
                return Ok(());
            }
            BPF_SOCK_OPS_RTT_CB => {
                if (*j).bind == BIND_PASSED {
                    let cookie = (*j).cookie;
                    let map = ptr::addr_of!(BOUND).cast_mut().cast();
                    bpf_map_delete_elem(map, ptr::addr_of!(cookie).cast());
                    // No more callbacks: the socket is no longer counted (its flight passed).
                    let _ = ctx.set_cb_flags(
                        (ctx.cb_flags() & !(BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG))
                            as i32,
                    );
                }
                return Ok(());
            }
            _ => {}
        }
        // A binding for another destination is an earlier connection's: `connect4/6` do not
        // clear a TCP socket's binding when it connects again where no name binding applies
        // (that would cost every connect a socket storage lookup).
        if (*j).bind != BIND_PENDING || !names_peer(ctx, &*j) {
            return Ok(());
        }
        let mut cookie = bpf_get_socket_cookie(ctx.ops.cast());
        (*j).cookie = cookie;
        BOUND
            .update(&mut cookie, &mut *ctx.ops, u64::from(BPF_ANY))
            .map_err(|_| ())?;
        ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_RTT_CB_FLAG) as i32)
            .map_err(|_| ())
    }
}

/// Whether the binding `j` was recorded for the peer of `ctx`'s socket (address, IPv4
/// mapped, and port). `remote_port` holds the port in network byte order in its upper 16
/// bits (the kernel shifts `skc_dport` up on little-endian machines), hence `from_be` of the
/// whole word.
#[inline(always)]
fn names_peer(ctx: &SockOpsContext, j: &binding::Binding) -> bool {
    if u32::from_be(ctx.remote_port()) as u16 != j.port {
        return false;
    }
    // Every field read, volatile, before any is chosen: with the choice first, LLVM picked the
    // field's offset in a register, and the verifier refuses a context access at a variable
    // offset ("dereference of modified ctx ptr").
    // SAFETY: plain 4-byte loads of context fields the verifier checks.
    let (family, ip4, w) = unsafe {
        let o = ctx.ops;
        (
            ptr::read_volatile(&raw const (*o).family),
            ptr::read_volatile(&raw const (*o).remote_ip4),
            [
                ptr::read_volatile(&raw const (*o).remote_ip6[0]),
                ptr::read_volatile(&raw const (*o).remote_ip6[1]),
                ptr::read_volatile(&raw const (*o).remote_ip6[2]),
                ptr::read_volatile(&raw const (*o).remote_ip6[3]),
            ],
        )
    };
    let peer = super::addr::local_addr(family, ip4, w);
    peer == j.addr
}

/// Whether `addr`, `port` (a binding's) are the peer of `sk` (a full socket): `dst_port` is
/// read as the 4-byte load every kernel accepts (the port in network byte order in its low 16
/// bits), each address field volatile before the family chooses (see `names_peer`).
#[inline(always)]
fn names_sock_peer(sk: *mut bpf_sock, addr: &egress_common::Addr, port: u16) -> bool {
    // SAFETY: `sk` is the context's non-null socket; plain 4-byte loads the verifier checks.
    let (family, dport, ip4, w) = unsafe {
        (
            ptr::read_volatile(&raw const (*sk).family),
            ptr::read_volatile((&raw const (*sk).dst_port).cast::<u32>()),
            ptr::read_volatile(&raw const (*sk).dst_ip4),
            [
                ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
            ],
        )
    };
    u16::from_be(dport as u16) == port && super::addr::local_addr(family, ip4, w) == *addr
}

/// What a parser found, as one scalar (a parser is a BPF-to-BPF call returning it in r0: an
/// enum with a payload, inlined, let LLVM compute the payload of one variant on the path of
/// another, on a register the verifier knew to hold a pointer, "pointer arithmetic with <<=
/// operator prohibited"). `kind << 32 | value`.
type Seen = u64;
/// The name is at `Flight::name_at`, `name_len` bytes.
const NAME: u64 = 1 << 32;
/// `NEED | n`: this many bytes in all are needed before the flight can be judged.
const NEED: u64 = 2 << 32;
/// `REFUSE | why`: refused, with a `name_why` constant.
const REFUSE: u64 = 3 << 32;

#[inline(always)]
fn need(n: u32) -> Seen {
    NEED | u64::from(n)
}

#[inline(always)]
fn refuse(why: u8) -> Seen {
    REFUSE | u64::from(why)
}

#[sk_msg]
pub fn first_flight(ctx: SkMsgContext) -> u32 {
    match try_first_flight(&ctx) {
        Ok(v) => v,
        Err(()) => {
            count(COUNTER_ERROR);
            sk_action::SK_DROP
        }
    }
}

fn try_first_flight(ctx: &SkMsgContext) -> Result<u32, ()> {
    // SAFETY: `sk` is a field of every sk_msg context (Linux 5.8+); checked for null.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return Err(());
    }
    let j = binding::of(sk);
    if j.is_null() {
        return Err(());
    }
    // SAFETY: non-null socket storage; `sk_msg` runs under the socket lock.
    let (state, port) = unsafe { ((*j).bind, (*j).port) };
    match state {
        BIND_PENDING => {}
        BIND_REFUSED => return Ok(sk_action::SK_DROP),
        // Passed (a send racing the removal from BOUND), or never bound.
        _ => return Ok(sk_action::SK_PASS),
    }
    let size = ctx.size();
    if size == 0 {
        return Ok(sk_action::SK_PASS);
    }
    let avail = if size > FIRST_FLIGHT_MAX {
        FIRST_FLIGHT_MAX
    } else {
        size
    };
    // SAFETY: the helper bounds-checks against the message.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, avail, 0) } != 0 {
        return Err(());
    }
    let f = take_scratch().ok_or(())?;
    // SAFETY: a non-null map value pointer, this run's alone until `put_scratch`.
    let verdict = judge_flight(ctx, j, unsafe { &mut *f }, size, avail, port);
    put_scratch(f);
    verdict
}

/// A free flight buffer of this CPU, taken, or `None` when all `SCRATCH_SLOTS` are held by
/// runs preempted mid-parse. The BPF target has atomic add (one `lock xadd`, which no
/// preemption splits) but no compare-and-exchange: a run adds 1 to a slot's `owner`, holds
/// the slot if it then reads 1, and otherwise takes its 1 back and tries the next. Two runs
/// inside one slot at once (each between its add and its subtract) both read at least 2, so
/// at most one holds it. All slots are of one map: the verifier walks the parse once.
#[inline(always)]
fn take_scratch() -> Option<*mut Flight> {
    let mut i: u32 = 0;
    while i < SCRATCH_SLOTS {
        let f = SCRATCH.get_ptr_mut(i)?;
        // SAFETY: a non-null per-CPU map value, this CPU's for the whole run (`sk_msg` runs
        // with migration off); `owner` is an aligned `u64` only ever added to atomically, and
        // read.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*f).owner, 1);
            if ptr::read_volatile(&raw const (*f).owner) == 1 {
                return Some(f);
            }
        }
        put_scratch(f);
        i += 1;
    }
    None
}

/// Takes this run's 1 back from the slot's `owner` (see `take_scratch`).
#[inline(always)]
fn put_scratch(f: *mut Flight) {
    // SAFETY: as in `take_scratch`; adding `u64::MAX` subtracts 1 (an atomic add, where the
    // target may lack an atomic subtract).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*f).owner, u64::MAX) };
}

/// Copies, parses and judges the flight (`size` bytes, `avail` of them pulled linear) in `f`.
#[inline(always)]
fn judge_flight(
    ctx: &SkMsgContext,
    j: *mut binding::Binding,
    f: &mut Flight,
    size: u32,
    avail: u32,
    port: u16,
) -> Result<u32, ()> {
    // Through memory, volatile: the copy loop can end after any of its 4096 steps, and a
    // length the verifier knows exactly would make it walk the whole parse once per length
    // ("BPF program is too large"). Read back from the map value it is just a number.
    // SAFETY: plain writes and reads of our map value.
    let len = unsafe {
        ptr::write_volatile(&raw mut f.len, copy_in(ctx, f, avail));
        ptr::read_volatile(&raw const f.len)
    };
    let seen = if f.buf[0] == TLS_HANDSHAKE {
        tls(f, len)
    } else {
        http(f, len)
    };
    let value = seen as u32;
    let why = match seen & !0xffff_ffff {
        NEED if value > FIRST_FLIGHT_MAX => name_why::TOO_LARGE,
        NEED if value > size => {
            // SAFETY: plain helper on our context.
            unsafe { bpf_msg_cork_bytes(ctx.msg, value) };
            return Ok(sk_action::SK_PASS);
        }
        REFUSE => value as u8,
        NAME => match name_to_key(f) {
            Err(why) => why,
            Ok(()) => match NAMES.get(&f.key) {
                Some(v) if v.permits(port, PROTO_TCP) => {
                    count(COUNTER_NAME_PASS);
                    release(j, BIND_PASSED);
                    return Ok(sk_action::SK_PASS);
                }
                _ => name_why::NOT_PERMITTED,
            },
        },
        // NEED no larger than what is there: cannot happen.
        _ => name_why::ERROR,
    };
    count(COUNTER_NAME_DENY);
    let audit = audit_mode();
    report(ctx, j, f, why, audit);
    if audit {
        release(j, BIND_PASSED);
        return Ok(sk_action::SK_PASS);
    }
    release(j, BIND_REFUSED);
    Ok(sk_action::SK_DROP)
}

/// Ends the judging of a socket: records `state` (`sock_ops` takes a passed socket out of
/// `BOUND` when its first flight is acknowledged; a refused one stays, and every later send
/// is refused). A passed socket holds nothing back any more: it leaves `HELD`'s count (a
/// refused one stays counted until it closes).
#[inline(always)]
fn release(j: *mut binding::Binding, state: u8) {
    // SAFETY: a non-null storage pointer.
    unsafe { (*j).bind = state };
    if state == BIND_PASSED {
        binding::unhold(j);
    }
}

/// Copies the first `avail` (at most `FIRST_FLIGHT_MAX`) bytes of the message, pulled into
/// its linear part, into `f.buf`; returns how many were copied.
#[inline(always)]
fn copy_in(ctx: &SkMsgContext, f: &mut Flight, avail: u32) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut n: u32 = 0;
    // Eight bytes a turn: 512 turns at most, each with the bounds check the verifier needs.
    let mut i: u32 = 0;
    while i < FIRST_FLIGHT_MAX / 8 {
        let at = data + (i as usize) * 8;
        if at + 8 > end || n + 8 > avail {
            break;
        }
        // SAFETY: `at..at + 8` is inside the message's linear data (checked just above).
        let w = unsafe { ptr::read_unaligned(at as *const u64) };
        let o = (n & MASK) as usize;
        if o + 8 <= BUF {
            // SAFETY: in bounds (checked).
            unsafe { ptr::write_unaligned(f.buf.as_mut_ptr().add(o).cast::<u64>(), w) };
        }
        n += 8;
        i += 1;
    }
    let mut k: u32 = 0;
    while k < 8 {
        let at = data + (n as usize);
        if at + 1 > end || n >= avail {
            break;
        }
        // SAFETY: `at` is inside the message's linear data (checked just above).
        f.buf[(n & MASK) as usize] = unsafe { *(at as *const u8) };
        n += 1;
        k += 1;
    }
    n
}

#[inline(always)]
fn at(f: &Flight, off: u32) -> u32 {
    u32::from(f.buf[(off & MASK) as usize])
}

#[inline(always)]
fn be16(f: &Flight, off: u32) -> u32 {
    (at(f, off) << 8) | at(f, off + 1)
}

/// A TLS record holding one whole ClientHello: finds its `server_name`.
#[inline(never)]
fn tls(f: &mut Flight, len: u32) -> Seen {
    if len < 5 {
        return need(5);
    }
    if at(f, 1) != 3 {
        return refuse(name_why::BAD_TLS);
    }
    let record = 5 + be16(f, 3);
    if record > FIRST_FLIGHT_MAX {
        return refuse(name_why::TOO_LARGE);
    }
    if len < record {
        return need(record);
    }
    if at(f, 5) != u32::from(TLS_CLIENT_HELLO) || at(f, 6) != 0 {
        return refuse(name_why::BAD_TLS);
    }
    // A ClientHello split over several records would need reassembling: refused.
    let hello_end = 9 + be16(f, 7);
    if hello_end > record {
        return refuse(name_why::BAD_TLS);
    }
    // version (2), random (32), then the session id.
    let mut p = 9 + 2 + 32;
    if p + 1 > hello_end {
        return refuse(name_why::BAD_TLS);
    }
    p += 1 + at(f, p);
    if p + 2 > hello_end {
        return refuse(name_why::BAD_TLS);
    }
    p += 2 + be16(f, p);
    if p + 1 > hello_end {
        return refuse(name_why::BAD_TLS);
    }
    p += 1 + at(f, p);
    if p + 2 > hello_end {
        return refuse(name_why::NO_SNI);
    }
    let ext_end = p + 2 + be16(f, p);
    p += 2;
    if ext_end > hello_end {
        return refuse(name_why::BAD_TLS);
    }
    f.pos = p;
    f.end = ext_end;
    f.sni = 0;
    f.sni_len = 0;
    f.done = 0;
    let mut walk = Walk {
        f: ptr::from_mut(f),
    };
    // SAFETY: as for `scan_step`.
    unsafe {
        bpf_loop(
            MAX_EXTENSIONS,
            ext_step as *mut c_void,
            ptr::addr_of_mut!(walk).cast(),
            0,
        )
    };
    if f.done != 0 {
        return refuse(f.done as u8);
    }
    if f.pos + 4 <= f.end {
        // More extensions than walked.
        return refuse(name_why::BAD_TLS);
    }
    let (sni, sni_len) = (f.sni, f.sni_len);
    if sni == 0 {
        return refuse(name_why::NO_SNI);
    }
    // server_name_list: its length, then one entry: type 0 (host_name), length, name. A list
    // with anything else in it is refused.
    if sni_len < 5 || be16(f, sni) + 2 != sni_len || at(f, sni + 2) != 0 {
        return refuse(name_why::BAD_TLS);
    }
    let name_len = be16(f, sni + 3);
    if name_len + 5 != sni_len {
        return refuse(name_why::BAD_TLS);
    }
    f.name_at = sni + 5;
    f.name_len = name_len;
    NAME
}

/// An HTTP/1.x request head in origin form: finds its one `Host`.
#[inline(never)]
fn http(f: &mut Flight, len: u32) -> Seen {
    // The method: 1 to 15 upper-case letters, then a space.
    let mut sp: u32 = 0;
    let mut k: u32 = 0;
    while k < 16 {
        if k >= len {
            return need(len + 1);
        }
        let c = at(f, k);
        if c == u32::from(b' ') {
            sp = k;
            break;
        }
        if !(u32::from(b'A')..=u32::from(b'Z')).contains(&c) {
            return refuse(name_why::UNKNOWN);
        }
        k += 1;
    }
    if sp == 0 {
        return refuse(name_why::UNKNOWN);
    }
    if sp + 2 > len {
        return need(len + 1);
    }
    if sp == 3 && at(f, 0) == u32::from(b'P') && at(f, 1) == u32::from(b'R') {
        // "PRI * HTTP/2.0": HTTP/2 prior knowledge.
        return refuse(name_why::H2C);
    }
    // Origin form ("/path") or asterisk form ("*"); an absolute-form target names its own
    // host, which a server prefers over Host: refused (clients use it for proxies only).
    let t = at(f, sp + 1);
    if t != u32::from(b'/') && t != u32::from(b'*') {
        return refuse(name_why::UNKNOWN);
    }
    f.hosts = 0;
    f.done = 0;
    f.host_at = 0;
    let i: u32 = sp;
    f.len = len;
    f.prev = i;
    let mut walk = Walk {
        f: ptr::from_mut(f),
    };
    // SAFETY: `scan_step` is a static BPF function with the callback signature; `walk` lives
    // on this frame for the whole call.
    unsafe {
        bpf_loop(
            len.saturating_sub(i),
            scan_step as *mut c_void,
            ptr::addr_of_mut!(walk).cast(),
            0,
        )
    };
    if f.done == 0 {
        return need(len + 1);
    }
    if f.done == 2 {
        return refuse(name_why::ERROR);
    }
    match f.hosts {
        0 => return refuse(name_why::NO_HOST),
        1 => {}
        _ => return refuse(name_why::TWO_HOSTS),
    }
    host_value(f, len)
}

/// The context of a `bpf_loop` walk: the flight (the callback reads everything else from it,
/// so each call starts from the same verifier state and the verifier checks it once, instead
/// of unrolling thousands of iterations: "The sequence of 8193 jumps is too complex").
#[repr(C)]
struct Walk {
    f: *mut Flight,
}

/// One byte of the request head scan (`bpf_loop` callback): offset `f.prev + index`.
#[inline(never)]
extern "C" fn scan_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Walk`, whose flight pointer is a non-null map value.
    let f = unsafe { &mut *(*ctx.cast::<Walk>()).f };
    let i = f.prev.wrapping_add(index as u32);
    let len = f.len;
    // `len` is at most FIRST_FLIGHT_MAX; testing `i` against that too would let LLVM drop
    // the mask in `at`, on a register copy whose bound the verifier does not carry over.
    if i >= len {
        return 1;
    }
    if at(f, i) == u32::from(b'\n') && scan_line(f, i, len) {
        return 1;
    }
    0
}

/// One byte of the name (`bpf_loop` callback): the `index`th byte from the end, lower-cased,
/// into the key. Stops the walk (1) on a byte no host name has, with `f.done` = 2.
#[inline(never)]
extern "C" fn name_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Walk`, whose flight pointer is a non-null map value.
    let f = unsafe { &mut *(*ctx.cast::<Walk>()).f };
    let k = index as u32;
    let mut c = at(f, f.host_at.wrapping_sub(k));
    if (u32::from(b'A')..=u32::from(b'Z')).contains(&c) {
        c |= 0x20;
    }
    let ok = (u32::from(b'a')..=u32::from(b'z')).contains(&c)
        || (u32::from(b'0')..=u32::from(b'9')).contains(&c)
        || c == u32::from(b'-')
        || c == u32::from(b'_')
        || (c == u32::from(b'.') && f.prev != u32::from(b'.'));
    if !ok {
        f.done = 2;
        return 1;
    }
    f.prev = c;
    f.key.data[(k & 0xff) as usize] = c as u8;
    0
}

/// At the `\n` at `i`: whether the head ends here (`f.done`: 1, or 2 when more bytes are
/// needed to tell), else whether the next line is a `Host` header (counted in `f`).
#[inline(never)]
fn scan_line(f: &mut Flight, i: u32, len: u32) -> bool {
    let n1 = at(f, i + 1);
    if i + 1 < len && n1 == u32::from(b'\n') {
        f.done = 1;
        return true;
    }
    if i + 2 < len && n1 == u32::from(b'\r') && at(f, i + 2) == u32::from(b'\n') {
        f.done = 1;
        return true;
    }
    // A head that goes on holds at least `X:` and an end after this line.
    if i + 6 > len {
        f.done = 0;
        return true;
    }
    if (at(f, i + 1) | 0x20) == u32::from(b'h')
        && (at(f, i + 2) | 0x20) == u32::from(b'o')
        && (at(f, i + 3) | 0x20) == u32::from(b's')
        && (at(f, i + 4) | 0x20) == u32::from(b't')
        && at(f, i + 5) == u32::from(b':')
    {
        f.hosts += 1;
        f.host_at = i + 6;
    }
    false
}

/// The name in the `Host` value at `f.host_at`: blanks around it, a `:port` after it.
#[inline(always)]
fn host_value(f: &mut Flight, len: u32) -> Seen {
    f.pos = f.host_at;
    f.len = len;
    f.prev = 0;
    f.done = 0;
    f.name_at = 0;
    f.name_len = 0;
    let mut walk = Walk {
        f: ptr::from_mut(f),
    };
    // SAFETY: as for `scan_step`.
    unsafe {
        bpf_loop(
            16 + MAX_NAME + 2,
            host_step as *mut c_void,
            ptr::addr_of_mut!(walk).cast(),
            0,
        )
    };
    if f.done != 1 {
        return refuse(name_why::BAD_NAME);
    }
    NAME
}

/// One TLS extension (`bpf_loop` callback) at `f.pos`, before `f.end`: notes `server_name`,
/// refuses ECH, a second `server_name` or a length past the end (into `f.done`).
#[inline(never)]
extern "C" fn ext_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Walk`, whose flight pointer is a non-null map value.
    let f = unsafe { &mut *(*ctx.cast::<Walk>()).f };
    let p = f.pos;
    if p + 4 > f.end {
        return 1;
    }
    let ty = be16(f, p);
    let body = p + 4;
    let body_len = be16(f, p + 2);
    if body + body_len > f.end {
        f.done = u32::from(name_why::BAD_TLS);
        return 1;
    }
    if ty == EXT_ECH {
        f.done = u32::from(name_why::ECH);
        return 1;
    }
    if ty == EXT_SERVER_NAME {
        if f.sni != 0 {
            f.done = u32::from(name_why::BAD_TLS);
            return 1;
        }
        f.sni = body;
        f.sni_len = body_len;
    }
    f.pos = body + body_len;
    0
}

/// One byte of a `Host` value (`bpf_loop` callback) at `f.pos`: blanks before the name are
/// skipped (`f.prev` 0), then the name runs to a CR, LF, blank or `:port` (`f.done` 1). Past
/// the flight, `f.done` 2.
#[inline(never)]
extern "C" fn host_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Walk`, whose flight pointer is a non-null map value.
    let f = unsafe { &mut *(*ctx.cast::<Walk>()).f };
    let p = f.pos;
    if p >= f.len {
        f.done = 2;
        return 1;
    }
    let c = at(f, p);
    let blank = c == u32::from(b' ') || c == u32::from(b'\t');
    if f.prev == 0 {
        if !blank {
            f.prev = 1;
            f.name_at = p;
            f.name_len = 1;
        }
    } else if blank || c == u32::from(b'\r') || c == u32::from(b'\n') || c == u32::from(b':') {
        f.done = 1;
        return 1;
    } else {
        f.name_len += 1;
    }
    f.pos = p + 1;
    0
}

/// Writes the key of the name at `f.name_at`: reversed, lower-cased, trailing dot dropped,
/// then `EXACT_END`. Refuses what is not a plain host name (only `a-z 0-9 - _ .`, no empty
/// label, 1 to 253 bytes), as the resolver does.
fn name_to_key(f: &mut Flight) -> Result<(), u8> {
    let mut n = f.name_len;
    if n > 0 && at(f, f.name_at + n - 1) == u32::from(b'.') {
        n -= 1;
    }
    if n == 0 || n > MAX_NAME {
        return Err(name_why::BAD_NAME);
    }
    f.prev = u32::from(b'.');
    f.done = 0;
    // The name's last byte; `name_step` walks back from it.
    f.host_at = f.name_at + n - 1;
    let mut walk = Walk {
        f: ptr::from_mut(f),
    };
    // SAFETY: as for `scan_step`.
    unsafe {
        bpf_loop(
            n,
            name_step as *mut c_void,
            ptr::addr_of_mut!(walk).cast(),
            0,
        )
    };
    if f.done == 2 {
        return Err(name_why::BAD_NAME);
    }
    if f.prev == u32::from(b'.') {
        // A leading dot: an empty first label.
        return Err(name_why::BAD_NAME);
    }
    // A volatile read: LLVM knows `n <= 253` and would drop the mask, but the verifier no
    // longer knows that bound here ("unbounded memory access").
    // SAFETY: a read of a local.
    let end = unsafe { ptr::read_volatile(&raw const n) } & 0xff;
    f.key.data[end as usize] = EXACT_END;
    f.key.prefix_len = (n + 1) * 8;
    Ok(())
}

/// Reports a refused (or, in audit mode, passed) first flight with the name seen, if any.
fn report(ctx: &SkMsgContext, j: *mut binding::Binding, f: &Flight, why: u8, audited: bool) {
    let Some(mut entry) = EVENTS.reserve::<NameDenyEvent>(0) else {
        count(egress_common::consts::COUNTER_RINGBUF_DROP);
        return;
    };
    let e = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: `e` points at the reserved record; `j` is non-null socket storage.
    unsafe {
        let d = &mut (*e).event;
        d.ts_ns = bpf_ktime_get_boot_ns();
        d.cgroup_id = 0;
        d.pid = (pid_tgid >> 32) as u32;
        d.tid = pid_tgid as u32;
        d.uid = uid_gid as u32;
        d.gid = (uid_gid >> 32) as u32;
        d.addr = (*j).addr;
        d.port = (*j).port;
        d.ip_proto = 6;
        d.hook = hook::FIRST_FLIGHT;
        d.reason = reason::NAME;
        d.audited = u8::from(audited);
        d._pad = [0; 2];
        d.comm = comm;
        (*e).why = why;
        // The socket, for the agent to reset a refused connection (clients that drop the
        // send's error, such as Node's TLS, would otherwise wait for the peer).
        // Each context field read volatile, at its own fixed offset: a read chosen by a
        // branch became `ctx + variable offset`, which the verifier refuses ("dereference of
        // modified ctx ptr").
        let m = ctx.msg;
        let family = ptr::read_volatile(&raw const (*m).family);
        let local_port = ptr::read_volatile(&raw const (*m).local_port);
        let ip4 = ptr::read_volatile(&raw const (*m).local_ip4);
        let w = [
            ptr::read_volatile(&raw const (*m).local_ip6[0]),
            ptr::read_volatile(&raw const (*m).local_ip6[1]),
            ptr::read_volatile(&raw const (*m).local_ip6[2]),
            ptr::read_volatile(&raw const (*m).local_ip6[3]),
        ];
        (*e).family = family as u8;
        (*e).local_port = local_port as u16;
        (*e)._pad2 = 0;
        (*e).cookie = (*j).cookie;
        (*e).local = super::addr::local_addr(family, ip4, w);
        let has_name = matches!(why, name_why::NOT_PERMITTED | name_why::BAD_NAME);
        let n = if has_name && f.name_len <= NAME_MAX as u32 {
            f.name_len
        } else {
            0
        };
        (*e).name_len = n as u16;
        let mut k: u32 = 0;
        while k < NAME_MAX as u32 {
            (*e).name[(k & 0xff) as usize] = if k < n { at(f, f.name_at + k) as u8 } else { 0 };
            k += 1;
        }
    }
    entry.submit(0);
}

const _: () = assert!(NAME_KEY_BYTES == 256);
