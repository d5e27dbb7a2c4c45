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
pub mod ratelimit;
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
use hickory_proto::op::{Message, ResponseCode};
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
use screen::{Screened, client_answer, reply_to};
use upstream::{Transport, read_framed, write_framed};

/// Queries handled at once; more wait (UDP) or are read later (TCP).
pub const MAX_IN_FLIGHT: usize = 512;
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
        for u in std::iter::once(&udp4).chain(&udp6) {
            grow_receive_buffer(u);
        }
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
        let relay = {
            use std::os::fd::AsRawFd;
            let udp = std::iter::once(&self.udp4).chain(&self.udp6);
            let tcp = std::iter::once(&self.tcp4).chain(&self.tcp6);
            let listeners = udp
                .map(AsRawFd::as_raw_fd)
                .chain(tcp.map(AsRawFd::as_raw_fd))
                .collect();
            Arc::new(upstream::Relay::new(
                listeners,
                limit.clone(),
                MAX_IN_FLIGHT,
            ))
        };
        let udp = std::iter::once((self.udp4, v4)).chain(self.udp6.map(|u| (u, v6)));
        for (sock, local) in udp {
            let sock = Arc::new(UdpSocket::from_std(sock)?);
            let (ctx, limit, relay) = (ctx.clone(), limit.clone(), relay.clone());
            tasks.spawn(serve_udp(sock, local, ctx, limit, relay));
        }
        let tcp = std::iter::once((self.tcp4, v4)).chain(self.tcp6.map(|t| (t, v6)));
        for (listener, local) in tcp {
            let listener = TcpListener::from_std(listener)?;
            tasks.spawn(serve_tcp(listener, local, ctx.clone(), limit.clone()));
        }
        tasks.spawn(sweep_forever(ctx.clone(), relay));
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
        tasks.abort_all();
        Ok(())
    }
}

/// The receive buffer of each UDP socket of the resolver: room for about 10,000 queries, so
/// that a flood from one client (dropped by its rate limit as fast as it is read) does not
/// fill the socket while the thread is briefly off the CPU, losing other clients' queries
/// with it (the default of about 200 KiB holds some 270 datagrams: 3 ms of a 90,000 a second
/// flood).
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// Sets [`RECEIVE_BUFFER`]: past `net.core.rmem_max` with CAP_NET_ADMIN (which the agent
/// holds), else as far as the limit allows.
fn grow_receive_buffer(sock: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size = RECEIVE_BUFFER;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket descriptor and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Serves the UDP socket bound to `local`.
async fn serve_udp(
    sock: Arc<UdpSocket>,
    local: SocketAddr,
    ctx: Arc<DnsContext>,
    limit: Arc<Semaphore>,
    relay: Arc<upstream::Relay>,
) {
    let mut buf = vec![0u8; 65_535];
    let mut clients = ratelimit::Limiter::default();
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns: receive failed: {e}");
                continue;
            }
        };
        // Before any parsing: a client over its rate costs one hash lookup.
        if !clients.allow(client, Instant::now()) {
            Metrics::inc(&ctx.metrics.dns_rate_limited);
            continue;
        }
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
            Step::Refused(refusal) => {
                // Named (the owner lookup off this thread) before the answer goes: the client
                // still waits for it, so its socket is still there to be found.
                let (sock, ctx) = (sock.clone(), ctx.clone());
                tokio::spawn(async move {
                    refusal.report(&ctx).await;
                    if let Some(reply) = refusal.reply {
                        let _ = sock.send_to(&reply, client).await;
                    }
                });
                continue;
            }
            Step::Hold(hold) => {
                // Ask mode: no slot taken (a held query may wait for minutes); the requests
                // and their waiters are bounded in `held` instead.
                let (sock, ctx) = (sock.clone(), ctx.clone());
                tokio::spawn(async move {
                    if let Some(reply) = held::wait(&ctx, hold).await {
                        let _ = sock.send_to(&reply, client).await;
                    }
                });
                continue;
            }
            Step::Forward(p) => p,
        };
        // Never wait for a slot here: waiting stops this loop from reading, and every other
        // client's queries would be lost with the flood's. Without a slot: SERVFAIL at once.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            Metrics::inc(&ctx.metrics.dns_rate_limited);
            if let Some(reply) = encode(&reply_to(&pending.msg, ResponseCode::ServFail)) {
                let _ = sock.send_to(&reply, client).await;
            }
            continue;
        };
        let (sock, ctx, relay) = (sock.clone(), ctx.clone(), relay.clone());
        let answer = async move {
            if let Some(reply) = forward(&ctx, pending, Some(&relay)).await
                && let Err(e) = sock.send_to(&reply, client).await
            {
                tracing::debug!("dns: cannot answer {client}: {e}");
            }
            drop(permit);
            // Off the answer's path: the spent socket closed, the next one opened.
            relay.tidy(
                ctx.upstreams
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .first()
                    .copied(),
            );
        };
        // Run here, on this task, as far as it goes: an answer caught on the CPU (see
        // `upstream::Relay`) goes out with no hop to a task of its own; one still pending
        // continues on its own task.
        let mut answer = Box::pin(answer);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if answer.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(answer);
        }
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
    let mut rate = ratelimit::ClientLimit::new();
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_framed(&mut s)).await {
            Ok(Ok(Some(q))) => q,
            _ => return,
        };
        // A connection over its rate is read more slowly (TCP pushes back on the client).
        if let Some(wait) = rate.wait() {
            Metrics::inc(&ctx.metrics.dns_rate_limited);
            tokio::time::sleep(wait).await;
        }
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
    match screen_query(ctx, query, client, local, transport) {
        Step::Answer(reply) => reply,
        Step::Refused(r) => {
            r.report(ctx).await;
            r.reply
        }
        Step::Forward(pending) => forward(ctx, pending, None).await,
        Step::Hold(hold) => held::wait(ctx, hold).await,
    }
}

