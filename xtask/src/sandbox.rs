//! The demo's sandbox: a network namespace of its own (only `lo`, so nothing in it reaches
//! the machine's network) and HTTP listeners inside it, served from this process.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::cmd::Cmd;

/// A network namespace created with `ip netns add`, `lo` up. Dropping it deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` and brings its `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        Cmd::new("ip").args(["netns", "add", name]).run()?;
        // From here on a failure still deletes the namespace, through Drop.
        let netns = Self {
            name: name.to_owned(),
        };
        Cmd::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .run()?;
        Ok(netns)
    }

    /// `/run/netns/NAME`, the bind mount that keeps it alive and that `setns` opens.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panics: this runs while unwinding from errors and after Ctrl-C. Listener
        // sockets still open in it keep the namespace itself alive until this process
        // exits, which is moments later.
        let deleted = Cmd::new("ip").args(["netns", "delete", &self.name]).run();
        if let Err(e) = deleted {
            let _ = writeln!(
                io::stderr(),
                "xtask: warning: network namespace {} is left behind: {e:#}",
                self.name
            );
        }
    }
}

/// Listens on 127.0.0.1 at each of `ports` inside `netns`, and answers every connection with
/// an HTTP/1.0 200 whose body is `hello from <port>\n`. Returns once all ports listen; the
/// listeners live on in background threads until this process exits.
pub fn serve_hello(netns: &Netns, ports: &[u16]) -> Result<()> {
    let path = netns.path();
    let ports = ports.to_vec();
    let (ready_tx, ready_rx) = mpsc::channel();
    thread::Builder::new()
        .name("netns-listeners".into())
        .spawn(move || {
            let ready = bind_in(&path, &ports).map(|listeners| {
                for (port, listener) in listeners {
                    thread::spawn(move || serve(&listener, port));
                }
            });
            let _ = ready_tx.send(ready);
        })
        .context("cannot start the listener thread")?;
    ready_rx
        .recv()
        .context("the listener thread ended before listening")?
}

/// Binds the listeners from inside the namespace. A namespace is per thread: `setns` here
/// moves only this thread, and a socket belongs to the namespace it was created in, so the
/// rest of the process stays where it was.
fn bind_in(netns: &Path, ports: &[u16]) -> Result<Vec<(u16, TcpListener)>> {
    let ns = File::open(netns).with_context(|| format!("cannot open {}", netns.display()))?;
    // SAFETY: `ns` is an open descriptor of a network namespace; setns changes only the
    // calling thread's namespace and touches no memory of ours.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot enter network namespace {}", netns.display()));
    }
    ports
        .iter()
        .map(|&port| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .map(|listener| (port, listener))
                .with_context(|| format!("cannot listen on 127.0.0.1:{port} in the namespace"))
        })
        .collect()
}

fn serve(listener: &TcpListener, port: u16) {
    for stream in listener.incoming().flatten() {
        // A client that misbehaves only loses its own answer.
        let _ = answer(stream, port);
    }
}

fn answer(mut stream: TcpStream, port: u16) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    // Read the request head (up to the blank line), or give up at 8 KiB or EOF.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("hello from {port}\n");
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}
