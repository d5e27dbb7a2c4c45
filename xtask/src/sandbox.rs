//! The demo's and the e2e's listeners: HTTP servers inside a network namespace (an
//! [`egress_netns::Netns`]: only `lo`, so nothing in it reaches the machine's network), served
//! from this process.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use egress_netns::Netns;

/// Listens on 127.0.0.1 at each of `ports` inside `netns`, and answers every connection with
/// an HTTP/1.0 200 whose body is `hello from <port>\n`. Returns once all ports listen; the
/// listeners live on in background threads until this process exits.
pub fn serve_hello(netns: &Netns, ports: &[u16]) -> Result<()> {
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|&p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        .collect();
    serve_hello_at(netns, &addrs)
}

/// Like [`serve_hello`], on each of `addrs` (addresses of the namespace's own interfaces).
pub fn serve_hello_at(netns: &Netns, addrs: &[SocketAddr]) -> Result<()> {
    // A socket belongs to the namespace it was created in, wherever it is used later: bind
    // inside, serve from ordinary threads.
    let listeners = netns.run_in(|| bind(addrs))??;
    for (port, listener) in listeners {
        thread::Builder::new()
            .name(format!("listener-{port}"))
            .spawn(move || serve(&listener, port))
            .context("cannot start a listener thread")?;
    }
    Ok(())
}

fn bind(addrs: &[SocketAddr]) -> Result<Vec<(u16, TcpListener)>> {
    addrs
        .iter()
        .map(|&addr| {
            TcpListener::bind(addr)
                .map(|listener| (addr.port(), listener))
                .with_context(|| format!("cannot listen on {addr} in the namespace"))
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
