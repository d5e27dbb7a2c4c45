//! Sending a query to the upstream servers: UDP for UDP clients (a truncated answer goes back
//! truncated, so the client retries over TCP), TCP for TCP clients. The query is the one the
//! resolver built from the client's ([`super::screen::upstream_query`]: lower case, no client
//! flag or EDNS option), never the client's bytes. Each query gets a fresh socket (random
//! source port) and a random id, checked on the answer.

use std::{io, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

/// How long one upstream may take to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest DNS message over UDP that we accept from upstream.
const MAX_UDP: usize = 65_535;

pub use crate::sys::sockdiag::Transport;

/// Sends `query` to each upstream in turn until one answers; returns its answer with the
/// client's id.
pub async fn exchange(
    upstreams: &[SocketAddr],
    query: &[u8],
    transport: Transport,
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
            Transport::Udp => timeout(UPSTREAM_TIMEOUT, udp(*server, &q, id)).await,
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

async fn udp(server: SocketAddr, q: &[u8], id: u16) -> anyhow::Result<Vec<u8>> {
    let sock = connected_udp(server)?;
    // Sent before the socket joins the runtime: a fresh socket's send buffer is empty, so the
    // send goes at once, without a round through the runtime to learn that it may.
    let sent = match sock.send(q) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e.into()),
    };
    let sock = UdpSocket::from_std(sock)?;
    if !sent {
        sock.send(q).await?;
    }
    loop {
        sock.readable().await?;
        // Read into this thread's buffer, room for the largest datagram, and keep only what
        // came: no 64 KiB allocation per query. No await while it is borrowed.
        let answer = RECV_BUF.with_borrow_mut(|buf| match sock.try_recv(buf) {
            // A connected UDP socket only receives from `server`.
            Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 => {
                Ok(Some(buf[..n].to_vec()))
            }
            // A stray or spoofed datagram: keep waiting for the real answer.
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        })?;
        if let Some(answer) = answer {
            return Ok(answer);
        }
    }
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
