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
//!   it for the rule's name, and never a link-local or cloud metadata address (the DNS
//!   rebinding guard, [`is_guarded`]).
//! - Port 53 (TCP and UDP) goes to egress's own resolver whatever the address, so the address
//!   itself is never reached and rules for it have no effect.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use egress_common::consts::{PROTO_ANY, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use crate::{
    policy::rebinding::is_guarded,
    policy::{HostPattern, Mode, Policy, PortSet, Protocol, Rule, Target},
};

/// The port every DNS packet or connection is steered from.
const DNS_PORT: u16 = 53;

/// How many near-miss notes a refused name gets at most.
const MAX_HINTS: usize = 3;

/// How many host rules a note about DNS-derived addresses names at most.
const MAX_NAMES: usize = 4;

/// The protocol of one connection or datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo (ping); it has no ports.
    Icmp,
}

impl Transport {
    /// The `PROTO_*` bit of this protocol.
    fn bit(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Icmp => PROTO_ICMP,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        })
    }
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            _ => Err(format!("{s:?} is not a protocol (tcp, udp or icmp)")),
        }
    }
}

/// What a destination names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name, lowercased, without the trailing dot.
    Name(String),
    /// An address (IPv4-mapped IPv6 is kept as written and judged as its IPv4 address).
    Ip(IpAddr),
    /// A unix socket: `unix:/path` or `unix:@name` (what `run` lets the command reach).
    Unix(crate::policy::UnixName),
}

/// A destination to explain: a name or an address, and maybe a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The name or address.
    pub host: Host,
    /// The port, if one was given.
    pub port: Option<u16>,
}

impl FromStr for Destination {
    type Err = String;

