//! Verdict tracing, a debugging aid (`egress-agent run|attach --trace-verdicts`): one aya-log
//! record per verdict, naming the verdict, the hook, the protocol, the destination, its port
//! and the reason, which the agent writes to its log (stderr).
//!
//! Off by default, at no cost: `TRACE` is a read-only global the agent sets at load time. With
//! 0 the verifier, which knows the value of a frozen read-only map, never walks the logging
//! code and removes it from the loaded program; the hot path runs what it runs without this
//! module (docs/KERNEL-NOTES.md has the instruction counts). The aya-log ring buffer
//! (`AYA_LOGS`) exists either way; nobody reads it while tracing is off.

use core::ptr;

use aya_log_ebpf::info;
use egress_common::{
    Addr,
    consts::VERDICT_ALLOW,
    events::{TRACE_TARGET, hook_name, reason_name},
};

/// 1: trace every verdict; 0 (the default, and what the agent loads without the flag): never.
#[unsafe(no_mangle)]
static TRACE: u8 = 0;

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;

/// Traces one verdict (`verdict` is the program's return value, `why` the deny reason or 0
/// for an allow), when tracing is on.
#[inline(always)]
pub fn verdict(hook: u8, addr: &Addr, port: u16, ip_proto: u32, verdict: i32, why: u8) {
    // SAFETY: a read-only global the loader sets before loading.
    if unsafe { ptr::read_volatile(&raw const TRACE) } == 0 {
        return;
    }
    emit(addr, port, ip_proto, hook, u16::from(why) << 8 | u16::from(verdict as u8));
}

/// Writes the record. A BPF-to-BPF call, not inlined: the verdict paths keep the registers and
/// stack they have without tracing, and with `TRACE` 0 the verifier drops the whole function.
/// (`why_verdict`: the reason in the high byte, the verdict in the low one, to stay within
/// the five arguments of a BPF call.)
#[inline(never)]
fn emit(addr: &Addr, port: u16, ip_proto: u32, hook: u8, why_verdict: u16) {
    let why = (why_verdict >> 8) as u8;
    let outcome = match (why, why_verdict as u8 as i32) {
        (0, _) => "allow",
        // A would-be deny let through (audit mode).
        (_, VERDICT_ALLOW) => "audit",
        _ => "deny",
    };
    let proto = match ip_proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        IPPROTO_ICMPV6 => "icmpv6",
        _ => "other",
    };
    let reason = if why == 0 { "-" } else { reason_name(why) };
    info!(
        &(),
        target: TRACE_TARGET,
        "kernel verdict: {} {} {} [{:i}]:{} reason {}",
        outcome,
        hook_name(hook),
        proto,
        *addr,
        port,
        reason
    );
}
