//! Verdict tracing, a debugging aid (`egress-agent run|attach --trace-verdicts`): one aya-log
//! record per verdict (hook, protocol, destination, port, reason, verdict), which the agent
//! names and writes to its log (stderr).
//!
//! Off by default, at no cost on the verdict paths: `TRACE` is a read-only global the agent
//! sets at load time. With 0 the verifier, which knows the value of a frozen read-only map,
//! never walks the logging code and removes it from the loaded program (docs/KERNEL-NOTES.md
//! has the instruction counts). The aya-log ring buffer (`AYA_LOGS`) exists either way;
//! nothing writes or reads it while tracing is off.
//!
//! The record holds numbers only, in a fixed order the agent parses (`egress-agent`'s
//! `trace.rs`): a string argument of varying length (a hook or reason name) splits the
//! verifier's walk at each choice, and their product exceeded its one-million-instruction
//! budget.

use core::ptr;

use aya_log_ebpf::info;
use egress_common::Addr;

/// 1: trace every verdict; 0 (the default, and what the agent loads without the flag): never.
#[unsafe(no_mangle)]
static TRACE: u8 = 0;

/// Traces one verdict (`verdict` is the program's return value, `why` the deny reason or 0
/// for an allow), when tracing is on.
#[inline(always)]
pub fn verdict(hook: u8, addr: &Addr, port: u16, ip_proto: u32, verdict: i32, why: u8) {
    // SAFETY: a read-only global the loader sets before loading.
    if unsafe { ptr::read_volatile(&raw const TRACE) } == 0 {
        return;
    }
    emit(
        addr,
        port,
        ip_proto,
        hook,
        u16::from(why) << 8 | u16::from(verdict as u8),
    );
}

/// Writes the record. A BPF-to-BPF call, not inlined: the verdict paths keep nearly the
/// registers and stack they have without tracing, and with `TRACE` 0 the verifier drops the
/// whole function. (`why_verdict`: the reason in the high byte, the verdict in the low one,
/// to stay within the five arguments of a BPF call.)
#[inline(never)]
fn emit(addr: &Addr, port: u16, ip_proto: u32, hook: u8, why_verdict: u16) {
    let (why, verdict) = ((why_verdict >> 8) as u8, why_verdict as u8);
    // The agent's `trace::Line::parse` reads these fields in this order.
    info!(
        &(),
        "verdict {} hook {} proto {} dst {:i} port {} reason {}",
        verdict,
        hook,
        ip_proto,
        *addr,
        port,
        why
    );
}
