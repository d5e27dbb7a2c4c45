//! The agent's DNS resolver: the only resolver the enforced cgroup can reach (the programs
//! steer every port-53 packet and connection here).
//!
//! A query is answered only if every name in it is permitted by a `host:` rule; anything else
//! gets REFUSED and a `dns-refused` event, so names cannot carry data out (DNS tunnelling).
//! Permitted queries are forwarded upstream; the A/AAAA addresses of the answer (through CNAME
//! chains) are written into the allow map *before* the answer goes back to the client, so the
//! client's first connect already finds them.
//!
//! Owns: the resolver (screening, upstream, cache, answers), the grants (which names each
//! answered address stands for, until when), the names deny events show, attribution of
//! refused queries. May use: `bpf` (the DNS-derived map), `policy`, `events`, `metrics`,
//! `sys`. May not touch: the session's other parts or the command.

pub mod answer;
pub mod attribution;
pub mod cache;
pub mod grants;
pub mod held;
pub mod names;
pub mod screen;
pub mod upstream;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use egress_common::AllowValue;
use hickory_proto::op::{Edns, Message, ResponseCode};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Notify, Semaphore, watch},
    task::JoinSet,
};

use crate::{
    bpf::enforcer::{Enforcer, ResolverAddr},
    dns::grants::{Change, Grants},
    dns::names::Names,
    events::{Event, EventSink, boot_now},
    metrics::Metrics,
    policy::{self, Policy},
};
use answer::normalize;
use screen::{Screened, reply_to};
use upstream::{Transport, read_framed, write_framed};

/// Queries handled at once; more wait (UDP) or are read later (TCP).
const MAX_IN_FLIGHT: usize = 512;
/// An idle TCP client is dropped after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How often expired grants are swept from the map.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// What the resolver shares with the rest of the agent.
pub struct DnsContext {
    /// The running policy (replaced whole on reload).
    pub policy: RwLock<Arc<Policy>>,
    /// Upstream servers, tried in order (replaced on reload).
    pub upstreams: RwLock<Vec<SocketAddr>>,
    /// The kernel maps.
    pub enforcer: Arc<Mutex<Enforcer>>,
    /// Which names each address was answered for.
    pub grants: Mutex<Grants>,
    /// Signalled after the grants changed (the session persists them).
    pub grants_changed: Notify,
    /// The search domains of the system resolver (lowercase, no trailing dot): a refused name
    /// that is a permitted name with one of them appended gets NXDOMAIN, so that a stub
    /// resolver walking its search list goes on to the name itself.
    pub search: Vec<String>,
    /// Address to last name, for deny events.
    pub names: Names,
    /// Event output.
    pub sink: Arc<EventSink>,
    /// The enforced cgroup, to find who sent a refused query.
    pub cgroup: PathBuf,
    /// Query counters.
    pub metrics: Arc<Metrics>,
    /// Per address: how many names its entry was last computed from, and the entry. A new
    /// answer for a known name only moves the expiry; a new name merges its ports in. Only
    /// sweeps and reloads recompute from every name (an address behind a CDN can serve
    /// thousands of names: recomputing each time made a query cost grow with them).
    pub entries: Mutex<HashMap<IpAddr, (usize, AllowValue)>>,
    /// Answers to permitted queries, served again within their TTL.
    pub answers: cache::AnswerCache,
    /// Ask mode: queries held for a person's decision, and the rules approved.
    pub held: held::Held,
}

impl DnsContext {
    /// The running policy.
    pub fn current_policy(&self) -> Arc<Policy> {
        self.policy()
    }

    fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The bound sockets (not yet registered with a runtime: [`Resolver::spawn`] serves them on
/// a runtime of their own).
pub struct Resolver {
    udp4: std::net::UdpSocket,
    udp6: Option<std::net::UdpSocket>,
    tcp4: std::net::TcpListener,
    tcp6: Option<std::net::TcpListener>,
    addr: ResolverAddr,
}

impl Resolver {
    /// Binds UDP and TCP on 127.0.0.1 and ::1, all on one free port. IPv6 is optional (a
    /// namespace without `::1` still gets IPv4 steering).
    pub async fn bind() -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..20 {
            match Self::try_bind() {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .expect("tried")
            .context("cannot bind the DNS resolver on loopback"))
    }

    fn try_bind() -> anyhow::Result<Self> {
        let udp4 = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = udp4.local_addr()?.port();
        let tcp4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let udp6 = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).ok();
        let tcp6 = match &udp6 {
            Some(_) => Some(std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port))?),
            None => None,
        };
        udp4.set_nonblocking(true)?;
        tcp4.set_nonblocking(true)?;
        if let (Some(u), Some(t)) = (&udp6, &tcp6) {
            u.set_nonblocking(true)?;
            t.set_nonblocking(true)?;
        }
        Ok(Self {
            udp4,
            udp6,
            tcp4,
            tcp6,
            addr: ResolverAddr {
                v4: Ipv4Addr::LOCALHOST,
                v6: Ipv6Addr::LOCALHOST,
                port,
            },
        })
    }

    /// Serves on a thread of its own, with a single-threaded runtime, until `stop` turns true
    /// (or its sender is dropped). One thread receives a query, forwards it, grants the
    /// answer and replies: no hand-off between the agent's worker threads, each of which is
    /// a wake-up, the largest part of a forwarded query's latency on a small machine.
    pub fn spawn(
        self,
        ctx: Arc<DnsContext>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the resolver's runtime")?;
        std::thread::Builder::new()
            .name("egress-dns".into())
            .spawn(move || {
                if let Err(e) = rt.block_on(self.serve(ctx, stop)) {
                    tracing::error!("dns: the resolver stopped: {e:#}");
                }
            })
            .context("cannot start the resolver's thread")
    }

    /// Where the programs must steer DNS.
    pub fn addr(&self) -> ResolverAddr {
        self.addr
    }

    /// Serves until `stop` turns true, sweeping expired grants as it goes.
    async fn serve(self, ctx: Arc<DnsContext>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let v4 = SocketAddr::from((self.addr.v4, self.addr.port));
        let v6 = SocketAddr::from((self.addr.v6, self.addr.port));
        let mut tasks = JoinSet::new();
        let udp = std::iter::once((self.udp4, v4)).chain(self.udp6.map(|u| (u, v6)));
        for (sock, local) in udp {
            let sock = Arc::new(UdpSocket::from_std(sock)?);
            tasks.spawn(serve_udp(sock, local, ctx.clone(), limit.clone()));
        }
        let tcp = std::iter::once((self.tcp4, v4)).chain(self.tcp6.map(|t| (t, v6)));
        for (listener, local) in tcp {
            let listener = TcpListener::from_std(listener)?;
            tasks.spawn(serve_tcp(listener, local, ctx.clone(), limit.clone()));
        }
        tasks.spawn(sweep_forever(ctx.clone()));
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
        tasks.abort_all();
        Ok(())
    }
}

/// Serves the UDP socket bound to `local`.
async fn serve_udp(
    sock: Arc<UdpSocket>,
    local: SocketAddr,
    ctx: Arc<DnsContext>,
    limit: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns: receive failed: {e}");
                continue;
            }
        };
        // Answered here when no upstream is needed (refused names, cache hits, malformed
        // queries): no task, no thread hop. Only a forwarded query gets a task of its own.
        let pending = match screen_query(&ctx, &buf[..n], client, local, Transport::Udp) {
            Step::Answer(reply) => {
                if let Some(reply) = reply
                    && let Err(e) = sock.send_to(&reply, client).await
                {
                    tracing::debug!("dns: cannot answer {client}: {e}");
                }
                continue;
            }
            step => step,
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let query = buf[..n].to_vec();
        let (sock, ctx) = (sock.clone(), ctx.clone());
        tokio::spawn(async move {
            if let Some(reply) = finish(&ctx, pending, &query, Transport::Udp).await
                && let Err(e) = sock.send_to(&reply, client).await
            {
                tracing::debug!("dns: cannot answer {client}: {e}");
            }
            drop(permit);
        });
    }
}

/// Serves the TCP listener bound to `local`.
async fn serve_tcp(
    listener: TcpListener,
    local: SocketAddr,
    ctx: Arc<DnsContext>,
    limit: Arc<Semaphore>,
) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ctx, limit) = (ctx.clone(), limit.clone());
        tokio::spawn(async move { tcp_client(stream, client, local, &ctx, &limit).await });
    }
}

