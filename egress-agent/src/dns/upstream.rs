//! Sending a query to the upstream servers: UDP for UDP clients (a truncated answer goes back
//! truncated, so the client retries over TCP), TCP for TCP clients. The query is the one the
//! resolver built from the client's ([`super::screen::upstream_query`]: lower case, no client
//! flag or EDNS option), never the client's bytes. Each query gets a fresh socket (random
//! source port) and a random id, checked on the answer.
//!
//! The resolver's own UDP queries go through a [`Relay`]: sockets opened ahead and closed
//! after the answer, and a short wait on the CPU for the answer to a query alone in flight.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};

/// How long one upstream may take to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest DNS message over UDP that we accept from upstream.
const MAX_UDP: usize = 65_535;

pub use crate::sys::sockdiag::Transport;

/// How long a UDP query waits for its upstream's answer on the CPU before it sleeps: most
/// answers from a nearby upstream come within it, and a thread that sleeps for them is woken
/// tens of µs later than one that polls (docs/KERNEL-NOTES.md). Bounded in µs: at most this
/// much CPU per forwarded query, and only while nothing else is in flight.
pub const SPIN: Duration = Duration::from_micros(100);
/// Sockets opened ahead for the first upstream, each for one query.
const READY: usize = 4;
/// How long a socket opened ahead may wait for its query: its port is open (and could be
/// probed for) only this long before the query, not for a quiet spell of minutes.
const READY_FOR: Duration = Duration::from_secs(1);

/// The resolver thread's way to the upstreams over UDP, made for latency (docs/KERNEL-NOTES.md,
/// "The resolver's latency on a cache miss"): sockets opened and closed off the path of a
/// query, and the answer to a query alone in flight waited for on the CPU.
///
/// Each query still gets a socket of its own, connected (so bound to a random port the kernel
/// chose) before the query, used once: [`Relay::take`] hands out one opened at most
/// [`READY_FOR`] ago (or a new one), [`Relay::tidy`], after an answer went out, closes the
/// spent ones and opens the next.
#[derive(Debug)]
pub struct Relay {
    /// The resolver's own sockets (UDP sockets and TCP listeners): a query arriving on one
    /// ends a wait on the CPU at once. Raw: they outlive every query task of the resolver's
    /// runtime, and a descriptor only polled cannot harm whatever it might name later (a
    /// wrong readiness ends a wait early).
    listeners: Vec<RawFd>,
    /// The resolver's in-flight slots, and how many there are: only a query holding the one
    /// slot taken waits on the CPU (the resolver's thread runs every query: while it polls
    /// for one answer it serves nobody else).
    slots: Arc<Semaphore>,
    all_slots: usize,
    sockets: Mutex<Sockets>,
}

#[derive(Debug, Default)]
struct Sockets {
    /// Opened ahead: (upstream, when opened, socket).
    ready: Vec<(SocketAddr, Instant, std::net::UdpSocket)>,
    /// Used, to close once the answer went out.
    spent: Vec<std::net::UdpSocket>,
}

impl Relay {
    /// For the resolver whose sockets are `listeners` and whose in-flight slots are `slots`
    /// (`all_slots` of them).
    pub fn new(listeners: Vec<RawFd>, slots: Arc<Semaphore>, all_slots: usize) -> Self {
        Self {
            listeners,
            slots,
            all_slots,
            sockets: Mutex::default(),
        }
    }

    fn sockets(&self) -> std::sync::MutexGuard<'_, Sockets> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A socket connected to `server`, never used before: one opened ahead if any.
    fn take(&self, server: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let ahead = {
            let mut s = self.sockets();
            let now = Instant::now();
            s.ready
                .iter()
                .rposition(|(to, at, _)| *to == server && now.duration_since(*at) < READY_FOR)
                .map(|i| s.ready.swap_remove(i).2)
        };
        match ahead {
            Some(sock) => {
                // Whatever came before the query is not its answer.
                drain(&sock);
                Ok(sock)
            }
            None => connected_udp(server),
        }
    }

    /// After an answer went out: closes the spent sockets and those opened too long ago, and
    /// opens sockets ahead for `server` (the first upstream) up to [`READY`]; `None` (no
    /// upstream, or a periodic sweep) only closes.
    pub fn tidy(&self, server: Option<SocketAddr>) {
        let now = Instant::now();
        let (spent, stale, wanted) = {
            let mut s = self.sockets();
            let spent = std::mem::take(&mut s.spent);
            let (keep, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut s.ready)
                .into_iter()
                .partition(|(to, at, _)| {
                    server.is_none_or(|s| s == *to) && now.duration_since(*at) < READY_FOR / 2
                });
            s.ready = keep;
            (spent, stale, READY.saturating_sub(s.ready.len()))
        };
        drop((spent, stale));
        let Some(server) = server else { return };
        let fresh: Vec<_> = (0..wanted)
            .map_while(|_| connected_udp(server).ok())
            .map(|sock| (server, Instant::now(), sock))
            .collect();
        self.sockets().ready.extend(fresh);
    }

