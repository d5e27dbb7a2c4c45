//! `egress-agent explain`: which rule of a policy lets a destination through, or why none
//! does, one readable line per finding. Pure logic over a [`Policy`]: no aya, no tokio.
//!
//! It follows what the kernel and the resolver do (docs/ARCHITECTURE.md):
//! - A host name is reachable through the addresses DNS answers for it, and the resolver
//!   answers only names a `host:` rule covers; the addresses get the union of the ports and
//!   protocols of the rules covering the name.
//! - An address is allowed statically only by `cidr:`/`ip:` rules. Every rule containing it
//!   counts, not only the longest prefix: the loader gives each trie entry the ports of the
//!   broader prefixes containing it. A `host:` rule allows an address only after DNS answered
//!   it for the rule's name, and never a loopback, unspecified, link-local or cloud metadata
//!   address, nor with `dns.block_private` a private one (the DNS rebinding guard,
//!   [`guarded`]).
//! - Port 53 (TCP and UDP) goes to egress's own resolver whatever the address, so the address
//!   itself is never reached and rules for it have no effect.

mod destination;
#[cfg(test)]
mod tests;

use std::{fmt, net::IpAddr};

use egress_common::consts::{PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

pub use self::destination::{Destination, Host, Transport};
use crate::{
    policy::rebinding::guarded,
    policy::{HostPattern, Mode, Policy, PortSet, Protocol, Rule, Target},
};

/// The port every DNS packet or connection is steered from.
const DNS_PORT: u16 = 53;

/// How many near-miss notes a refused name gets at most.
const MAX_HINTS: usize = 3;

/// How many host rules a note about DNS-derived addresses names at most.
const MAX_NAMES: usize = 4;

/// A destination and protocol to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Where to.
    pub destination: Destination,
    /// Over which protocol; `None`: TCP when a port is given, any protocol without one.
    pub transport: Option<Transport>,
}

/// What [`explain`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Whether the policy lets the destination through: with a port, on that port and
    /// protocol; without one, on some port (for a name: whether its DNS queries are answered;
    /// for an address: whether a `cidr:`/`ip:` rule covers it).
    pub allowed: bool,
    /// One readable line per finding, each starting with the destination.
    pub lines: Vec<String>,
}

/// Explains what `policy` does with `query`.
pub fn explain(policy: &Policy, query: &Query) -> Explanation {
    let Destination { host, port } = &query.destination;
    let transport = match (query.transport, port) {
        (Some(t), _) => Some(t),
        (None, Some(_)) => Some(Transport::Tcp),
        (None, None) => None,
    };
    let subject = subject(host, *port, transport);
    let mut out = Out {
        subject,
        lines: Vec::new(),
    };
    let allowed = match (host, *port) {
        (_, Some(DNS_PORT)) if transport != Some(Transport::Icmp) => {
            steered(policy, host, transport, &mut out);
            false
        }
        (Host::Unix(u), _) => unix_verdict(policy, u, &mut out),
        (Host::Name(name), _) => name_verdict(policy, name, *port, transport, &mut out),
        (Host::Ip(ip), _) => ip_verdict(policy, *ip, *port, transport, &mut out),
    };
    if !allowed && policy.mode == Mode::Audit {
        out.line(
            "note: the policy is in audit mode: what it does not allow is let through and \
             reported, not blocked",
        );
    }
    Explanation {
        allowed,
        lines: out.lines,
    }
}

/// A unix socket: reachable from `run` when a `unix:` rule names it exactly (a socket the
/// command binds itself needs no rule).
fn unix_verdict(policy: &Policy, name: &crate::policy::UnixName, out: &mut Out) -> bool {
    let rules: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| matches!(&r.target, Target::Unix(u) if u == name))
        .collect();
    match rules.first() {
        Some(r) => {
            out.line(format_args!("allowed by {}: {}", reference(r), describe(r)));
            true
        }
        None => {
            out.line(
                "denied: no unix rule names this socket; under run, a unix socket bound outside \
                 the sandbox is out of reach unless a rule names it (the command's own sockets \
                 need none)",
            );
            false
        }
    }
}

