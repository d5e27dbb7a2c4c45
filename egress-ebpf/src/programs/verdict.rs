//! The one verdict shared by every hook: is this destination, port and protocol allowed?

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, generated::bpf_jiffies64,
    },
    macros::map,
    maps::{PerCpuArray, lpm_trie::Key},
};
use egress_common::{
    Addr, AllowValue, DenyEvent,
    config::{FLAG_AUDIT, FLAG_ICMP, FLAG_NAME_BIND},
    consts::{
        COUNTER_ALLOW, COUNTER_DENY, COUNTER_ERROR, COUNTER_RINGBUF_DROP, PROTO_ICMP, PROTO_NAMED,
        PROTO_NAMED_UDP, PROTO_TCP, PROTO_UDP, VERDICT_ALLOW, VERDICT_DENY,
    },
    events::reason,
};

use super::{recent, trace};
use crate::maps::{ALLOW_CIDR, ALLOW_DNS, ALLOW_EXACT, CONFIG, COUNTERS, EVENTS};

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;

/// What a hook saw.
pub struct Destination {
    /// Destination, IPv4 mapped, network byte order.
    pub addr: Addr,
    /// Destination port, host byte order (0 for ICMP, see [`port_of_proto`]).
    pub port: u16,
    /// The socket's IP protocol.
    pub ip_proto: u32,
    /// Which hook asks.
    pub hook: u8,
}

/// How a destination was admitted: not (a deny, or an audit-mode pass of one).
pub const ADMIT_NONE: u8 = 0;
/// By a rule, by address.
pub const ADMIT_PLAIN: u8 = 1;
/// Only by host rules with `name_check`: the connection is bound to names.
pub const ADMIT_NAMED: u8 = 2;

/// Allow (1) or deny (0) `dst`, counting the outcome and reporting a deny; with it, how the
/// destination was admitted (`ADMIT_*`).
#[inline(always)]
pub fn decide(dst: &Destination) -> Result<(i32, u8), ()> {
    // The jiffy the lookup begins in: an allow is kept for the backstop (`recent`) only when
    // it is still the jiffy after it.
    let since = recent::jiffy();
    let why = match proto_bit(dst.ip_proto) {
        None => reason::PROTOCOL,
        Some(bit) => match lookup_named(&dst.addr, dst.port, bit) {
            Ok(named) => {
                count(COUNTER_ALLOW);
                recent::remember(since, &dst.addr, dst.port, bit, named);
                trace::verdict(
                    dst.hook,
                    &dst.addr,
                    dst.port,
                    dst.ip_proto,
                    VERDICT_ALLOW,
                    0,
                );
                return Ok((VERDICT_ALLOW, if named { ADMIT_NAMED } else { ADMIT_PLAIN }));
            }
            Err(why) => why,
        },
    };
    Ok((deny(dst, why), ADMIT_NONE))
}

/// The verdict when a program failed before it could decide: deny, count and report.
#[inline(always)]
pub fn deny_on_error(hook: u8) -> i32 {
    deny_error(&Destination {
        addr: [0; 16],
        port: 0,
        ip_proto: 0,
        hook,
    })
}

/// The verdict when a program failed on `dst` (known): deny, count and report it, reason
/// `error`. An error never allows, not even in audit mode.
#[inline(always)]
pub fn deny_error(dst: &Destination) -> i32 {
    count(COUNTER_ERROR);
    report(dst, reason::ERROR, false);
    count(COUNTER_DENY);
    trace::verdict(
        dst.hook,
        &dst.addr,
        dst.port,
        dst.ip_proto,
        VERDICT_DENY,
        reason::ERROR,
    );
    VERDICT_DENY
}

/// The verdict on an allow [`decide`] counted that cannot stand (a name-bound connect whose
/// binding cannot be recorded): its allow is taken back, then it is denied as an error.
#[inline(always)]
pub fn revoke_error(dst: &Destination) -> i32 {
    uncount(COUNTER_ALLOW);
    deny_error(dst)
}

/// The `PROTO_*` bit a socket protocol is judged under. An ICMP datagram ("ping") socket
/// reaches connect4/6 (`ping_pre_connect`, Linux 5.17 and later) with `protocol`
/// IPPROTO_ICMP or IPPROTO_ICMPV6; it exists only when `sock_create` let it be created
/// (some rule allows ICMP), and its destination must still permit ICMP.
fn proto_bit(ip_proto: u32) -> Option<u8> {
    match ip_proto {
        IPPROTO_TCP => Some(PROTO_TCP),
        IPPROTO_UDP => Some(PROTO_UDP),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Some(PROTO_ICMP),
        _ => None,
    }
}

/// The port a destination is judged and reported with: ICMP has none (the address's
/// `sin_port` a ping socket is connected with means nothing), so 0.
#[inline(always)]
pub fn port_of_proto(ip_proto: u32, port: u16) -> u16 {
    if ip_proto == IPPROTO_ICMP || ip_proto == IPPROTO_ICMPV6 {
        0
    } else {
        port
    }
}

