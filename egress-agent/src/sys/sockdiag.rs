//! Exact socket lookups through `NETLINK_SOCK_DIAG`: one `SOCK_DIAG_BY_FAMILY` request
//! (`inet_diag_req_v2` without `NLM_F_DUMP`) makes the kernel look the socket up in its hash
//! tables (`udp_dump_one`, `inet_diag_find_one_icsk`) and answer one `inet_diag_msg` with the
//! socket's inode, where reading `/proc/net/udp` walks every UDP socket of the namespace.
//!
//! The kernel orients the request's addresses differently per protocol: UDP looks up
//! `__udp4_lib_lookup(src, sport, dst, dport)`, `src`/`sport` the *remote* side and
//! `dst`/`dport` the *local* side of the socket sought (a packet's source and destination);
//! TCP looks up `inet_lookup(dst, dport, src, sport)`, `src`/`sport` the socket's *local*
//! side. [`request`] hides that: callers name the socket's own address and its peer's.

use std::{
    cell::RefCell,
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// The transport protocol of a socket (and of a DNS query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP (for DNS: length-prefixed messages).
    Tcp,
}

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY` (linux/sock_diag.h, Linux 4.5, `CONFIG_INET_DIAG_DESTROY`).
const SOCK_DESTROY: u16 = 21;
/// `INET_DIAG_CGROUP_ID` (linux/inet_diag.h): the socket's cgroup v2 id, in every dump
/// message since Linux 5.7.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `struct inet_diag_sockid` sits at this offset of `inet_diag_msg` and is this long.
const SOCKID_AT: usize = 4;
const SOCKID_LEN: usize = 48;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`.
const REQ_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`.
const MSG_LEN: usize = 72;
/// How long to wait for the kernel's answer (it is queued before `sendto` returns; this only
/// bounds a kernel that never answers).
const RECV_TIMEOUT: Duration = Duration::from_millis(100);

/// The socket that sent a datagram or opened a connection (`transport`) from `local` to
/// `remote`: one connected to `remote`, or for UDP an unconnected one bound at `local`.
/// `Ok(None)` when the kernel has none (`ENOENT`, which is also its answer when it has no
/// diag handler for the protocol: see `crate::dns::attribution`).
///
/// An IPv4 pair is looked up as `AF_INET`, then as IPv4-mapped `AF_INET6` (a dual-stack IPv6
/// socket is normally found by the first: the kernel's IPv4 lookup sees them too).
pub fn find(
    transport: Transport,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<Option<Reply>> {
    // The kernel's lookup falls back from the exact connection to a socket bound at `local`
    // (a TCP listener, an unconnected UDP socket): only the latter could have sent.
    let sender = |r: &Reply| {
        r.local_port == local.port()
            && (r.remote_port == remote.port()
                || (r.remote_port == 0 && transport == Transport::Udp))
    };
    Ok(lookup(transport, local, remote)?.filter(sender))
}

/// Whether the kernel finds any socket of `transport` at `local` for packets from `remote`
/// (a connection, a listener, an unconnected UDP socket).
pub fn exists(transport: Transport, local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    Ok(lookup(transport, local, remote)?.is_some_and(|r| r.local_port == local.port()))
}

fn lookup(
    transport: Transport,
    local: SocketAddr,
    remote: SocketAddr,
) -> io::Result<Option<Reply>> {
    match (unmap(local), unmap(remote)) {
        (l @ IpAddr::V4(_), r @ IpAddr::V4(_)) => {
            let (lp, rp) = (local.port(), remote.port());
            if let Some(f) = ask(transport, (l, lp), (r, rp))? {
                return Ok(Some(f));
            }
            ask(transport, (mapped(l), lp), (mapped(r), rp))
        }
        (l @ IpAddr::V6(_), r @ IpAddr::V6(_)) => {
            ask(transport, (l, local.port()), (r, remote.port()))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "addresses of different families",
        )),
    }
}

/// `a` as IPv4 when it is IPv4 or IPv4-mapped IPv6.
fn unmap(a: SocketAddr) -> IpAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn mapped(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

thread_local! {
    /// One netlink socket per thread (the resolver's lookups run on the runtime's workers):
    /// no lock, and a reply can only be read by the thread that asked.
    static SOCKET: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
}

/// Request sequence numbers (a reply that arrives after its request timed out is skipped).
static SEQ: AtomicU32 = AtomicU32::new(1);

fn ask(
    transport: Transport,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
) -> io::Result<Option<Reply>> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let req = request(transport, local, remote, seq);
    SOCKET.with(|cell| {
        let mut cell = cell.borrow_mut();
        let fd = match cell.as_ref() {
            Some(fd) => fd,
            None => cell.insert(open()?),
        };
        let answer = exchange(fd, &req, seq);
        if answer.is_err() {
            // Start over with a new socket next time (a lost reply may still be queued).
            *cell = None;
        }
        answer
    })
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: RECV_TIMEOUT.as_micros() as libc::suseconds_t,
    };
    // SAFETY: valid descriptor, option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn exchange(fd: &OwnedFd, req: &[u8], seq: u32) -> io::Result<Option<Reply>> {
    send(fd, req)?;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: valid descriptor and buffer of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        match parse(&buf[..n as usize], seq)? {
            Answer::Stale => {}
            Answer::Missing => return Ok(None),
            Answer::Found(r) => return Ok(Some(r)),
            Answer::Failed(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The `SOCK_DIAG_BY_FAMILY` request for the socket of `transport` at `local` whose peer is
/// `remote` (both of one family: IPv4, or IPv6 including IPv4-mapped), numbered `seq`.
pub fn request(
    transport: Transport,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    seq: u32,
) -> Vec<u8> {
    let (family, protocol) = match (local.0, transport) {
        (IpAddr::V4(_), Transport::Udp) => (libc::AF_INET, libc::IPPROTO_UDP),
        (IpAddr::V4(_), Transport::Tcp) => (libc::AF_INET, libc::IPPROTO_TCP),
        (IpAddr::V6(_), Transport::Udp) => (libc::AF_INET6, libc::IPPROTO_UDP),
        (IpAddr::V6(_), Transport::Tcp) => (libc::AF_INET6, libc::IPPROTO_TCP),
    };
    // udp_dump_one: __udp4_lib_lookup(saddr = src, daddr = dst), as for a packet arriving
    // at the socket: dst is the socket's own side. inet_diag_find_one_icsk:
    // inet_lookup(saddr = dst, daddr = src): there src is the socket's own side.
    let (src, dst) = match transport {
        Transport::Udp => (remote, local),
        Transport::Tcp => (local, remote),
    };
    let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    let flags = libc::NLM_F_REQUEST as u16;
    nlmsghdr(&mut m, NLMSG_HDR + REQ_LEN, SOCK_DIAG_BY_FAMILY, flags, seq);
    // struct inet_diag_req_v2: family, protocol, ext, pad, states
    m.extend_from_slice(&[family as u8, protocol as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: sport, dport (big-endian), src[4], dst[4], if, cookie[2]
    m.extend_from_slice(&src.1.to_be_bytes());
    m.extend_from_slice(&dst.1.to_be_bytes());
    m.extend_from_slice(&addr_bytes(src.0));
    m.extend_from_slice(&addr_bytes(dst.0));
    m.extend_from_slice(&0u32.to_ne_bytes());
    // INET_DIAG_NOCOOKIE: any socket, whatever its cookie.
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m
}

/// Destroys every TCP and UDP socket (IPv4 and IPv6) of this network namespace whose cgroup is
/// `cgroup_id`, as `ss -K` does: a TCP connection is reset, its queued data dropped. `run`
/// calls it after the command's processes are gone and before the programs are detached, so
/// no orphaned socket of the command (a connection still retransmitting, data queued behind a
/// routing header) sends anything once nothing judges it. Returns how many it destroyed.
/// Needs Linux >= 5.7 (the cgroup id in dumps) and `CONFIG_INET_DIAG_DESTROY`: without them
/// the kernel says `EOPNOTSUPP` and the error says so.
pub fn destroy_cgroup_sockets(cgroup_id: u64) -> io::Result<usize> {
    let fd = open()?;
    let mut destroyed = 0;
    for family in [libc::AF_INET, libc::AF_INET6] {
        for protocol in [libc::IPPROTO_TCP, libc::IPPROTO_UDP] {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let head = [family as u8, protocol as u8, 0, 0];
            let mut req = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
            let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
            nlmsghdr(
                &mut req,
                NLMSG_HDR + REQ_LEN,
                SOCK_DIAG_BY_FAMILY,
                flags,
                seq,
            );
            req.extend_from_slice(&head);
            req.extend_from_slice(&u32::MAX.to_ne_bytes());
            req.extend_from_slice(&[0u8; SOCKID_LEN]);
            send(&fd, &req)?;
            let mut ids = Vec::new();
            read_dump(&fd, seq, |body| {
                if cgroup_of(body) == Some(cgroup_id) {
                    let mut id = [0u8; SOCKID_LEN];
                    id.copy_from_slice(&body[SOCKID_AT..SOCKID_AT + SOCKID_LEN]);
                    ids.push(id);
                }
            })?;
            for id in ids {
                let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                let mut req = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
                let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
                nlmsghdr(&mut req, NLMSG_HDR + REQ_LEN, SOCK_DESTROY, flags, seq);
                req.extend_from_slice(&head);
                req.extend_from_slice(&u32::MAX.to_ne_bytes());
                // The exact socket, its cookie included.
                req.extend_from_slice(&id);
                send(&fd, &req)?;
                match read_ack(&fd, seq)? {
                    0 => destroyed += 1,
                    // Gone meanwhile.
                    libc::ENOENT => {}
                    e => return Err(io::Error::from_raw_os_error(e)),
                }
            }
        }
    }
    Ok(destroyed)
}

/// One TCP socket, exactly, as `sock_diag` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// `AF_INET6` (addresses as the socket holds them, IPv4-mapped included), else `AF_INET`.
    pub v6: bool,
    /// Its own address and port.
    pub local: (IpAddr, u16),
    /// Its peer.
    pub remote: (IpAddr, u16),
    /// Its cookie: a newer socket on the same addresses is left alone.
    pub cookie: u64,
}

/// Resets the TCP socket `s` (`SOCK_DESTROY`, as `ss -K` does): its reads and writes fail at
/// once with `ECONNABORTED`, the peer gets a reset. Name binding calls it for a connection
/// whose first flight was refused, so a client that drops the send's error (Node's TLS
/// socket) fails now instead of when the peer gives up. `Ok(false)`: the socket is gone.
pub fn destroy_tcp(s: &TcpSocket) -> io::Result<bool> {
    let fd = open()?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let family = if s.v6 { libc::AF_INET6 } else { libc::AF_INET };
    let mut req = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    nlmsghdr(&mut req, NLMSG_HDR + REQ_LEN, SOCK_DESTROY, flags, seq);
    req.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_find_one_icsk: src is the socket's own side.
    req.extend_from_slice(&s.local.1.to_be_bytes());
    req.extend_from_slice(&s.remote.1.to_be_bytes());
    req.extend_from_slice(&addr_bytes(s.local.0));
    req.extend_from_slice(&addr_bytes(s.remote.0));
    req.extend_from_slice(&0u32.to_ne_bytes());
    // idiag_cookie[2]: low word first (sock_diag_check_cookie).
    req.extend_from_slice(&(s.cookie as u32).to_ne_bytes());
    req.extend_from_slice(&((s.cookie >> 32) as u32).to_ne_bytes());
    send(&fd, &req)?;
    match read_ack(&fd, seq)? {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The `INET_DIAG_CGROUP_ID` attribute of an `inet_diag_msg` body, if it has one.
fn cgroup_of(body: &[u8]) -> Option<u64> {
    let mut attrs = body.get(MSG_LEN..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            return Some(u64::from_ne_bytes(attrs[4..12].try_into().ok()?));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

fn send(fd: &OwnedFd, req: &[u8]) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_nl is valid; family set below (pid 0: the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid descriptor, buffer and address of the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the messages answering dump `seq` until `NLMSG_DONE`, each body to `each`.
fn read_dump(fd: &OwnedFd, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: valid descriptor and buffer of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (kind, msg_seq, body) in messages(&buf[..n as usize])? {
            if msg_seq != seq {
                continue;
            }
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(()),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let e = body
                        .get(..4)
                        .map_or(0, |b| -i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                    return Err(io::Error::from_raw_os_error(e));
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => each(body),
                _ => {}
            }
        }
    }
}

/// Reads the acknowledgement of request `seq`: 0, or the errno it carries.
fn read_ack(fd: &OwnedFd, seq: u32) -> io::Result<i32> {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: valid descriptor and buffer of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for (kind, msg_seq, body) in messages(&buf[..n as usize])? {
            if msg_seq == seq && kind == libc::NLMSG_ERROR as u16 && body.len() >= 4 {
                return Ok(-i32::from_ne_bytes([body[0], body[1], body[2], body[3]]));
            }
        }
    }
}

/// The netlink messages of one datagram: (type, sequence number, body).
fn messages(buf: &[u8]) -> io::Result<Vec<(u16, u32, &[u8])>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(rest[0..4].try_into().map_err(|_| bad())?) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            return Err(bad());
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().map_err(|_| bad())?);
        out.push((kind, seq, &rest[NLMSG_HDR..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(out)
}

/// Appends a `struct nlmsghdr` (sender port 0).
fn nlmsghdr(m: &mut Vec<u8>, len: usize, kind: u16, flags: u16, seq: u32) {
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
}

/// An address as `idiag_src`/`idiag_dst` hold it: 16 bytes, an IPv4 address in the first 4.
fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The socket in an `inet_diag_msg` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The socket's own port (`idiag_sport`: replies are oriented from the socket).
    pub local_port: u16,
    /// Its peer's port, 0 when not connected.
    pub remote_port: u16,
    /// `idiag_uid`: the socket's owner (in the agent's user namespace).
    pub uid: u32,
    /// `idiag_inode`, as in `/proc/PID/fd/N -> socket:[inode]`.
    pub inode: u64,
}

/// What one datagram from the kernel says about request `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Nothing about this request (a late reply to an earlier one).
    Stale,
    /// No such socket (`ENOENT`).
    Missing,
    /// The socket.
    Found(Reply),
    /// Another error (errno).
    Failed(i32),
}

