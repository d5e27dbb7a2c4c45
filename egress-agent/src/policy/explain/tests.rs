//! Tests of `explain`: each finding's wording and verdict on small policies.

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
        ("/run/x.sock", "write a unix socket as unix:/run/x.sock"),
        ("@name", "write a unix socket as unix:@name"),
        ("unix:run/x.sock", "absolute path"),
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
                 (host api.anthropic.com, ports 443, tcp)",
            "api.anthropic.com:443/tcp: name-bound: its first bytes must be a TLS \
                 ClientHello or an HTTP/1.x request naming a name permitted on 443/tcp \
                 (api.anthropic.com, *.github.com, github.com); another name, no name, ECH or \
                 another protocol is refused before a byte leaves (name_check: false admits \
                 by address)"
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

    let p = policy("version: 1\nallow:\n  - host: \"*.example.com\"\n  - host: api.example.org\n");
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
                 ports 22, 443, tcp and udp)",
            // SSH carries no name: such a rule wants name_check: false.
            "github.com:22/tcp: name-bound: its first bytes must be a TLS ClientHello or an \
                 HTTP/1.x request naming a name permitted on 22/tcp (github.com); another \
                 name, no name, ECH or another protocol is refused before a byte leaves \
                 (name_check: false admits by address)"
        ]
    );
    let p = policy(
        "version: 1\nallow:\n  - host: a.example.com\n    ports: 443\n    protocol: tcp\n  \
             - host: \"*.example.com\"\n    ports: [443, 53]\n    protocol: udp\n",
    );
    let e = run(&p, "a.example.com", None);
    assert!(e.allowed);
    assert_eq!(e.lines.len(), 4, "{:?}", e.lines);
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
                 ports 443, tcp and udp)",
            "api.github.com: name-bound over tcp through allow[1] (allowlists/x.yaml:6:5): a \
                 connection's first bytes must name a name permitted on its port (TLS \
                 server_name or HTTP Host); name_check: false admits by address"
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
            "10.1.2.3:443/tcp: name-bound: its first bytes must be a TLS ClientHello or an \
                 HTTP/1.x request naming a name permitted on 443/tcp (api.anthropic.com, \
                 *.github.com, github.com); another name, no name, ECH or another protocol is \
                 refused before a byte leaves (name_check: false admits by address)",
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
    assert_eq!(e.lines.len(), 3, "{:?}", e.lines);
    assert!(e.lines[2].contains("name-bound over tcp"), "{:?}", e.lines);
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
    assert_eq!(e.lines.len(), 3, "{:?}", e.lines);
    assert_eq!(
        e.lines[2],
        "a.example.com:443/tcp: note: in audit mode a flight name binding would refuse is \
             reported and let through"
    );
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

const SHARED: &str = "version: 1
allow:
  - host: api.example.com
    ports: [443]
  - host: \"*.cdn.example.com\"
    ports: [443, 8443]
    protocol: tcp
  - host: git.example.com
    ports: [22]
    protocol: tcp
    name_check: false
  - host: db.example.com
    ports: [5432, 443]
    protocol: tcp
    name_check: false
  - cidr: 192.0.2.0/24
    ports: [443]
";

#[test]
fn a_destination_admitted_by_host_rules_only_is_name_bound_and_names_what_passes() {
    let p = policy(SHARED);
    let e = run(&p, "api.example.com:443", None);
    assert!(e.allowed);
    assert_eq!(
        e.lines[1],
        "api.example.com:443/tcp: name-bound: its first bytes must be a TLS ClientHello or an \
             HTTP/1.x request naming a name permitted on 443/tcp (api.example.com, \
             *.cdn.example.com, db.example.com); another name, no name, ECH or another \
             protocol is refused before a byte leaves (name_check: false admits by address)",
        "every host rule's name passes on the port, name_check: false ones too"
    );
    // 8443: only the wildcard.
    let e = run(&p, "x.cdn.example.com:8443", None);
    assert!(
        e.lines[1].contains("permitted on 8443/tcp (*.cdn.example.com);"),
        "{:?}",
        e.lines
    );
    // An address no static rule covers, reached through host rules.
    let e = run(&p, "198.51.100.9:8443", None);
    assert!(!e.allowed);
    assert!(
        e.lines.last().unwrap().contains("name-bound: ")
            && e.lines.last().unwrap().contains("(*.cdn.example.com)"),
        "{:?}",
        e.lines
    );
    // A cidr rule admits by address: never name-bound.
    let e = run(&p, "192.0.2.7:443", None);
    assert!(e.allowed);
    assert_eq!(e.lines.len(), 1, "{:?}", e.lines);
}

#[test]
fn name_check_false_is_said_to_admit_by_address() {
    let p = policy(SHARED);
    let e = run(&p, "git.example.com:22", None);
    assert!(e.allowed);
    assert_eq!(
        e.lines,
        [
            "git.example.com:22/tcp: allowed by allowlists/x.yaml:8:5 allow[2] (host \
                 git.example.com, ports 22, tcp, name_check: false)",
            "git.example.com:22/tcp: admitted by address on 22/tcp: allow[2] \
                 (allowlists/x.yaml:8:5) has name_check: false, so any name or protocol passes",
        ]
    );
    // An address reached through host rules, one of which admits by address on the port.
    let e = run(&p, "198.51.100.9:443", None);
    assert!(
        e.lines
            .last()
            .unwrap()
            .ends_with("allow[3] (allowlists/x.yaml:12:5) has name_check: false, so any name or protocol passes"),
        "{:?}",
        e.lines
    );
}

#[test]
fn quic_to_a_name_bound_destination_is_said_to_be_refused() {
    let p = policy(SHARED);
    let e = run(&p, "api.example.com:443", Some(Transport::Udp));
    assert!(e.allowed);
    assert_eq!(
        e.lines[1],
        "api.example.com:443/udp: QUIC Initial datagrams on 443/udp are refused (their name is \
             encrypted, so it cannot be judged; QUIC clients fall back to TCP, where it is); \
             other datagrams pass (name_check: false admits QUIC by address)"
    );
    let p = policy(
        "version: 1\nallow:\n  - host: q.example.com\n    ports: [443]\n    name_check: false\n",
    );
    let e = run(&p, "q.example.com:443", Some(Transport::Udp));
    assert_eq!(e.lines.len(), 1, "{:?}", e.lines);
}

#[test]
fn the_names_that_pass_are_capped() {
    let rules: String = (0..6)
        .map(|i| format!("  - host: n{i}.example.com\n    ports: [443]\n"))
        .collect();
    let p = policy(&format!("version: 1\nallow:\n{rules}"));
    let e = run(&p, "n0.example.com:443", None);
    assert!(
        e.lines[1]
            .contains("(n0.example.com, n1.example.com, n2.example.com, n3.example.com, 2 more)"),
        "{:?}",
        e.lines
    );
}