    /// The answer to `id` on `sock` if this query is alone in flight, the answer comes within
    /// [`SPIN`] and no query arrives on a listener meanwhile; `None` otherwise (then the
    /// caller sleeps for it).
    fn spin(&self, sock: &std::net::UdpSocket, id: u16) -> Option<Vec<u8>> {
        if self.slots.available_permits() + 1 < self.all_slots {
            return None;
        }
        let mut fds: Vec<libc::pollfd> = std::iter::once(sock.as_raw_fd())
            .chain(self.listeners.iter().copied())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let start = Instant::now();
        loop {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd; a zero timeout never
            // blocks.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
            if ready > 0 {
                if fds[1..].iter().any(|p| p.revents != 0) {
                    return None;
                }
                match receive(|buf| sock.recv(buf), id) {
                    Ok(Some(answer)) => return Some(answer),
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return None,
                }
            }
            if ready < 0 || start.elapsed() >= SPIN {
                return None;
            }
            // Lets a thread that shares this CPU run (the upstream itself, on a busy
            // machine); a no-op when none waits.
            std::thread::yield_now();
        }
    }
}

/// Discards whatever a socket opened ahead received before its query went out.
fn drain(sock: &std::net::UdpSocket) {
    let mut byte = [0u8; 1];
    while sock.recv(&mut byte).is_ok() {}
}

