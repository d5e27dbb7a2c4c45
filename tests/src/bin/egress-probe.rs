//! `egress-probe ACTION ADDR:PORT`: tries one way of reaching a destination and reports,
//! as one JSON line on stdout, what the kernel said:
//!
//! ```text
//! {"ok":true,"pid":1234}
//! {"ok":false,"errno":1,"error":"Operation not permitted (os error 1)","pid":1234}
//! {"ok":false,"error":"sent 3 of 6 bytes","pid":1234}
//! ```
//!
//! It exits 0 whenever it could try (the outcome is in the line), 2 on bad usage. IPv6
//! addresses go in brackets (`[::1]:8080`); an IPv6 address, IPv4-mapped ones included
//! (`[::ffff:127.0.0.1]:8080`), is reached from an `AF_INET6` socket.
//!
//! Each technique is one function in [`ACTIONS`]; add new ones there. The bypass suite
//! (`tests/tests/bypass.rs`, docs/THREATS.md) runs every one of them against a listener that
//! must receive nothing. When an action fails at a step other than the obvious one, the error
//! text names the step (`io_uring_setup: ...`, `forked child 123: ...`); the errno is the
//! step's.

use std::{
    ffi::CString,
    io::{self, Write as _},
    mem,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    process::ExitCode,
    ptr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What every action sends once it can.
const PAYLOAD: &[u8] = b"probe\n";

/// One technique: try to get [`PAYLOAD`] to `dst`.
type Action = fn(SocketAddr) -> io::Result<()>;

/// The actions by name.
const ACTIONS: &[(&str, Action, &str)] = &[
    (
        "tcp-connect",
        tcp_connect,
        "TCP connect (2 s timeout), then write the payload",
    ),
    (
        "udp-sendto",
        udp_sendto,
        "sendto() from an unconnected UDP socket",
    ),
    (
        "udp-connect",
        udp_connect,
        "connect() a UDP socket, then send()",
    ),
    (
        "udp-connect-cmsg",
        udp_connect_cmsg,
        "connect() a UDP socket, then three sendmsg() with control messages and no address: \
         a traffic class (IP_TOS/IPV6_TCLASS), a packet info, UDP_SEGMENT with a traffic class",
    ),
    (
        "udp-unspec",
        udp_unspec,
        "sendto() from an unconnected UDP socket, the IPv4 address given with family AF_UNSPEC \
         (udp_sendmsg takes it as IPv4)",
    ),
    (
        "udp-connected-unspec",
        udp_connected_unspec,
        "connect() a UDP socket to port 53 of ADDR (DNS, which egress steers to its resolver), \
         then sendto() ADDR:PORT given with family AF_UNSPEC",
    ),
    (
        "udp-sendmmsg",
        udp_sendmmsg,
        "sendmmsg() of two datagrams from an unconnected UDP socket",
    ),
    (
        "tcp-fastopen",
        tcp_fastopen,
        "sendto(MSG_FASTOPEN) on a fresh TCP socket: connect and data in one call",
    ),
    (
        "iouring-connect",
        iouring_connect,
        "IORING_OP_CONNECT through a raw io_uring, then write the payload",
    ),
    (
        "raw-ip",
        raw_ip,
        "SOCK_RAW/IPPROTO_UDP: a hand-made UDP header and the payload to ADDR:PORT",
    ),
    (
        "icmp-dgram",
        icmp_dgram,
        "ICMP echo from a ping socket (SOCK_DGRAM/IPPROTO_ICMP); ok once a reply arrives",
    ),
    (
        "icmp-raw",
        icmp_raw,
        "ICMP echo from a SOCK_RAW/IPPROTO_ICMP socket; ok once a reply arrives",
    ),
    (
        "packet",
        packet,
        "AF_PACKET on lo: a whole Ethernet/IPv4/UDP frame (from 203.0.113.1) to ADDR:PORT",
    ),
    (
        "vsock-socket",
        vsock_socket,
        "socket(AF_VSOCK, SOCK_STREAM): only opens it (ADDR is ignored; nothing is sent)",
    ),
    (
        "local-sockets",
        local_sockets,
        "socketpair(AF_UNIX) and socket(AF_NETLINK, NETLINK_ROUTE) (ADDR is ignored)",
    ),
    (
        "fork-connect",
        fork_connect,
        "fork(); the child does tcp-connect, the parent reports its result",
    ),
    (
        "reexec-connect",
        reexec_connect,
        "exec /bin/sh -c 'exec PROBE tcp-connect ADDR:PORT' (same pid, new image)",
    ),
];

fn tcp_connect(dst: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)?;
    s.write_all(PAYLOAD)?;
    s.shutdown(std::net::Shutdown::Write)
}