    /// Parses `name`, `name:port`, `ip`, `ip:port`, `[ipv6]`, `[ipv6]:port`, or a unix
    /// socket as `unix:/path` or `unix:@name`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(u) = t.strip_prefix("unix:") {
            return Ok(Self {
                host: Host::Unix(u.parse()?),
                port: None,
            });
        }
        if t.is_empty() {
            return Err(
                "empty destination: give NAME, NAME:PORT, IP, IP:PORT or [IPV6]:PORT".into(),
            );
        }
        if t.contains("://") || t.contains('/') {
            return Err(format!(
                "{t:?} is not a destination: give a host name or address and a port, like \
                 api.example.com:443, not a URL or a network"
            ));
        }
        if let Some(rest) = t.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{t:?}: missing ] after the IPv6 address"))?;
            let ip: Ipv6Addr = inside
                .parse()
                .map_err(|_| format!("{inside:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(p) => Some(parse_port(p)?),
                    None => return Err(format!("{t:?}: expected :PORT after ]")),
                },
            };
            return Ok(Self {
                host: Host::Ip(IpAddr::V6(ip)),
                port,
            });
        }
        // A bare IPv6 address has colons of its own: it takes no port without brackets.
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Self {
                host: Host::Ip(ip),
                port: None,
            });
        }
        let (host, port) = match t.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(p)?)),
            None => (t, None),
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            if ip.is_ipv6() {
                return Err(format!(
                    "{t:?}: write an IPv6 address with a port in brackets, like [{ip}]:{}",
                    port.unwrap_or(443)
                ));
            }
            return Ok(Self {
                host: Host::Ip(ip),
                port,
            });
        }
        match host.parse::<HostPattern>()? {
            HostPattern::Exact(name) => Ok(Self {
                host: Host::Name(name),
                port,
            }),
            HostPattern::Wildcard(_) => Err(format!(
                "{host:?} is a wildcard: explain one name, like a.{}",
                host.trim_start_matches("*.")
            )),
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("{p:?} is not a port (1-65535)")),
    }
}

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
    format!("{target}, {ports}, {protocol}")
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
    true
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
    if is_guarded(ip) {
        out.line(
            "never allowed through host rules: link-local and cloud metadata addresses are not \
             allowed from DNS answers (DNS rebinding guard); only a cidr or ip rule can allow it",
        );
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy;

    const FILE: &str = "allowlists/x.yaml";

    fn policy(yaml: &str) -> Policy {
        policy::parse_str(yaml, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn run(p: &Policy, target: &str, transport: Option<Transport>) -> Explanation {
        let destination = target.parse().unwrap_or_else(|e| panic!("{target}: {e}"));
        explain(
            p,
            &Query {
                destination,
                transport,
            },
        )
    }

    fn lines(p: &Policy, target: &str) -> Vec<String> {
        run(p, target, None).lines
    }

    const CLAUDE: &str = "version: 1
allow:
  - host: api.anthropic.com
    ports: [443]
    protocol: tcp
  - host: \"*.github.com\"
    ports: [443]
  - host: github.com
    ports: [22, 443]
  - cidr: 10.0.0.0/8
    ports: [80]
    protocol: tcp
  - cidr: 10.1.0.0/16
    ports: [\"8000-8080\"]
  - ip: 9.9.9.9
    ports: 53
  - ip: 2001:db8::1
";

    #[test]
    fn destinations_parse() {
        let d = |s: &str| s.parse::<Destination>();
        let name = |n: &str, port| Destination {
            host: Host::Name(n.into()),
            port,
        };
        let ip = |i: &str, port| Destination {
            host: Host::Ip(i.parse().unwrap()),
            port,
        };
        assert_eq!(d("API.Anthropic.com."), Ok(name("api.anthropic.com", None)));
        assert_eq!(
            d("api.anthropic.com:443"),
            Ok(name("api.anthropic.com", Some(443)))
        );
        assert_eq!(d("localhost:8080"), Ok(name("localhost", Some(8080))));
        assert_eq!(d("10.0.0.1"), Ok(ip("10.0.0.1", None)));
        assert_eq!(d("10.0.0.1:80"), Ok(ip("10.0.0.1", Some(80))));
        assert_eq!(d("2001:db8::1"), Ok(ip("2001:db8::1", None)));
        assert_eq!(d("[2001:db8::1]"), Ok(ip("2001:db8::1", None)));
        assert_eq!(d("[2001:db8::1]:443"), Ok(ip("2001:db8::1", Some(443))));
        assert_eq!(d(" ::ffff:10.0.0.1 "), Ok(ip("::ffff:10.0.0.1", None)));
        for (bad, why) in [
            ("", "empty destination"),
            ("a.com:0", "is not a port"),
            ("a.com:65536", "is not a port"),
            ("a.com:+1", "is not a port"),
            ("a.com:", "is not a port"),
            ("[2001:db8::1", "missing ]"),
            ("[10.0.0.1]:80", "is not an IPv6 address"),
            ("[2001:db8::1]443", "expected :PORT"),
            ("https://a.com/", "not a URL"),
            ("10.0.0.0/8", "not a URL or a network"),
            ("*.a.com", "is a wildcard"),
            ("a..com", "is not a host name"),
        ] {
            let e = d(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn name_allowed_names_the_rule() {
        let p = policy(CLAUDE);
        let e = run(&p, "api.anthropic.com:443", None);
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "api.anthropic.com:443/tcp: allowed by allowlists/x.yaml:3:5 allow[0] \
                 (host api.anthropic.com, ports 443, tcp)"
            ]
        );
    }

    #[test]
    fn name_on_another_port_or_protocol_is_denied() {
        let p = policy(CLAUDE);
        let e = run(&p, "api.anthropic.com:80", None);
        assert!(!e.allowed);
        assert_eq!(
            e.lines,
            [
                "api.anthropic.com:80/tcp: denied: the name is permitted by allow[0] \
                 (allowlists/x.yaml:3:5) but only on ports 443/tcp"
            ]
        );
        let e = run(&p, "api.anthropic.com:443", Some(Transport::Udp));
        assert!(!e.allowed);
        assert!(e.lines[0].starts_with("api.anthropic.com:443/udp: denied"));
    }

    #[test]
    fn unknown_names_are_refused_with_near_misses() {
        let p = policy(CLAUDE);
        let e = run(&p, "evil.test", None);
        assert!(!e.allowed);
        assert_eq!(
            e.lines,
            ["evil.test: no rule permits this name: its DNS queries are refused"]
        );

        let p =
            policy("version: 1\nallow:\n  - host: \"*.example.com\"\n  - host: api.example.org\n");
        let l = lines(&p, "example.com:443");
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(
            l[1],
            "example.com:443/tcp: note: allowlists/x.yaml:3:5 allow[0] (*.example.com) covers \
             only names below example.com, not example.com itself; add host: example.com"
        );
        let l = lines(&p, "eu.api.example.org");
        assert_eq!(
            l[1],
            "eu.api.example.org: note: allowlists/x.yaml:4:5 allow[1] (api.example.org) is an \
             exact name; \"*.api.example.org\" would cover eu.api.example.org"
        );
        // Not a label boundary: no hint.
        assert_eq!(lines(&p, "xapi.example.org").len(), 1);
    }

    #[test]
    fn several_rules_for_one_name() {
        let p = policy(CLAUDE);
        // github.com: its own rule only (the wildcard does not cover the apex).
        let e = run(&p, "github.com:22", None);
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "github.com:22/tcp: allowed by allowlists/x.yaml:8:5 allow[2] (host github.com, \
                 ports 22, 443, tcp and udp)"
            ]
        );
        let p = policy(
            "version: 1\nallow:\n  - host: a.example.com\n    ports: 443\n    protocol: tcp\n  \
             - host: \"*.example.com\"\n    ports: [443, 53]\n    protocol: udp\n",
        );
        let e = run(&p, "a.example.com", None);
        assert!(e.allowed);
        assert_eq!(e.lines.len(), 3, "{:?}", e.lines);
        assert!(e.lines[1].starts_with("a.example.com: also allowed by"));
        assert_eq!(
            e.lines[2],
            "a.example.com: in all: ports 53/udp, 443/tcp, 443/udp"
        );
        let e = run(&p, "a.example.com:22", None);
        assert_eq!(
            e.lines,
            [
                "a.example.com:22/tcp: denied: the name is permitted by allow[0] \
                 (allowlists/x.yaml:3:5) and allow[1] (allowlists/x.yaml:6:5) but only on \
                 ports 53/udp, 443/tcp, 443/udp"
            ]
        );
    }

    #[test]
    fn name_without_port_lists_the_rule() {
        let p = policy(CLAUDE);
        let e = run(&p, "api.github.com", None);
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "api.github.com: allowed by allowlists/x.yaml:6:5 allow[1] (host *.github.com, \
                 ports 443, tcp and udp)"
            ]
        );
        // Only UDP asked for, the rule is TCP only.
        let e = run(&p, "api.anthropic.com", Some(Transport::Udp));
        assert!(!e.allowed);
        assert_eq!(
            e.lines,
            [
                "api.anthropic.com/udp: denied: the name is permitted by allow[0] \
                 (allowlists/x.yaml:3:5) but only on ports 443/tcp"
            ]
        );
    }

    #[test]
    fn addresses_take_every_covering_prefix() {
        let p = policy(CLAUDE);
        // 10.1.2.3 is in 10.1.0.0/16 (8000-8080) and 10.0.0.0/8 (80/tcp): both count.
        let e = run(&p, "10.1.2.3:80", None);
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "10.1.2.3:80/tcp: allowed by allowlists/x.yaml:10:5 allow[3] (cidr 10.0.0.0/8, \
                 ports 80, tcp)"
            ]
        );
        let e = run(&p, "10.1.2.3", None);
        assert!(e.allowed);
        assert_eq!(e.lines.len(), 3, "{:?}", e.lines);
        assert!(
            e.lines[0].contains("allow[4] (cidr 10.1.0.0/16,"),
            "{:?}",
            e.lines
        );
        assert!(e.lines[1].contains("also allowed by allowlists/x.yaml:10:5 allow[3]"));
        assert_eq!(
            e.lines[2],
            "10.1.2.3: in all: ports 80/tcp, 8000-8080/tcp, 8000-8080/udp"
        );

        let e = run(&p, "10.1.2.3:443", None);
        assert!(!e.allowed);
        assert_eq!(
            e.lines,
            [
                "10.1.2.3:443/tcp: denied: the address is covered by allow[4] \
                 (allowlists/x.yaml:13:5) and allow[3] (allowlists/x.yaml:10:5) but only on \
                 ports 80/tcp, 8000-8080/tcp, 8000-8080/udp",
                "10.1.2.3:443/tcp: host rules allow an address only after DNS answered it for \
                 their name: allowed while it is an answer for api.anthropic.com, *.github.com, \
                 github.com",
            ]
        );
    }

    #[test]
    fn uncovered_addresses_point_at_host_rules() {
        let p = policy(CLAUDE);
        let e = run(&p, "198.51.100.7:8443", None);
        assert!(!e.allowed);
        assert_eq!(
            e.lines,
            [
                "198.51.100.7:8443/tcp: denied: no cidr or ip rule covers this address",
                "198.51.100.7:8443/tcp: no host rule allows this port and protocol either, so \
                 no DNS answer can",
            ]
        );
        let e = run(&p, "198.51.100.7", None);
        assert!(!e.allowed);
        assert_eq!(e.lines.len(), 2);
    }

    #[test]
    fn metadata_and_link_local_are_never_allowed_by_host_rules() {
        let p = policy(CLAUDE);
        for target in [
            "169.254.169.254:443",
            "169.254.1.1:443",
            "[fe80::1]:443",
            "[fd00:ec2::254]:443",
            "100.100.100.200:443",
            "[::ffff:169.254.169.254]:443",
        ] {
            let e = run(&p, target, None);
            assert!(!e.allowed, "{target}");
            let last = e.lines.last().unwrap();
            assert!(
                last.contains("never allowed through host rules")
                    && last.contains("DNS rebinding guard"),
                "{target}: {last}"
            );
        }
        // A cidr rule still can.
        let p = policy("version: 1\nallow:\n  - cidr: 169.254.169.254/32\n    ports: 80\n");
        assert!(run(&p, "169.254.169.254:80", None).allowed);
    }

    #[test]
    fn mapped_addresses_are_judged_as_ipv4() {
        let p = policy(CLAUDE);
        let e = run(&p, "[::ffff:10.0.0.1]:80", None);
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "[::ffff:10.0.0.1]:80/tcp: judged as the IPv4 address it carries, 10.0.0.1",
                "[::ffff:10.0.0.1]:80/tcp: allowed by allowlists/x.yaml:10:5 allow[3] \
                 (cidr 10.0.0.0/8, ports 80, tcp)",
            ]
        );
    }

    #[test]
    fn ipv6_rules() {
        let p = policy(CLAUDE);
        let e = run(&p, "[2001:db8::1]:5000", Some(Transport::Udp));
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "[2001:db8::1]:5000/udp: allowed by allowlists/x.yaml:17:5 allow[6] \
                 (ip 2001:db8::1, every port, tcp and udp)"
            ]
        );
        assert!(!run(&p, "[2001:db8::2]:5000", None).allowed);
    }

    #[test]
    fn port_53_is_steered_whatever_the_rules() {
        let p = policy(CLAUDE);
        let e = run(&p, "9.9.9.9:53", Some(Transport::Udp));
        assert!(!e.allowed);
        assert_eq!(e.lines.len(), 2, "{:?}", e.lines);
        assert!(e.lines[0].starts_with("9.9.9.9:53/udp: not reached: every DNS packet"));
        assert_eq!(
            e.lines[1],
            "9.9.9.9:53/udp: note: allow[5] (allowlists/x.yaml:15:5) would allow it, but has \
             no effect on port 53 while DNS is steered"
        );
        let e = run(&p, "evil.test:53", None);
        assert!(!e.allowed);
        assert_eq!(e.lines.len(), 1);
    }

    #[test]
    fn audit_mode_says_nothing_is_blocked() {
        let p = policy("version: 1\nmode: audit\nallow:\n  - host: a.example.com\n");
        let e = run(&p, "b.example.com:443", None);
        assert!(!e.allowed);
        assert!(e.lines.last().unwrap().contains("audit mode"));
        let e = run(&p, "a.example.com:443", None);
        assert!(e.allowed);
        assert_eq!(e.lines.len(), 1);
    }

    #[test]
    fn transports_parse() {
        assert_eq!("tcp".parse(), Ok(Transport::Tcp));
        assert_eq!("UDP".parse(), Ok(Transport::Udp));
        assert_eq!("icmp".parse(), Ok(Transport::Icmp));
        assert!("any".parse::<Transport>().is_err());
    }

    #[test]
    fn icmp_rules() {
        let p = policy(
            "version: 1\nallow:\n  - cidr: 198.51.100.0/24\n    protocol: icmp\n  - ip: \
             198.51.100.7\n    ports: [443]\n    protocol: tcp\n",
        );
        let e = run(&p, "198.51.100.7", Some(Transport::Icmp));
        assert!(e.allowed);
        assert_eq!(
            e.lines,
            [
                "198.51.100.7/icmp: allowed by allowlists/x.yaml:3:5 allow[0] (cidr \
              198.51.100.0/24, icmp (echo requests))"
            ]
        );
        let e = run(&p, "198.51.100.7", None);
        assert_eq!(
            e.lines.last().unwrap(),
            "198.51.100.7: in all: ports 443/tcp and icmp"
        );
        // ICMP allows no port over tcp or udp.
        let e = run(&p, "198.51.100.9:443", None);
        assert!(!e.allowed);
        assert!(e.lines[0].ends_with("but only on icmp"), "{:?}", e.lines);
        // tcp/udp rules never allow icmp.
        let e = run(&p, "203.0.113.1", Some(Transport::Icmp));
        assert!(!e.allowed);
        let q = policy("version: 1\nallow:\n  - cidr: 0.0.0.0/0\n");
        assert!(!run(&q, "203.0.113.1", Some(Transport::Icmp)).allowed);
    }

    #[test]
    fn a_peer_is_said_to_be_allowed_inbound() {
        let p = policy(
            "version: 1\nallow:\n  - inbound: 203.0.113.0/24\n    ports: [8080]\n  - ip: 198.51.100.1\n",
        );
        let yes = lines(&p, "203.0.113.7:8080");
        assert!(
            yes.iter().any(|l| l.contains(
                "allowed inbound: may connect in to local port 8080 by allow[0] (allowlists/x.yaml:3:5)"
            )),
            "{yes:#?}"
        );
        let no = lines(&p, "203.0.113.7:22");
        assert!(
            no.iter()
                .any(|l| l.contains("not allowed inbound to local port 22")),
            "{no:#?}"
        );
        // Inbound rules never allow reaching the peer.
        assert!(!run(&p, "203.0.113.7:8080", None).allowed);
        assert!(
            !lines(&p, "198.51.100.1:80")
                .iter()
                .any(|l| l.contains("inbound")),
            "no note where no inbound rule covers the address"
        );
    }
}
