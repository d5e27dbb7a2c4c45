//! The packet-socket tripwire: `raw_tracepoint/sys_enter` and
//! `raw_tracepoint/io_uring_submit_req`, attached only where the family guard
//! (`lsm_cgroup/socket_create`) cannot load (docs/KERNEL-NOTES.md, "The packet-socket
//! tripwire").
//!
//! A tracepoint cannot refuse a system call, but it runs before the call does anything: a
//! process of the enforced cgroup (or below it) asking for a socket of a family the guard
//! would refuse (AF_PACKET, `(AF_INET, SOCK_PACKET)`, AF_VSOCK, ...) gets SIGKILL there,
//! before the socket exists, and a `deny` event (reason `family`, hook `tripwire`). The
//! kernel acts on the signal on the way back to user space, so no thread of the process runs
//! another instruction of its own once the socket exists. Audit mode reports and kills nothing.
//!
//! The attach is global (every task on the machine runs `sys_enter`): the syscall number is
//! tested first, on one load from the context, so every other system call of every task costs
//! a compare; only `socket`/`socketpair` (and i386's `socketcall`) go on to the cgroup test.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, raw_tracepoint},
    maps::CgroupArray,
    programs::RawTracePointContext,
};
use egress_common::events::{hook, reason};

use super::verdict::{Destination, audit_mode, deny, deny_on_error, exempt};

/// The enforced cgroup, at index 0 (the agent writes the cgroup directory's descriptor):
/// `bpf_current_task_under_cgroup` tests the task against it and its descendants.
#[map]
pub static TRIPWIRE_CGROUP: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// Offset of `opcode` in `struct io_kiocb`; the agent sets it from the kernel's BTF.
#[unsafe(no_mangle)]
static IO_KIOCB_OPCODE: u32 = 64;
/// Offset of `domain` in `struct io_kiocb` (its command area, `struct io_socket`, starts at
/// offset 0, `type` follows `domain`); the agent sets it from the kernel's BTF.
#[unsafe(no_mangle)]
static IO_KIOCB_DOMAIN: u32 = 8;

/// 1: io_uring's system calls from the cgroup trip too (`attach --refuse-io-uring`); set by the
/// agent at load.
#[unsafe(no_mangle)]
static TRIPWIRE_IO_URING: u8 = 0;

/// `io_uring_setup`, `io_uring_enter`, `io_uring_register`: the same numbers on x86_64, x32
/// (bit 30 masked) and i386.
const NR_IO_URING_SETUP: u64 = 425;
const NR_IO_URING_REGISTER: u64 = 427;

/// x86_64 `socket`, `socketpair`; x32 numbers carry bit 30.
const NR_SOCKET: u64 = 41;
const NR_SOCKETPAIR: u64 = 53;
const X32_SYSCALL_BIT: u64 = 0x4000_0000;
/// i386 `socketcall`, `socket`, `socketpair` (the compat entry points of an x86_64 kernel).
const NR32_SOCKETCALL: u64 = 102;
const NR32_SOCKET: u64 = 359;
const NR32_SOCKETPAIR: u64 = 360;
/// `socketcall`'s calls that create sockets.
const SYS_SOCKET: u64 = 1;
const SYS_SOCKETPAIR: u64 = 8;

/// `struct pt_regs` offsets (x86_64; the agent checks them against the kernel's BTF and does
/// not attach on a mismatch).
const REGS_BX: usize = 40;
const REGS_CX: usize = 88;
const REGS_SI: usize = 104;
const REGS_DI: usize = 112;
/// `task_struct.thread_info.status` (thread_info is the task's first member on x86) and its
/// `TS_COMPAT` bit: set at the entry of every 32-bit system call (`int $0x80` from 64-bit code
/// included, whose `cs` is the 64-bit one) and cleared before the return to user space.
const TASK_TI_STATUS: usize = 16;
const TS_COMPAT: u32 = 0x0002;

/// `IORING_OP_SOCKET`.
const IORING_OP_SOCKET: u8 = 45;

const SIGKILL: u32 = 9;
const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const AF_PACKET: i32 = 17;
const AF_ALG: i32 = 38;
/// `NPROTO`: the kernel refuses any family at or above it (`EAFNOSUPPORT`) before it looks.
const NPROTO: i32 = 46;
const SOCK_PACKET: i32 = 10;
/// `SOCK_TYPE_MASK`: the type without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: i32 = 0xf;

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let id: u64 = ctx.arg(1);
    let native = id & !X32_SYSCALL_BIT;
    let io_uring = (NR_IO_URING_SETUP..=NR_IO_URING_REGISTER).contains(&native);
    if native != NR_SOCKET
        && native != NR_SOCKETPAIR
        && id != NR32_SOCKETCALL
        && id != NR32_SOCKET
        && id != NR32_SOCKETPAIR
        && !(io_uring && refuse_io_uring())
    {
        return 0;
    }
    if !enforced() {
        return 0;
    }
    if io_uring {
        trip_io_uring(native);
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    if try_sys_enter(regs, id).is_err() {
        deny_on_error(hook::TRIPWIRE);
    }
    0
}