/// An unbound-port UDP socket of `dst`'s family.
fn udp_socket(dst: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match dst {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    UdpSocket::bind(any)
}

fn udp_sendto(dst: SocketAddr) -> io::Result<()> {
    let s = udp_socket(dst)?;
    let n = s.send_to(PAYLOAD, dst)?;
    short_write(n)
}

fn udp_connect(dst: SocketAddr) -> io::Result<()> {
    let s = udp_socket(dst)?;
    s.connect(dst)?;
    let n = s.send(PAYLOAD)?;
    short_write(n)
}

/// `sendto` of [`PAYLOAD`] on `s` to the IPv4 `dst` given with family `AF_UNSPEC`: for an
/// IPv4 UDP socket the kernel sends to the address all the same, and the cgroup hook sees
/// family 0 with the address and port in place.
fn send_unspec(s: &UdpSocket, dst: SocketAddr) -> io::Result<()> {
    if !dst.is_ipv4() {
        return Err(io::Error::other("AF_UNSPEC sends take an IPv4 address"));
    }
    let (mut ss, len) = sockaddr(dst);
    ss.ss_family = libc::AF_UNSPEC as libc::sa_family_t;
    send_to_raw(s.as_raw_fd(), PAYLOAD, 0, &ss, len, "sendto (AF_UNSPEC)")
}

fn udp_unspec(dst: SocketAddr) -> io::Result<()> {
    let s = udp_socket(dst)?;
    send_unspec(&s, dst)
}

/// A socket connected to DNS (allowed: steered to the resolver), then a send elsewhere.
fn udp_connected_unspec(dst: SocketAddr) -> io::Result<()> {
    let s = udp_socket(dst)?;
    let mut dns = dst;
    dns.set_port(53);
    s.connect(dns).map_err(|e| step("connect (port 53)", e))?;
    send_unspec(&s, dst)
}

/// `udp_connect`, with control messages on each send (as QUIC stacks set ECN and GSO): the
/// kernel leaves its connected fast path and runs `sendmsg4/6` without an address.
fn udp_connect_cmsg(dst: SocketAddr) -> io::Result<()> {
    let s = udp_socket(dst)?;
    s.connect(dst)?;
    // A plain IPv6 peer takes IPv6 options; IPv4 and IPv4-mapped peers go through udp_sendmsg,
    // which reads SOL_IP ones.
    let v6 = matches!(dst, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none());
    let ect0: libc::c_int = 2;
    let class = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            ect0.to_ne_bytes().to_vec(),
        )
    } else {
        (libc::IPPROTO_IP, libc::IP_TOS, ect0.to_ne_bytes().to_vec())
    };
    let info = if v6 {
        let n = mem::size_of::<libc::in6_pktinfo>();
        (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, vec![0u8; n])
    } else {
        let n = mem::size_of::<libc::in_pktinfo>();
        (libc::IPPROTO_IP, libc::IP_PKTINFO, vec![0u8; n])
    };
    let gso = (
        libc::SOL_UDP,
        libc::UDP_SEGMENT,
        1200u16.to_ne_bytes().to_vec(),
    );
    send_with_cmsgs(&s, std::slice::from_ref(&class))
        .map_err(|e| step("sendmsg (traffic class)", e))?;
    send_with_cmsgs(&s, &[info]).map_err(|e| step("sendmsg (packet info)", e))?;
    send_with_cmsgs(&s, &[gso, class]).map_err(|e| step("sendmsg (UDP_SEGMENT)", e))
}

/// `sendmsg` of [`PAYLOAD`] on the connected socket `s`, no address, with `cmsgs` (level,
/// type, data).
fn send_with_cmsgs(s: &UdpSocket, cmsgs: &[(libc::c_int, libc::c_int, Vec<u8>)]) -> io::Result<()> {
    let len = |d: &Vec<u8>| u32::try_from(d.len()).expect("small control message");
    // SAFETY: CMSG_SPACE is arithmetic.
    let space: usize = cmsgs
        .iter()
        .map(|c| unsafe { libc::CMSG_SPACE(len(&c.2)) } as usize)
        .sum();
    // u64 words: control data must be aligned for `cmsghdr`.
    let mut buf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: PAYLOAD.as_ptr().cast_mut().cast(),
        iov_len: PAYLOAD.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the headers walk `buf`, which holds CMSG_SPACE of every message.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        for (level, ty, data) in cmsgs {
            (*c).cmsg_level = *level;
            (*c).cmsg_type = *ty;
            (*c).cmsg_len = libc::CMSG_LEN(len(data)) as usize;
            ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &raw const msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    short_write(usize::try_from(n).unwrap_or(0))
}

/// An OS error at a named step of an action: the report shows `step: error` and the
/// error's errno.
#[derive(Debug)]
struct Step {
    step: String,
    source: io::Error,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

impl std::error::Error for Step {}

/// Wraps `source` with the step it failed at.
fn step(step: impl Into<String>, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        Step {
            step: step.into(),
            source,
        },
    )
}

/// The errno of `e`, looking through a [`Step`].
fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Step>())
            .and_then(|s| s.source.raw_os_error())
    })
}