/// What a query needs after screening.
enum Step {
    /// This answer now (`None`: nothing to answer, not even a header).
    Answer(Option<Vec<u8>>),
    /// REFUSED, once the refusal is reported.
    Refused(Refusal),
    /// The upstream's answer.
    Forward(Pending),
    /// Ask mode: a person's decision first (see `held`).
    Hold(held::Hold),
}

/// A refused query: what to report, and the answer to give after.
struct Refusal {
    /// The REFUSED answer (`None`: nothing to answer).
    reply: Option<Vec<u8>>,
    /// (name, type) of each refused question.
    names: Vec<(String, String)>,
    from: Origin,
    /// Why, when more than "no rule" (ask mode: `approval-denied`, `approval-timeout`, ...).
    reason: Option<&'static str>,
}

impl Refusal {
    /// Writes its `dns-refused` events.
    async fn report(&self, ctx: &DnsContext) {
        report_refused(ctx, &self.names, self.from, self.reason).await;
    }
}

/// Why an answer is not given after all.
enum Denied {
    /// The policy in force no longer permits a question.
    Refused(Box<Refusal>),
    /// This answer instead (SERVFAIL: a write failed).
    Failed(Option<Vec<u8>>),
}

/// A query on its way to the upstream.
struct Pending {
    msg: Box<Message>,
    key: cache::Key,
    /// Refused names forwarded in audit mode are never cached.
    cacheable: bool,
    /// Who asked, and where: to name the sender if the answer is refused after all.
    from: Origin,
    /// Refused questions forwarded anyway (audit mode), to report.
    audited: Vec<(String, String)>,
    /// Ask mode, `approve --for once`: the rule that permits this one answer, beside the
    /// policy in force.
    once: Option<policy::Rule>,
}

/// Where a query came from.
#[derive(Debug, Clone, Copy)]
struct Origin {
    client: SocketAddr,
    local: SocketAddr,
    transport: Transport,
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
    let from = Origin {
        client,
        local,
        transport,
    };
    let mut cacheable = true;
    let mut audited = Vec::new();
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
            query: parsed,
        } => {
            Metrics::inc(&ctx.metrics.dns_queries);
            Metrics::inc(&ctx.metrics.dns_refused);
            if policy.mode == policy::Mode::Ask {
                return held::hold(ctx, query, names, reply, from);
            }
            if policy.mode != policy::Mode::Audit {
                return Step::Refused(Refusal {
                    reply: Some(reply),
                    names,
                    from,
                    reason: None,
                });
            }
            cacheable = false;
            audited = names;
            parsed
        }
    };

    let key = cache::Key::of(&msg);
    if cacheable && let Some((answer, granted)) = ctx.answers.get(&key, Instant::now()) {
        // The addresses are granted again, for what remains of their TTL.
        return match grant_all(ctx, &msg, granted, from, None) {
            Ok(()) => Step::Answer(client_answer(answer, &msg, transport == Transport::Udp)),
            Err(Denied::Refused(r)) => Step::Refused(*r),
            Err(Denied::Failed(reply)) => Step::Answer(reply),
        };
    }
    Step::Forward(Pending {
        msg,
        key,
        cacheable,
        from,
        audited,
        once: None,
    })
}