/// `None` when allowed, else the reason for the deny. A DNS-derived entry that permits decides
/// at once: whether static rules admit the address too (which only says whether the
/// connection is name-bound) is not looked up.
#[inline(always)]
pub fn lookup(addr: &Addr, port: u16, proto: u8) -> Option<u8> {
    admission::<false>(addr, port, proto).err()
}

/// `Ok(named)` when allowed (`named`: TCP or UDP admitted only by host rules that check names:
/// a TCP connection is name-bound, a UDP socket may send no QUIC long header), else the reason
/// for the deny.
#[inline(always)]
pub fn lookup_named(addr: &Addr, port: u16, proto: u8) -> Result<bool, u8> {
    admission::<true>(addr, port, proto)
}

/// [`lookup_named`]; without `NAMED`, `Ok(false)` for every allow (whether it is name-bound is
/// not worked out).
#[inline(always)]
fn admission<const NAMED: bool>(addr: &Addr, port: u16, proto: u8) -> Result<bool, u8> {
    let mut why = reason::NO_RULE;
    let mut named = false;
    // `ALLOW_DNS` first: it holds the DNS-derived addresses (host rules, the usual way in)
    // and, where no DNS-derived entry is, a copy of the exact static entry (`expires_ns` 0,
    // the same value as in `ALLOW_EXACT`; the agent's `bpf::copies`), so an `ip:` destination
    // is decided by this one lookup too. A copy that does not permit falls through to the
    // static entry it copies, which says the same: the verdict and its reason are those of
    // the static rules alone.
    // SAFETY: the value is only read, through a pointer the kernel keeps valid (preallocated
    // elements are never freed). It is NOT a snapshot: the element of a key the agent
    // replaces or removes goes back to the map's free elements at once, with no grace period,
    // and the agent's next write on that CPU may copy another key's value into it while this
    // reads (docs/KERNEL-NOTES.md, "Values of ALLOW_DNS read while rewritten"): the decision
    // may then mix this entry's value with another DNS entry's (docs/THREATS.md).
    if let Some(v) = unsafe { ALLOW_DNS.get(addr) } {
        // The clock is read only for an entry that expires (`expiry_clock`: this CPU's cached boot
        // time, the clock helper called once per jiffy).
        if v.expires_ns != 0 && expiry_clock() >= v.expires_ns {
            why = reason::EXPIRED;
        } else if let Some(protos) = v.permitting(port, proto) {
            if !NAMED {
                return Ok(false);
            }
            // The range that permits says whether it is name-bound (one scan of the ranges).
            let bound = (proto == PROTO_TCP && protos & PROTO_NAMED != 0)
                || (proto == PROTO_UDP && protos & PROTO_NAMED_UDP != 0);
            if !bound {
                return Ok(false);
            }
            // Name-bound, unless a static rule admits the address by itself.
            named = true;
        } else {
            why = reason::PORT;
        }
    }
    // Static rules: one entry decides (`static_entry`). A static entry that covers the
    // address but not this port says `port`, over an expired DNS entry.
    if let Some(v) = static_entry(addr) {
        if v.permits(port, proto) {
            return Ok(false);
        }
        if !named {
            why = reason::PORT;
        }
    }
    if named { Ok(true) } else { Err(why) }
}

/// Whether UDP to `addr`, `port` is admitted only by host rules that check names, expired or
/// not: a DNS-derived entry marks the port name-checked (`named_udp`) and no static rule admits
/// it by address. The backstop refuses QUIC long headers there (their server name is
/// encrypted). Expiry is ignored: a connected socket goes on talking to an expired destination,
/// but never gets a long header past a name-checking rule that way.
#[inline(always)]
pub fn named_only_udp(addr: &Addr, port: u16) -> bool {
    // SAFETY: read only, as in `lookup_named`.
    let named = match unsafe { ALLOW_DNS.get(addr) } {
        Some(v) => v.named_udp(port),
        None => false,
    };
    if !named {
        return false;
    }
    !static_entry(addr).is_some_and(|v| v.permits(port, PROTO_UDP))
}

/// The static rule entry for `addr`: the longest matching prefix, which already carries the
/// union of every broader rule's ports (the agent merges them), so one entry decides. An
/// exact (`/32`, `/128`) entry is that longest prefix whenever it exists, and `ALLOW_EXACT`
/// holds a copy of it: a hash hit decides without the trie walk, which runs only on a miss.
#[inline(always)]
fn static_entry(addr: &Addr) -> Option<&'static AllowValue> {
    // SAFETY: read only, as `ALLOW_DNS` in `lookup_named` (the same caveat on an entry
    // rewritten while read, on a reload: docs/KERNEL-NOTES.md).
    match unsafe { ALLOW_EXACT.get(addr) } {
        Some(v) => Some(v),
        None => ALLOW_CIDR.get(Key::new(128, *addr)),
    }
}

