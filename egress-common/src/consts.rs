//! Map names, counter indices, protocol bits and capacities.

/// LPM trie of static `cidr:`/`ip:` rules: `Key<Addr>` to [`crate::AllowValue`].
pub const MAP_ALLOW_CIDR: &str = "ALLOW_CIDR";
/// Hash of the exact (`/32`, `/128`) entries of [`MAP_ALLOW_CIDR`], the same values:
/// [`crate::Addr`] to [`crate::AllowValue`]. A copy beside the trie, so that an `ip:`
/// destination costs one hash lookup instead of a longest-prefix walk; the trie keeps every
/// entry and is walked only when this misses.
pub const MAP_ALLOW_EXACT: &str = "ALLOW_EXACT";
/// LPM trie of `inbound:` rules: `Key<Addr>` (the peer) to [`crate::AllowValue`] (the local
/// ports it may connect to, `PROTO_TCP`).
pub const MAP_ALLOW_INBOUND: &str = "ALLOW_INBOUND";
/// Hash of addresses learned from DNS answers: [`crate::Addr`] to [`crate::AllowValue`]
/// (with an expiry).
pub const MAP_ALLOW_DNS: &str = "ALLOW_DNS";
/// Ring buffer of [`crate::DenyEvent`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-CPU `u64` counters, indexed by the `COUNTER_*` constants.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// One-element array holding the [`crate::Config`].
pub const MAP_CONFIG: &str = "CONFIG";
/// LRU hash: socket cookie to the [`crate::config::OrigDst`] of a steered DNS socket.
pub const MAP_DNS_ORIG: &str = "DNS_ORIG";
/// LPM trie of the names host rules permit (name binding, issue 13): a
/// [`crate::names::NameKey`] (the name reversed, see `names`) to [`crate::AllowValue`] (the
/// TCP ports the name may be used on).
pub const MAP_NAMES: &str = "NAMES";
/// Sockhash of name-bound TCP sockets whose first flight is not judged yet, by socket cookie;
/// the `first_flight` sk_msg program runs on every send of a socket in it.
pub const MAP_BOUND: &str = "BOUND";
/// Socket storage: a name-bound socket's binding (what its connect was admitted to, how far its
/// first flight got). Pinned with the other maps: a restarted agent's programs must find the
/// bindings of the sockets connected before it (the backstop holds back their payload).
pub const MAP_BINDING: &str = "BINDING";
/// One-element array: how many sockets' bindings hold payload back (see the eBPF
/// `binding::HELD`); pinned with `BINDING`, whose marks it counts.
pub const MAP_HELD: &str = "HELD";
/// Capacity of `NAMES` (allocated lazily, as every LPM trie).
pub const DEFAULT_NAMES_CAPACITY: u32 = 1 << 16;
/// Capacity of `BOUND`: name-bound connections between their handshake and their first flight.
pub const BOUND_CAPACITY: u32 = 1 << 16;
/// The most bytes of a first flight the kernel waits for (corks) and parses: a TLS record
/// holding the whole ClientHello, or an HTTP/1.x request head. Larger is refused.
pub const FIRST_FLIGHT_MAX: u32 = 4096;

/// Capacity of `DNS_ORIG` (least recently used entries are evicted).
pub const DNS_ORIG_CAPACITY: u32 = 16_384;

/// Connects and sends that were allowed.
pub const COUNTER_ALLOW: u32 = 0;
/// Connects and sends that were denied (or would have been, in audit mode).
pub const COUNTER_DENY: u32 = 1;
/// Deny events lost because the ring buffer was full.
pub const COUNTER_RINGBUF_DROP: u32 = 2;
/// Errors inside a program (each one also denied).
pub const COUNTER_ERROR: u32 = 3;
/// DNS packets and connections steered to the agent's resolver.
pub const COUNTER_DNS_STEERED: u32 = 4;
/// Packets the `cgroup_skb/egress` backstop dropped.
pub const COUNTER_BACKSTOP_DROP: u32 = 5;
/// First flights of name-bound connections refused (or reported, in audit mode).
pub const COUNTER_NAME_DENY: u32 = 6;
/// First flights of name-bound connections judged and let through.
pub const COUNTER_NAME_PASS: u32 = 7;
/// Number of slots in the counters map.
pub const COUNTER_SLOTS: u32 = 8;

/// Protocol bit for TCP in [`crate::PortRange::protos`].
pub const PROTO_TCP: u8 = 1 << 0;
/// Protocol bit for UDP in [`crate::PortRange::protos`].
pub const PROTO_UDP: u8 = 1 << 1;
/// TCP and UDP (what `protocol: any` means: it never includes ICMP).
pub const PROTO_ANY: u8 = PROTO_TCP | PROTO_UDP;
/// Protocol bit for ICMP echo (ping), IPv4 and IPv6, in [`crate::PortRange::protos`]. ICMP
/// has no ports: the agent writes it as one range covering every port, and the programs judge
/// an ICMP destination with port 0.
pub const PROTO_ICMP: u8 = 1 << 2;

/// Flag on a TCP [`crate::PortRange`] of a DNS-derived entry: the stretch is admitted only by
/// host rules that check names (`name_check`, the default), so a connection admitted by it is
/// name-bound (its first flight must carry a permitted TLS SNI or HTTP Host). It is not a
/// protocol: `permits` ignores it.
pub const PROTO_NAMED: u8 = 1 << 3;
/// Flag on a UDP [`crate::PortRange`] of a DNS-derived entry: the stretch is admitted only by
/// host rules that check names, so QUIC long-header packets (an Initial carries its server
/// name encrypted) are refused there; clients fall back to TCP, whose first flight is judged.
pub const PROTO_NAMED_UDP: u8 = 1 << 4;

/// How many port ranges one allow entry can hold. The verifier unrolls nothing: the check
/// is a bounded loop (kernel >= 5.3), so this only sizes the value.
pub const MAX_PORT_RANGES: usize = 16;

/// Default capacity of the static CIDR trie (allocated lazily: LPM tries are never
/// preallocated).
pub const DEFAULT_CIDR_CAPACITY: u32 = 1 << 20;
/// Default capacity of the exact-entry hash (not preallocated: its bucket array, 16 bytes per
/// slot, is all it takes while empty). Exact entries beyond it stay in the trie alone.
pub const DEFAULT_EXACT_CAPACITY: u32 = 1 << 16;
/// Default capacity of the inbound trie (allocated lazily, as the CIDR trie).
pub const DEFAULT_INBOUND_CAPACITY: u32 = 1 << 16;
/// Default capacity of the DNS-derived hash.
pub const DEFAULT_DNS_CAPACITY: u32 = 1 << 16;
/// Size of the events ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 18;

/// Value returned by cgroup sock_addr programs to let the call proceed.
pub const VERDICT_ALLOW: i32 = 1;
/// Value returned by cgroup sock_addr programs to fail the call with EPERM.
pub const VERDICT_DENY: i32 = 0;
