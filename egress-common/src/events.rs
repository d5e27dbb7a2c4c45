//! Events the programs send to the agent through the `EVENTS` ring buffer.

/// Which hook made a decision.
pub mod hook {
    /// `cgroup/connect4`.
    pub const CONNECT4: u8 = 1;
    /// `cgroup/connect6`.
    pub const CONNECT6: u8 = 2;
    /// `cgroup/sendmsg4`.
    pub const SENDMSG4: u8 = 3;
    /// `cgroup/sendmsg6`.
    pub const SENDMSG6: u8 = 4;
    /// `cgroup/sock_create` (raw and ICMP sockets).
    pub const SOCK_CREATE: u8 = 5;
    /// `cgroup_skb/egress`, the packet backstop.
    pub const EGRESS: u8 = 6;
    /// `lsm_cgroup/socket_create` (address families). The event's `port` holds the family.
    pub const SOCKET_CREATE: u8 = 7;
}

/// Why a destination was denied.
pub mod reason {
    /// No allow entry covers the address.
    pub const NO_RULE: u8 = 1;
    /// An entry covers the address, but not this port or protocol.
    pub const PORT: u8 = 2;
    /// The only entry for the address came from DNS and has expired.
    pub const EXPIRED: u8 = 3;
    /// The socket's protocol is neither TCP nor UDP (nor ICMP echo where a rule allows
    /// ICMP), or it is a raw socket, or an ICMP socket while no rule allows ICMP.
    pub const PROTOCOL: u8 = 4;
    /// The program could not read its context or maps (it denies).
    pub const ERROR: u8 = 5;
    /// The socket's address family never reaches the network through a judged path.
    pub const FAMILY: u8 = 6;
}

/// One denied connect or send.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_boot_ns` at the decision, host byte order.
    pub ts_ns: u64,
    /// cgroup v2 id of the process (the inode number of its cgroup directory), host order.
    pub cgroup_id: u64,
    /// Process id (the kernel's tgid), host byte order.
    pub pid: u32,
    /// Thread id (the kernel's pid), host byte order.
    pub tid: u32,
    /// Real user id, host byte order.
    pub uid: u32,
    /// Real group id, host byte order.
    pub gid: u32,
    /// Destination address, network byte order (IPv4 in mapped form, see `keys`).
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, ...).
    pub ip_proto: u8,
    /// One of the `hook` constants.
    pub hook: u8,
    /// One of the `reason` constants.
    pub reason: u8,
    /// 1 when audit mode let the call through, 0 when it was denied.
    pub audited: u8,
    /// Always zero.
    pub _pad: [u8; 2],
    /// The task's `comm`, NUL-padded.
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<DenyEvent>() == 72);