/// Forwards a screened query (normalized: [`screen::upstream_query`]) and grants what the
/// upstream answered before returning it; with `relay`, a UDP query goes through it
/// ([`upstream::Relay`]).
async fn forward(
    ctx: &DnsContext,
    pending: Pending,
    relay: Option<&upstream::Relay>,
) -> Option<Vec<u8>> {
    let Pending {
        msg,
        key,
        cacheable,
        from,
        audited,
        once,
    } = pending;
    let transport = from.transport;
    if !audited.is_empty() {
        report_refused(ctx, &audited, from, None).await;
    }
    let query = match screen::upstream_query(&msg) {
        Ok(q) => q,
        Err(e) => {
            warn(ctx, &format!("dns: cannot build the upstream query: {e}"));
            return encode(&reply_to(&msg, ResponseCode::ServFail));
        }
    };
    let answer = match upstream::exchange(&ctx.upstreams(), &query, transport, relay).await {
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
    let parsed = match Message::from_vec(&answer) {
        Ok(m) => m,
        Err(e) => {
            warn(ctx, &format!("dns: unparseable upstream answer: {e}"));
            return encode(&reply_to(&msg, ResponseCode::ServFail));
        }
    };
    let granted = screen::addresses_in(&msg, &parsed);
    match grant_all(ctx, &msg, granted.clone(), from, once) {
        Ok(()) => {}
        Err(Denied::Refused(r)) => {
            r.report(ctx).await;
            return r.reply;
        }
        Err(Denied::Failed(reply)) => return reply,
    }
    if cacheable {
        ctx.answers.put(key, &parsed, granted, Instant::now());
    }
    client_answer(parsed, &msg, transport == Transport::Udp)
}

/// Grants the answered addresses under the policy in force *now*, not the one the query was
/// screened under: a reload may have come while the query was upstream. On refusal, the
/// answer to give instead: REFUSED (with its `dns-refused` event) when that policy no longer
/// permits a question, SERVFAIL when a write failed.
fn grant_all(
    ctx: &DnsContext,
    msg: &Message,
    granted: cache::Granted,
    from: Origin,
    once: Option<policy::Rule>,
) -> Result<(), Denied> {
    let mut grants = ctx.grants.lock().unwrap_or_else(|p| p.into_inner());
    // Read under the grants lock: a reload swaps the policy and prunes the grants under the
    // same lock ([`crate::daemon::reload::apply`]), so this answer is either judged by the new policy
    // or written before the prune, which then removes what the new policy drops.
    let mut policy = ctx.policy();
    if let Some(rule) = once {
        // Ask mode, approved once: this answer also under the one approved rule.
        let mut p = (*policy).clone();
        p.rules.push(rule);
        policy = Arc::new(p);
    }
    if policy.mode != policy::Mode::Audit {
        let refused: Vec<(String, String)> = msg
            .queries()
            .iter()
            .filter(|q| !screen::permitted(q, &policy))
            .map(|q| (normalize(q.name()), q.query_type().to_string()))
            .collect();
        if !refused.is_empty() {
            Metrics::inc(&ctx.metrics.dns_refused);
            return Err(Denied::Refused(Box::new(Refusal {
                reply: encode(&reply_to(msg, ResponseCode::Refused)),
                names: refused,
                from,
                reason: None,
            })));
        }
    }
    let written = granted
        .iter()
        .try_for_each(|(name, addrs)| allow_answer(ctx, &policy, &mut grants, name, addrs));
    count_entries(ctx, &grants);
    if let Err(e) = written {
        // The addresses are not allowed: say so rather than hand out an answer that only
        // fails later.
        warn(ctx, &format!("dns: {e:#}"));
        return Err(Denied::Failed(encode(&reply_to(
            msg,
            ResponseCode::ServFail,
        ))));
    }
    Ok(())
}

/// Keeps the `egress_dns_map_entries` gauge: the addresses holding grants.
pub fn count_entries(ctx: &DnsContext, grants: &Grants) {
    ctx.metrics
        .dns_entries
        .store(grants.len() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Owner lookups running at once; a refused query beyond them is reported without its
/// sender rather than wait.
const ATTRIBUTING: usize = 4;
static ATTRIBUTION_SLOTS: Semaphore = Semaphore::const_new(ATTRIBUTING);

/// Writes a `dns-refused` event per refused question, naming the querying process (see
/// [`owner_of`]); `reason` says why when more than "no rule".
async fn report_refused(
    ctx: &DnsContext,
    names: &[(String, String)],
    from: Origin,
    reason: Option<&str>,
) {
    let audit = ctx.policy().mode == policy::Mode::Audit;
    let owner = owner_of(ctx, from).await;
    for (name, qtype) in names {
        ctx.sink.emit(&Event::DnsRefused {
            ts: SystemTime::now(),
            query: name,
            qtype,
            verdict: if audit { "audit" } else { "refused" },
            proto: match from.transport {
                Transport::Udp => "udp",
                Transport::Tcp => "tcp",
            },
            pid: owner.as_ref().map(|o| o.pid),
            comm: owner.as_ref().map(|o| o.comm.as_str()),
            uid: owner.as_ref().map(|o| o.uid),
            reason,
        });
    }
}

/// The process that sent a query from `from`. The lookup (a `sock_diag` request, at worst a
/// walk over `/proc`) runs on the blocking pool, never on the resolver's thread, at most
/// [`ATTRIBUTING`] at once; beyond them, `None` rather than wait.
async fn owner_of(ctx: &DnsContext, from: Origin) -> Option<attribution::Owner> {
    match ATTRIBUTION_SLOTS.try_acquire() {
        Ok(_slot) => {
            let cgroup = ctx.cgroup.clone();
            tokio::task::spawn_blocking(move || {
                attribution::owner_of(from.transport, from.local, from.client, &cgroup)
            })
            .await
            .ok()
            .flatten()
        }
        Err(_) => None,
    }
}

/// Writes the answered addresses into the map; returns once every write is done.
fn allow_answer(
    ctx: &DnsContext,
    policy: &Policy,
    grants: &mut Grants,
    name: &str,
    addrs: &[(IpAddr, u32)],
) -> anyhow::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    let now = boot_now();
    let mut enf = ctx.enforcer.lock().unwrap_or_else(|p| p.into_inner());
    // Whatever happens below, the grants may have changed: persist them.
    ctx.grants_changed.notify_one();
    for &(ip, ttl) in addrs {
        if let Some(what) = crate::policy::rebinding::guarded(ip, policy.dns.block_private) {
            let message = format!(
                "dns: {name} answered {ip}, {what}: not allowed (DNS rebinding guard; only a \
                 cidr/ip rule can allow it)"
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
        let Some(value) = cached_entry(ctx, policy, ip, name, added, grants)? else {
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
    let mut cache = ctx.entries.lock().unwrap_or_else(|p| p.into_inner());
    let value = next_entry(cache.get(&ip).copied(), policy, name, &added, || {
        grants.live(&ip)
    })?;
    if let Some(value) = value {
        cache.insert(ip, (added.names, value));
    }
    Ok(value)
}

/// [`cached_entry`]'s decision: the entry after `name` was (re)answered, given the entry
/// computed last (`cached`: from how many names, and the value) and the address's grants now
/// (`live`, read only when every name's rules must be gathered again); `None`: no rewrite.
fn next_entry(
    cached: Option<(usize, AllowValue)>,
    policy: &Policy,
    name: &str,
    added: &grants::Added,
    live: impl FnOnce() -> Vec<grants::Grant>,
) -> anyhow::Result<Option<AllowValue>> {
    let expires = added.latest.as_nanos() as u64;
    let evicted = added.evicted.as_deref();
    let value = match cached {
        // The same names as before: only the expiry moves. So too when a name made room for
        // this one under the very same rules (a flood of names below one wildcard, all
        // answered with one address): the union of the names' rules is what it was.
        Some((n, v))
            if n == added.names && evicted.is_none_or(|gone| rules_match(policy, gone, name)) =>
        {
            if expires.saturating_sub(v.expires_ns) <= rewrite_slack(policy).as_nanos() as u64 {
                return Ok(None);
            }
            let mut v = v;
            v.expires_ns = expires;
            v
        }
        // A name made room for this one: computed again from the names left.
        _ if evicted.is_some() => entry_value(policy, &live())?,
        // One more name: merge its rules into the entry.
        Some((n, v)) if n + 1 == added.names => {
            let rules = policy.host_rules_for(name);
            let mine = policy::rule_value(&rules, expires)
                .map_err(|e| anyhow::anyhow!("too many port ranges ({} needed)", e.0))?;
            AllowValue::from_ranges(v.ranges().iter().chain(mine.ranges()).copied(), expires)
                .map_err(|e| {
                    anyhow::anyhow!("too many port ranges for one address ({} needed)", e.0)
                })?
        }
        _ => entry_value(policy, &live())?,
    };
    Ok(Some(value))
}

/// Whether names `a` and `b` are covered by the very same rules of `policy`.
fn rules_match(policy: &Policy, a: &str, b: &str) -> bool {
    let (a, b) = (policy.host_rules_for(a), policy.host_rules_for(b));
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| std::ptr::eq(*x, *y))
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

async fn sweep_forever(ctx: Arc<DnsContext>, relay: Arc<upstream::Relay>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        sweep(&ctx);
        relay.tidy(None);
    }
}

/// Removes expired grants from the map (the programs also check expiry themselves, so a late
/// sweep never extends an entry).
pub fn sweep(ctx: &DnsContext) {
    let changes = {
        let mut grants = ctx.grants.lock().unwrap_or_else(|p| p.into_inner());
        let changes = grants.sweep(boot_now());
        count_entries(ctx, &grants);
        changes
    };
    let expired = ctx.answers.expire(Instant::now());
    if changes.len() + expired >= TRIM_AFTER {
        // After a burst (a flood of names) the freed memory goes back to the system rather
        // than stay with the allocator.
        // SAFETY: glibc's malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
    }
    if changes.is_empty() {
        return;
    }
    let policy = ctx.policy();
    apply_changes(ctx, &policy, changes);
}

/// A sweep that removed at least this many grants and cached answers hands freed memory back.
const TRIM_AFTER: usize = 256;

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
    use std::path::Path;

    use super::*;

    fn policy() -> Policy {
        policy::parse_str(
            "version: 1\nallow:\n  - host: \"*.a.test\"\n    ports: [443]\n  - host: \
             \"*.b.test\"\n    ports: [8443]\n",
            Path::new("t.yaml"),
        )
        .unwrap()
    }

    fn ports(v: &AllowValue) -> Vec<(u16, u16)> {
        v.ranges().iter().map(|r| (r.lo, r.hi)).collect()
    }

    fn grant(name: &str, secs: u64) -> grants::Grant {
        grants::Grant {
            name: name.into(),
            expires: Duration::from_secs(secs),
        }
    }

    /// A name that pushed out one under the very same rules moves the expiry only; one that
    /// pushed out a name under other rules recomputes the entry from the names left, so the
    /// pushed-out name's ports go with it.
    #[test]
    fn an_evicted_name_keeps_the_entry_only_under_the_same_rules() {
        let p = policy();
        let full = grants::NAMES_PER_ADDRESS;
        let a = policy::rule_value(&p.host_rules_for("x.a.test"), 10_000_000_000).unwrap();
        let b = policy::rule_value(&p.host_rules_for("x.b.test"), 10_000_000_000).unwrap();
        let added = |gone: &str, secs: u64| grants::Added {
            names: full,
            latest: Duration::from_secs(secs),
            evicted: Some(gone.into()),
        };
        let unread = || -> Vec<grants::Grant> { panic!("the grants were read again") };

        // Same rules, a later expiry: the entry's ports, the new expiry, no recompute.
        let v = next_entry(
            Some((full, a)),
            &p,
            "new.a.test",
            &added("old.a.test", 60),
            unread,
        )
        .unwrap()
        .expect("the expiry moved: a rewrite");
        assert_eq!((ports(&v), v.expires_ns), (ports(&a), 60_000_000_000));
        // Same rules, the same expiry: nothing to write.
        let same = grants::Added {
            latest: Duration::from_secs(10),
            ..added("old.a.test", 10)
        };
        assert!(
            next_entry(Some((full, a)), &p, "new.a.test", &same, unread)
                .unwrap()
                .is_none()
        );

        // Other rules: computed from the names left, so the pushed-out name's ports go.
        let rewrite = |cached: AllowValue, name: &str, gone: &str, left: [&str; 2]| {
            let live = || left.iter().map(|n| grant(n, 60)).collect();
            next_entry(Some((full, cached)), &p, name, &added(gone, 60), live)
                .unwrap()
                .expect("a rewrite")
        };
        let v = rewrite(
            a,
            "new.b.test",
            "old.a.test",
            ["new.b.test", "other.b.test"],
        );
        assert_eq!((ports(&v), v.expires_ns), (ports(&b), 60_000_000_000));
        // And the other way: a b name pushed out by an a name under a mixed entry.
        let mixed =
            AllowValue::from_ranges(a.ranges().iter().chain(b.ranges()).copied(), 10_000_000_000)
                .unwrap();
        let v = rewrite(mixed, "y.a.test", "old.b.test", ["y.a.test", "z.a.test"]);
        assert_eq!(ports(&v), ports(&a));
    }

    #[test]
    fn rules_match_compares_the_covering_rules() {
        let p = policy();
        assert!(rules_match(&p, "x.a.test", "y.z.a.test"));
        assert!(!rules_match(&p, "x.a.test", "x.b.test"));
        assert!(rules_match(&p, "x.c.test", "y.c.test"));
    }
}