async fn tcp_client(
    mut s: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    ctx: &DnsContext,
    limit: &Semaphore,
) {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_framed(&mut s)).await {
            Ok(Ok(Some(q))) => q,
            _ => return,
        };
        let Ok(_permit) = limit.acquire().await else {
            return;
        };
        let Some(reply) = handle(ctx, &query, client, local, Transport::Tcp).await else {
            return;
        };
        if write_framed(&mut s, &reply).await.is_err() {
            return;
        }
    }
}

/// Answers one query from `client` to the resolver's `local` address; `None` when there is
/// nothing to answer (not even a header).
pub async fn handle(
    ctx: &DnsContext,
    query: &[u8],
    client: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let step = screen_query(ctx, query, client, local, transport);
    finish(ctx, step, query, transport).await
}

/// The answer to a screened query: at once, from the upstream, or (ask mode) after a
/// person's decision.
async fn finish(
    ctx: &DnsContext,
    step: Step,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    match step {
        Step::Answer(reply) => reply,
        Step::Forward(pending) => forward(ctx, pending, query, transport).await,
        Step::Hold(hold) => held::wait(ctx, hold, query, transport).await,
    }
}

/// What a query needs after screening.
enum Step {
    /// This answer now (`None`: nothing to answer, not even a header).
    Answer(Option<Vec<u8>>),
    /// The upstream's answer.
    Forward(Pending),
    /// Ask mode: a person's decision first (see `held`).
    Hold(held::Hold),
}

/// A query on its way to the upstream.
struct Pending {
    policy: Arc<Policy>,
    msg: Box<Message>,
    key: cache::Key,
    /// Refused names forwarded in audit mode are never cached.
    cacheable: bool,
}

/// Everything that needs no upstream, synchronously: screening, refusals (with their event)
/// and answers from the cache (with their grants).
fn screen_query(
    ctx: &DnsContext,
    query: &[u8],
    client: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> Step {
    let policy = ctx.policy();
    let mut cacheable = true;
    let msg = match screen::screen(query, &policy, &ctx.search) {
        Screened::Drop => return Step::Answer(None),
        Screened::Reply(r) => return Step::Answer(Some(r)),
        Screened::NxDomain(r) => {
            Metrics::inc(&ctx.metrics.dns_queries);
            return Step::Answer(Some(r));
        }
        Screened::Forward(msg) => {
            Metrics::inc(&ctx.metrics.dns_queries);
            msg
        }
        Screened::Refused {
            reply,
            names,
            query,
        } => {
            Metrics::inc(&ctx.metrics.dns_queries);
            Metrics::inc(&ctx.metrics.dns_refused);
            if policy.mode == policy::Mode::Ask {
                return held::hold(ctx, &names, reply, client, local, transport);
            }
            report_refused(ctx, &policy, &names, client, local, transport);
            if policy.mode != policy::Mode::Audit {
                return Step::Answer(Some(reply));
            }
            cacheable = false;
            query
        }
    };

    let key = cache::Key::of(&msg, transport);
    if cacheable && let Some((reply, granted)) = ctx.answers.get(&key, msg.id(), Instant::now()) {
        // The addresses are granted again, for what remains of their TTL.
        return Step::Answer(grant_all(ctx, &policy, &msg, granted).map_or(Some(reply), Some));
    }
    Step::Forward(Pending {
        policy,
        msg,
        key,
        cacheable,
    })
}

/// Forwards a screened query and grants what the upstream answered before returning it.
async fn forward(
    ctx: &DnsContext,
    pending: Pending,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let Pending {
        policy,
        msg,
        key,
        cacheable,
    } = pending;
    // What leaves for the upstream carries no bits the client chose beyond its questions.
    let normalized = upstream_query(&msg);
    let query = normalized.as_deref().unwrap_or(query);
    let answer = match upstream::exchange(&ctx.upstreams(), query, transport).await {
        Ok(a) => a,
        Err(e) => {
            Metrics::inc(&ctx.metrics.dns_upstream_failures);
            let names: Vec<_> = msg.queries().iter().map(|q| normalize(q.name())).collect();
            warn(
                ctx,
                &format!("dns: upstream failed for {}: {e:#}", names.join(", ")),
            );
            return encode(&reply_to(&msg, ResponseCode::ServFail));
        }
    };
    let granted = match screen::answered_addresses(&msg, &answer) {
        Ok(g) => g,
        Err(e) => {
            warn(ctx, &format!("dns: unparseable upstream answer: {e}"));
            return encode(&reply_to(&msg, ResponseCode::ServFail));
        }
    };
    if let Some(servfail) = grant_all(ctx, &policy, &msg, granted.clone()) {
        return Some(servfail);
    }
    if cacheable {
        ctx.answers.put(key, &answer, granted, Instant::now());
    }
    Some(answer)
}

/// The query as it goes upstream: the questions only, names lower-cased, and of the client's
/// EDNS only the buffer size (capped at 1,232 bytes) and the DNSSEC bit; no EDNS options, no
/// other records. A permitted name's query is otherwise a channel of its own: letter case,
/// options and extra records would carry the client's bits to that name's servers. The answer
/// goes back to the client as it comes (stub resolvers compare question names without regard
/// to case).
fn upstream_query(msg: &Message) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(msg.id())
        .set_op_code(msg.op_code())
        .set_recursion_desired(msg.recursion_desired());
    for q in msg.queries() {
        let mut q = q.clone();
        q.set_name(q.name().to_lowercase());
        m.add_query(q);
    }
    if let Some(e) = msg.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().clamp(512, 1232))
            .set_dnssec_ok(e.flags().dnssec_ok);
        m.set_edns(edns);
    }
    m.to_vec().ok()
}