/// `-1` from a libc call as the last OS error, at `what`.
fn check(rc: libc::c_long, what: &str) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(step(what, io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

/// A new socket, owned.
fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    check(fd.into(), "socket")?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn family(dst: SocketAddr) -> libc::c_int {
    match dst {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

/// `dst` as a C socket address.
fn sockaddr(dst: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match dst {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { ptr::write(ptr::from_mut(&mut ss).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write(ptr::from_mut(&mut ss).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// `sendto(fd, buf, flags, dst)`; the whole buffer must go.
fn send_to(
    fd: RawFd,
    buf: &[u8],
    flags: libc::c_int,
    dst: SocketAddr,
    what: &str,
) -> io::Result<()> {
    let (ss, len) = sockaddr(dst);
    send_to_raw(fd, buf, flags, &ss, len, what)
}

/// [`send_to`] with the C address as given.
fn send_to_raw(
    fd: RawFd,
    buf: &[u8],
    flags: libc::c_int,
    ss: &libc::sockaddr_storage,
    len: libc::socklen_t,
    what: &str,
) -> io::Result<()> {
    // SAFETY: valid buffer and address of the given lengths.
    let n = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            flags,
            ptr::from_ref(ss).cast(),
            len,
        )
    };
    let n = check(n as libc::c_long, what)?;
    if n as usize == buf.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: sent {n} of {} bytes",
            buf.len()
        )))
    }
}

fn set_timeout(fd: RawFd, opt: libc::c_int, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(fd, libc::SOL_SOCKET, opt, &tv)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: a valid pointer to a `T` of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            ptr::from_ref(v).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc.into(), "setsockopt").map(drop)
}

fn udp_sendmmsg(dst: SocketAddr) -> io::Result<()> {
    let s = udp_socket(dst)?;
    let (mut ss, len) = sockaddr(dst);
    let mut iov = [libc::iovec {
        iov_base: PAYLOAD.as_ptr().cast_mut().cast(),
        iov_len: PAYLOAD.len(),
    }];
    // SAFETY: all-zero is a valid msghdr.
    let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
    hdr.msg_name = ptr::from_mut(&mut ss).cast();
    hdr.msg_namelen = len;
    hdr.msg_iov = iov.as_mut_ptr();
    hdr.msg_iovlen = 1;
    let mut msgs = [
        libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        },
        libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        },
    ];
    // SAFETY: two valid mmsghdr whose pointers outlive the call.
    let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), 2, 0) };
    let n = check(n.into(), "sendmmsg")?;
    if n == 2 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sendmmsg: sent {n} of 2 datagrams"
        )))
    }
}

fn tcp_fastopen(dst: SocketAddr) -> io::Result<()> {
    let s = socket(family(dst), libc::SOCK_STREAM, 0)?;
    // The implicit connect waits for the handshake for up to the send timeout.
    set_timeout(s.as_raw_fd(), libc::SO_SNDTIMEO, CONNECT_TIMEOUT)?;
    send_to(
        s.as_raw_fd(),
        PAYLOAD,
        libc::MSG_FASTOPEN,
        dst,
        "sendto(MSG_FASTOPEN)",
    )?;
    // SAFETY: plain syscall on a socket we own.
    let rc = unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
    check(rc.into(), "shutdown").map(drop)
}

/// `struct io_sqring_offsets` (include/uapi/linux/io_uring.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_cqring_offsets`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_uring_params`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UringParams {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}

/// `struct io_uring_sqe`, the fields a connect uses.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Sqe {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    /// `off`/`addr2`: the address length for a connect.
    off: u64,
    addr: u64,
    len: u32,
    op_flags: u32,
    user_data: u64,
    tail: [u64; 3],
}

/// `struct io_uring_cqe`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Cqe {
    user_data: u64,
    res: i32,
    flags: u32,
}

const _: () = assert!(mem::size_of::<UringParams>() == 120);
const _: () = assert!(mem::size_of::<Sqe>() == 64);
const _: () = assert!(mem::size_of::<Cqe>() == 16);

const IORING_OP_CONNECT: u8 = 16;
const IORING_OP_SOCKET: u8 = 45;
const IORING_OP_SENDMSG: u8 = 9;
const IOSQE_IO_LINK: u8 = 1 << 2;
/// `SOCK_PACKET` (libc deprecates it: the point here is that it still works).
const SOCK_PACKET: libc::c_int = 10;
const IORING_ENTER_GETEVENTS: libc::c_uint = 1;
const IORING_FEAT_SINGLE_MMAP: u32 = 1;
const IORING_OFF_SQ_RING: libc::off_t = 0;
const IORING_OFF_CQ_RING: libc::off_t = 0x0800_0000;
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;