#[inline(always)]
fn try_sys_enter(regs: u64, id: u64) -> Result<(), i64> {
    // SAFETY: the current task is always valid; the read is checked by the helper.
    let status: u32 = unsafe {
        bpf_probe_read_kernel((bpf_get_current_task() as usize + TASK_TI_STATUS) as *const u32)
    }
    .map_err(i64::from)?;
    let compat = status & TS_COMPAT != 0;
    let (family, ty) = match (compat, id) {
        (false, _)
            if id & !X32_SYSCALL_BIT == NR_SOCKET || id & !X32_SYSCALL_BIT == NR_SOCKETPAIR =>
        {
            (reg(regs, REGS_DI)?, reg(regs, REGS_SI)?)
        }
        (true, NR32_SOCKET | NR32_SOCKETPAIR) => (reg(regs, REGS_BX)?, reg(regs, REGS_CX)?),
        (true, NR32_SOCKETCALL) => {
            let call = reg(regs, REGS_BX)?;
            if call as u64 != SYS_SOCKET && call as u64 != SYS_SOCKETPAIR {
                return Ok(());
            }
            // The arguments sit in user memory, which another thread can rewrite between this
            // read and the kernel's own copy: a socket made through socketcall is refused
            // whatever family this read finds (32-bit programs rarely use it; `run`'s seccomp
            // filter refuses socketcall outright). What was read only names it in the event.
            let args = reg(regs, REGS_CX)? as u32 as u64;
            // SAFETY: a user address, read by the checked helper.
            let (family, ty) = unsafe { bpf_probe_read_user(args as *const [i32; 2]) }
                .map(|a| (a[0], a[1]))
                .unwrap_or((0, 0));
            trip(family, ty);
            return Ok(());
        }
        // i386 `dup` (41) or x86_64 `getuid` (102): not a socket.
        _ => return Ok(()),
    };
    if refused(family, ty) {
        trip(family, ty);
    }
    Ok(())
}

#[raw_tracepoint(tracepoint = "io_uring_submit_req")]
pub fn io_uring_submit_req(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct io_kiocb *req), after the request was prepared (`io_init_req`) and
    // before it is issued: `io_socket_prep` has copied the family from the SQE into the
    // request, which is what `io_socket` will use (the SQE itself can change under us).
    let req: u64 = ctx.arg(0);
    // SAFETY: global read-only offsets, and reads checked by the helper.
    let opcode = unsafe {
        let off = core::ptr::read_volatile(&raw const IO_KIOCB_OPCODE) as u64;
        bpf_probe_read_kernel((req + off) as *const u8)
    };
    match opcode {
        Ok(IORING_OP_SOCKET) => {}
        Ok(_) => return 0,
        Err(_) => {
            if enforced() {
                deny_on_error(hook::TRIPWIRE);
            }
            return 0;
        }
    }
    if !enforced() {
        return 0;
    }
    // SAFETY: as above.
    let args = unsafe {
        let off = core::ptr::read_volatile(&raw const IO_KIOCB_DOMAIN) as u64;
        bpf_probe_read_kernel((req + off) as *const [i32; 2])
    };
    match args {
        Ok([family, ty]) if refused(family, ty) => trip(family, ty),
        Ok(_) => {}
        Err(_) => {
            deny_on_error(hook::TRIPWIRE);
        }
    }
    0
}

/// Whether io_uring's system calls trip (`TRIPWIRE_IO_URING`).
#[inline(always)]
fn refuse_io_uring() -> bool {
    // SAFETY: a read-only global the loader sets before loading.
    unsafe { core::ptr::read_volatile(&raw const TRIPWIRE_IO_URING) != 0 }
}

/// Kills the current process for an io_uring system call (unless in audit mode), and reports.
#[inline(always)]
fn trip_io_uring(nr: u64) {
    if !audit_mode() {
        // SAFETY: a helper taking a signal number.
        unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
    }
    let dst = Destination {
        addr: [0; 16],
        // The system call number rides in the port field.
        port: nr as u16,
        ip_proto: 0,
        hook: hook::TRIPWIRE,
    };
    deny(&dst, reason::IO_URING);
}

/// Whether the current task is in the enforced cgroup or below it, and not the exempt one
/// (the agent's own, when it runs inside as a sidecar).
#[inline(always)]
fn enforced() -> bool {
    matches!(TRIPWIRE_CGROUP.current_task_under_cgroup(0), Ok(true)) && !exempt()
}

/// A system call argument (the low 32 bits are the `int` the call reads).
#[inline(always)]
fn reg(regs: u64, off: usize) -> Result<i32, i64> {
    // SAFETY: `regs` is the tracepoint's `struct pt_regs *`; the read is checked by the helper.
    unsafe { bpf_probe_read_kernel((regs as usize + off) as *const u64) }
        .map(|v| v as i32)
        .map_err(i64::from)
}

/// The families the family guard refuses (`socket_family.rs`), and `(AF_INET, SOCK_PACKET)`,
/// which the kernel turns into a packet socket. Families the kernel refuses by itself (0,
/// negative, `NPROTO` and above) make no socket and are left to fail.
#[inline(always)]
fn refused(family: i32, ty: i32) -> bool {
    if family == AF_INET {
        return ty & SOCK_TYPE_MASK == SOCK_PACKET;
    }
    family > 0
        && family < NPROTO
        && family != AF_UNIX
        && family != AF_INET6
        && family != AF_NETLINK
        && family != AF_ALG
}

/// Kills the current process (all its threads) unless in audit mode, and reports.
#[inline(always)]
fn trip(family: i32, ty: i32) {
    if !audit_mode() {
        // SIGKILL to the thread group (PIDTYPE_TGID), sent now: this is process context with
        // interrupts on, so the helper does not defer it to irq_work.
        // SAFETY: a helper taking a signal number.
        unsafe { aya_ebpf::helpers::generated::bpf_send_signal(SIGKILL) };
    }
    let family = if family == AF_INET && ty & SOCK_TYPE_MASK == SOCK_PACKET {
        AF_PACKET
    } else {
        family
    };
    let dst = Destination {
        addr: [0; 16],
        // The family rides in the port field, as for the family guard.
        port: family as u16,
        ip_proto: 0,
        hook: hook::TRIPWIRE,
    };
    deny(&dst, reason::FAMILY);
}
