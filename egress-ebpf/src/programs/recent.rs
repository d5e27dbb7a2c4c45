//! The last allow a socket hook decided on this CPU, so that the backstop need not look the
//! same destination up again for the packet that follows it.
//!
//! A TCP connect's SYN and an unconnected UDP send's datagram leave moments after
//! `connect4`/`sendmsg4` allowed them, in the same task, on the same CPU as a rule: the
//! backstop's second lookup of that destination (a hash lookup and, for an `ip:` address
//! without a copy, the static maps) was most of its cost on those packets (issue 14). The
//! verdict writes what it allowed into this CPU's slot; the backstop passes a packet whose
//! destination, port and protocol are in the slot, written in the current jiffy, and looks up
//! everything else as before.
//!
//! The slot is one 8-byte word, written and read whole (no torn tuple): an IPv4 destination
//! (32 bits), its port (16), the `PROTO_*` bit it was judged under (3), whether it is
//! name-bound (1, [`super::verdict::lookup_named`]) and the low 12 bits of the jiffy the
//! lookup began in. Beside it the whole jiffy, written after the word. The backstop matches
//! only when both say the current jiffy, so a slot answers for at most one tick (4 ms at 250 Hz)
//! what a lookup in that tick answered: the same tolerance as an expiry (see
//! `verdict::expiry_clock`). The writer stores nothing when the jiffy moved during its lookup.
//! IPv6 destinations are not kept (they do not fit the word): the backstop looks them up.
//! docs/THREATS.md and docs/KERNEL-NOTES.md ("The last allow of each CPU") say what this
//! leaves open.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{helpers::generated::bpf_jiffies64, macros::map, maps::PerCpuArray};
use egress_common::Addr;

/// One CPU's slot: [`pack`]ed word, then the jiffy it was written in (0: never).
#[repr(C)]
pub struct Recent {
    word: u64,
    jiffy: u64,
}

#[map]
static RECENT: PerCpuArray<Recent> = PerCpuArray::with_max_entries(1, 0);

/// The name-bound bit of the word.
const NAMED: u64 = 1 << 12;
/// The jiffy bits of the word.
const TICK: u64 = (1 << 12) - 1;

/// The jiffy now (a load of `jiffies`: the verifier inlines `bpf_jiffies64`).
#[inline(always)]
pub fn jiffy() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// The word for an IPv4-mapped `addr`, `port`, a non-zero `proto` bit, `named`, in `jiffy`;
/// `None` for an IPv6 destination. A zeroed slot never matches: `proto` is never 0.
#[inline(always)]
fn pack(addr: &Addr, port: u16, proto: u8, named: bool, jiffy: u64) -> Option<u64> {
    // SAFETY: `Addr` is 16 bytes; read as words, unaligned.
    let w: [u32; 4] = unsafe { (addr.as_ptr() as *const [u32; 4]).read_unaligned() };
    if w[0] != 0 || w[1] != 0 || w[2] != u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        return None;
    }
    Some(
        (u64::from(w[3]) << 32)
            | (u64::from(port) << 16)
            | (u64::from(proto & 0x7) << 13)
            | if named { NAMED } else { 0 }
            | (jiffy & TICK),
    )
}

/// Records that the lookup begun in `since` (a [`jiffy`]) allowed `addr`, `port` under
/// `proto` (`named`: name-bound). Nothing is stored when the jiffy has moved since.
#[inline(always)]
pub fn remember(since: u64, addr: &Addr, port: u16, proto: u8, named: bool) {
    let Some(word) = pack(addr, port, proto, named, since) else {
        return;
    };
    if jiffy() != since {
        return;
    }
    if let Some(s) = RECENT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot (migration is off while a program runs); 8-byte stores, the
        // word first.
        unsafe {
            write_volatile(&raw mut (*s).word, word);
            write_volatile(&raw mut (*s).jiffy, since);
            // Held up (preempted) past the jiffy between the check above and the stores: the
            // word is not of this jiffy, so it goes.
            if jiffy() != since {
                write_volatile(&raw mut (*s).word, 0);
            }
        }
    }
}

/// `Some(named)` when a socket hook on this CPU allowed `addr`, `port` under `proto` in the
/// current jiffy (and it was the last thing it allowed here); else `None`: look it up.
#[inline(always)]
pub fn allowed(addr: &Addr, port: u16, proto: u8) -> Option<bool> {
    let now = jiffy();
    let want = pack(addr, port, proto, false, now)?;
    let s = RECENT.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, read with two 8-byte loads.
    let (jiffy, word) = unsafe {
        (
            read_volatile(&raw const (*s).jiffy),
            read_volatile(&raw const (*s).word),
        )
    };
    if jiffy != now || word & !NAMED != want {
        return None;
    }
    Some(word & NAMED != 0)
}