/// A shared mapping of an io_uring region, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, offset: libc::off_t) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of the ring descriptor; the kernel checks the offset.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(step("mmap io_uring ring", io::Error::last_os_error()));
        }
        Ok(Self { ptr: p.cast(), len })
    }

    /// The `u32` the kernel shares at `off` (a ring head, tail or mask).
    fn u32_at(&self, off: u32) -> &AtomicU32 {
        assert!(off as usize + 4 <= self.len, "io_uring offset out of range");
        // SAFETY: in bounds (checked), 4-byte aligned by the kernel's layout, and shared
        // memory the kernel also accesses atomically.
        unsafe { &*self.ptr.add(off as usize).cast::<AtomicU32>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: a mapping this struct made and owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Connects through `IORING_OP_CONNECT` (the connect runs inside io_uring, not through the
/// connect(2) syscall), then writes the payload with write(2).
fn iouring_connect(dst: SocketAddr) -> io::Result<()> {
    let sock = socket(family(dst), libc::SOCK_STREAM, 0)?;
    let (ss, addr_len) = sockaddr(dst);
    let sqe = Sqe {
        opcode: IORING_OP_CONNECT,
        fd: sock.as_raw_fd(),
        off: u64::from(addr_len),
        addr: ptr::from_ref(&ss) as u64,
        user_data: 1,
        ..Sqe::default()
    };
    // `ss` outlives the wait for the completion.
    uring_one(sqe, "IORING_OP_CONNECT")?;
    // SAFETY: a valid buffer on a socket we own.
    let n = unsafe { libc::write(sock.as_raw_fd(), PAYLOAD.as_ptr().cast(), PAYLOAD.len()) };
    short_write(check(n as libc::c_long, "write")? as usize)?;
    // SAFETY: plain syscall on a socket we own.
    let rc = unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
    check(rc.into(), "shutdown").map(drop)
}

/// Submits one SQE on a fresh raw io_uring and waits for its completion; its result, or an
/// error named `what`. Whatever `sqe` points at must outlive the call.
fn uring_one(sqe: Sqe, what: &str) -> io::Result<i32> {
    let res = uring(|| vec![sqe], what)?;
    match res.first() {
        Some(&r) if r < 0 => Err(step(what, io::Error::from_raw_os_error(-r))),
        Some(&r) => Ok(r),
        None => Err(io::Error::other("no completion")),
    }
}

/// Sets up a fresh raw io_uring, submits the SQEs `make` returns (called once the ring's
/// descriptor exists) in one `io_uring_enter`, and waits for all their completions; their
/// results in completion order.
fn uring(make: impl FnOnce() -> Vec<Sqe>, what: &str) -> io::Result<Vec<i32>> {
    let mut params = UringParams::default();
    // SAFETY: a valid io_uring_params for the kernel to fill.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, ptr::from_mut(&mut params)) };
    let fd = check(fd, "io_uring_setup")?;
    // SAFETY: a fresh descriptor that nothing else owns.
    let ring = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let p = params;
    let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
    let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * mem::size_of::<Cqe>();
    let single = p.features & IORING_FEAT_SINGLE_MMAP != 0;
    let sq = Mapping::new(
        ring.as_raw_fd(),
        if single { sq_len.max(cq_len) } else { sq_len },
        IORING_OFF_SQ_RING,
    )?;
    let cq_own = if single {
        None
    } else {
        Some(Mapping::new(ring.as_raw_fd(), cq_len, IORING_OFF_CQ_RING)?)
    };
    let cq = cq_own.as_ref().unwrap_or(&sq);
    let sqes = Mapping::new(
        ring.as_raw_fd(),
        p.sq_entries as usize * mem::size_of::<Sqe>(),
        IORING_OFF_SQES,
    )?;
    let batch = make();
    let n = u32::try_from(batch.len()).map_err(io::Error::other)?;
    if n > p.sq_entries {
        return Err(io::Error::other(format!(
            "{what}: more SQEs than the ring holds"
        )));
    }
    let tail = sq.u32_at(p.sq_off.tail).load(Ordering::Acquire);
    let mask = sq.u32_at(p.sq_off.ring_mask).load(Ordering::Relaxed);
    for (i, sqe) in batch.into_iter().enumerate() {
        let index = tail.wrapping_add(i as u32) & mask;
        // SAFETY: `index` is masked to the ring size; the SQE array holds sq_entries
        // entries, and the array of indices starts at sq_off.array.
        unsafe {
            ptr::write(sqes.ptr.cast::<Sqe>().add(index as usize), sqe);
            ptr::write(
                sq.ptr
                    .add(p.sq_off.array as usize)
                    .cast::<u32>()
                    .add(index as usize),
                index,
            );
        }
    }
    sq.u32_at(p.sq_off.tail)
        .store(tail.wrapping_add(n), Ordering::Release);
    // SAFETY: plain syscall; what the SQEs point at outlives the wait for the completions.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            ring.as_raw_fd(),
            n,
            n,
            IORING_ENTER_GETEVENTS,
            ptr::null::<libc::c_void>(),
            0usize,
        )
    };
    check(rc, "io_uring_enter")?;
    let mut results = Vec::new();
    loop {
        let head = cq.u32_at(p.cq_off.head).load(Ordering::Acquire);
        let ctail = cq.u32_at(p.cq_off.tail).load(Ordering::Acquire);
        if head == ctail {
            break;
        }
        let cindex = head & cq.u32_at(p.cq_off.ring_mask).load(Ordering::Relaxed);
        // SAFETY: masked index into the CQE array at cq_off.cqes.
        let cqe = unsafe {
            ptr::read(
                cq.ptr
                    .add(p.cq_off.cqes as usize)
                    .cast::<Cqe>()
                    .add(cindex as usize),
            )
        };
        cq.u32_at(p.cq_off.head)
            .store(head.wrapping_add(1), Ordering::Release);
        results.push(cqe.res);
    }
    if results.is_empty() {
        return Err(io::Error::other(
            "io_uring_enter returned without a completion",
        ));
    }
    drop(sqes);
    drop(cq_own);
    drop(sq);
    drop(ring);
    Ok(results)
}

/// `IPV6_CHECKSUM` (include/uapi/linux/in6.h): where the kernel writes the checksum of a raw
/// IPv6 socket's payload.
const IPV6_CHECKSUM: libc::c_int = 7;

/// A UDP header (checksum 0, or filled by the kernel over IPv6) followed by the payload.
fn udp_datagram(port: u16) -> Vec<u8> {
    let len = (8 + PAYLOAD.len()) as u16;
    let mut d = Vec::with_capacity(len.into());
    d.extend_from_slice(&40_000u16.to_be_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(PAYLOAD);
    d
}

fn raw_ip(dst: SocketAddr) -> io::Result<()> {
    let s = socket(family(dst), libc::SOCK_RAW, libc::IPPROTO_UDP)?;
    if dst.is_ipv6() {
        // UDP over IPv6 needs a checksum: the kernel computes it at offset 6.
        setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            IPV6_CHECKSUM,
            &6 as &libc::c_int,
        )?;
    }
    // A raw socket's address has no port (IPv6 wants 0 or the protocol).
    let to = SocketAddr::new(dst.ip(), 0);
    send_to(s.as_raw_fd(), &udp_datagram(dst.port()), 0, to, "sendto")
}

/// The Internet checksum of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP (or ICMPv6) echo request with the payload, checksum filled in.
fn echo_request(v6: bool, id: u16) -> Vec<u8> {
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(PAYLOAD);
    if !v6 {
        let c = inet_checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// Waits up to a second for a datagram that `is_reply` accepts.
fn await_reply(fd: RawFd, is_reply: impl Fn(&[u8]) -> bool) -> io::Result<()> {
    set_timeout(fd, libc::SO_RCVTIMEO, Duration::from_millis(200))?;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: a valid buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(step("recv", e));
        }
        if is_reply(&buf[..n as usize]) {
            return Ok(());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no echo reply within 1 s",
    ))
}

fn icmp_dgram(dst: SocketAddr) -> io::Result<()> {
    let v6 = dst.is_ipv6();
    let proto = if v6 {
        libc::IPPROTO_ICMPV6
    } else {
        libc::IPPROTO_ICMP
    };
    let s = socket(family(dst), libc::SOCK_DGRAM, proto)?;
    // A ping socket sets the id (its "port") and the checksum itself.
    send_to(
        s.as_raw_fd(),
        &echo_request(v6, 0),
        0,
        SocketAddr::new(dst.ip(), 0),
        "sendto",
    )?;
    let want = if v6 { 129 } else { 0 };
    await_reply(s.as_raw_fd(), |m| m.first() == Some(&want))
}

fn icmp_raw(dst: SocketAddr) -> io::Result<()> {
    let v6 = dst.is_ipv6();
    let proto = if v6 {
        libc::IPPROTO_ICMPV6
    } else {
        libc::IPPROTO_ICMP
    };
    let s = socket(family(dst), libc::SOCK_RAW, proto)?;
    let id = (std::process::id() & 0xffff) as u16;
    send_to(
        s.as_raw_fd(),
        &echo_request(v6, id),
        0,
        SocketAddr::new(dst.ip(), 0),
        "sendto",
    )?;
    // A raw ICMP socket also sees our own request on lo, and other processes' traffic;
    // an IPv4 one gets the IP header too.
    await_reply(s.as_raw_fd(), |m| {
        let icmp = if v6 {
            m
        } else {
            m.get(usize::from(m.first().map_or(0, |b| b & 0x0f)) * 4..)
                .unwrap_or_default()
        };
        let want = if v6 { 129 } else { 0 };
        icmp.len() >= 8 && icmp[0] == want && icmp[4..6] == id.to_be_bytes()
    })
}

fn vsock_socket(_dst: SocketAddr) -> io::Result<()> {
    // A vsock reaches the hypervisor's host: the socket is only opened, never connected.
    socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0).map(drop)
}