/// Sends `query` to each upstream in turn until one answers; returns its answer with the
/// client's id. With `relay`, UDP goes through it ([`Relay`]).
pub async fn exchange(
    upstreams: &[SocketAddr],
    query: &[u8],
    transport: Transport,
    relay: Option<&Relay>,
) -> anyhow::Result<Vec<u8>> {
    if query.len() < 12 {
        bail!("query shorter than a DNS header");
    }
    if upstreams.is_empty() {
        bail!("no upstream DNS server is configured");
    }
    let client_id = [query[0], query[1]];
    let mut last = None;
    for server in upstreams {
        let id: u16 = rand::random();
        let mut q = query.to_vec();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let res = match transport {
            Transport::Udp => timeout(UPSTREAM_TIMEOUT, udp(*server, &q, id, relay)).await,
            Transport::Tcp => timeout(UPSTREAM_TIMEOUT, tcp(*server, &q, id)).await,
        };
        match res {
            Ok(Ok(mut answer)) => {
                answer[..2].copy_from_slice(&client_id);
                return Ok(answer);
            }
            Ok(Err(e)) => last = Some(e.context(format!("upstream {server}"))),
            Err(_) => {
                last = Some(anyhow::anyhow!(
                    "upstream {server}: no answer within {UPSTREAM_TIMEOUT:?}"
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no upstream answered")))
}

async fn udp(
    server: SocketAddr,
    q: &[u8],
    id: u16,
    relay: Option<&Relay>,
) -> anyhow::Result<Vec<u8>> {
    let sock = match relay {
        Some(r) => r.take(server)?,
        None => connected_udp(server)?,
    };
    // Sent before the socket joins the runtime: a fresh socket's send buffer is empty, so the
    // send goes at once, without a round through the runtime to learn that it may.
    let sent = match sock.send(q) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e.into()),
    };
    // An answer caught on the CPU never registers the socket with the runtime at all, and
    // its socket is closed after the answer went out.
    if sent
        && let Some(r) = relay
        && let Some(answer) = r.spin(&sock, id)
    {
        r.sockets().spent.push(sock);
        return Ok(answer);
    }
    let sock = UdpSocket::from_std(sock)?;
    if !sent {
        sock.send(q).await?;
    }
    loop {
        sock.readable().await?;
        match receive(|buf| sock.try_recv(buf), id) {
            Ok(Some(answer)) => return Ok(answer),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram with `recv` into this thread's buffer (room for the largest
/// datagram; only what came is copied out: no 64 KiB allocation per query); `None` when it
/// is not the answer to `id`.
fn receive(
    recv: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    id: u16,
) -> io::Result<Option<Vec<u8>>> {
    RECV_BUF.with_borrow_mut(|buf| {
        let n = recv(buf)?;
        // A connected UDP socket only receives from its server; a stray or spoofed datagram
        // (wrong id, or not an answer) is dropped and the wait goes on.
        Ok(
            (n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0)
                .then(|| buf[..n].to_vec()),
        )
    })
}

thread_local! {
    /// Where each upstream answer over UDP is received (then copied out at its length).
    static RECV_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_UDP]);
}

/// A fresh non-blocking UDP socket connected to `server`. `connect` binds it to a random
/// source port (the kernel's ephemeral choice, as `bind` to port 0 makes), one system call
/// fewer than binding first.
fn connected_udp(server: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::FromRawFd as _;
    let domain = if server.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    sock.connect(server)?;
    Ok(sock)
}

async fn tcp(server: SocketAddr, q: &[u8], id: u16) -> anyhow::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    write_framed(&mut s, q).await?;
    let answer = read_framed(&mut s)
        .await?
        .context("connection closed before the answer")?;
    if answer.len() < 12 || answer[..2] != id.to_be_bytes() {
        bail!("answer does not match the query");
    }
    Ok(answer)
}

/// Writes one length-prefixed DNS message (RFC 1035 4.2.2).
pub async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    msg: &[u8],
) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    w.write_all(&framed).await
}

/// Reads one length-prefixed DNS message; `None` at a clean end of stream.
pub async fn read_framed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::Ipv4Addr};

    use super::*;

    /// A loopback upstream that answers every query twice: first with a wrong id (a spoofed
    /// answer), then with the right one plus a marker byte. Returns its address and, once
    /// `queries` came, the source ports they came from.
    fn upstream(queries: usize) -> (SocketAddr, std::thread::JoinHandle<Vec<u16>>) {
        let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = sock.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut ports = Vec::new();
            let mut buf = [0u8; 512];
            while ports.len() < queries {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                let mut answer = buf[..n].to_vec();
                answer[2] |= 0x80;
                let mut spoofed = answer.clone();
                spoofed[0] ^= 0xff;
                sock.send_to(&spoofed, from).unwrap();
                answer.push(0xaa);
                sock.send_to(&answer, from).unwrap();
                ports.push(from.port());
            }
            ports
        });
        (addr, t)
    }

    fn relay() -> Relay {
        // One slot, taken by the query: alone in flight, so it waits on the CPU first.
        Relay::new(Vec::new(), Arc::new(Semaphore::new(1)), 1)
    }

    /// Through the relay every query still gets a socket of its own (a port of its own) and
    /// only its own answer: the spoofed one before it is skipped.
    #[tokio::test]
    async fn each_query_gets_its_own_port_and_only_its_answer() {
        let (server, t) = upstream(12);
        let relay = relay();
        for i in 0..12u8 {
            let query = [0x12, i, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            let answer = exchange(&[server], &query, Transport::Udp, Some(&relay))
                .await
                .unwrap();
            assert_eq!(answer[..2], query[..2], "the client's id goes back");
            assert_eq!(
                answer.last(),
                Some(&0xaa),
                "the real answer, not the spoofed one"
            );
            relay.tidy(Some(server));
        }
        let ports = t.join().unwrap();
        let distinct: HashSet<_> = ports.iter().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port was used twice: {ports:?}"
        );
        assert!(relay.sockets().spent.is_empty());
        assert_eq!(relay.sockets().ready.len(), READY);
    }

    /// A socket opened ahead is handed out empty: what reached its port before its query went
    /// out is discarded; and one opened too long ago is never handed out.
    #[test]
    fn a_socket_opened_ahead_starts_empty_and_expires() {
        let stuffer = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let relay = relay();
        relay.tidy(Some(stuffer.local_addr().unwrap()));
        let (port, opened) = {
            let s = relay.sockets();
            let (_, at, sock) = s.ready.last().unwrap();
            (sock.local_addr().unwrap(), *at)
        };
        stuffer.send_to(b"early", port).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let sock = relay.take(stuffer.local_addr().unwrap()).unwrap();
        assert_eq!(
            sock.local_addr().unwrap(),
            port,
            "the last one opened is taken"
        );
        let mut buf = [0u8; 16];
        let err = sock.recv(&mut buf).unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::WouldBlock,
            "the early datagram was kept"
        );

        // Aged past READY_FOR: a new socket rather than one of these.
        let aged: Vec<SocketAddr> = {
            let mut s = relay.sockets();
            for r in &mut s.ready {
                r.1 = opened - READY_FOR;
            }
            s.ready.iter().map(|r| r.2.local_addr().unwrap()).collect()
        };
        let fresh = relay.take(stuffer.local_addr().unwrap()).unwrap();
        assert!(!aged.contains(&fresh.local_addr().unwrap()));
        relay.tidy(None);
        assert!(relay.sockets().ready.is_empty(), "aged sockets are closed");
    }
}
