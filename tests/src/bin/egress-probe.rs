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
//! Each technique is one function in [`ACTIONS`]; add new ones there (sendmmsg,
//! MSG_FASTOPEN, raw sockets, io_uring, ...).

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
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
            let errno = e
                .raw_os_error()
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
        text.push_str(&format!("  {name:<14} {help}\n"));
    }
    eprint!("{text}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [action, dst] = args.as_slice() else {
        return usage();
    };
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
}