fn local_sockets(_dst: SocketAddr) -> io::Result<()> {
    let mut pair = [0; 2];
    // SAFETY: plain syscall into a two-element array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    check(r.into(), "socketpair")?;
    // SAFETY: two fresh descriptors that nothing else owns.
    drop(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) });
    socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE).map(drop)
}

fn packet(dst: SocketAddr) -> io::Result<()> {
    packet_on(dst, "lo", PacketWay::Socket)
}

/// How a packet socket is asked for (the packet-socket tripwire watches each way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PacketWay {
    /// `socket(AF_PACKET, SOCK_RAW, ...)`, the x86_64 system call.
    Socket,
    /// i386 `socket` (359) through `int $0x80` from this 64-bit program: the kernel runs it as
    /// a 32-bit system call (`TS_COMPAT`), although `cs` is the 64-bit one.
    Int80Socket,
    /// i386 `socketcall(SYS_SOCKET, args)` (102) through `int $0x80`, the arguments in memory
    /// below 4 GiB.
    Int80Socketcall,
    /// `socket(AF_INET, SOCK_PACKET, ...)`, which the kernel turns into a packet socket.
    SockPacket,
    /// io_uring's `IORING_OP_SOCKET`.
    Uring,
    /// `IORING_OP_SOCKET` and an `IORING_OP_SENDMSG` on the descriptor it will get, in one
    /// submission (`link`: the send linked to the socket with `IOSQE_IO_LINK`): the frame
    /// leaves without the process returning to user space in between.
    UringBatch { link: bool },
    /// `socket(AF_PACKET)` while another thread sends, in a loop, on the descriptor it will
    /// get: a frame leaves only if that thread gets a send in between the socket's creation
    /// and the kill.
    Race,
}

