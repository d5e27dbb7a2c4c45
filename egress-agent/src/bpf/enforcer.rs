//! Loading the eBPF programs, writing their maps and attaching them to a cgroup.
//!
//! The maps are written before the programs are attached, so the first connect in the cgroup
//! already sees the whole static policy. Until a DNS answer adds an address, the default for
//! everything is deny.

use std::{
    collections::HashSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{
        Array, CgroupArray, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf, SockHash,
        lpm_trie::LpmTrie,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, LsmCgroup,
        RawTracePoint,
        links::{FdLink, PinnedLink},
    },
};
use egress_common::{
    Addr, AllowValue, Config,
    config::FLAG_NAME_BIND,
    consts::{
        COUNTER_ALLOW, COUNTER_DENY, COUNTER_ERROR, COUNTER_RINGBUF_DROP, DEFAULT_CIDR_CAPACITY,
        DEFAULT_DNS_CAPACITY, DEFAULT_EXACT_CAPACITY, MAP_ALLOW_CIDR, MAP_ALLOW_DNS,
        MAP_ALLOW_EXACT, MAP_ALLOW_INBOUND, MAP_BINDING, MAP_BOUND, MAP_CONFIG, MAP_COUNTERS,
        MAP_DNS_ORIG, MAP_EVENTS, MAP_HELD, MAP_NAMES,
    },
    keys::addr_from_ip,
    names::NameBytes,
};

use super::{
    btf::Layouts,
    copies::{self, Copies},
    rules::{self, ApplyError, Exact, Faults, Rules, Trie},
    trace,
};
use crate::{
    events::{DenyRecord, boot_to_wall_offset},
    policy::{self, Policy},
};

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The cgroup/sock_addr programs, in attach order: the ones that restore a steered DNS
/// reply's source first, then the ones that decide.
pub const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
];

/// Every map, by name (for pinning).
pub const ALL_MAPS: [&str; 12] = [
    MAP_NAMES,
    MAP_BOUND,
    MAP_BINDING,
    MAP_HELD,
    MAP_ALLOW_CIDR,
    MAP_ALLOW_EXACT,
    MAP_ALLOW_INBOUND,
    MAP_ALLOW_DNS,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_DNS_ORIG,
];

/// The cgroup_skb/egress backstop.
pub const BACKSTOP_PROGRAM: &str = "egress";

/// The cgroup_skb/ingress program that judges peers connecting to the cgroup's listeners.
pub const INGRESS_PROGRAM: &str = "ingress";

/// The cgroup/sock program that refuses raw and ICMP sockets.
pub const SOCK_CREATE_PROGRAM: &str = "sock_create";

/// The BPF LSM cgroup program that refuses socket families other than unix, inet, inet6,
/// netlink and alg (AF_PACKET, AF_VSOCK, ...).
pub const FAMILY_PROGRAM: &str = "socket_create";

/// The packet-socket tripwire on system calls (`raw_tracepoint/sys_enter`), attached where the
/// family guard cannot load.
pub const TRIPWIRE_PROGRAM: &str = "sys_enter";

/// The packet-socket tripwire on io_uring's `IORING_OP_SOCKET`
/// (`raw_tracepoint/io_uring_submit_req`).
pub const TRIPWIRE_IO_URING_PROGRAM: &str = "io_uring_submit_req";

/// The tripwire's cgroup array (the enforced cgroup at index 0).
const TRIPWIRE_CGROUP_MAP: &str = "TRIPWIRE_CGROUP";

/// Where the agent's resolver listens, for DNS steering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverAddr {
    /// For IPv4 sockets (and IPv4-mapped destinations of IPv6 sockets).
    pub v4: std::net::Ipv4Addr,
    /// For IPv6 sockets.
    pub v6: std::net::Ipv6Addr,
    /// UDP and TCP port.
    pub port: u16,
}

/// How to load and attach.
#[derive(Debug, Clone)]
pub struct EnforcerOptions {
    /// Capacity of the static CIDR trie.
    pub cidr_capacity: u32,
    /// Capacity of the hash of the trie's exact entries (more stay in the trie alone).
    pub exact_capacity: u32,
    /// Capacity of the DNS-derived address hash.
    pub dns_capacity: u32,
    /// Pin links and maps under this bpffs directory, so enforcement outlives the agent's
    /// process (a killed agent leaves the cgroup closed, never open). `None`: links live as
    /// long as the [`Enforcer`].
    pub pin_dir: Option<PathBuf>,
    /// Load the programs with verdict tracing on (`TRACE`, see [`super::trace`]) and read
    /// their aya-log records; off, the verifier removes the tracing code.
    pub trace: bool,
    /// Where the packet-socket tripwire is armed: kill a process of the cgroup at any io_uring
    /// system call too (`TRIPWIRE_IO_URING`), since one submission can create a packet socket
    /// and send on it before the kill lands.
    pub refuse_io_uring: bool,
    /// Where the packet-socket tripwire is armed: its `sys_enter` half too. While a program
    /// is on that tracepoint, every task of the machine enters every system call through
    /// the slow path (docs/KERNEL-NOTES.md). `run` leaves it off: its command's seccomp
    /// filter refuses the same families on the same calls before the tracepoint, so the half
    /// would never fire there; the `io_uring_submit_req` half stays (io_uring's sockets pass
    /// that filter with `--allow-io-uring`).
    pub syscall_tripwire: bool,
}

