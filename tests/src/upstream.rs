//! A DNS server of the test's own standing in for the agent's upstream where dnsmasq cannot do
//! what a test needs: hold the answers for some names until the test releases them (a slow
//! upstream, for a reload while a query is in flight), answer any name below a suffix at a high
//! rate without a log, and record every query's exact bytes (what the agent forwarded).
//!
//! UDP only (the agent forwards over TCP only for TCP clients), in a namespace of the test's
//! own, on an address the test puts on its `lo`. Dropping it stops its thread.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::TestNetns;

/// At most this many queries are recorded (a flood is counted, not kept).
const RECORDED: usize = 10_000;

/// One query as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The datagram, byte for byte.
    pub bytes: Vec<u8>,
    /// The question's labels, as sent (letter case included).
    pub labels: Vec<Vec<u8>>,
    /// The question's type.
    pub qtype: u16,
    /// The question's class.
    pub qclass: u16,
}

impl Received {
    /// The question's name as sent: labels joined by dots (no escaping).
    pub fn name(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        labels.join(".")
    }

    /// The header's flags (bytes 2 and 3).
    pub fn flags(&self) -> u16 {
        u16::from_be_bytes([self.bytes[2], self.bytes[3]])
    }

    /// The id.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.bytes[0], self.bytes[1]])
    }

    /// Everything after the question (the additional section: an EDNS OPT record, if any).
    pub fn after_question(&self) -> &[u8] {
        let end = question_end(&self.bytes).unwrap_or(self.bytes.len());
        &self.bytes[end..]
    }
}

#[derive(Debug, Default)]
struct State {
    /// `(suffix, address)`: a name equal to or below `suffix` answers `address` (A).
    answers: Vec<(String, Ipv4Addr)>,
    ttl: u32,
    /// Names whose answers wait for [`FakeUpstream::release`].
    hold: Mutex<Vec<String>>,
    released: AtomicBool,
    received: Mutex<Vec<Received>>,
    count: AtomicUsize,
    stop: AtomicBool,
}

/// The server. See the module documentation.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl FakeUpstream {
    /// Serves on `addr` (UDP) inside `netns`, whose `lo` must hold the address already.
    /// `answers`: `(suffix, IPv4 address)`; other names get NXDOMAIN, AAAA and other types
    /// an empty answer. Every answer has TTL `ttl`.
    pub fn start(netns: &TestNetns, addr: &str, answers: &[(&str, &str)], ttl: u32) -> Self {
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad address {addr}: {e}"));
        let sock = netns
            .run_in(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("cannot bind udp {addr} in {}: {e}", netns.name()));
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .expect("read timeout");
        let state = Arc::new(State {
            answers: answers
                .iter()
                .map(|(s, ip)| {
                    (
                        s.to_ascii_lowercase(),
                        ip.parse()
                            .unwrap_or_else(|e| panic!("bad address {ip}: {e}")),
                    )
                })
                .collect(),
            ttl,
            ..State::default()
        });
        let st = state.clone();
        let thread = thread::Builder::new()
            .name(format!("upstream-{addr}"))
            .spawn(move || serve(&sock, &st))
            .expect("cannot start the upstream's thread");
        Self {
            addr,
            state,
            thread: Some(thread),
        }
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds the answers to queries for exactly `name` (any case) until [`Self::release`].
    pub fn hold(&self, name: &str) {
        self.state
            .hold
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_ascii_lowercase());
    }

    /// Answers the held queries now, and later ones at once.
    pub fn release(&self) {
        self.state.released.store(true, Ordering::SeqCst);
    }

    /// The queries received so far (the first [`RECORDED`]).
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many queries were received.
    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The thread looks at the flag at least every 10 ms.
            let _ = t.join();
        }
    }
}

fn serve(sock: &UdpSocket, st: &State) {
    let mut held: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    let mut buf = vec![0u8; 65_535];
    while !st.stop.load(Ordering::SeqCst) {
        if st.released.load(Ordering::SeqCst) {
            for (q, from) in held.drain(..) {
                answer(sock, st, &q, from);
            }
        }
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => continue,
        };
        let q = &buf[..n];
        let Some(rec) = parse(q) else {
            continue;
        };
        st.count.fetch_add(1, Ordering::SeqCst);
        let name = rec.name().to_ascii_lowercase();
        {
            let mut r = st.received.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() < RECORDED {
                r.push(rec);
            }
        }
        let hold = !st.released.load(Ordering::SeqCst)
            && st
                .hold
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&name);
        if hold {
            held.push((q.to_vec(), from));
        } else {
            answer(sock, st, q, from);
        }
    }
}

/// Where the (single) question of `q` ends.
fn question_end(q: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = usize::from(*q.get(i)?);
        if len == 0 {
            return (i + 5 <= q.len()).then_some(i + 5);
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len;
    }
}

fn parse(q: &[u8]) -> Option<Received> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let end = question_end(q)?;
    let mut labels = Vec::new();
    let mut i = 12;
    while q[i] != 0 {
        let len = usize::from(q[i]);
        labels.push(q[i + 1..i + 1 + len].to_vec());
        i += 1 + len;
    }
    Some(Received {
        bytes: q.to_vec(),
        labels,
        qtype: u16::from_be_bytes([q[end - 4], q[end - 3]]),
        qclass: u16::from_be_bytes([q[end - 2], q[end - 1]]),
    })
}

fn answer(sock: &UdpSocket, st: &State, q: &[u8], to: SocketAddr) {
    let Some(rec) = parse(q) else {
        return;
    };
    let end = question_end(q).expect("parsed");
    let name = rec.name().to_ascii_lowercase();
    let ip = st
        .answers
        .iter()
        .find(|(s, _)| name == *s || name.ends_with(&format!(".{s}")))
        .map(|(_, ip)| *ip);
    let rd = q[2] & 0x01;
    let rcode = if ip.is_some() { 0 } else { 3 };
    let a = ip.filter(|_| rec.qtype == 1);
    let mut out = Vec::with_capacity(end + 16);
    out.extend_from_slice(&q[..2]);
    out.extend_from_slice(&[
        0x80 | rd,
        0x80 | rcode,
        0,
        1,
        0,
        u8::from(a.is_some()),
        0,
        0,
        0,
        0,
    ]);
    out.extend_from_slice(&q[12..end]);
    if let Some(ip) = a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&st.ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    let _ = sock.send_to(&out, to);
}