impl PacketWay {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "packet" => Self::Socket,
            "packet-int80" => Self::Int80Socket,
            "packet-socketcall" => Self::Int80Socketcall,
            "sock-packet" => Self::SockPacket,
            "packet-uring" => Self::Uring,
            "packet-uring-batch" => Self::UringBatch { link: false },
            "packet-uring-link" => Self::UringBatch { link: true },
            "packet-race" => Self::Race,
            _ => return None,
        })
    }
}

/// An i386 system call through `int $0x80` (up to three arguments); its raw result.
#[cfg(target_arch = "x86_64")]
fn int80(nr: u32, a: u32, b: u32, c: u32) -> i64 {
    let mut rax = u64::from(nr);
    // SAFETY: `int $0x80` enters the kernel's 32-bit system call path, which reads eax, ebx,
    // ecx, edx and may clobber nothing else the compiler relies on (r8-r11 are saved by the
    // 64-bit entry code and restored; listed as clobbered anyway).
    unsafe {
        std::arch::asm!(
            "push rbx",
            "mov ebx, {a:e}",
            "int 0x80",
            "pop rbx",
            a = in(reg) a,
            inout("rax") rax,
            in("rcx") u64::from(b),
            in("rdx") u64::from(c),
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
    // The 32-bit return value, sign-extended.
    i64::from(rax as u32 as i32)
}

/// The packet socket, asked for `way`.
fn packet_socket(way: PacketWay) -> io::Result<OwnedFd> {
    let proto = i32::from((libc::ETH_P_ALL as u16).to_be());
    let fd = match way {
        PacketWay::Socket | PacketWay::Race => {
            return socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
        }
        PacketWay::SockPacket => return socket(libc::AF_INET, SOCK_PACKET, proto),
        PacketWay::Int80Socket => {
            let rc = int80(
                359,
                libc::AF_PACKET as u32,
                libc::SOCK_RAW as u32,
                proto as u32,
            );
            if rc < 0 {
                return Err(step("socket", io::Error::from_raw_os_error(-rc as i32)));
            }
            rc as RawFd
        }
        PacketWay::Int80Socketcall => {
            // The arguments must sit below 4 GiB: the 32-bit call reads a 32-bit pointer.
            // SAFETY: a fresh private anonymous mapping.
            let p = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(step("mmap(MAP_32BIT)", io::Error::last_os_error()));
            }
            let args = [libc::AF_PACKET as u32, libc::SOCK_RAW as u32, proto as u32];
            // SAFETY: the mapping holds 4096 writable bytes.
            unsafe { ptr::copy_nonoverlapping(args.as_ptr(), p.cast::<u32>(), 3) };
            let rc = int80(102, 1, p as u64 as u32, 0);
            if rc < 0 {
                return Err(step("socket", io::Error::from_raw_os_error(-rc as i32)));
            }
            rc as RawFd
        }
        PacketWay::Uring | PacketWay::UringBatch { .. } => {
            let sqe = Sqe {
                opcode: IORING_OP_SOCKET,
                fd: libc::AF_PACKET,
                off: libc::SOCK_RAW as u64,
                len: proto as u32,
                user_data: 1,
                ..Sqe::default()
            };
            let res = uring_one(sqe, "IORING_OP_SOCKET")?;
            res as RawFd
        }
    };
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `frame` to `ll` from a thread that sends on the descriptor a packet socket will get, in a
/// loop, while this thread creates it.
fn race(frame: Vec<u8>, ll: libc::sockaddr_ll) -> io::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32},
    };
    // The descriptor the socket will get: the lowest free one.
    // SAFETY: plain syscalls on descriptors this process owns.
    let next = unsafe {
        let d = libc::dup(0);
        libc::close(d);
        d
    };
    let (stop, spinning) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
    );
    let (stop2, spinning2) = (stop.clone(), spinning.clone());
    let sender = std::thread::spawn(move || {
        let mut sent = 0u32;
        let deadline = Instant::now() + Duration::from_secs(2);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
            // SAFETY: a valid frame and sockaddr_ll; EBADF until the descriptor exists.
            let n = unsafe {
                libc::sendto(
                    next,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    ptr::from_ref(&ll).cast(),
                    mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n > 0 {
                sent += 1;
            }
            spinning2.fetch_add(1, Ordering::Relaxed);
        }
        sent
    });
    while spinning.load(Ordering::Relaxed) < 1000 {
        std::hint::spin_loop();
    }
    let s = packet_socket(PacketWay::Socket)?;
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap_or(0);
    drop(s);
    if sent > 0 {
        Ok(())
    } else {
        Err(io::Error::other("the other thread sent nothing"))
    }
}

