//! `--health ADDR`: `/healthz` (the agent is alive), `/readyz` (enforcement attached and the
//! resolver answering) and `/metrics` (Prometheus text), over plain HTTP/1.1.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{bpf::enforcer::Enforcer, metrics::Metrics};

/// How long the accept loop waits after a failed accept.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// What the endpoints read.
pub struct HealthState {
    /// Agent counters and the ready flag.
    pub metrics: Arc<Metrics>,
    /// Kernel counters and map fill.
    pub enforcer: Arc<Mutex<Enforcer>>,
    /// Capacity of the DNS-derived map.
    pub dns_capacity: u32,
    /// Ask mode's decisions and the bearer token they need (`--approval-token-file`);
    /// `None`: no `/approvals` endpoint.
    pub approvals: Option<(Arc<crate::daemon::approvals::Approvals>, String)>,
}

/// Binds `addr`; the returned future serves until dropped.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --health"))
}

/// Serves requests forever.
pub async fn serve(listener: TcpListener, state: Arc<HealthState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: the pending connection stays
                // queued and accept fails again at once. Back off rather than spin a CPU.
                tracing::debug!("health: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), answer(stream, &state))
                .await;
        });
    }
}

async fn answer(mut s: TcpStream, state: &HealthState) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut n = 0;
    // Read the request line and headers (small requests only).
    while n < buf.len() {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].ends_with(b"\n\n") {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]).into_owned();
    let path = req
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/");
    let (status, body, ctype) = match &state.approvals {
        Some((approvals, token)) if path.starts_with("/approvals") => {
            let (head, body) = read_body(&mut s, &buf[..n]).await?;
            let (status, body) = tokio::task::block_in_place(|| {
                crate::daemon::approvals::http(approvals, token, &head, &body)
            });
            (status, body, "application/json")
        }
        _ => route(path, state),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// The head of a request (up to the blank line) and its body (`Content-Length` bytes, at
/// most 4 KiB), from what was read so far and the rest of the stream.
async fn read_body(s: &mut TcpStream, read: &[u8]) -> std::io::Result<(String, Vec<u8>)> {
    let split = read
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            read.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        })
        .unwrap_or((read.len(), read.len()));
    let head = String::from_utf8_lossy(&read[..split.0]).into_owned();
    let want = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(4096);
    let mut body = read[split.1..].to_vec();
    while body.len() < want {
        let mut more = vec![0u8; want - body.len()];
        let r = s.read(&mut more).await?;
        if r == 0 {
            break;
        }
        body.extend_from_slice(&more[..r]);
    }
    body.truncate(want);
    Ok((head, body))
}

fn route(path: &str, state: &HealthState) -> (&'static str, String, &'static str) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path.split('?').next().unwrap_or(path) {
        "/healthz" => ("200 OK", "ok\n".into(), TEXT),
        "/readyz" => {
            if state.metrics.raw_blocks_ready.load(Ordering::Relaxed) {
                (
                    "503 Service Unavailable",
                    "not ready: a packet socket or CAP_NET_RAW in the enforced cgroup \
                     (--require-no-raw)\n"
                        .into(),
                    TEXT,
                )
            } else if state.metrics.ready.load(Ordering::Relaxed) {
                ("200 OK", "ready\n".into(), TEXT)
            } else {
                ("503 Service Unavailable", "not ready\n".into(), TEXT)
            }
        }
        "/metrics" => {
            // The lock only for the four counter reads: the DNS entries are counted by the
            // resolver as it writes them (a walk of the kernel map here held the lock the
            // resolver needs to answer, for as long as the map was large).
            let kernel = state
                .enforcer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .counters()
                .ok();
            (
                "200 OK",
                state.metrics.render(kernel, state.dns_capacity),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        _ => ("404 Not Found", "not found\n".into(), TEXT),
    }
}