/// The lines being written, each prefixed with the destination.
struct Out {
    subject: String,
    lines: Vec<String>,
}

impl Out {
    fn line(&mut self, text: impl fmt::Display) {
        self.lines.push(format!("{}: {text}", self.subject));
    }
}

/// `api.example.com:443/tcp`, `[2001:db8::1]:443/udp`, `10.0.0.1`, `example.com/udp`.
fn subject(host: &Host, port: Option<u16>, transport: Option<Transport>) -> String {
    let mut s = match (host, port) {
        (Host::Name(n), _) => n.clone(),
        (Host::Ip(IpAddr::V6(v6)), Some(_)) => format!("[{v6}]"),
        (Host::Ip(ip), _) => ip.to_string(),
        (Host::Unix(u), _) => return format!("unix:{u}"),
    };
    if let Some(p) = port {
        s.push_str(&format!(":{p}"));
    }
    if let Some(t) = transport {
        s.push_str(&format!("/{t}"));
    }
    s
}

/// Whether `rule` allows `port` (any port if `None`) over `transport` (any if `None`). ICMP
/// has no ports: an ICMP rule allows ICMP whatever port is asked.
fn permits(rule: &Rule, port: Option<u16>, transport: Option<Transport>) -> bool {
    let proto_ok = transport.is_none_or(|t| rule.protocol.bits() & t.bit() != 0);
    let port_ok = transport == Some(Transport::Icmp)
        || port.is_none_or(|p| rule.ports.iter().any(|&(lo, hi)| lo <= p && p <= hi));
    proto_ok && port_ok
}

/// `allowlists/x.yaml:12:5 allow[0]`.
fn at(rule: &Rule) -> String {
    let o = &rule.origin;
    format!(
        "{}:{}:{} allow[{}]",
        o.file.display(),
        o.line,
        o.column,
        o.index
    )
}

/// `allow[0] (allowlists/x.yaml:12:5)`, the short reference within a sentence.
fn reference(rule: &Rule) -> String {
    let o = &rule.origin;
    format!(
        "allow[{}] ({}:{}:{})",
        o.index,
        o.file.display(),
        o.line,
        o.column
    )
}

/// `host api.anthropic.com, ports 443, tcp`.
fn describe(rule: &Rule) -> String {
    let target = match &rule.target {
        Target::Host(h) => format!("host {h}"),
        Target::Net(n) if n.is_host() => format!("ip {}", n.addr()),
        Target::Net(n) => format!("cidr {n}"),
        Target::Inbound(n) if n.is_host() => format!("inbound {}", n.addr()),
        Target::Inbound(n) => format!("inbound {n}"),
        Target::Unix(u) => return format!("unix {u}"),
    };
    let ports = if rule.ports == [(0, u16::MAX)] {
        "every port".to_string()
    } else {
        format!("ports {}", ranges_text(&rule.ports))
    };
    let protocol = match rule.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "tcp and udp",
        Protocol::Icmp => return format!("{target}, icmp (echo requests)"),
    };
    let by_address = if matches!(rule.target, Target::Host(_)) && !rule.name_check {
        ", name_check: false"
    } else {
        ""
    };
    format!("{target}, {ports}, {protocol}{by_address}")
}

fn ranges_text(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|&(lo, hi)| range_text(lo, hi))
        .collect::<Vec<_>>()
        .join(", ")
}