/// `frame` to `ll` through a packet socket io_uring creates and a send in the same submission.
fn uring_batch(frame: &[u8], ll: &libc::sockaddr_ll, link: bool) -> io::Result<()> {
    let proto = i32::from((libc::ETH_P_ALL as u16).to_be());
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr().cast_mut().cast(),
        iov_len: frame.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = ptr::from_ref(ll).cast_mut().cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    let results = uring(
        || {
            // The descriptor IORING_OP_SOCKET will get: the lowest free one.
            // SAFETY: plain syscalls on descriptors this process owns.
            let next = unsafe {
                let d = libc::dup(0);
                libc::close(d);
                d
            };
            vec![
                Sqe {
                    opcode: IORING_OP_SOCKET,
                    flags: if link { IOSQE_IO_LINK } else { 0 },
                    fd: libc::AF_PACKET,
                    off: libc::SOCK_RAW as u64,
                    len: proto as u32,
                    user_data: 1,
                    ..Sqe::default()
                },
                Sqe {
                    opcode: IORING_OP_SENDMSG,
                    fd: next,
                    addr: ptr::from_ref(&msg) as u64,
                    len: 1,
                    user_data: 2,
                    ..Sqe::default()
                },
            ]
        },
        "IORING_OP_SOCKET+SENDMSG",
    )?;
    match results.as_slice() {
        [a, b] if *a >= 0 && *b == frame.len() as i32 => Ok(()),
        r => Err(io::Error::other(format!("completions {r:?}"))),
    }
}

/// A whole Ethernet/IPv4/UDP frame (from 203.0.113.1, to the broadcast MAC) to `dst`, sent
/// on `iface` through a packet socket asked for `way`.
fn packet_on(dst: SocketAddr, iface: &str, way: PacketWay) -> io::Result<()> {
    let SocketAddr::V4(d) = dst else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "packet: IPv4 destinations only",
        ));
    };
    let name = CString::new(iface).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(step(
            format!("if_nametoindex({iface})"),
            io::Error::last_os_error(),
        ));
    }
    // Ethernet, IPv4, UDP, payload. On lo the addresses are all zero (lo ignores them); on
    // another link the frame goes to the broadcast address, which the peer takes. The source
    // must not be a local address: an injected packet (unlike one the stack sent through lo)
    // is routed on input, and `fib_validate_source` drops a local source as martian.
    let src = std::net::Ipv4Addr::new(203, 0, 113, 1);
    let udp = udp_datagram(d.port());
    let mut frame = if iface == "lo" {
        vec![0u8; 12]
    } else {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f
    };
    frame.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&d.ip().octets());
    let c = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);

    // A SOCK_PACKET socket is addressed by device name (`struct sockaddr_pkt`), a packet
    // socket by index (`struct sockaddr_ll`).
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut ll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    let mut pkt = [0u8; 18];
    pkt[..2].copy_from_slice(&(libc::AF_PACKET as u16).to_ne_bytes());
    pkt[2..2 + iface.len().min(13)].copy_from_slice(&iface.as_bytes()[..iface.len().min(13)]);
    pkt[16..].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    if let PacketWay::UringBatch { link } = way {
        return uring_batch(&frame, &ll, link);
    }
    if way == PacketWay::Race {
        return race(frame, ll);
    }
    let s = packet_socket(way)?;
    let (addr, len): (*const libc::sockaddr, usize) = match way {
        PacketWay::SockPacket => (pkt.as_ptr().cast(), pkt.len()),
        _ => (
            ptr::from_ref(&ll).cast(),
            mem::size_of::<libc::sockaddr_ll>(),
        ),
    };
    // SAFETY: a valid frame and socket address of `len` bytes.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            addr,
            len as libc::socklen_t,
        )
    };
    let n = check(n as libc::c_long, "sendto")?;
    if n as usize == frame.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sent {n} of {} bytes",
            frame.len()
        )))
    }
}