/// Grants the answered addresses; on failure, the SERVFAIL answer to give instead.
fn grant_all(
    ctx: &DnsContext,
    policy: &Policy,
    msg: &Message,
    granted: cache::Granted,
) -> Option<Vec<u8>> {
    for (name, addrs) in granted {
        if let Err(e) = allow_answer(ctx, policy, &name, &addrs) {
            // The addresses are not allowed: say so rather than hand out an answer that
            // only fails later.
            warn(ctx, &format!("dns: {e:#}"));
            return encode(&reply_to(msg, ResponseCode::ServFail));
        }
    }
    None
}

/// Writes a `dns-refused` event per refused question, naming the querying process.
fn report_refused(
    ctx: &DnsContext,
    policy: &Policy,
    names: &[(String, String)],
    client: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) {
    let audit = policy.mode == policy::Mode::Audit;
    let owner = attribution::owner_of(transport, local, client, &ctx.cgroup);
    for (name, qtype) in names {
        ctx.sink.emit(&Event::DnsRefused {
            ts: SystemTime::now(),
            query: name,
            qtype,
            verdict: if audit { "audit" } else { "refused" },
            proto: match transport {
                Transport::Udp => "udp",
                Transport::Tcp => "tcp",
            },
            pid: owner.as_ref().map(|o| o.pid),
            comm: owner.as_ref().map(|o| o.comm.as_str()),
            uid: owner.as_ref().map(|o| o.uid),
            reason: None,
        });
    }
}

/// Writes the answered addresses into the map; returns once every write is done.
fn allow_answer(
    ctx: &DnsContext,
    policy: &Policy,
    name: &str,
    addrs: &[(IpAddr, u32)],
) -> anyhow::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    let now = boot_now();
    let mut grants = ctx.grants.lock().unwrap_or_else(|p| p.into_inner());
    let mut enf = ctx.enforcer.lock().unwrap_or_else(|p| p.into_inner());
    // Whatever happens below, the grants may have changed: persist them.
    ctx.grants_changed.notify_one();
    for &(ip, ttl) in addrs {
        if crate::policy::rebinding::is_guarded(ip) {
            let message = format!(
                "dns: {name} answered {ip}, a link-local or metadata address: not allowed \
                 (DNS rebinding guard; only a cidr/ip rule can allow it)"
            );
            tracing::warn!("{message}");
            ctx.sink.emit(&Event::Warning {
                ts: SystemTime::now(),
                message: &message,
            });
            continue;
        }
        let ttl = Duration::from_secs(ttl.into()).clamp(policy.dns.min_ttl, policy.dns.max_ttl);
        let added = grants.add(ip, name, now + ttl + policy.dns.grace);
        let Some(value) = cached_entry(ctx, policy, ip, name, added, &grants)? else {
            // The kernel's entry already holds these rules until (almost) the same time.
            ctx.names.remember(ip, name);
            continue;
        };
        if let Err(e) = enf.allow_dns(ip, value) {
            grants.forget(&ip);
            ctx.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ip);
            return Err(e).with_context(|| format!("{name} answered {ip}"));
        }
        ctx.names.remember(ip, name);
    }
    Ok(())
}