fn range_text(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// What `rules` allow together: `ports 53/tcp, 53/udp, 443/tcp`, `every port over udp`.
fn union_text(rules: &[&Rule]) -> String {
    let mut set = PortSet::default();
    for r in rules {
        set.add(&r.ports, r.protocol);
    }
    let (mut listed, mut every) = (Vec::new(), Vec::new());
    for r in set.ranges() {
        if r.protos == PROTO_ICMP {
            every.push("icmp".to_string());
            continue;
        }
        if (r.lo, r.hi) == (0, u16::MAX) {
            every.push(match r.protos {
                PROTO_ANY => "every port".to_string(),
                PROTO_TCP => "every port over tcp".to_string(),
                _ => "every port over udp".to_string(),
            });
            continue;
        }
        let ports = range_text(r.lo, r.hi);
        if r.protos & PROTO_TCP != 0 {
            listed.push(format!("{ports}/tcp"));
        }
        if r.protos & PROTO_UDP != 0 {
            listed.push(format!("{ports}/udp"));
        }
    }
    let mut parts = Vec::new();
    if !listed.is_empty() {
        parts.push(format!("ports {}", listed.join(", ")));
    }
    parts.extend(every);
    parts.join(" and ")
}

/// `allow[0] (x.yaml:3:5)`, `allow[0] (x.yaml:3:5) and allow[4] (y.yaml:9:5)`.
fn references(rules: &[&Rule]) -> String {
    let refs: Vec<String> = rules.iter().map(|r| reference(r)).collect();
    match refs.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => refs.join(""),
    }
}

/// Port 53: steered to the resolver, whatever the address.
fn steered(policy: &Policy, host: &Host, transport: Option<Transport>, out: &mut Out) {
    out.line(
        "not reached: every DNS packet or connection (port 53, tcp and udp, any address) \
         goes to egress's own resolver, which answers only the names the allowlist permits",
    );
    let moot: Vec<&Rule> = match host {
        Host::Name(name) => policy.host_rules_for(name),
        Host::Ip(ip) => covering(policy, *ip),
        Host::Unix(_) => Vec::new(),
    }
    .into_iter()
    .filter(|r| permits(r, Some(DNS_PORT), transport))
    .collect();
    if !moot.is_empty() {
        out.line(format_args!(
            "note: {} would allow it, but has no effect on port 53 while DNS is steered",
            references(&moot)
        ));
    }
}

fn name_verdict(
    policy: &Policy,
    name: &str,
    port: Option<u16>,
    transport: Option<Transport>,
    out: &mut Out,
) -> bool {
    let matching = policy.host_rules_for(name);
    if matching.is_empty() {
        out.line("no rule permits this name: its DNS queries are refused");
        for hint in near_misses(policy, name).into_iter().take(MAX_HINTS) {
            out.line(format_args!("note: {hint}"));
        }
        return false;
    }
    let permitting: Vec<&Rule> = matching
        .iter()
        .copied()
        .filter(|r| permits(r, port, transport))
        .collect();
    if permitting.is_empty() {
        out.line(format_args!(
            "denied: the name is permitted by {} but only on {}",
            references(&matching),
            union_text(&matching)
        ));
        return false;
    }
    allowed_by(&permitting, out);
    if port.is_none() && permitting.len() > 1 {
        out.line(format_args!("in all: {}", union_text(&permitting)));
    }
    binding_note(policy, &permitting, port, transport, out);
    true
}

/// Name binding (issue 13) for a connection that `hosts` (host rules permitting it) admit
/// and no `cidr:`/`ip:` rule does: over TCP its first bytes must name a permitted name,
/// unless one of them says `name_check: false`; over UDP, QUIC Initials are refused.
fn binding_note(
    policy: &Policy,
    hosts: &[&Rule],
    port: Option<u16>,
    transport: Option<Transport>,
    out: &mut Out,
) {
    let over = |t: Transport| -> Vec<&Rule> {
        hosts
            .iter()
            .copied()
            .filter(|r| r.protocol.bits() & t.bit() != 0)
            .collect()
    };
    let (tcp, udp) = (over(Transport::Tcp), over(Transport::Udp));
    let checking: Vec<&Rule> = tcp.iter().copied().filter(|r| r.name_check).collect();
    let by_address: Vec<&Rule> = tcp.iter().copied().filter(|r| !r.name_check).collect();
    let len = out.lines.len();
    if transport.is_none_or(|t| t == Transport::Tcp) {
        match port {
            Some(p) if !checking.is_empty() && by_address.is_empty() => out.line(format_args!(
                "name-bound: its first bytes must be a TLS ClientHello or an HTTP/1.x request \
                 naming a name permitted on {p}/tcp ({}); another name, no name, ECH or \
                 another protocol is refused before a byte leaves (name_check: false admits \
                 by address)",
                names_on(policy, &checking, p)
            )),
            Some(p) if !by_address.is_empty() => out.line(format_args!(
                "admitted by address on {p}/tcp: {} has name_check: false, so any name or \
                 protocol passes",
                references(&by_address)
            )),
            None if !checking.is_empty() => out.line(format_args!(
                "name-bound over tcp through {}: a connection's first bytes must name a name \
                 permitted on its port (TLS server_name or HTTP Host); name_check: false \
                 admits by address",
                references(&checking)
            )),
            _ => {}
        }
    }
    if let (Some(p), Some(Transport::Udp)) = (port, transport)
        && !udp.is_empty()
        && udp.iter().all(|r| r.name_check)
    {
        out.line(format_args!(
            "QUIC Initial datagrams on {p}/udp are refused (their name is encrypted, so it \
             cannot be judged; QUIC clients fall back to TCP, where it is); other datagrams \
             pass (name_check: false admits QUIC by address)"
        ));
    }
    if policy.mode == Mode::Audit && out.lines.len() > len {
        out.line(
            "note: in audit mode a flight name binding would refuse is reported and let through",
        );
    }
}