/// The boot clock as last read on this CPU, and the jiffy it was read in.
#[repr(C)]
pub struct ClockCache {
    jiffies: u64,
    boot_ns: u64,
}

/// One [`ClockCache`] per CPU (see [`expiry_clock`]).
#[map]
static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// Now on `CLOCK_BOOTTIME` (the clock the agent writes and sweeps `expires_ns` on), at most
/// one tick behind: `bpf_ktime_get_boot_ns` read once per jiffy and CPU, and kept in `CLOCK`
/// for every verdict later in that jiffy.
///
/// Why: the boot clock is a clocksource read, ~120 ns per verdict on this VM (the verdict
/// without it is ~250 ns), and `bpf_ktime_get_coarse_ns` still a helper call (~50, and
/// monotonic time, which lags boot time by the time spent suspended). `bpf_jiffies64` is
/// inlined by the verifier into one load of `jiffies` (docs/KERNEL-NOTES.md). The jiffy is
/// read before the clock, so a cached time was read in its jiffy or later: a verdict may see
/// now up to one tick late, never early, and an entry ends at most a tick late. A hook that
/// preempts another between its two stores on this CPU may pair a jiffy with an older time (by
/// as long as the preempted hook was held up between its clock read and its stores):
/// later still, never earlier.
#[inline(always)]
fn expiry_clock() -> u64 {
    // SAFETY: helpers without arguments; `c` is this CPU's slot, which stays this CPU's for the
    // run (migration is off), read and written with volatile accesses in the order shown.
    unsafe {
        let jiffy = bpf_jiffies64();
        let Some(c) = CLOCK.get_ptr_mut(0) else {
            return bpf_ktime_get_boot_ns();
        };
        if read_volatile(&raw const (*c).jiffies) == jiffy {
            let cached = read_volatile(&raw const (*c).boot_ns);
            if cached != 0 {
                return cached;
            }
        }
        let now = bpf_ktime_get_boot_ns();
        write_volatile(&raw mut (*c).boot_ns, now);
        write_volatile(&raw mut (*c).jiffies, jiffy);
        now
    }
}

/// Whether the calling task belongs to the exempt cgroup (the agent itself, as a sidecar
/// inside the enforced cgroup: its resolver must reach upstream).
#[inline(always)]
pub fn exempt() -> bool {
    match CONFIG.get(0) {
        Some(c) if c.exempt_cgroup != 0 => {
            // SAFETY: helper without arguments.
            unsafe { bpf_get_current_cgroup_id() == c.exempt_cgroup }
        }
        _ => false,
    }
}

/// Whether some rule allows ICMP (`FLAG_ICMP`): ping sockets may then be created.
pub fn icmp_allowed() -> bool {
    match CONFIG.get(0) {
        Some(c) => c.flags & FLAG_ICMP != 0,
        // No config: strict.
        None => false,
    }
}

/// Whether name binding runs (`FLAG_NAME_BIND`).
#[inline(always)]
pub fn name_binding() -> bool {
    match CONFIG.get(0) {
        Some(c) => c.flags & FLAG_NAME_BIND != 0,
        None => false,
    }
}

/// Whether audit mode is on.
pub fn audit_mode() -> bool {
    match CONFIG.get(0) {
        Some(c) => c.flags & FLAG_AUDIT != 0,
        // No config: strict.
        None => false,
    }
}

/// Counts and reports a deny; returns the verdict (allow in audit mode).
#[inline(always)]
pub fn deny(dst: &Destination, why: u8) -> i32 {
    count(COUNTER_DENY);
    let audit = audit_mode();
    report(dst, why, audit);
    let verdict = if audit { VERDICT_ALLOW } else { VERDICT_DENY };
    trace::verdict(dst.hook, &dst.addr, dst.port, dst.ip_proto, verdict, why);
    verdict
}

fn report(dst: &Destination, why: u8, audited: bool) {
    let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) else {
        count(COUNTER_RINGBUF_DROP);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: helpers without pointer arguments.
    let (ts_ns, cgroup_id) = unsafe { (bpf_ktime_get_boot_ns(), bpf_get_current_cgroup_id()) };
    entry.write(DenyEvent {
        ts_ns,
        cgroup_id,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        addr: dst.addr,
        port: dst.port,
        ip_proto: dst.ip_proto as u8,
        hook: dst.hook,
        reason: why,
        audited: u8::from(audited),
        _pad: [0; 2],
        comm,
    });
    entry.submit(0);
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot: no other writer runs on this CPU while this program does.
        unsafe { *c += 1 };
    }
}

/// Takes back one that [`count`] added to a per-CPU counter in the same run (so on the same
/// CPU: the slot never goes below 0).
#[inline(always)]
fn uncount(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: as in [`count`].
        unsafe { *c = (*c).wrapping_sub(1) };
    }
}
