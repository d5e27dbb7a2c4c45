//! Settings the agent hands to the programs through the one-element `CONFIG` array.

/// Mode flag: report would-be denies but allow them (audit).
pub const FLAG_AUDIT: u32 = 1 << 0;

/// Program settings; a zeroed value is the strict default (enforce).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `FLAG_*` bits, host byte order.
    pub flags: u32,
    /// Always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Config>() == 8);

#[cfg(feature = "user")]
// SAFETY: plain old data with no padding holes.
unsafe impl aya::Pod for Config {}