/// The names a name-bound connection on `port` may carry: every host rule permitting the
/// port over TCP counts, `name_check` or not (a first flight is judged against all of
/// them), `first` first. `api.example.com, *.example.org`, at most [`MAX_NAMES`] and `N more`.
fn names_on(policy: &Policy, first: &[&Rule], port: u16) -> String {
    let mut names: Vec<String> = Vec::new();
    for r in first.iter().copied().chain(&policy.rules) {
        if let Target::Host(h) = &r.target
            && permits(r, Some(port), Some(Transport::Tcp))
            && !names.contains(&h.to_string())
        {
            names.push(h.to_string());
        }
    }
    let more = names.len().saturating_sub(MAX_NAMES);
    names.truncate(MAX_NAMES);
    if more > 0 {
        names.push(format!("{more} more"));
    }
    names.join(", ")
}

fn allowed_by(rules: &[&Rule], out: &mut Out) {
    for (i, r) in rules.iter().enumerate() {
        let how = if i == 0 { "allowed" } else { "also allowed" };
        out.line(format_args!("{how} by {} ({})", at(r), describe(r)));
    }
}

/// Host rules that almost cover `name`: the apex of a wildcard, or a name below an exact rule.
fn near_misses(policy: &Policy, name: &str) -> Vec<String> {
    let mut hints = Vec::new();
    for r in &policy.rules {
        let Target::Host(h) = &r.target else {
            continue;
        };
        match h {
            HostPattern::Wildcard(suffix) if suffix == name => hints.push(format!(
                "{} ({}) covers only names below {suffix}, not {suffix} itself; add host: \
                 {suffix}",
                at(r),
                h
            )),
            HostPattern::Exact(exact)
                if name
                    .strip_suffix(exact.as_str())
                    .is_some_and(|head| head.ends_with('.')) =>
            {
                hints.push(format!(
                    "{} ({exact}) is an exact name; \"*.{exact}\" would cover {name}",
                    at(r)
                ));
            }
            _ => {}
        }
    }
    hints
}

/// The `cidr:`/`ip:` rules containing `ip`, longest prefix first (policy order within one
/// length).
fn covering(policy: &Policy, ip: IpAddr) -> Vec<&Rule> {
    let mut rules: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| matches!(&r.target, Target::Net(n) if n.contains(ip)))
        .collect();
    rules.sort_by_key(|r| match &r.target {
        Target::Net(n) => std::cmp::Reverse(n.prefix_len()),
        Target::Host(_) | Target::Inbound(_) | Target::Unix(_) => std::cmp::Reverse(0),
    });
    rules
}

