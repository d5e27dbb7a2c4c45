//! The egress eBPF programs: one verdict for every outbound connect and UDP send of the
//! enforced cgroup. Built for `bpfel-unknown-none` by `egress-agent/build.rs`.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target's `core` offers no atomic read-modify-write (no
// compare-and-exchange), but BPF has an atomic add (`programs/name_bind.rs`, `take_scratch`).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics: atomic_xadd, see above")]

mod maps;
mod programs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects a program that can reach this loop; panics must be impossible.
    loop {}
}

// GPL-compatible: the ring buffer helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
