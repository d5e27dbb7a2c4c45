//! The load generator of `cargo xtask bench`. xtask starts it inside a network namespace and
//! a cgroup (it joins both before `exec`), then sends it one command a line on stdin; each
//! answer is one line on stdout, `ok key=value ...` or `err message`.
//!
//! Commands:
//! - `tcp ADDR:PORT[,ADDR:PORT...] N`: N connect+close (linger 0: a RST, no TIME_WAIT), to
//!   the destinations in turn; `ns=` thread CPU time per operation.
//! - `udp ADDR:PORT[,ADDR:PORT...] N`: N unconnected `sendto` of 32 bytes, to the
//!   destinations in turn; `ns=` thread CPU per send.
//! - `stream ADDR:PORT N`: one TCP connection, then N writes of 32 bytes with `TCP_NODELAY`
//!   (a segment each: the established path); `ns=` thread CPU per write.
//! - `tls ADDR:PORT N NAME`: N connects, each sending a TLS ClientHello (about 512 bytes, as
//!   browsers pad it) with server name NAME, then closing (linger 0); `ns=` thread CPU per
//!   connection setup. A refused first flight fails the command.
//! - `bulk ADDR:PORT MIB NAME`: one TCP connection, a ClientHello with NAME as its first
//!   flight, then MIB MiB in 64 KiB writes; `ns=` thread CPU per MiB, `mbps=` MiB/s of wall
//!   clock.
//! - `deny ADDR:PORT N`: N connects that must fail with EPERM; wall-clock `p50=`, `p99=`,
//!   `max=` per connect, `eperm=` how many failed with EPERM.
//! - `lat ADDR:PORT N`: N allowed connect+close, wall-clock `p50=`, `p99=` per connect.
//! - `flood ADDR:PORT MAX MS`: denied connects as fast as possible, at most MAX or MS
//!   milliseconds; `count=`, `eperm=`, `ms=`.
//! - `dns-rate ADDR:PORT KIND QPS MS` (both DNS commands spread their queries over 500 client
//!   sockets, see `DNS_CLIENTS`): queries at a fixed rate for MS milliseconds;
//!   `p50=`, `p99=` (ns, from the send), `sent=`, `lost=`, `rcode=` of the last.
//! - `dns-max ADDR:PORT KIND WINDOW MS`: WINDOW queries in flight for MS milliseconds;
//!   `qps=`, `lost=`.
//!
//! KIND: `hit` (one name again and again), `miss` (a new name below example.com each time),
//! `refused` (a new name below evil.test each time). Every loop is bounded in count and time.

