//! Loopback servers inside a test namespace that record what reached them.
//!
//! They are created by the test process, which is not in the enforced cgroup, so they are
//! never subject to enforcement themselves.

use std::{
    io::Read as _,
    net::{self, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{TestNetns, poll_until};

/// How long a connection may take to send its payload and close.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What a listener has received, shared with its thread.
#[derive(Debug, Default)]
struct Received {
    /// One entry per TCP connection (what it sent before closing) or per UDP datagram.
    payloads: Mutex<Vec<Vec<u8>>>,
    stop: AtomicBool,
}

/// The part both listener kinds share: the address, the record and the thread.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    received: Arc<Received>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn payloads(&self) -> Vec<Vec<u8>> {
        lock(&self.received.payloads).clone()
    }

    fn received(&self) -> usize {
        lock(&self.received.payloads).len()
    }

    fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || (self.received() >= n).then_some(())).is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.received.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The thread wakes at least every 20 ms to see the flag.
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits up to 20 ms for `fd` to become readable.
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 20) };
    n > 0
}

/// A TCP listener that accepts connections and records, per connection, the bytes it sent
/// before closing.
#[derive(Debug)]
pub struct TcpListener(Server);

impl TcpListener {
    /// Listens on `addr` (e.g. `127.0.0.1:8080`, `[::1]:8080`) inside `netns`.
    pub fn bind(netns: &TestNetns, addr: &str) -> Self {
        Self::bind_with_read_timeout(netns, addr, READ_TIMEOUT)
    }

    /// As [`Self::bind`], but a connection is read for up to `timeout` before it is recorded
    /// with what arrived: for a connection made long before its peer writes (one handed to a
    /// command that first has to start an agent).
    pub fn bind_with_read_timeout(netns: &TestNetns, addr: &str, timeout: Duration) -> Self {
        let want: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad listener address {addr}: {e}"));
        let listener = netns
            .run_in(|| net::TcpListener::bind(want))
            .unwrap_or_else(|e| panic!("cannot listen on tcp {want} in {}: {e}", netns.name()));
        let addr = listener.local_addr().expect("listener address");
        let received = Arc::new(Received::default());
        let rec = received.clone();
        let thread = thread::Builder::new()
            .name(format!("tcp-listener-{addr}"))
            .spawn(move || {
                while !rec.stop.load(Ordering::SeqCst) {
                    if !readable(listener.as_raw_fd()) {
                        continue;
                    }
                    let Ok((mut stream, _peer)) = listener.accept() else {
                        continue;
                    };
                    let _ = stream.set_read_timeout(Some(timeout));
                    let mut data = Vec::new();
                    // A timeout still records the connection, with what arrived so far.
                    let _ = stream.read_to_end(&mut data);
                    lock(&rec.payloads).push(data);
                }
            })
            .expect("cannot start a listener thread");
        Self(Server {
            addr,
            received,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Connections accepted and read to the end so far.
    pub fn received(&self) -> usize {
        self.0.received()
    }

    /// What each connection sent.
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.0.payloads()
    }

    /// Waits until at least `n` connections have been recorded; false on timeout.
    pub fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        self.0.wait_received(n, timeout)
    }
}

/// A UDP socket that records every datagram it receives.
#[derive(Debug)]
pub struct UdpListener(Server);

impl UdpListener {
    /// Binds `addr` (e.g. `127.0.0.1:5353`, `[::1]:5353`) inside `netns`.
    pub fn bind(netns: &TestNetns, addr: &str) -> Self {
        let want: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad listener address {addr}: {e}"));
        let socket = netns
            .run_in(|| net::UdpSocket::bind(want))
            .unwrap_or_else(|e| panic!("cannot bind udp {want} in {}: {e}", netns.name()));
        let addr = socket.local_addr().expect("socket address");
        let received = Arc::new(Received::default());
        let rec = received.clone();
        let thread = thread::Builder::new()
            .name(format!("udp-listener-{addr}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !rec.stop.load(Ordering::SeqCst) {
                    if !readable(socket.as_raw_fd()) {
                        continue;
                    }
                    if let Ok((n, _peer)) = socket.recv_from(&mut buf) {
                        lock(&rec.payloads).push(buf[..n].to_vec());
                    }
                }
            })
            .expect("cannot start a listener thread");
        Self(Server {
            addr,
            received,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.0.received()
    }

    /// Each datagram's payload.
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.0.payloads()
    }

    /// Waits until at least `n` datagrams have arrived; false on timeout.
    pub fn wait_received(&self, n: usize, timeout: Duration) -> bool {
        self.0.wait_received(n, timeout)
    }
}