/// Reads the messages of one datagram from the kernel, looking for the answer to `seq`.
pub fn parse(buf: &[u8], seq: u32) -> io::Result<Answer> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let len = u32_at(rest, 0) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            return Err(bad());
        }
        let msg = &rest[..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        if u32_at(msg, 8) != seq {
            continue;
        }
        let body = &msg[NLMSG_HDR..];
        return match u16_at(msg, 4) {
            t if t == libc::NLMSG_ERROR as u16 => {
                if body.len() < 4 {
                    return Err(bad());
                }
                // struct nlmsgerr: a negative errno (0 is an acknowledgement, never asked for).
                match -(u32_at(body, 0) as i32) {
                    0 | libc::ENOENT => Ok(Answer::Missing),
                    e => Ok(Answer::Failed(e)),
                }
            }
            t if t == libc::NLMSG_DONE as u16 => Ok(Answer::Missing),
            SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                // struct inet_diag_msg: family, state, timer, retrans, then the sockid (sport
                // and dport big-endian at 4 and 6), expires, rqueue, wqueue, uid, inode.
                Ok(Answer::Found(Reply {
                    local_port: u16::from_be_bytes([body[4], body[5]]),
                    remote_port: u16::from_be_bytes([body[6], body[7]]),
                    uid: u32_at(body, 64),
                    inode: u32_at(body, 68).into(),
                }))
            }
            _ => Err(bad()),
        };
    }
    Ok(Answer::Stale)
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
        os::fd::AsRawFd,
    };

    use super::*;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn request_orients_udp_from_the_peer_and_tcp_from_the_socket() {
        let udp = request(
            Transport::Udp,
            (LO, 40000),
            (IpAddr::from([10, 0, 0, 2]), 53),
            7,
        );
        assert_eq!(udp.len(), 72);
        assert_eq!(&udp[0..4], &72u32.to_ne_bytes());
        assert_eq!(&udp[4..6], &20u16.to_ne_bytes(), "SOCK_DIAG_BY_FAMILY");
        assert_eq!(
            &udp[6..8],
            &1u16.to_ne_bytes(),
            "NLM_F_REQUEST only, no NLM_F_DUMP"
        );
        assert_eq!(&udp[8..12], &7u32.to_ne_bytes());
        assert_eq!(&udp[12..16], &[0; 4]);
        assert_eq!(&udp[16..20], &[2, 17, 0, 0], "AF_INET, IPPROTO_UDP");
        assert_eq!(&udp[20..24], &[0xff; 4], "every state");
        // sockid: sport, dport, src, dst: the peer first for UDP.
        assert_eq!(&udp[24..26], &53u16.to_be_bytes());
        assert_eq!(&udp[26..28], &40000u16.to_be_bytes());
        assert_eq!(
            &udp[28..44],
            &[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            &udp[44..60],
            &[127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&udp[60..64], &[0; 4], "any interface");
        assert_eq!(&udp[64..72], &[0xff; 8], "INET_DIAG_NOCOOKIE");

        let peer = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53));
        let tcp = request(
            Transport::Tcp,
            (IpAddr::V6(Ipv6Addr::LOCALHOST), 40000),
            (peer, 53),
            8,
        );
        assert_eq!(&tcp[16..20], &[10, 6, 0, 0], "AF_INET6, IPPROTO_TCP");
        // The socket's own side first for TCP.
        assert_eq!(&tcp[24..26], &40000u16.to_be_bytes());
        assert_eq!(&tcp[26..28], &53u16.to_be_bytes());
        assert_eq!(&tcp[28..44], &Ipv6Addr::LOCALHOST.octets());
        assert_eq!(
            &tcp[44..60],
            &Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53).octets()
        );
    }

    /// A reply as the kernel writes it: header, inet_diag_msg, one attribute.
    fn reply(seq: u32, sport: u16, dport: u16, uid: u32, inode: u32) -> Vec<u8> {
        let mut m = Vec::new();
        nlmsghdr(&mut m, 16 + 72 + 8, 20, 0, seq);
        m.extend_from_slice(&[2, 1, 0, 0]);
        m.extend_from_slice(&sport.to_be_bytes());
        m.extend_from_slice(&dport.to_be_bytes());
        m.extend_from_slice(&[127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&[127, 0, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&0u32.to_ne_bytes()); // if
        m.extend_from_slice(&[0x11; 8]); // cookie
        m.extend_from_slice(&0u32.to_ne_bytes()); // expires
        m.extend_from_slice(&0u32.to_ne_bytes()); // rqueue
        m.extend_from_slice(&0u32.to_ne_bytes()); // wqueue
        m.extend_from_slice(&uid.to_ne_bytes());
        m.extend_from_slice(&inode.to_ne_bytes());
        // INET_DIAG_SHUTDOWN, padded.
        m.extend_from_slice(&5u16.to_ne_bytes());
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m
    }

    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        nlmsghdr(&mut m, 16 + 4 + 16, 2, 0, seq);
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0; 16]); // the request's header
        m
    }

    #[test]
    fn replies_parse() {
        let want = Reply {
            local_port: 0xd431,
            remote_port: 53,
            uid: 1000,
            inode: 3_987_654_321,
        };
        let r = reply(9, 0xd431, 53, 1000, 3_987_654_321);
        assert_eq!(parse(&r, 9).unwrap(), Answer::Found(want));
        assert_eq!(parse(&r, 10).unwrap(), Answer::Stale);
        // A stale reply before the answer in one datagram.
        let both = [reply(8, 1, 2, 3, 4), r.clone()].concat();
        assert_eq!(parse(&both, 9).unwrap(), Answer::Found(want));
        assert_eq!(parse(&error(9, libc::ENOENT), 9).unwrap(), Answer::Missing);
        assert_eq!(
            parse(&error(9, libc::EINVAL), 9).unwrap(),
            Answer::Failed(libc::EINVAL)
        );
        assert!(parse(&r[..50], 9).is_err(), "truncated");
        let mut short = r.clone();
        short[0..4].copy_from_slice(&40u32.to_ne_bytes());
        assert!(parse(&short, 9).is_err(), "too short for an inet_diag_msg");
        assert_eq!(parse(&[], 9).unwrap(), Answer::Stale);
    }

    fn inode(fd: &impl AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let link = link.to_string_lossy();
        link.strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a socket: {link}"))
    }

    /// Whether this kernel answers sock_diag for `transport` (the server's own socket exists).
    fn diag_works(transport: Transport, server: SocketAddr) -> bool {
        let any = SocketAddr::from((server.ip(), 9));
        match exists(transport, server, any) {
            Ok(true) => true,
            other => {
                eprintln!("no sock_diag for {transport:?} here ({other:?}): skipped");
                false
            }
        }
    }

    /// The real kernel finds the sender of a datagram from the addresses the server sees.
    #[test]
    fn finds_udp_senders_on_loopback() {
        let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let at = server.local_addr().unwrap();
        if !diag_works(Transport::Udp, at) {
            return;
        }
        let connected = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        connected.connect(at).unwrap();
        let unconnected = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        // Dual stack: an IPv6 socket sending to an IPv4-mapped address.
        let dual = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok();
        let mut buf = [0u8; 16];
        connected.send(b"c").unwrap();
        unconnected.send_to(b"u", at).unwrap();
        if let Some(d) = &dual {
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), at.port()));
            d.send_to(b"d", to).unwrap();
        }
        for _ in 0..2 + usize::from(dual.is_some()) {
            let (_, client) = server.recv_from(&mut buf).unwrap();
            let want = match buf[0] {
                b'c' => inode(&connected),
                b'u' => inode(&unconnected),
                _ => inode(dual.as_ref().unwrap()),
            };
            let got = find(Transport::Udp, client, at).unwrap();
            assert_eq!(
                got.map(|f| f.inode),
                Some(want),
                "sender {}",
                buf[0] as char
            );
        }
        // A port nobody holds.
        drop(connected);
        let gone = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        assert_eq!(find(Transport::Udp, gone, at).unwrap(), None);

        if let Ok(server6) = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)) {
            let at6 = server6.local_addr().unwrap();
            let client6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
            client6.connect(at6).unwrap();
            client6.send(b"6").unwrap();
            let (_, from) = server6.recv_from(&mut buf).unwrap();
            let got = find(Transport::Udp, from, at6).unwrap();
            assert_eq!(got.map(|f| f.inode), Some(inode(&client6)));
        }
    }

    /// The real kernel finds the client end of a connection, not the accepted end.
    #[test]
    fn finds_tcp_clients_on_loopback() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let at = listener.local_addr().unwrap();
        if !diag_works(Transport::Tcp, at) {
            return;
        }
        let client = TcpStream::connect(at).unwrap();
        let (accepted, from) = listener.accept().unwrap();
        let got = find(Transport::Tcp, from, at).unwrap();
        assert_eq!(got.map(|f| f.inode), Some(inode(&client)));
        assert_ne!(got.map(|f| f.inode), Some(inode(&accepted)));
    }
}