impl Default for EnforcerOptions {
    fn default() -> Self {
        Self {
            cidr_capacity: DEFAULT_CIDR_CAPACITY,
            exact_capacity: DEFAULT_EXACT_CAPACITY,
            dns_capacity: DEFAULT_DNS_CAPACITY,
            pin_dir: None,
            trace: false,
            refuse_io_uring: false,
            syscall_tripwire: true,
        }
    }
}

/// Kernel counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Allowed connects and sends.
    pub allow: u64,
    /// Denied connects and sends.
    pub deny: u64,
    /// Deny events lost to a full ring buffer.
    pub ringbuf_drop: u64,
    /// Program errors (each denied).
    pub error: u64,
}

enum Link {
    Owned(FdLink),
    Pinned(PinnedLink),
    /// A bpf_link made without aya (its descriptor): detached when closed.
    Raw(std::os::fd::OwnedFd),
}

/// Says why the kernel would not load the family guard, in the words an operator needs.
fn family_guard_load_error(e: aya::programs::ProgramError) -> anyhow::Error {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if crate::bpf::kernel::parse_release(&release).is_some_and(|v| v < (6, 0)) {
        return anyhow!(
            "BPF LSM cgroup programs need Linux 6.0; this kernel is {}",
            release.trim()
        );
    }
    match &e {
        aya::programs::ProgramError::LoadError { io_error, .. }
            if io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            anyhow!(
                "the kernel refuses to load BPF LSM programs (EPERM: it is locked down, or a \
                 security module forbids them)"
            )
        }
        _ => anyhow::Error::new(e).context(
            "the kernel rejected the BPF LSM program (it needs CONFIG_BPF_LSM and kernel BTF)",
        ),
    }
}

/// `io_kiocb.opcode` and the offset of `io_socket.domain` in an `io_kiocb` (its command area,
/// `io_kiocb_to_cmd`, is the request's first bytes), from the kernel's BTF.
fn io_kiocb_offsets(layouts: Option<&Layouts>) -> (Option<u32>, Option<u32>) {
    let Some(l) = layouts else {
        return (None, None);
    };
    (
        l.offset("io_kiocb", "opcode"),
        l.offset("io_socket", "domain"),
    )
}

/// Programs attached to one cgroup, with handles on their maps.
pub struct Enforcer {
    cgroup: PathBuf,
    /// The enforced cgroup and those below it, for attributing denies.
    workload: crate::sys::cgroup::Subtree,
    links: Vec<Link>,
    pin_dir: Option<PathBuf>,
    adopted: bool,
    generation: u128,
    cidr: Trie,
    exact: Exact,
    exact_capacity: u32,
    inbound: Trie,
    dns: copies::DnsMap,
    /// The exact static entries copied into `dns` (one lookup for `ip:` destinations).
    copies: Copies,
    config: Array<MapData, Config>,
    config_value: Config,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    /// The reader of the programs' verdict trace, when tracing is on.
    trace: Option<trace::Logger>,
    boot_offset: Duration,
    /// Why the family guard ([`FAMILY_PROGRAM`]) does not run, when it does not.
    family_guard: Option<String>,
    /// Where the guard does not run: why the tripwire ([`TRIPWIRE_PROGRAM`]) is not armed
    /// either, and why its io_uring part is not ([`TRIPWIRE_IO_URING_PROGRAM`]).
    tripwire: Option<String>,
    tripwire_io_uring: Option<String>,
    /// The names host rules permit (name binding), and the keys written.
    names: LpmTrie<MapData, NameBytes, AllowValue>,
    name_keys: HashSet<super::name_bind::NameKey>,
    /// Name-bound sockets awaiting their first flight; kept open for the sk_msg attachment.
    bound: SockHash<MapData, u64>,
    /// Why name binding does not run, when it does not.
    name_binding: Option<String>,
    // Dropped last: the programs' file descriptors.
    _ebpf: Ebpf,
}

