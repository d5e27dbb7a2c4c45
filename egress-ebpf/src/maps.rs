//! The maps, named as in `egress_common::consts`. Capacities are defaults: the agent sets
//! them at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use egress_common::{
    Addr, AllowValue, Config,
    config::OrigDst,
    consts::{
        COUNTER_SLOTS, DEFAULT_CIDR_CAPACITY, DEFAULT_DNS_CAPACITY, DEFAULT_EXACT_CAPACITY,
        DEFAULT_INBOUND_CAPACITY, DNS_ORIG_CAPACITY, EVENTS_RING_BYTES,
    },
};

/// Static `cidr:`/`ip:` rules. Written by the agent at start and on reload; each entry already
/// holds the union of every broader rule that covers it, so one longest-prefix lookup suffices.
#[map]
pub static ALLOW_CIDR: LpmTrie<Addr, AllowValue> =
    LpmTrie::with_max_entries(DEFAULT_CIDR_CAPACITY, 0);

/// The exact (`/32`, `/128`) entries of `ALLOW_CIDR` again, with the same values, up to this
/// map's capacity: one hash lookup decides an `ip:` destination, and the trie is walked only
/// on a miss. Not preallocated (`BPF_F_NO_PREALLOC`): memory is taken per entry written.
#[map]
pub static ALLOW_EXACT: HashMap<Addr, AllowValue> =
    HashMap::with_max_entries(DEFAULT_EXACT_CAPACITY, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC`.
const BPF_F_NO_PREALLOC: u32 = 1;

/// `inbound:` rules: peers (prefixes, IPv4 mapped) that may connect to the cgroup's
/// listening sockets, each with the local ports (`PROTO_TCP`) they may connect to; merged
/// like `ALLOW_CIDR`. Written by the agent at start and on reload.
#[map]
pub static ALLOW_INBOUND: LpmTrie<Addr, AllowValue> =
    LpmTrie::with_max_entries(DEFAULT_INBOUND_CAPACITY, 0);

/// Addresses answered for allowed host names, each with its expiry.
#[map]
pub static ALLOW_DNS: HashMap<Addr, AllowValue> =
    HashMap::with_max_entries(DEFAULT_DNS_CAPACITY, 0);

/// Deny events for the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Allow/deny/drop/error counters.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Original destinations of DNS sockets steered to the agent's resolver, by socket cookie.
#[map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(DNS_ORIG_CAPACITY, 0);

/// Program settings (mode, resolver address).
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
