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
    /// A connection coming in to a listening socket of the cgroup from a peer no `inbound:`
    /// rule allows: `cgroup_skb/ingress` (the peer's SYN, or the ACK completing a SYN-cookie
    /// handshake) or the backstop (the SYN-ACK). The event's `addr` is the peer, `port` the
    /// local port it connected to.
    pub const ACCEPT: u8 = 8;
    /// `sk_msg` `first_flight`: the first bytes a name-bound TCP connection sends (TLS SNI,
    /// HTTP Host). The record is a [`super::NameDenyEvent`].
    pub const FIRST_FLIGHT: u8 = 9;
    /// `cgroup/setsockopt`: `TCP_ULP` on a name-bound socket whose first flight was not
    /// judged and let through (kernel TLS would have `first_flight` judge the plaintext and
    /// send its encryption). Reason `NAME`.
    pub const SETSOCKOPT: u8 = 10;
    /// The packet-socket tripwire (`raw_tracepoint/sys_enter`, `io_uring_submit_req`), where
    /// the family guard cannot load: the process was killed. The event's `port` holds the
    /// family, as for [`SOCKET_CREATE`].
    pub const TRIPWIRE: u8 = 11;
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
    /// The packet carries IPv4 options or an IPv6 routing header: either can send it on to
    /// an address other than the one judged (source routing).
    pub const ROUTE: u8 = 7;
    /// A name-bound connection's first flight did not carry a name the policy permits for
    /// this port (see [`super::name_why`]).
    pub const NAME: u8 = 8;
    /// An io_uring system call (`io_uring_setup`, `_enter`, `_register`) in a cgroup whose
    /// agent refuses io_uring (`attach --refuse-io-uring`, where the family guard cannot
    /// load): one submission could make a packet socket and send on it before a kill lands.
    /// The event's `port` holds the system call number.
    pub const IO_URING: u8 = 9;
}

/// Why a first flight was refused (`NameDenyEvent::why`).
pub mod name_why {
    /// The name it carried is not permitted on this port (the name is in the event).
    pub const NOT_PERMITTED: u8 = 1;
    /// A TLS ClientHello without a `server_name`.
    pub const NO_SNI: u8 = 2;
    /// A ClientHello with an `encrypted_client_hello` extension: the real name is hidden.
    pub const ECH: u8 = 3;
    /// A TLS record that does not hold one whole, well-formed ClientHello (fragmented across
    /// records, lengths that do not add up, two `server_name` extensions).
    pub const BAD_TLS: u8 = 4;
    /// An HTTP request head without a `Host` header.
    pub const NO_HOST: u8 = 5;
    /// An HTTP request head with more than one `Host` header.
    pub const TWO_HOSTS: u8 = 6;
    /// HTTP/2 prior knowledge (the `PRI * HTTP/2.0` preface): no Host to judge.
    pub const H2C: u8 = 7;
    /// Neither a TLS handshake nor an HTTP/1.x request in origin form.
    pub const UNKNOWN: u8 = 8;
    /// The name is not a plain host name (characters, empty label, length).
    pub const BAD_NAME: u8 = 9;
    /// The ClientHello or request head is larger than `FIRST_FLIGHT_MAX`.
    pub const TOO_LARGE: u8 = 10;
    /// The program could not read the message (it refuses).
    pub const ERROR: u8 = 11;
    /// Payload that never met `first_flight` (TCP Fast Open data, MPTCP, a send that was
    /// already waiting for the handshake), or sent after a refused flight: the backstop drops
    /// it (hook `egress`).
    pub const UNJUDGED: u8 = 12;
}

/// Longest name a [`NameDenyEvent`] carries: a host name is at most 253 bytes.
pub const NAME_MAX: usize = 256;

/// A refused first flight: a [`DenyEvent`] (reason `NAME`, hook `FIRST_FLIGHT`) followed by
/// why and the name seen, if any. The agent tells it from a plain `DenyEvent` by its reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameDenyEvent {
    /// The common part.
    pub event: DenyEvent,
    /// One of the `name_why` constants.
    pub why: u8,
    /// The socket's family (`AF_INET` 2 or `AF_INET6` 10): how `local` and the event's
    /// `addr` name the socket to `sock_diag`.
    pub family: u8,
    /// Bytes of `name` that count, host byte order.
    pub name_len: u16,
    /// The socket's local port, host byte order.
    pub local_port: u16,
    /// Always zero.
    pub _pad2: u16,
    /// The socket's cookie (`bpf_get_socket_cookie`, as `sock_diag` reports it), host order:
    /// with the addresses, what the agent needs to reset a refused connection.
    pub cookie: u64,
    /// The socket's local address, IPv4 mapped, network byte order.
    pub local: [u8; 16],
    /// The name as sent (not lower-cased), when the flight carried one.
    pub name: [u8; NAME_MAX],
}

const _: () = assert!(core::mem::size_of::<NameDenyEvent>() == 72 + 8 + 8 + 16 + NAME_MAX);

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