impl Enforcer {
    /// Loads the programs, writes `policy`'s static rules and mode, and attaches to the
    /// cgroup v2 directory `cgroup`.
    pub fn attach(cgroup: &Path, policy: &Policy, opts: &EnforcerOptions) -> anyhow::Result<Self> {
        crate::bpf::kernel::check()?;
        crate::sys::caps::check()?;
        let cgroup_dir = fs::File::open(cgroup)
            .with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        let trace_on = u8::from(opts.trace);
        // Parsed once: the loader's relocations and the family guard's hook both need it.
        let btf = Btf::from_sys_fs().ok();
        // Member offsets the tripwire reads kernel memory at (no CO-RE in aya-ebpf).
        let layouts = Layouts::from_sys_fs(&[
            "pt_regs",
            "task_struct",
            "thread_info",
            "io_kiocb",
            "io_socket",
        ]);
        let (kiocb_opcode, kiocb_domain) = io_kiocb_offsets(layouts.as_ref().ok());
        let (opcode_at, domain_at) = (kiocb_opcode.unwrap_or(0), kiocb_domain.unwrap_or(0));
        let refuse_io_uring = u8::from(opts.refuse_io_uring);
        let mut loader = EbpfLoader::new();
        loader
            .btf(btf.as_ref())
            .override_global("IO_KIOCB_OPCODE", &opcode_at, true)
            .override_global("IO_KIOCB_DOMAIN", &domain_at, true)
            .override_global("TRIPWIRE_IO_URING", &refuse_io_uring, true)
            .override_global(trace::GLOBAL, &trace_on, true)
            .map_max_entries(MAP_ALLOW_CIDR, opts.cidr_capacity)
            .map_max_entries(MAP_ALLOW_EXACT, opts.exact_capacity)
            .map_max_entries(MAP_ALLOW_DNS, opts.dns_capacity);
        if !opts.trace {
            // Nothing writes the aya-log ring then: one page instead of 128 KiB of kernel memory.
            loader.map_max_entries(trace::MAP, trace::page_size());
        }
        // With a pin directory, maps already pinned there (by an earlier agent of this name,
        // killed or restarted) are reused as they are, entries included: that is adoption.
        let map_pins: Vec<(&str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                let maps = dir.join("maps");
                fs::create_dir_all(&maps)
                    .with_context(|| format!("cannot create {}", maps.display()))?;
                ALL_MAPS.iter().map(|n| (*n, maps.join(n))).collect()
            }
            None => Vec::new(),
        };
        let adopted = map_pins.iter().any(|(_, p)| p.exists());
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("cannot load the eBPF maps")
            .map_err(crate::sys::caps::explain_bpf_eperm)?;

        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let cidr = LpmTrie::try_from(take(MAP_ALLOW_CIDR)?)?;
        let exact = take(MAP_ALLOW_EXACT)?;
        // An adopted map keeps the capacity it was made with.
        let exact_capacity = match &exact {
            Map::HashMap(m) => m.info().map_or(opts.exact_capacity, |i| i.max_entries()),
            _ => opts.exact_capacity,
        };
        let exact: Exact = HashMap::try_from(exact)?;
        let inbound = LpmTrie::try_from(take(MAP_ALLOW_INBOUND)?)?;
        let dns = take(MAP_ALLOW_DNS)?;
        let dns_capacity = match &dns {
            Map::HashMap(m) => m.info().map_or(opts.dns_capacity, |i| i.max_entries()),
            _ => opts.dns_capacity,
        };
        let dns: copies::DnsMap = HashMap::try_from(dns)?;
        // Copies an earlier agent wrote, to follow the policy below; an adopted map that
        // cannot be read is emptied (`clear_dns`) before anything is written.
        let adopted_copies = Copies::adopt(&dns, dns_capacity);
        let config = Array::try_from(take(MAP_CONFIG)?)?;
        let counters = PerCpuArray::try_from(take(MAP_COUNTERS)?)?;
        let events = RingBuf::try_from(take(MAP_EVENTS)?)?;
        let names = LpmTrie::try_from(take(MAP_NAMES)?)?;
        let bound = SockHash::try_from(take(MAP_BOUND)?)?;
        // Taken before the programs load, which need its fd open: the logger keeps it.
        // The pinned config when adopting: a failed first policy change writes its flags back.
        let config_value = config.get(&0, 0).unwrap_or_default();
        let trace = match opts.trace {
            true => Some(trace::logger(&mut ebpf).context("cannot read the verdict trace map")?),
            false => None,
        };