/// The entry for `ip` after `name` was (re)answered, from the cache when possible; `None`
/// when the entry already written needs no rewrite: same rules, and an expiry at most
/// [`rewrite_slack`] short of the new one (a burst of answers for one name writes the map
/// once, not once per answer).
fn cached_entry(
    ctx: &DnsContext,
    policy: &Policy,
    ip: IpAddr,
    name: &str,
    added: grants::Added,
    grants: &grants::Grants,
) -> anyhow::Result<Option<AllowValue>> {
    let expires = added.latest.as_nanos() as u64;
    let mut cache = ctx.entries.lock().unwrap_or_else(|p| p.into_inner());
    let value = match cache.get(&ip) {
        // The same names as before: only the expiry moves.
        Some((n, v)) if *n == added.names => {
            if expires.saturating_sub(v.expires_ns) <= rewrite_slack(policy).as_nanos() as u64 {
                return Ok(None);
            }
            let mut v = *v;
            v.expires_ns = expires;
            v
        }
        // One more name: merge its rules into the entry.
        Some((n, v)) if *n + 1 == added.names => {
            let rules = policy.host_rules_for(name);
            let mine = policy::rule_value(&rules, expires)
                .map_err(|e| anyhow::anyhow!("too many port ranges ({} needed)", e.0))?;
            AllowValue::from_ranges(v.ranges().iter().chain(mine.ranges()).copied(), expires)
                .map_err(|e| {
                    anyhow::anyhow!("too many port ranges for one address ({} needed)", e.0)
                })?
        }
        _ => entry_value(policy, &grants.live(&ip))?,
    };
    cache.insert(ip, (added.names, value));
    Ok(Some(value))
}

/// How much shorter than promised a kernel entry may stay rather than be rewritten: a
/// quarter of the grace period that follows every TTL, at most a second.
fn rewrite_slack(policy: &Policy) -> Duration {
    (policy.dns.grace / 4).min(Duration::from_secs(1))
}

/// The map value for an address: the union of the rules of every name it was answered for.
fn entry_value(
    policy: &Policy,
    live: &[grants::Grant],
) -> anyhow::Result<egress_common::AllowValue> {
    let rules: Vec<_> = live
        .iter()
        .flat_map(|g| policy.host_rules_for(&g.name))
        .collect();
    let expires = grants::latest(live);
    policy::rule_value(&rules, expires.as_nanos() as u64)
        .map_err(|e| anyhow::anyhow!("too many port ranges for one address ({} needed)", e.0))
}

async fn sweep_forever(ctx: Arc<DnsContext>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        sweep(&ctx);
    }
}

/// Removes expired grants from the map (the programs also check expiry themselves, so a late
/// sweep never extends an entry).
pub fn sweep(ctx: &DnsContext) {
    let changes = ctx
        .grants
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sweep(boot_now());
    if changes.is_empty() {
        return;
    }
    let policy = ctx.policy();
    apply_changes(ctx, &policy, changes);
}

/// Writes grant changes into the map.
pub fn apply_changes(ctx: &DnsContext, policy: &Policy, changes: Vec<Change>) {
    {
        let mut cache = ctx.entries.lock().unwrap_or_else(|p| p.into_inner());
        for c in &changes {
            match c {
                Change::Remove(ip) | Change::Update(ip, _) => {
                    cache.remove(ip);
                }
            }
        }
    }
    ctx.grants_changed.notify_one();
    let mut enf = ctx.enforcer.lock().unwrap_or_else(|p| p.into_inner());
    for c in changes {
        match c {
            Change::Remove(ip) => enf.forget_dns(ip),
            Change::Update(ip, live) => match entry_value(policy, &live) {
                Ok(v) => {
                    if let Err(e) = enf.allow_dns(ip, v) {
                        tracing::warn!("{e:#}");
                    }
                }
                Err(e) => tracing::warn!("{e:#}"),
            },
        }
    }
}