use std::{
    io::{self, BufRead as _, Write as _},
    mem,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

/// No command runs longer than this, whatever it asks for.
const MAX_COMMAND: Duration = Duration::from_secs(30);

fn main() {
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match command(&words) {
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("err {e}"),
        };
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
}

type Res<T> = Result<T, String>;

fn command(w: &[&str]) -> Res<String> {
    let arg = |i: usize| {
        w.get(i)
            .copied()
            .ok_or_else(|| format!("missing argument {i}"))
    };
    let num = |i: usize| -> Res<u64> { arg(i)?.parse().map_err(|e| format!("{e}")) };
    let addr = |i: usize| -> Res<SocketAddrV4> { arg(i)?.parse().map_err(|e| format!("{e}")) };
    let addrs = |i: usize| -> Res<Vec<SocketAddrV4>> {
        arg(i)?
            .split(',')
            .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
            .collect()
    };
    match arg(0)? {
        "tcp" => tcp(&addrs(1)?, num(2)?),
        "udp" => udp(&addrs(1)?, num(2)?),
        "stream" => stream(addr(1)?, num(2)?),
        "tls" => tls(addr(1)?, num(2)?, arg(3)?),
        "bulk" => bulk(addr(1)?, num(2)?, arg(3)?),
        "deny" => deny(addr(1)?, num(2)?),
        "lat" => lat(addr(1)?, num(2)?),
        "flood" => flood(addr(1)?, num(2)?, num(3)?),
        "dns-rate" => dns_rate(addr(1)?, arg(2)?, num(3)?, num(4)?),
        "dns-max" => dns_max(addr(1)?, arg(2)?, num(3)?, num(4)?),
        "getppid" => getppid(num(1)?),
        "pid" => Ok(format!("pid={}", std::process::id())),
        other => Err(format!("unknown command {other}")),
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn socket(ty: libc::c_int) -> Res<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One connect; Ok(()) when connected, else the errno. Closing sends a RST (linger 0).
fn connect_once(sa: &libc::sockaddr_in) -> Result<(), i32> {
    connected(sa).map(drop)
}

/// A TCP socket with linger 0 (closing it sends a RST), connected to `sa`; else the errno.
fn connected(sa: &libc::sockaddr_in) -> Result<OwnedFd, i32> {
    let s = socket(libc::SOCK_STREAM).map_err(|_| -1)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid descriptor and option buffer of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // SAFETY: `sa` is a valid sockaddr_in of the given length.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            (sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(s)
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    }
}

fn tcp(to: &[SocketAddrV4], n: u64) -> Res<String> {
    let sas: Vec<_> = to.iter().copied().map(sockaddr).collect();
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut failed = 0u64;
    let mut done = 0u64;
    while done < n && start.elapsed() < MAX_COMMAND {
        if connect_once(&sas[done as usize % sas.len()]).is_err() {
            failed += 1;
        }
        done += 1;
    }
    let cpu = thread_cpu_ns() - cpu0;
    if failed > 0 {
        return Err(format!("{failed} of {done} connects to {to:?} failed"));
    }
    Ok(format!("ns={:.1} n={done}", cpu as f64 / done as f64))
}

/// `n` calls of the cheapest system call: what entering and leaving the kernel costs this
/// thread (a tracepoint on `sys_enter` anywhere on the machine puts every call on the slow
/// path).
fn getppid(n: u64) -> Res<String> {
    let cpu0 = thread_cpu_ns();
    for _ in 0..n {
        // SAFETY: no arguments, no memory.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    let cpu = thread_cpu_ns() - cpu0;
    Ok(format!("ns={:.1} n={n}", cpu as f64 / n.max(1) as f64))
}

fn udp(to: &[SocketAddrV4], n: u64) -> Res<String> {
    let s = socket(libc::SOCK_DGRAM)?;
    let sas: Vec<_> = to.iter().copied().map(sockaddr).collect();
    let payload = [0x5au8; 32];
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut failed = 0u64;
    let mut done = 0u64;
    while done < n && start.elapsed() < MAX_COMMAND {
        // SAFETY: valid descriptor, buffer and address.
        let rc = unsafe {
            libc::sendto(
                s.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&raw const sas[done as usize % sas.len()]).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            failed += 1;
        }
        done += 1;
    }
    let cpu = thread_cpu_ns() - cpu0;
    if failed > 0 {
        return Err(format!(
            "{failed} of {done} sends to {to:?} failed: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(format!("ns={:.1} n={done}", cpu as f64 / done as f64))
}

fn stream(to: SocketAddrV4, n: u64) -> Res<String> {
    let mut s = std::net::TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let payload = [0x5au8; 32];
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut done = 0u64;
    while done < n && start.elapsed() < MAX_COMMAND {
        io::Write::write_all(&mut s, &payload).map_err(|e| format!("write to {to}: {e}"))?;
        done += 1;
    }
    let cpu = thread_cpu_ns() - cpu0;
    Ok(format!("ns={:.1} n={done}", cpu as f64 / done as f64))
}

/// A TLS 1.3-style ClientHello record naming `sni`, padded (extension 21) to about 512 bytes.
fn client_hello(sni: &str) -> Vec<u8> {
    let n = sni.as_bytes();
    let entry = [&[0u8][..], &(n.len() as u16).to_be_bytes(), n].concat();
    let list = [&(entry.len() as u16).to_be_bytes()[..], &entry].concat();
    let mut exts = [&[0u8, 0][..], &(list.len() as u16).to_be_bytes(), &list].concat();
    let pad = 512usize.saturating_sub(exts.len() + 100).max(1);
    exts.extend_from_slice(&[0, 21]);
    exts.extend_from_slice(&(pad as u16).to_be_bytes());
    exts.resize(exts.len() + pad, 0);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.push(32);
    body.extend_from_slice(&[0x22; 32]);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn tls(to: SocketAddrV4, n: u64, sni: &str) -> Res<String> {
    let sa = sockaddr(to);
    let hello = client_hello(sni);
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut done = 0u64;
    while done < n && start.elapsed() < MAX_COMMAND {
        let s = connected(&sa)
            .map_err(|e| format!("connect {to}: {}", io::Error::from_raw_os_error(e)))?;
        // SAFETY: valid descriptor and buffer.
        let sent = unsafe { libc::send(s.as_raw_fd(), hello.as_ptr().cast(), hello.len(), 0) };
        if sent != hello.len() as isize {
            return Err(format!(
                "ClientHello to {to} ({sni}): {}",
                io::Error::last_os_error()
            ));
        }
        done += 1;
    }
    let cpu = thread_cpu_ns() - cpu0;
    Ok(format!("ns={:.1} n={done}", cpu as f64 / done as f64))
}

fn bulk(to: SocketAddrV4, mib: u64, sni: &str) -> Res<String> {
    let mut s = std::net::TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(5))
        .map_err(|e| format!("connect {to}: {e}"))?;
    io::Write::write_all(&mut s, &client_hello(sni))
        .map_err(|e| format!("ClientHello to {to} ({sni}): {e}"))?;
    // The first flight's ACK takes a name-bound socket out of the judged path: what is
    // measured is the connection after it.
    std::thread::sleep(Duration::from_millis(20));
    let chunk = vec![0x5au8; 64 * 1024];
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut done = 0u64;
    while done < mib * 16 && start.elapsed() < MAX_COMMAND {
        io::Write::write_all(&mut s, &chunk).map_err(|e| format!("write to {to}: {e}"))?;
        done += 1;
    }
    let cpu = thread_cpu_ns() - cpu0;
    let secs = start.elapsed().as_secs_f64();
    let mib_done = done as f64 / 16.0;
    Ok(format!(
        "ns={:.1} mbps={:.1} n={mib_done}",
        cpu as f64 / mib_done,
        mib_done / secs
    ))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn deny(to: SocketAddrV4, n: u64) -> Res<String> {
    let sa = sockaddr(to);
    let start = Instant::now();
    let mut lat = Vec::with_capacity(n as usize);
    let mut eperm = 0u64;
    while (lat.len() as u64) < n && start.elapsed() < MAX_COMMAND {
        let t = Instant::now();
        let r = connect_once(&sa);
        lat.push(t.elapsed().as_nanos() as u64);
        if r == Err(libc::EPERM) {
            eperm += 1;
        }
    }
    lat.sort_unstable();
    Ok(format!(
        "p50={} p99={} max={} n={} eperm={eperm}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
        lat.len()
    ))
}

fn lat(to: SocketAddrV4, n: u64) -> Res<String> {
    let sa = sockaddr(to);
    let start = Instant::now();
    let mut lat = Vec::with_capacity(n as usize);
    let mut failed = 0u64;
    while (lat.len() as u64) < n && start.elapsed() < MAX_COMMAND {
        let t = Instant::now();
        if connect_once(&sa).is_err() {
            failed += 1;
        }
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    Ok(format!(
        "p50={} p99={} n={} failed={failed}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    ))
}

fn flood(to: SocketAddrV4, max: u64, ms: u64) -> Res<String> {
    let sa = sockaddr(to);
    let limit = Duration::from_millis(ms).min(MAX_COMMAND);
    let start = Instant::now();
    let (mut count, mut eperm) = (0u64, 0u64);
    while count < max {
        // The clock only every 256 connects: the flood should be as fast as it can be.
        if count % 256 == 0 && start.elapsed() >= limit {
            break;
        }
        if connect_once(&sa) == Err(libc::EPERM) {
            eperm += 1;
        }
        count += 1;
    }
    Ok(format!(
        "count={count} eperm={eperm} ms={}",
        start.elapsed().as_millis()
    ))
}

/// A DNS query for an A record of `name`, with id `id` and recursion desired.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn name_for(kind: &str, seq: u64, salt: u64) -> Res<String> {
    Ok(match kind {
        "hit" => "www.example.com".to_owned(),
        "miss" => format!("m{salt:x}-{seq}.example.com"),
        "refused" => format!("r{salt:x}-{seq}.evil.test"),
        other => return Err(format!("unknown query kind {other}")),
    })
}

fn salt() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        & 0xffff_ffff
}

fn dns_socket(server: SocketAddrV4) -> Res<UdpSocket> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    s.connect(SocketAddr::V4(server))
        .map_err(|e| format!("connect {server}: {e}"))?;
    Ok(s)
}

/// Client sockets a DNS load is spread over, one query on each in turn. The resolver limits
/// each client socket to 200 queries/s (burst 400; egress-agent/src/dns/ratelimit.rs), as a
/// flood from one socket must not starve the others: a bench of its maximum rate from one
/// socket would measure that limit. Over 500 sockets a 1.5 s run stays under it up to about
/// 230,000 queries/s (each socket: its burst and 1.5 s of its rate), above what this machine
/// reaches; every path (direct, ours, dnsmasq) gets the same clients.
const DNS_CLIENTS: usize = 500;

struct Clients {
    socks: Vec<UdpSocket>,
    epoll: OwnedFd,
    /// Sockets epoll said were readable, not yet read.
    ready: Vec<usize>,
    next: usize,
}

impl Clients {
    fn new(server: SocketAddrV4) -> Res<Self> {
        // SAFETY: plain syscall; the descriptor is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut socks = Vec::with_capacity(DNS_CLIENTS);
        for i in 0..DNS_CLIENTS {
            let s = dns_socket(server)?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: valid epoll and socket descriptors, a valid event.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &raw mut ev) } < 0 {
                return Err(format!("epoll_ctl: {}", io::Error::last_os_error()));
            }
            socks.push(s);
        }
        Ok(Self {
            socks,
            epoll,
            ready: Vec::new(),
            next: 0,
        })
    }

    /// Sends `q` on the next socket (a full socket buffer counts as a loss later).
    fn send(&mut self, q: &[u8]) {
        let _ = self.socks[self.next].send(q);
        self.next = (self.next + 1) % self.socks.len();
    }

    /// Collects the readable sockets without waiting.
    fn collect(&mut self) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: a valid epoll descriptor and a buffer of 64 events.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), evs.as_mut_ptr(), 64, 0) };
        for ev in evs.iter().take(n.max(0) as usize) {
            self.ready.push(ev.u64 as usize);
        }
    }

    /// One answer into `buf`, waiting at most `wait` for it; `None` when none came.
    fn recv(&mut self, buf: &mut [u8], wait: Duration) -> Option<usize> {
        let mut waited = false;
        loop {
            while let Some(i) = self.ready.pop() {
                if let Ok(n) = self.socks[i].recv(buf) {
                    return Some(n);
                }
            }
            if waited {
                return None;
            }
            self.collect();
            if self.ready.is_empty() {
                wait_readable(self.epoll.as_raw_fd(), wait);
                waited = true;
                self.collect();
            }
        }
    }
}

fn dns_rate(server: SocketAddrV4, kind: &str, qps: u64, ms: u64) -> Res<String> {
    let mut clients = Clients::new(server)?;
    let salt = salt();
    let total = (qps * ms / 1000).clamp(1, 65_536);
    let interval = Duration::from_nanos(1_000_000_000 / qps.max(1));
    // Scheduled send time of each id (ids are sequence numbers: fewer than 65,536).
    let mut scheduled: Vec<Option<Instant>> = vec![None; total as usize];
    let mut lat = Vec::with_capacity(total as usize);
    let mut buf = [0u8; 1500];
    let mut last_rcode = 0u8;
    let start = Instant::now();
    let mut sent = 0u64;
    let deadline = start + Duration::from_millis(ms) + Duration::from_secs(1);
    while Instant::now() < deadline.min(start + MAX_COMMAND) {
        let now = Instant::now();
        let due = start + interval * sent as u32;
        if sent < total && now >= due {
            let q = query(sent as u16, &name_for(kind, sent, salt)?);
            clients.send(&q);
            scheduled[sent as usize] = Some(Instant::now());
            sent += 1;
            continue;
        }
        // Sleep in poll until an answer or the next send is due: a spinning client would take
        // a CPU from the servers on a 2-CPU machine.
        let wait = if sent < total {
            due.saturating_duration_since(now)
        } else {
            Duration::from_millis(5)
        };
        if let Some(n) = clients.recv(&mut buf, wait)
            && n >= 12
        {
            let id = u16::from_be_bytes([buf[0], buf[1]]) as usize;
            if let Some(t) = scheduled.get_mut(id).and_then(Option::take) {
                lat.push(t.elapsed().as_nanos() as u64);
                last_rcode = buf[3] & 0x0f;
            }
            if sent >= total && lat.len() as u64 == total {
                break;
            }
        }
    }
    let lost = sent - lat.len() as u64;
    lat.sort_unstable();
    Ok(format!(
        "p50={} p99={} sent={sent} lost={lost} rcode={last_rcode}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    ))
}

/// Waits until `fd` is readable or `wait` has passed (ppoll: microsecond resolution).
fn wait_readable(fd: std::os::fd::RawFd, wait: Duration) {
    let mut fd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timeout, no signal mask.
    unsafe { libc::ppoll(&raw mut fd, 1, &raw const ts, std::ptr::null()) };
}

fn dns_max(server: SocketAddrV4, kind: &str, window: u64, ms: u64) -> Res<String> {
    let mut clients = Clients::new(server)?;
    let salt = salt();
    let limit = Duration::from_millis(ms).min(MAX_COMMAND);
    let mut buf = [0u8; 1500];
    let mut seq = 0u64;
    let mut answered = 0u64;
    let mut lost = 0u64;
    let mut in_flight = 0u64;
    let start = Instant::now();
    while start.elapsed() < limit {
        while in_flight < window.clamp(1, 1024) {
            let q = query(seq as u16, &name_for(kind, seq, salt)?);
            clients.send(&q);
            seq += 1;
            in_flight += 1;
        }
        match clients.recv(&mut buf, Duration::from_millis(200)) {
            Some(_) => {
                answered += 1;
                in_flight -= 1;
            }
            None => {
                // Nothing for 200 ms: what is in flight is lost.
                lost += in_flight;
                in_flight = 0;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "qps={:.0} lost={lost} answered={answered}",
        answered as f64 / secs
    ))
}