        // Name entries an earlier agent wrote: known, so a changed policy removes them.
        let name_keys = super::name_bind::keys(&names);
        let mut me = Self {
            cgroup: cgroup.to_owned(),
            workload: crate::sys::cgroup::Subtree::new(cgroup),
            links: Vec::new(),
            pin_dir: opts.pin_dir.clone(),
            adopted,
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            cidr,
            exact,
            exact_capacity,
            inbound,
            dns,
            copies: Copies::new(dns_capacity),
            config,
            config_value,
            counters,
            events: Some(events),
            trace,
            boot_offset: boot_to_wall_offset(),
            family_guard: None,
            tripwire: None,
            tripwire_io_uring: None,
            names,
            name_keys,
            bound,
            name_binding: None,
            _ebpf: ebpf,
        };
        match adopted_copies {
            Ok(c) => me.copies = c,
            Err(e) => {
                let removed = me
                    .clear_dns()
                    .with_context(|| format!("{e:#}, and the DNS map cannot be emptied"))?;
                tracing::warn!("{e:#}: the {removed} adopted DNS entries are removed");
            }
        }
        me.apply_policy(policy)?;
        if let Some(dir) = &opts.pin_dir {
            let links = dir.join("links");
            fs::create_dir_all(&links)
                .with_context(|| format!("cannot create {}", links.display()))?;
        }

        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = me
                ._ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected program {name}"))?;
            // A cgroup bpf_link is always multi-attach, and the kernel rejects any flag on
            // BPF_LINK_CREATE for cgroups (EINVAL): `Single` passes 0. Other programs on this
            // cgroup or its ancestors still run, and every one of them must allow.
            let id = prog
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .with_context(|| format!("cannot attach {name} to {}", cgroup.display()))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .map_err(|e| anyhow!("{name}: not a bpf_link: {e:?}"))?;
            let link = me.keep_link(name, link)?;
            me.links.push(link);
        }
        let prog: &mut CgroupSock = me
            ._ebpf
            .program_mut(SOCK_CREATE_PROGRAM)
            .ok_or_else(|| anyhow!("program {SOCK_CREATE_PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected program {SOCK_CREATE_PROGRAM}"))?;
        let id = prog
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| {
                format!(
                    "cannot attach {SOCK_CREATE_PROGRAM} to {}",
                    cgroup.display()
                )
            })?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .map_err(|e| anyhow!("{SOCK_CREATE_PROGRAM}: not a bpf_link: {e:?}"))?;
        let link = me.keep_link(SOCK_CREATE_PROGRAM, link)?;
        me.links.push(link);
        let prog: &mut CgroupSkb = me
            ._ebpf
            .program_mut(BACKSTOP_PROGRAM)
            .ok_or_else(|| anyhow!("program {BACKSTOP_PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected program {BACKSTOP_PROGRAM}"))?;
        let id = prog
            .attach(
                &cgroup_dir,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .with_context(|| format!("cannot attach {BACKSTOP_PROGRAM} to {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .map_err(|e| anyhow!("{BACKSTOP_PROGRAM}: not a bpf_link: {e:?}"))?;
        let link = me.keep_link(BACKSTOP_PROGRAM, link)?;
        me.links.push(link);
        let prog: &mut CgroupSkb = me
            ._ebpf
            .program_mut(INGRESS_PROGRAM)
            .ok_or_else(|| anyhow!("program {INGRESS_PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected program {INGRESS_PROGRAM}"))?;
        let id = prog
            .attach(
                &cgroup_dir,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )
            .with_context(|| format!("cannot attach {INGRESS_PROGRAM} to {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .map_err(|e| anyhow!("{INGRESS_PROGRAM}: not a bpf_link: {e:?}"))?;
        let link = me.keep_link(INGRESS_PROGRAM, link)?;
        me.links.push(link);
        let bound_names =
            super::name_bind::attach(&mut me._ebpf, &me.bound, &cgroup_dir).and_then(|a| {
                Ok(vec![
                    me.keep_raw_link(super::name_bind::SETSOCKOPT_PROGRAM, a.setsockopt)?,
                    me.keep_link(super::name_bind::SOCK_OPS_PROGRAM, a.sock_ops)?,
                ])
            });
        match bound_names {
            Ok(links) => {
                me.links.extend(links);
                me.config_value.flags |= FLAG_NAME_BIND;
                me.write_config()?;
            }
            Err(e) => me.name_binding = Some(format!("{e:#}")),
        }
        if let Err(e) = me.attach_family_guard(&cgroup_dir, btf.as_ref()) {
            me.family_guard = Some(format!("{e:#}"));
        } else if crate::bpf::kernel::bpf_lsm_active() == Some(false) {
            me.family_guard = Some(
                "the BPF LSM is not active on this kernel (add `bpf` to the `lsm=` boot \
                 parameter): the program is attached but never runs"
                    .into(),
            );
        }
        if me.family_guard.is_some() {
            let io_uring = kiocb_opcode.zip(kiocb_domain).ok_or_else(|| {
                anyhow!("the kernel's BTF has no struct io_kiocb.opcode or io_socket.domain")
            });
            let syscalls = opts.syscall_tripwire;
            if let Err(e) = me.attach_tripwire(&cgroup_dir, layouts, io_uring, syscalls) {
                me.tripwire = Some(format!("{e:#}"));
            }
        }
        me.drop_older_generations()?;
        Ok(me)
    }

    /// Loads and attaches the family guard, a BPF LSM cgroup program (kernel 6.0+).
    fn attach_family_guard(
        &mut self,
        cgroup_dir: &fs::File,
        btf: Option<&Btf>,
    ) -> anyhow::Result<()> {
        let btf = btf.context("the kernel has no BTF (/sys/kernel/btf/vmlinux)")?;
        let prog: &mut LsmCgroup = self
            ._ebpf
            .program_mut(FAMILY_PROGRAM)
            .ok_or_else(|| anyhow!("program {FAMILY_PROGRAM} missing from the eBPF object"))?
            .try_into()?;
        if let Err(e) = prog.load("socket_create", btf) {
            return Err(family_guard_load_error(e));
        }
        let id = prog
            .attach(cgroup_dir)
            .with_context(|| format!("cannot attach {FAMILY_PROGRAM}"))?;
        let link: FdLink = prog.take_link(id)?.into();
        let link = self.keep_link(FAMILY_PROGRAM, link)?;
        self.links.push(link);
        Ok(())
    }

    /// Arms the packet-socket tripwire on the cgroup: `sys_enter` (when `syscalls`), then
    /// `io_uring_submit_req` (whose failure leaves the first armed, and is remembered).
    fn attach_tripwire(
        &mut self,
        cgroup_dir: &fs::File,
        layouts: anyhow::Result<Layouts>,
        io_uring: anyhow::Result<(u32, u32)>,
        syscalls: bool,
    ) -> anyhow::Result<()> {
        if !cfg!(target_arch = "x86_64") {
            bail!("the tripwire knows the system call numbers of x86_64 only");
        }
        let layouts = layouts?;
        // The offsets `programs/tripwire.rs` reads the system call's arguments and the
        // task's compat flag at.
        for (strukt, member, at) in [
            ("pt_regs", "bx", 40),
            ("pt_regs", "cx", 88),
            ("pt_regs", "si", 104),
            ("pt_regs", "di", 112),
            ("task_struct", "thread_info", 0),
            ("thread_info", "status", 16),
        ] {
            layouts.expect(strukt, member, at)?;
        }
        let mut cgroups: CgroupArray<_> = self
            ._ebpf
            .map_mut(TRIPWIRE_CGROUP_MAP)
            .ok_or_else(|| anyhow!("map {TRIPWIRE_CGROUP_MAP} missing from the eBPF object"))?
            .try_into()?;
        cgroups
            .set(0, std::os::fd::AsRawFd::as_raw_fd(cgroup_dir), 0)
            .with_context(|| format!("cannot write {TRIPWIRE_CGROUP_MAP}"))?;
        if syscalls {
            let link = self.attach_raw_tracepoint(TRIPWIRE_PROGRAM, "sys_enter")?;
            self.links.push(link);
        }
        let on_io_uring = io_uring.and_then(|_| {
            self.attach_raw_tracepoint(TRIPWIRE_IO_URING_PROGRAM, "io_uring_submit_req")
        });
        match on_io_uring {
            Ok(link) => self.links.push(link),
            Err(e) => self.tripwire_io_uring = Some(format!("{e:#}")),
        }
        Ok(())
    }

    /// Loads program `name` and attaches it to the raw tracepoint `tp`; the link is kept
    /// (pinned when pinning).
    fn attach_raw_tracepoint(&mut self, name: &str, tp: &str) -> anyhow::Result<Link> {
        let prog: &mut RawTracePoint = self
            ._ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected program {name}"))?;
        let id = prog
            .attach(tp)
            .with_context(|| format!("cannot attach {name} to the raw tracepoint {tp}"))?;
        let link: FdLink = prog.take_link(id)?.into();
        self.keep_link(name, link)
    }

    /// Where the family guard does not run: why the packet-socket tripwire is not armed
    /// either (`None`: it is, and kills a process of the cgroup that asks for a refused
    /// family through `socket`/`socketpair`).
    pub fn tripwire_missing(&self) -> Option<&str> {
        self.tripwire.as_deref()
    }

    /// With the tripwire armed: why it does not watch io_uring's `IORING_OP_SOCKET`.
    pub fn tripwire_io_uring_missing(&self) -> Option<&str> {
        self.tripwire_io_uring.as_deref()
    }

    /// Why socket families other than unix, inet, inet6, netlink and alg are *not* refused
    /// by the kernel here (`None`: they are). Without the guard, packet sockets are closed only
    /// by the lack of `CAP_NET_RAW`.
    pub fn family_guard_missing(&self) -> Option<&str> {
        self.family_guard.as_deref()
    }

    /// Pins `link` when pinning, so it outlives the agent. Each start pins its links under
    /// a fresh generation (`connect4@<ns>`); the previous generation's pins are removed only
    /// once all the new links are attached, so a restart never leaves a gap.
    fn keep_link(&self, name: &str, link: FdLink) -> anyhow::Result<Link> {
        Ok(match &self.pin_dir {
            Some(dir) => {
                let path = dir
                    .join("links")
                    .join(format!("{name}@{}", self.generation));
                Link::Pinned(
                    link.pin(&path)
                        .with_context(|| format!("cannot pin {}", path.display()))?,
                )
            }
            None => Link::Owned(link),
        })
    }

    /// [`Enforcer::keep_link`] for a link aya did not make: pinned by hand, then opened again
    /// as a `PinnedLink`.
    fn keep_raw_link(&self, name: &str, fd: std::os::fd::OwnedFd) -> anyhow::Result<Link> {
        Ok(match &self.pin_dir {
            Some(dir) => {
                let path = dir
                    .join("links")
                    .join(format!("{name}@{}", self.generation));
                super::unix::obj_pin(std::os::fd::AsFd::as_fd(&fd), &path)
                    .with_context(|| format!("cannot pin {}", path.display()))?;
                Link::Pinned(
                    PinnedLink::from_pin(&path)
                        .with_context(|| format!("cannot open {}", path.display()))?,
                )
            }
            None => Link::Raw(fd),
        })
    }

    /// Removes the link pins of earlier generations: their links detach once no agent holds
    /// them, and ours are already attached.
    fn drop_older_generations(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let links = dir.join("links");
        let mine = format!("@{}", self.generation);
        for entry in fs::read_dir(&links)
            .with_context(|| format!("cannot read {}", links.display()))?
            .flatten()
        {
            if !entry.file_name().to_string_lossy().ends_with(&mine) {
                fs::remove_file(entry.path()).with_context(|| {
                    format!("cannot remove the old pin {}", entry.path().display())
                })?;
            }
        }
        Ok(())
    }

    /// Why name binding (TLS SNI / HTTP Host judged in the kernel) does *not* run, when it
    /// does not: host rules then admit by address only.
    pub fn name_binding_missing(&self) -> Option<&str> {
        self.name_binding.as_deref()
    }

    /// Whether the maps were adopted from an earlier agent's pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The enforced cgroup.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Replaces the static rules, the mode and the ICMP flag with `policy`'s, as one
    /// transaction ([`super::rules`]): on success the maps hold exactly `policy`'s compiled
    /// entries; on failure the previous contents are written back and checked
    /// ([`ApplyError::rolled_back`] says whether that worked). New entries are written before
    /// stale ones are removed, so an address allowed by both policies never sees a gap.
    pub fn apply_policy(&mut self, policy: &Policy) -> Result<(), ApplyError> {
        let fail = |error: anyhow::Error| ApplyError {
            error,
            rolled_back: true,
        };
        // Compiled, and the maps read, before anything changes: a policy that does not
        // compile, or maps that cannot be read in full, change nothing.
        let cidr = rules::target(&policy::cidr_entries(policy).map_err(|e| fail(e.into()))?);
        let inbound = rules::target(&policy::inbound_entries(policy).map_err(|e| fail(e.into()))?);
        let old_flags = self.config_value.flags;
        let want = Rules {
            exact: rules::exact_of(&cidr, self.exact_capacity),
            cidr,
            inbound,
            // Name binding stays as attached.
            flags: rules::flags(policy) | (old_flags & FLAG_NAME_BIND),
        };
        let have = self.read_rules(old_flags).map_err(fail)?;
        // The names trie is not part of the transaction (left for later): after a failed
        // change it holds the new policy's names, which judge only connections to addresses
        // the rolled-back maps admit.
        let names = policy::name_entries(policy);
        self.name_keys =
            super::name_bind::sync(&mut self.names, &self.name_keys, &names).map_err(fail)?;
        let mut faults = Faults::from_env();
        let forward = self.write_rules(&have, &want, &mut faults);
        let Err(error) = forward else {
            return Ok(());
        };
        // Back to what was there, checked the same way; twice, should a write race a
        // concurrent reader's iteration.
        let mut rolled_back = false;
        for _ in 0..2 {
            let now = self.read_rules(want.flags).unwrap_or_else(|_| want.clone());
            if self.write_rules(&now, &have, &mut Faults::none()).is_ok() {
                rolled_back = true;
                break;
            }
        }
        Err(ApplyError { error, rolled_back })
    }

    /// What the static rule maps hold now, with `flags` as the config's.
    fn read_rules(&self, flags: u32) -> anyhow::Result<Rules> {
        use rules::RuleMap as _;
        Ok(Rules {
            cidr: self.cidr.read("CIDR rules")?,
            exact: self.exact.read("exact rules")?,
            inbound: self.inbound.read("inbound rules")?,
            flags,
        })
    }

    /// Makes the rule maps, which hold `have`, hold `want` (the trie before its exact copy,
    /// see [`super::rules`]), sets the config flags, and reads everything back.
    fn write_rules(
        &mut self,
        have: &Rules,
        want: &Rules,
        faults: &mut Faults,
    ) -> anyhow::Result<()> {
        rules::converge(&mut self.cidr, &have.cidr, &want.cidr, "CIDR rules", faults)?;
        rules::converge(
            &mut self.exact,
            &have.exact,
            &want.exact,
            "exact rules",
            faults,
        )?;
        rules::converge(
            &mut self.inbound,
            &have.inbound,
            &want.inbound,
            "inbound rules",
            faults,
        )?;
        if faults.on_config() {
            bail!("cannot write the config map: injected fault");
        }
        self.config_value.flags = want.flags;
        self.write_config()?;
        rules::verify(&self.cidr, &want.cidr, "CIDR rules")?;
        rules::verify(&self.exact, &want.exact, "exact rules")?;
        rules::verify(&self.inbound, &want.inbound, "inbound rules")?;
        // After the static maps are checked: a copy never outlives its static entry.
        self.copies.follow(&mut self.dns, &want.exact)?;
        let written = self
            .config
            .get(&0, 0)
            .context("cannot read the config map")?;
        if written.flags != want.flags {
            bail!("the config map does not hold the policy's flags after writing them");
        }
        Ok(())
    }

    /// Steers the cgroup's DNS (port 53, UDP and TCP, any address) to `resolver`; `None`
    /// turns steering off (port 53 is then judged like any other port).
    pub fn set_resolver(&mut self, resolver: Option<ResolverAddr>) -> anyhow::Result<()> {
        let c = &mut self.config_value;
        match resolver {
            Some(r) => {
                c.dns_port = r.port;
                c.dns_v4 = r.v4.octets();
                c.dns_v6 = r.v6.octets();
            }
            None => {
                c.dns_port = 0;
                c.dns_v4 = [0; 4];
                c.dns_v6 = [0; 16];
            }
        }
        self.write_config()
    }

    /// Leaves the processes of cgroup `id` alone (0: nobody): the agent's own cgroup when it
    /// runs inside the enforced one.
    pub fn set_exempt_cgroup(&mut self, id: u64) -> anyhow::Result<()> {
        self.config_value.exempt_cgroup = id;
        self.write_config()
    }

    fn write_config(&mut self) -> anyhow::Result<()> {
        self.config
            .set(0, self.config_value, 0)
            .context("cannot write the config map")
    }

    /// Writes `entries` as the names trie (name binding), as a policy change does: a
    /// `once` approval of a name adds it beside the policy's names until the next change.
    pub fn set_names(&mut self, entries: &[policy::NameEntry]) -> anyhow::Result<()> {
        self.name_keys = super::name_bind::sync(&mut self.names, &self.name_keys, entries)?;
        Ok(())
    }

    /// Allows `ip` with `value` (its ports and expiry) in the DNS-derived map, over the copy
    /// of a static entry there; copies make room when the map is full.
    pub fn allow_dns(&mut self, ip: IpAddr, value: AllowValue) -> anyhow::Result<()> {
        let addr = addr_from_ip(ip);
        loop {
            match self.dns.insert(addr, value, 0) {
                Ok(()) => {
                    self.copies.replaced(&addr);
                    return Ok(());
                }
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG)
                        && self.copies.evict(&mut self.dns) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot allow {ip}: the DNS address map is full")
                    });
                }
            }
        }
    }

    /// Removes `ip` from the DNS-derived map (its static entry's copy, if any, goes back).
    pub fn forget_dns(&mut self, ip: IpAddr) {
        let addr = addr_from_ip(ip);
        let _ = self.dns.remove(&addr);
        self.copies.restore(&mut self.dns, &addr);
    }

    /// The DNS-derived entries (not the copies of static entries); an entry that cannot be
    /// read (or a walk that stops) fails the read: an adopted entry nobody can account for
    /// must not stay behind unowned.
    /// (`dns read N` in `EGRESS_FAULT_FILE` fails the Nth read, debug builds only.)
    pub fn dns_entries(&self) -> anyhow::Result<Vec<(Addr, AllowValue)>> {
        let mut faults = Faults::from_env();
        self.dns
            .iter()
            .map(|item| {
                if faults.on_read("dns") {
                    bail!("cannot read the DNS map: injected fault");
                }
                item.context("cannot read the DNS map")
            })
            .filter(|item| !item.as_ref().is_ok_and(|(_, v)| copies::is_copy(v)))
            .collect()
    }

    /// Removes every DNS-derived entry (each name resolves, and is granted, anew); fails
    /// unless the map is then read back empty. The copies of static entries are written
    /// again after.
    pub fn clear_dns(&mut self) -> anyhow::Result<usize> {
        let mut removed = 0;
        for _ in 0..3 {
            // A walk that stops early still names keys to remove; the next pass sees the rest.
            let keys: Vec<Addr> = self.dns.keys().map_while(Result::ok).collect();
            if keys.is_empty() && self.dns.keys().next().is_none() {
                self.copies.refill(&mut self.dns);
                return Ok(removed);
            }
            for k in keys {
                match self.dns.remove(&k) {
                    Ok(()) => removed += 1,
                    Err(MapError::KeyNotFound) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).context("cannot clear the DNS map"),
                }
            }
        }
        bail!("cannot clear the DNS map: entries remain after three passes")
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let sum =
            |slot: u32| -> anyhow::Result<u64> { Ok(self.counters.get(&slot, 0)?.iter().sum()) };
        Ok(Counters {
            allow: sum(COUNTER_ALLOW)?,
            deny: sum(COUNTER_DENY)?,
            ringbuf_drop: sum(COUNTER_RINGBUF_DROP)?,
            error: sum(COUNTER_ERROR)?,
        })
    }

    /// Drains the deny events queued so far (non-blocking). Empty once
    /// [`Enforcer::take_events`] has taken the ring buffer.
    pub fn poll_denies(&mut self) -> Vec<DenyRecord> {
        let offset = self.boot_offset;
        let Some(ring) = self.events.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(mut r) = DenyRecord::from_bytes(&item, offset) {
                r.attribute(&mut self.workload);
                out.push(r);
            }
        }
        out
    }

    /// Takes the ring buffer, for an async reader (see [`crate::daemon::monitor`]).
    pub fn take_events(&mut self) -> Option<(RingBuf<MapData>, Duration)> {
        self.events.take().map(|r| (r, self.boot_offset))
    }

    /// Takes the reader of the verdict trace (`None` unless loaded with tracing on).
    pub fn take_trace(&mut self) -> Option<trace::Logger> {
        self.trace.take()
    }

    /// Detaches the programs and removes the pins. Without this, pinned links keep
    /// enforcing after the agent is gone (by design: fail closed).
    pub fn detach(&mut self) -> anyhow::Result<()> {
        for link in self.links.drain(..) {
            match link {
                Link::Owned(l) => drop(l),
                Link::Raw(fd) => drop(fd),
                Link::Pinned(p) => drop(p.unpin().context("cannot unpin a link")?),
            }
        }
        if let Some(dir) = self.pin_dir.take() {
            remove_pin_dir(&dir)?;
        }
        Ok(())
    }
}

/// Removes a pin directory: unlinking a pin releases the kernel object once nothing else
/// holds it.
pub fn remove_pin_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove pins {}", dir.display()))?;
    }
    // The shared parent (`/sys/fs/bpf/egress`) goes too once no instance is left in it.
    if let Some(parent) = dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    Ok(())
}

/// The bpffs mount point `/sys/fs/bpf`, mounting it there if no bpffs is mounted yet (as
/// systemd does at boot).
pub fn ensure_bpffs() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from("/sys/fs/bpf");
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next(), f.next(), f.next());
        dir == Some("/sys/fs/bpf") && ty == Some("bpf")
    });
    if !mounted {
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (src, dir, ty, data) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"), c("mode=0700"));
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dir.as_ptr(),
                ty.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "no bpffs at /sys/fs/bpf and cannot mount one: {}",
                std::io::Error::last_os_error()
            );
        }
        tracing::info!("mounted a bpffs at /sys/fs/bpf");
    }
    Ok(root)
}