fn encode(m: &Message) -> Option<Vec<u8>> {
    m.to_vec().ok()
}

fn warn(ctx: &DnsContext, message: &str) {
    tracing::warn!("{message}");
    ctx.sink.emit(&Event::Warning {
        ts: SystemTime::now(),
        message,
    });
}

/// Asks the resolver at `addr` something harmless (a STATUS query, answered NOTIMP without an
/// event) and waits for any answer: readiness means the resolver answers.
pub async fn check_answers(addr: crate::bpf::enforcer::ResolverAddr) -> anyhow::Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    sock.connect((addr.v4, addr.port)).await?;
    // id 0xe9e5, opcode STATUS (2), no questions.
    let probe = [0xe9, 0xe5, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut buf = [0u8; 512];
    for _ in 0..5 {
        sock.send(&probe).await?;
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await
            && n >= 12
            && buf[..2] == probe[..2]
        {
            return Ok(());
        }
    }
    anyhow::bail!("no answer from 127.0.0.1:{}", addr.port)
}

/// The upstream servers: the policy's `dns.upstream`, or the system resolver's name servers
/// (read before steering, from the agent's own view).
pub fn upstreams(policy: &Policy) -> Vec<SocketAddr> {
    match &policy.dns.upstream {
        policy::Upstream::Servers(list) => list.clone(),
        policy::Upstream::System => system_name_servers(),
    }
}

/// The system resolver's search domains (`search`, else `domain`, of `/etc/resolv.conf`, as
/// the agent sees them), lowercase without the trailing dot, deduplicated, in order.
pub fn system_search_domains() -> Vec<String> {
    match hickory_resolver::system_conf::read_system_conf() {
        Ok((conf, _)) => {
            let mut out: Vec<String> = Vec::new();
            for name in conf.search().iter().chain(conf.domain()) {
                let name = normalize(name);
                if !name.is_empty() && !out.contains(&name) {
                    out.push(name);
                }
            }
            out
        }
        Err(e) => {
            tracing::warn!("cannot read the system resolver configuration: {e}");
            Vec::new()
        }
    }
}

/// The system resolver's name servers (from `/etc/resolv.conf`), deduplicated, in order.
pub fn system_name_servers() -> Vec<SocketAddr> {
    match hickory_resolver::system_conf::read_system_conf() {
        Ok((conf, _)) => {
            let mut out: Vec<SocketAddr> = Vec::new();
            for ns in conf.name_servers() {
                if !out.contains(&ns.socket_addr) {
                    out.push(ns.socket_addr);
                }
            }
            out
        }
        Err(e) => {
            tracing::warn!("cannot read the system resolver configuration: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use hickory_proto::{
        op::{Edns, Message, Query},
        rr::{Name, RecordType, rdata::opt::EdnsOption},
    };

    #[test]
    fn the_upstream_sees_lowercase_questions_and_no_client_options() {
        let mut m = Message::new();
        m.set_id(9).set_recursion_desired(true);
        m.add_query(Query::query(
            Name::from_str("OK.ExAmPle.COM.").unwrap(),
            RecordType::A,
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        edns.options_mut()
            .insert(EdnsOption::Unknown(65001, b"secret".to_vec()));
        m.set_edns(edns);
        let sent = super::upstream_query(&m).unwrap();
        assert!(!sent.windows(6).any(|w| w == b"secret"));
        let out = Message::from_vec(&sent).unwrap();
        assert_eq!(out.queries()[0].name().to_ascii(), "ok.example.com.");
        assert_eq!(out.id(), 9);
        let e = out.extensions().as_ref().unwrap();
        assert_eq!(e.max_payload(), 1232);
        assert!(AsRef::<[_]>::as_ref(e.options()).is_empty());
    }
}