fn ip_verdict(
    policy: &Policy,
    ip: IpAddr,
    port: Option<u16>,
    transport: Option<Transport>,
    out: &mut Out,
) -> bool {
    let canonical = ip.to_canonical();
    if canonical != ip {
        out.line(format_args!(
            "judged as the IPv4 address it carries, {canonical}"
        ));
    }
    if transport.is_none_or(|t| t == Transport::Tcp) {
        inbound_note(policy, canonical, port, out);
    }
    let covering = covering(policy, canonical);
    let permitting: Vec<&Rule> = covering
        .iter()
        .copied()
        .filter(|r| permits(r, port, transport))
        .collect();
    if !permitting.is_empty() {
        allowed_by(&permitting, out);
        if port.is_none() && permitting.len() > 1 {
            out.line(format_args!("in all: {}", union_text(&permitting)));
        }
        return true;
    }
    if covering.is_empty() {
        out.line("denied: no cidr or ip rule covers this address");
    } else {
        out.line(format_args!(
            "denied: the address is covered by {} but only on {}",
            references(&covering),
            union_text(&covering)
        ));
    }
    dns_note(policy, canonical, port, transport, out);
    false
}

/// What the `inbound:` rules say about `ip` as a peer connecting in (TCP) to a local port
/// (`port`, when given): one line, only when some inbound rule covers the address. It does
/// not change the verdict, which is about reaching `ip`.
fn inbound_note(policy: &Policy, ip: IpAddr, port: Option<u16>, out: &mut Out) {
    let covering = policy.inbound_rules_for(ip);
    if covering.is_empty() {
        return;
    }
    let permitting: Vec<&Rule> = covering
        .iter()
        .copied()
        .filter(|r| permits(r, port, Some(Transport::Tcp)))
        .collect();
    match (port, permitting.is_empty()) {
        (Some(p), false) => out.line(format_args!(
            "allowed inbound: may connect in to local port {p} by {}",
            references(&permitting)
        )),
        (Some(p), true) => out.line(format_args!(
            "not allowed inbound to local port {p}: {} allow only {}",
            references(&covering),
            union_text(&covering)
        )),
        (None, _) => out.line(format_args!(
            "allowed inbound: may connect in to local {} by {}",
            union_text(&covering),
            references(&covering)
        )),
    }
}

/// What host rules could still do for an address no static rule allows.
fn dns_note(
    policy: &Policy,
    ip: IpAddr,
    port: Option<u16>,
    transport: Option<Transport>,
    out: &mut Out,
) {
    let hosts: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| matches!(r.target, Target::Host(_)) && permits(r, port, transport))
        .collect();
    if let Some(what) = guarded(ip, policy.dns.block_private) {
        out.line(format_args!(
            "never allowed through host rules: {what} is not allowed from DNS answers (DNS \
             rebinding guard); only a cidr or ip rule can allow it"
        ));
    } else if hosts.is_empty() {
        out.line("no host rule allows this port and protocol either, so no DNS answer can");
    } else {
        let mut names: Vec<String> = hosts
            .iter()
            .take(MAX_NAMES)
            .map(|r| match &r.target {
                Target::Host(h) => h.to_string(),
                Target::Net(n) | Target::Inbound(n) => n.to_string(),
                Target::Unix(u) => u.to_string(),
            })
            .collect();
        if hosts.len() > MAX_NAMES {
            names.push(format!("{} more", hosts.len() - MAX_NAMES));
        }
        out.line(format_args!(
            "host rules allow an address only after DNS answered it for their name: allowed \
             while it is an answer for {}",
            names.join(", ")
        ));
        binding_note(policy, &hosts, port, transport, out);
    }
}

/// The rule that almost allowed a denied connect to `ip` (answered for `host`, if known): the
/// most specific cidr/ip rule covering the address, else the first host rule for the name.
/// For deny events with reason `port`: `allow[0] (allowlists/x.yaml:12:5): host
/// api.anthropic.com, ports 443, tcp`.
pub fn nearest_rule(policy: &Policy, ip: IpAddr, host: Option<&str>) -> Option<String> {
    let by_net = covering(policy, ip).into_iter().next();
    let by_host = host.and_then(|h| policy.host_rules_for(h).into_iter().next());
    by_net
        .or(by_host)
        .map(|r| format!("{}: {}", reference(r), describe(r)))
}