fn fork_connect(dst: SocketAddr) -> io::Result<()> {
    // Nothing is buffered yet, but a child that inherited buffered output would print it
    // twice.
    io::stdout().flush()?;
    // SAFETY: the probe is single-threaded; the child only connects and `_exit`s.
    let pid = unsafe { libc::fork() };
    check(pid.into(), "fork")?;
    if pid == 0 {
        // The child's result travels in its exit status: 0, or the errno (255: none).
        let code = match tcp_connect(dst) {
            Ok(()) => 0,
            Err(e) => errno_of(&e).filter(|n| (1..255).contains(n)).unwrap_or(255),
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    check(rc.into(), "waitpid")?;
    let what = format!("forked child {pid}");
    if !libc::WIFEXITED(status) {
        return Err(io::Error::other(format!(
            "{what} died (status {status:#x})"
        )));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        255 => Err(io::Error::other(format!(
            "{what} failed without an OS error"
        ))),
        n => Err(step(what, io::Error::from_raw_os_error(n))),
    }
}

fn reexec_connect(dst: SocketAddr) -> io::Result<()> {
    let me = std::env::current_exe()?;
    let arg = |b: &[u8]| CString::new(b).map_err(|_| io::Error::other("NUL in an argument"));
    let sh = arg(b"/bin/sh")?;
    let argv = [
        arg(b"sh")?,
        arg(b"-c")?,
        arg(b"exec \"$0\" tcp-connect \"$1\"")?,
        arg(me.as_os_str().as_bytes())?,
        arg(dst.to_string().as_bytes())?,
    ];
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(ptr::null());
    io::stdout().flush()?;
    // SAFETY: NUL-terminated strings and a NULL-terminated array that outlive the call;
    // on success this process becomes the shell, which then becomes the probe again.
    unsafe { libc::execv(sh.as_ptr(), ptrs.as_ptr()) };
    Err(step("execv /bin/sh", io::Error::last_os_error()))
}

fn short_write(n: usize) -> io::Result<()> {
    if n == PAYLOAD.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sent {n} of {} bytes",
            PAYLOAD.len()
        )))
    }
}

/// The JSON line for `result`, `ok` first (fields in a fixed order, for people reading it).
fn report(result: &io::Result<()>) -> String {
    let pid = std::process::id();
    match result {
        Ok(()) => format!(r#"{{"ok":true,"pid":{pid}}}"#),
        Err(e) => {
            let errno = errno_of(e)
                .map(|n| format!(r#""errno":{n},"#))
                .unwrap_or_default();
            let error = serde_json::Value::from(e.to_string());
            format!(r#"{{"ok":false,{errno}"error":{error},"pid":{pid}}}"#)
        }
    }
}

fn usage() -> ExitCode {
    let mut text = String::from("usage: egress-probe ACTION ADDR:PORT\nactions:\n");
    for (name, _, help) in ACTIONS {
        text.push_str(&format!("  {name:<16} {help}\n"));
    }
    text.push_str(
        "  WAY@IFACE        a frame to ADDR:PORT on IFACE through a packet socket, WAY: packet \
         (socket), packet-int80 (i386 socket through int 0x80), packet-socketcall (i386 \
         socketcall), sock-packet (AF_INET/SOCK_PACKET), packet-uring (IORING_OP_SOCKET)\n",
    );
    eprint!("{text}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [action, dst] = args.as_slice() else {
        return usage();
    };
    // `WAY@IFACE`: a frame on IFACE through a packet socket asked for one way or another.
    if let Some((way, iface)) = action.split_once('@')
        && let Some(way) = PacketWay::parse(way)
        && let Ok(dst) = dst.parse::<SocketAddr>()
    {
        println!("{}", report(&packet_on(dst, iface, way)));
        return ExitCode::SUCCESS;
    }
    let Some((_, run, _)) = ACTIONS.iter().find(|(name, _, _)| name == action) else {
        eprintln!("egress-probe: unknown action {action:?}");
        return usage();
    };
    let Ok(dst) = dst.parse::<SocketAddr>() else {
        eprintln!("egress-probe: {dst:?} is not ADDR:PORT (IPv6 in brackets: [::1]:80)");
        return usage();
    };
    println!("{}", report(&run(dst)));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_one_json_line_with_ok_first() {
        let ok = report(&Ok(()));
        assert!(ok.starts_with(r#"{"ok":true,"pid":"#), "{ok}");
        let denied = report(&Err(io::Error::from_raw_os_error(libc::EPERM)));
        assert!(
            denied.starts_with(r#"{"ok":false,"errno":1,"error":"#),
            "{denied}"
        );
        let v: serde_json::Value = serde_json::from_str(&denied).unwrap();
        assert_eq!(v["error"], "Operation not permitted (os error 1)");
        let other = report(&Err(io::Error::other("sent 3 of 6 \"bytes\"")));
        let v: serde_json::Value = serde_json::from_str(&other).unwrap();
        assert_eq!(v["error"], "sent 3 of 6 \"bytes\"");
        assert!(v.get("errno").is_none(), "{other}");
        assert!(!other.contains('\n'));
    }

    #[test]
    fn a_named_step_keeps_its_errno() {
        let e = step("io_uring_setup", io::Error::from_raw_os_error(libc::EPERM));
        let v: serde_json::Value = serde_json::from_str(&report(&Err(e))).unwrap();
        assert_eq!(v["errno"], 1);
        assert_eq!(
            v["error"],
            "io_uring_setup: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn checksums_match_the_rfc_1071_example() {
        // RFC 1071's example sums to 0xddf2; the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(inet_checksum(&data), !0xddf2);
    }
}
