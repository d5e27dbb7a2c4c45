//! Settings the agent hands to the programs through the one-element `CONFIG` array.

/// Mode flag: report would-be denies but allow them (audit).
pub const FLAG_AUDIT: u32 = 1 << 0;
/// Some rule allows ICMP (`protocol: icmp`): `sock_create` lets ICMP datagram ("ping")
/// sockets be created; their destinations are still judged (connect4/6 and the backstop).
/// Raw sockets stay refused either way.
pub const FLAG_ICMP: u32 = 1 << 1;
/// Name binding runs (the `sock_ops` and `sk_msg` programs are attached): connect4/6 mark
/// name-bound TCP sockets, and the backstop holds back their payload until their first
/// flight is judged. Off, host rules admit by address only.
pub const FLAG_NAME_BIND: u32 = 1 << 2;

/// Program settings; a zeroed value is the strict default (enforce, no DNS steering: port 53
/// is then judged like any other port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `FLAG_*` bits, host byte order.
    pub flags: u32,
    /// Port of the agent's resolver, host byte order; 0 turns DNS steering off.
    pub dns_port: u16,
    /// Always zero.
    pub _pad: u16,
    /// Resolver address for IPv4 sockets, network byte order.
    pub dns_v4: [u8; 4],
    /// Resolver address for IPv6 sockets, network byte order.
    pub dns_v6: [u8; 16],
    /// Always zero.
    pub _pad2: u32,
    /// cgroup v2 id whose processes the programs leave alone (the agent's own, when it runs
    /// inside the enforced cgroup as a sidecar); 0 exempts nothing. Host byte order.
    pub exempt_cgroup: u64,
}

const _: () = assert!(core::mem::size_of::<Config>() == 40);

/// Where a steered DNS socket really wanted to go, keyed by socket cookie in `DNS_ORIG`, so
/// that replies can be given back the source the client expects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Original destination, network byte order (IPv4 mapped).
    pub addr: [u8; 16],
    /// Original destination port, host byte order.
    pub port: u16,
    /// Always zero.
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// Port steered to the agent's resolver.
pub const DNS_PORT: u16 = 53;

#[cfg(feature = "user")]
// SAFETY: plain old data with no padding holes.
unsafe impl aya::Pod for Config {}

#[cfg(feature = "user")]
// SAFETY: plain old data with no padding holes.
unsafe impl aya::Pod for OrigDst {}
