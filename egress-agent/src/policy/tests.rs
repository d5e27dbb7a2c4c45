//! Tests of the whole module: error messages with exact positions, includes, compilation.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use egress_common::consts::{
    PROTO_ANY, PROTO_ICMP, PROTO_NAMED, PROTO_NAMED_UDP, PROTO_TCP, PROTO_UDP,
};

use super::*;

const FILE: &str = "allowlists/x.yaml";

fn parse(yaml: &str) -> Policy {
    parse_str(yaml, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"))
}

/// The message of the error `yaml` must give.
fn err(yaml: &str) -> String {
    match parse_str(yaml, Path::new(FILE)) {
        Ok(p) => panic!("expected an error, got {p:?}"),
        Err(e) => e.to_string(),
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy")
}

fn net(s: &str) -> Net {
    s.parse().unwrap()
}

#[test]
fn the_example_of_the_design_parses() {
    let p = parse(
        r#"
version: 1
name: claude-code
mode: enforce
dns:
  min_ttl: 30s
  max_ttl: 1h
  grace: 60s
  upstream: system
allow:
  - host: api.anthropic.com
    ports: [443]
  - host: "*.githubusercontent.com"
    ports: [443]
  - cidr: 192.0.2.0/24
    ports: [80, "8000-8080"]
    protocol: tcp
  - ip: 2001:db8::1
"#,
    );
    assert_eq!(p.name, "claude-code");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.dns, DnsSettings::default());
    assert_eq!(p.files, vec![PathBuf::from(FILE)]);
    assert_eq!(p.rules.len(), 4);
    let r = &p.rules[2];
    assert_eq!(r.target, Target::Net(net("192.0.2.0/24")));
    assert_eq!(r.ports, vec![(80, 80), (8000, 8080)]);
    assert_eq!(r.protocol, Protocol::Tcp);
    assert_eq!(
        r.origin,
        Origin {
            file: FILE.into(),
            line: 15,
            column: 5,
            index: 2
        }
    );
    assert_eq!(
        p.rules[1].target,
        Target::Host(HostPattern::Wildcard("githubusercontent.com".into()))
    );
    assert_eq!(p.rules[3].target, Target::Net(net("2001:db8::1/128")));
    assert_eq!(p.rules[3].ports, vec![(0, 65535)]);
    assert_eq!(p.rules[3].protocol, Protocol::Any);
    assert_eq!(
        p.summary(),
        r#"name "claude-code", mode enforce, 4 rules (1 host, 1 wildcard, 2 addresses), 0 includes"#
    );
}

#[test]
fn defaults() {
    let p = parse("version: 1\n");
    assert_eq!(p.name, "x");
    assert_eq!(p.mode, Mode::Enforce);
    assert!(p.rules.is_empty());
    assert_eq!(p.dns.min_ttl, Duration::from_secs(30));
    assert_eq!(p.dns.max_ttl, Duration::from_secs(3600));
    assert_eq!(p.dns.grace, Duration::from_secs(60));
    assert_eq!(p.dns.upstream, Upstream::System);
    let p = parse("version: 1\nallow: []\ndns: {}\nmode: audit\n");
    assert_eq!(p.mode, Mode::Audit);
    assert!(p.rules.is_empty());
    let p = parse("version: 1\nallow:\n");
    assert!(p.rules.is_empty());
}

#[test]
fn dns_settings() {
    let p = parse(
        "version: 1\ndns:\n  min_ttl: 5\n  max_ttl: 5m\n  grace: 500ms\n  upstream: [9.9.9.9, \"[2001:db8::1]:5353\", \"127.0.0.53\"]\n",
    );
    assert_eq!(p.dns.min_ttl, Duration::from_secs(5));
    assert_eq!(p.dns.max_ttl, Duration::from_secs(300));
    assert_eq!(p.dns.grace, Duration::from_millis(500));
    assert_eq!(
        p.dns.upstream,
        Upstream::Servers(vec![
            "9.9.9.9:53".parse().unwrap(),
            "[2001:db8::1]:5353".parse().unwrap(),
            "127.0.0.53:53".parse().unwrap(),
        ])
    );
    // Equal bounds are fine.
    parse("version: 1\ndns: {min_ttl: 1m, max_ttl: 60s}\n");
}

#[test]
fn ports_forms() {
    let p = parse(
        r#"version: 1
allow:
  - {ip: 10.0.0.1, ports: 443}
  - {ip: 10.0.0.1, ports: "8000-8080"}
  - {ip: 10.0.0.1, ports: "53"}
  - {ip: 10.0.0.1, ports: [443, 80, "81-90", "85-100", 1]}
  - {ip: 10.0.0.1, ports: ["1-65535"]}
  - {ip: 10.0.0.1, ports: [65535]}
"#,
    );
    let ports: Vec<_> = p.rules.iter().map(|r| r.ports.clone()).collect();
    assert_eq!(
        ports,
        vec![
            vec![(443, 443)],
            vec![(8000, 8080)],
            vec![(53, 53)],
            vec![(1, 1), (80, 100), (443, 443)],
            vec![(1, 65535)],
            vec![(65535, 65535)],
        ]
    );
}

#[test]
fn error_unknown_fields_point_at_the_key() {
    assert_eq!(
        err("version: 1\nallow:\n  - host: a.example.com\n    prot: tcp\n"),
        r#"allowlists/x.yaml:4:5: allow[0]: unknown field "prot", expected one of host, cidr, ip, inbound, unix, ports, protocol, name_check"#
    );
    assert_eq!(
        err("version: 1\nallow:\n- host: a.example.com\n  prot: tcp\n"),
        r#"allowlists/x.yaml:4:3: allow[0]: unknown field "prot", expected one of host, cidr, ip, inbound, unix, ports, protocol, name_check"#
    );
    assert_eq!(
        err("version: 1\nallwo: []\n"),
        r#"allowlists/x.yaml:2:1: unknown field "allwo", expected one of version, name, mode, include, dns, allow, writable"#
    );
    assert_eq!(
        err("version: 1\ndns:\n  min: 3s\n"),
        r#"allowlists/x.yaml:3:3: dns: unknown field "min", expected one of min_ttl, max_ttl, grace, upstream, block_private"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - {ip: 10.0.0.1, port: 80}\n"),
        r#"allowlists/x.yaml:3:20: allow[0]: unknown field "port", expected one of host, cidr, ip, inbound, unix, ports, protocol, name_check"#
    );
}

#[test]
fn error_cidr() {
    assert_eq!(
        err("version: 1\nallow:\n  - host: a.example.com\n  - cidr: 10.0.0.300/8\n"),
        r#"allowlists/x.yaml:4:11: allow[1].cidr: "10.0.0.300/8" is not a CIDR"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - cidr: 10.1.2.3/8\n"),
        r#"allowlists/x.yaml:3:11: allow[0].cidr: "10.1.2.3/8" has host bits set; did you mean 10.0.0.0/8"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - cidr: \"10.0.0.1\"\n"),
        r#"allowlists/x.yaml:3:11: allow[0].cidr: "10.0.0.1" is an address, not a CIDR (addr/len); use ip: for a single address"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - cidr: 2001:db8::/129\n"),
        r#"allowlists/x.yaml:3:11: allow[0].cidr: "2001:db8::/129" is not a CIDR: the prefix length is longer than 128"#
    );
}

#[test]
fn error_ip() {
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.0/8\n"),
        r#"allowlists/x.yaml:3:9: allow[0].ip: "10.0.0.0/8" is a network, not an IP address; use cidr: instead"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: localhost\n"),
        r#"allowlists/x.yaml:3:9: allow[0].ip: "localhost" is not an IP address"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: [10.0.0.1]\n"),
        r#"allowlists/x.yaml:3:9: allow[0].ip: expected a string, found a list"#
    );
}

#[test]
fn error_ports() {
    assert_eq!(
        err("version: 1\nallow:\n  - cidr: 10.0.0.0/8\n    ports: [80, 70000]\n"),
        r#"allowlists/x.yaml:4:17: allow[0].ports[1]: "70000" is not a port (1-65535)"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ports: 0\n"),
        r#"allowlists/x.yaml:4:12: allow[0].ports: "0" is not a port (1-65535)"#
    );
    assert_eq!(
        err(
            "version: 1\nallow:\n  - ip: 10.0.0.1\n    ports:\n      - 443\n      - \"8080-8000\"\n"
        ),
        r#"allowlists/x.yaml:6:9: allow[0].ports[1]: "8080-8000" is not a port range (a-b with 1 <= a <= b <= 65535)"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ports: [-1]\n"),
        r#"allowlists/x.yaml:4:13: allow[0].ports[0]: "-1" is not a port (1-65535)"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ports: [http]\n"),
        r#"allowlists/x.yaml:4:13: allow[0].ports[0]: "http" is not a port (1-65535)"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ports: [[80]]\n"),
        r#"allowlists/x.yaml:4:13: allow[0].ports[0]: expected a port or a range like "8000-8080", found a list"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ports: []\n"),
        r#"allowlists/x.yaml:4:12: allow[0].ports: no ports given; leave ports out to allow every port"#
    );
    // An empty value is reported at its key.
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ports:\n  - ip: 10.0.0.2\n"),
        "allowlists/x.yaml:4:5: allow[0].ports: no ports given; leave ports out to allow every port"
    );
    let many: Vec<String> = (1..=17).map(|i| (i * 2).to_string()).collect();
    assert_eq!(
        err(&format!(
            "version: 1\nallow:\n  - ip: 10.0.0.1\n    ports: [{}]\n",
            many.join(", ")
        )),
        "allowlists/x.yaml:4:12: allow[0].ports: 17 separate port ranges, more than the 16 one rule can hold"
    );
}

#[test]
fn error_protocol_and_mode() {
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    protocol: sctp\n"),
        r#"allowlists/x.yaml:4:15: allow[0].protocol: unknown value "sctp", expected one of tcp, udp, any, icmp"#
    );
    assert_eq!(
        err("version: 1\nmode: block\n"),
        r#"allowlists/x.yaml:2:7: mode: unknown value "block", expected one of enforce, audit, ask"#
    );
}

#[test]
fn error_hosts() {
    assert_eq!(
        err("version: 1\nallow:\n  - host: \"a*.b.com\"\n"),
        r#"allowlists/x.yaml:3:11: allow[0].host: "a*.b.com" is not a host name: a wildcard is only allowed as the whole leftmost label, like *.example.com"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - host: foo.*.com\n"),
        r#"allowlists/x.yaml:3:11: allow[0].host: "foo.*.com" is not a host name: a wildcard is only allowed as the whole leftmost label, like *.example.com"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - host: \"*.com\"\n"),
        r#"allowlists/x.yaml:3:11: allow[0].host: "*.com": wildcard too broad, the part after *. needs at least two labels (like *.example.com)"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - host: 192.0.2.1\n"),
        r#"allowlists/x.yaml:3:11: allow[0].host: "192.0.2.1" is an IP address, not a host name; use ip: instead"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - host: a..example.com\n"),
        r#"allowlists/x.yaml:3:11: allow[0].host: "a..example.com" is not a host name: empty label"#
    );
}

#[test]
fn error_targets() {
    assert_eq!(
        err("version: 1\nallow:\n  - host: a.example.com\n    ip: 10.0.0.1\n"),
        "allowlists/x.yaml:3:5: allow[0]: give only one of host, cidr, ip, inbound, unix (found host and ip)"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n  - ports: [443]\n    protocol: tcp\n"),
        "allowlists/x.yaml:4:5: allow[1]: no destination: give one of host, cidr, ip, inbound, unix"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - {}\n"),
        "allowlists/x.yaml:3:5: allow[0]: no destination: give one of host, cidr, ip, inbound, unix"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - just-a-string\n"),
        r#"allowlists/x.yaml:3:5: allow[0]: expected a mapping, found "just-a-string""#
    );
    assert_eq!(
        err("version: 1\nallow:\n  host: a.example.com\n"),
        "allowlists/x.yaml:3:3: allow: expected a list, found a mapping"
    );
}

#[test]
fn error_version_and_name() {
    assert_eq!(
        err("allow: []\n"),
        r#"allowlists/x.yaml:1:1: missing field "version""#
    );
    assert_eq!(err(""), r#"allowlists/x.yaml:1:1: missing field "version""#);
    assert_eq!(
        err("# only a comment\n"),
        r#"allowlists/x.yaml:1:1: missing field "version""#
    );
    assert_eq!(
        err("name: x\nversion: 2\n"),
        "allowlists/x.yaml:2:10: version: unsupported version 2, this agent reads version 1"
    );
    assert_eq!(
        err("version: \"1\"\n"),
        r#"allowlists/x.yaml:1:10: version: expected version 1, found "1""#
    );
    assert_eq!(
        err("version: 1\nname: \" \"\n"),
        "allowlists/x.yaml:2:7: name: empty name"
    );
    assert_eq!(
        err("- version: 1\n"),
        "allowlists/x.yaml:1:1: expected a mapping, found a list"
    );
}

#[test]
fn error_dns() {
    assert_eq!(
        err("version: 1\ndns:\n  min_ttl: 30x\n"),
        r#"allowlists/x.yaml:3:12: dns.min_ttl: "30x" is not a duration (like 500ms, 30s, 5m, 1h)"#
    );
    assert_eq!(
        err("version: 1\ndns:\n  min_ttl: 2h\n  max_ttl: 1h\n"),
        "allowlists/x.yaml:4:12: dns.max_ttl: 1h is shorter than min_ttl (2h)"
    );
    assert_eq!(
        err("version: 1\ndns:\n  min_ttl: 2h\n"),
        "allowlists/x.yaml:3:12: dns.min_ttl: 2h is longer than max_ttl (default 1h)"
    );
    assert_eq!(
        err("version: 1\ndns:\n  upstream: [9.9.9.9, dns.google]\n"),
        r#"allowlists/x.yaml:3:23: dns.upstream[1]: "dns.google" is not a name server address (ip, ip:port or [ipv6]:port)"#
    );
    assert_eq!(
        err("version: 1\ndns:\n  upstream: resolv.conf\n"),
        r#"allowlists/x.yaml:3:13: dns.upstream: expected "system" or a list of name server addresses, found "resolv.conf""#
    );
    assert_eq!(
        err("version: 1\ndns:\n  upstream: []\n"),
        "allowlists/x.yaml:3:13: dns.upstream: no name servers given; use upstream: system for the system resolver"
    );
}

#[test]
fn error_yaml() {
    assert_eq!(
        err("version: 1\nallow:\n  - host: a\n - bad\n"),
        "allowlists/x.yaml:4:2: while parsing a block mapping, did not find expected key"
    );
    assert_eq!(
        err("version: 1\nallow: []\nversion: 1\n"),
        r#"allowlists/x.yaml:3:1: duplicate key "version""#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    ip: 10.0.0.2\n"),
        r#"allowlists/x.yaml:4:5: duplicate key "ip""#
    );
}

#[test]
fn ipv4_mapped_is_ipv4() {
    let p = parse("version: 1\nallow:\n  - ip: ::ffff:127.0.0.1\n  - cidr: ::ffff:10.0.0.0/104\n");
    assert_eq!(p.rules[0].target, Target::Net(net("127.0.0.1/32")));
    assert_eq!(p.rules[1].target, Target::Net(net("10.0.0.0/8")));
    assert_eq!(p.rules[0].target.to_string(), "127.0.0.1");
}

#[test]
fn host_rules_for_a_name() {
    let p = parse(
        r#"version: 1
allow:
  - host: example.com
    ports: [80]
  - host: "*.example.com"
    ports: [443]
  - host: API.Example.com.
    ports: [8443]
  - ip: 10.0.0.1
"#,
    );
    let ports = |name: &str| -> Vec<Vec<(u16, u16)>> {
        p.host_rules_for(name)
            .iter()
            .map(|r| r.ports.clone())
            .collect()
    };
    assert_eq!(ports("example.com"), vec![vec![(80, 80)]]);
    assert_eq!(ports("Example.COM."), vec![vec![(80, 80)]]);
    assert_eq!(
        ports("api.example.com"),
        vec![vec![(443, 443)], vec![(8443, 8443)]]
    );
    assert_eq!(ports("a.b.example.com"), vec![vec![(443, 443)]]);
    assert!(ports("evilexample.com").is_empty());
    assert!(ports("example.com.evil.test").is_empty());
    assert!(ports("10.0.0.1").is_empty());
    let v = rule_value(&p.host_rules_for("api.example.com"), 99).unwrap();
    assert_eq!(v.expires_ns, 99);
    assert!(v.permits(443, PROTO_TCP) && v.permits(8443, PROTO_UDP));
    assert!(!v.permits(80, PROTO_TCP));
}

#[test]
fn rule_value_unions_ports_and_protocols() {
    let p = parse(
        r#"version: 1
allow:
  - {host: a.example.com, ports: [443], protocol: tcp}
  - {host: a.example.com, ports: [443, 53], protocol: udp}
  - {host: a.example.com, ports: ["8000-8080"]}
"#,
    );
    let rules: Vec<&Rule> = p.rules.iter().collect();
    let v = rule_value(&rules, 0).unwrap();
    let got: Vec<(u16, u16, u8)> = v.ranges().iter().map(|r| (r.lo, r.hi, r.protos)).collect();
    assert_eq!(
        got,
        vec![
            // Host rules check names by default: their TCP stretches are name-bound, their
            // UDP stretches refuse QUIC long headers.
            (53, 53, PROTO_UDP | PROTO_NAMED_UDP),
            (443, 443, PROTO_ANY | PROTO_NAMED | PROTO_NAMED_UDP),
            (8000, 8080, PROTO_ANY | PROTO_NAMED | PROTO_NAMED_UDP)
        ]
    );
    assert_eq!(rule_value(&[], 0).unwrap().len, 0);
}

#[test]
fn name_check_false_admits_by_address_and_wins_over_a_checking_rule() {
    let p = parse(
        r#"version: 1
allow:
  - {host: a.example.com, ports: [443, 22]}
  - {host: a.example.com, ports: [22], name_check: false}
"#,
    );
    let rules: Vec<&Rule> = p.rules.iter().collect();
    assert!(rules[0].name_check && !rules[1].name_check);
    let v = rule_value(&rules, 0).unwrap();
    assert!(v.named_tcp(443), "443 is admitted by a checking rule only");
    assert!(!v.named_tcp(22), "22 is admitted by address too");
    assert!(v.named_udp(443) && !v.named_udp(22));
    assert!(v.permits(22, PROTO_TCP) && v.permits(443, PROTO_TCP) && v.permits(22, PROTO_UDP));
    assert!(
        err("version: 1\nallow:\n  - ip: 192.0.2.1\n    name_check: false\n")
            .contains("name_check applies to host rules only")
    );
}

#[test]
fn names_compile_to_reversed_keys_with_the_ports_of_every_covering_rule() {
    let p = parse(
        r#"version: 1
allow:
  - {host: "*.example.com", ports: [443]}
  - {host: "*.api.example.com", ports: [8443]}
  - {host: x.api.example.com, ports: [80]}
  - {host: other.test, ports: [443], name_check: false}
"#,
    );
    let entries = name_entries(&p);
    let find = |name: &str, wildcard: bool| {
        let (len, data) = egress_common::names::name_key(name, wildcard).unwrap();
        entries
            .iter()
            .find(|e| e.prefix_len == len && e.data == data)
            .map(|e| e.value)
            .unwrap_or_else(|| panic!("no entry for {name}"))
    };
    let exact = find("x.api.example.com", false);
    assert!(exact.permits(80, PROTO_TCP) && exact.permits(8443, PROTO_TCP));
    assert!(exact.permits(443, PROTO_TCP), "inherits *.example.com");
    let mid = find("api.example.com", true);
    assert!(mid.permits(8443, PROTO_TCP) && mid.permits(443, PROTO_TCP));
    assert!(
        !mid.permits(80, PROTO_TCP),
        "an exact name below adds nothing to the wildcard"
    );
    // A name_check: false rule's name may still be carried by a bound connection.
    assert!(find("other.test", false).permits(443, PROTO_TCP));
    assert_eq!(entries.len(), 4);
}

/// A trie entry as `prefix/len` and its `(lo, hi, protos)` ranges.
type Entry = (String, Vec<(u16, u16, u8)>);

fn entries(yaml: &str) -> Vec<Entry> {
    cidr_entries(&parse(yaml))
        .unwrap()
        .iter()
        .map(|e| {
            let ip = std::net::Ipv6Addr::from(e.addr);
            let ranges = e
                .value
                .ranges()
                .iter()
                .map(|r| (r.lo, r.hi, r.protos))
                .collect();
            (format!("{ip}/{}", e.prefix_len), ranges)
        })
        .collect()
}

#[test]
fn cidr_entries_inherit_from_broader_prefixes() {
    let got = entries(
        r#"version: 1
allow:
  - cidr: 10.1.0.0/16
    ports: [443]
  - cidr: 10.0.0.0/8
    ports: [80]
  - ip: 10.1.2.3
    ports: [22]
    protocol: tcp
  - cidr: 10.0.0.0/8
    ports: [81]
  - ip: 192.0.2.1
    ports: [53]
    protocol: udp
  - cidr: 2001:db8::/32
    ports: [443]
  - ip: 2001:db8::1
  - host: example.com
"#,
    );
    assert_eq!(
        got,
        vec![
            ("2001:db8::/32".into(), vec![(443, 443, PROTO_ANY)]),
            // The /8 rule given twice: one entry with the union.
            ("::ffff:10.0.0.0/104".into(), vec![(80, 81, PROTO_ANY)]),
            (
                "::ffff:10.1.0.0/112".into(),
                vec![(80, 81, PROTO_ANY), (443, 443, PROTO_ANY)]
            ),
            (
                "::ffff:10.1.2.3/128".into(),
                vec![
                    (22, 22, PROTO_TCP),
                    (80, 81, PROTO_ANY),
                    (443, 443, PROTO_ANY)
                ]
            ),
            ("::ffff:192.0.2.1/128".into(), vec![(53, 53, PROTO_UDP)]),
            ("2001:db8::1/128".into(), vec![(0, 65535, PROTO_ANY)]),
        ]
    );
}

#[test]
fn ipv6_rules_do_not_open_ipv4() {
    let got = entries(
        "version: 1\nallow:\n  - cidr: ::/0\n    ports: [443]\n  - ip: 10.0.0.1\n    ports: [80]\n",
    );
    assert_eq!(
        got,
        vec![
            ("::/0".into(), vec![(443, 443, PROTO_ANY)]),
            ("::ffff:0.0.0.0/96".into(), vec![]),
            ("::ffff:10.0.0.1/128".into(), vec![(80, 80, PROTO_ANY)]),
        ]
    );
    // 0.0.0.0/0 written as a rule takes the barrier's place.
    let got = entries("version: 1\nallow:\n  - cidr: ::/0\n  - cidr: 0.0.0.0/0\n    ports: [80]\n");
    assert_eq!(
        got,
        vec![
            ("::/0".into(), vec![(0, 65535, PROTO_ANY)]),
            ("::ffff:0.0.0.0/96".into(), vec![(80, 80, PROTO_ANY)]),
        ]
    );
    // A prefix that does not contain the mapped range needs no barrier.
    assert_eq!(
        entries("version: 1\nallow:\n  - cidr: 2001:db8::/32\n").len(),
        1
    );
}

#[test]
fn cidr_entries_too_many_ranges_names_the_rule() {
    let wide: Vec<String> = (1..=10).map(|i| (i * 2).to_string()).collect();
    let narrow: Vec<String> = (1..=10).map(|i| (1000 + i * 2).to_string()).collect();
    let yaml = format!(
        "version: 1\nallow:\n  - cidr: 10.0.0.0/8\n    ports: [{}]\n  - cidr: 10.1.0.0/16\n    ports: [{}]\n",
        wide.join(", "),
        narrow.join(", ")
    );
    let e = cidr_entries(&parse(&yaml)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "allowlists/x.yaml:5:5: allow[1]: 10.1.0.0/16 needs 20 port ranges (with those of the broader prefixes containing it), more than the 16 one entry can hold"
    );
}

#[test]
fn cidr_entries_scale_to_100k_rules() {
    let origin = Origin {
        file: FILE.into(),
        line: 1,
        column: 1,
        index: 0,
    };
    let mut rules = Vec::new();
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 | (i << 4));
        // Nested: a /28 per rule, a /20 every 256 rules, and a /8 over all of them.
        let len = if i % 256 == 0 { 20 } else { 28 };
        let net = Net::new(ip.into(), len).unwrap().unwrap_or_else(|n| n);
        rules.push(Rule {
            name_check: false,
            target: Target::Net(net),
            ports: vec![(1000 + (i % 7) as u16, 1000 + (i % 7) as u16)],
            protocol: Protocol::Tcp,
            origin: origin.clone(),
        });
    }
    rules.push(Rule {
        name_check: false,
        target: Target::Net(net("10.0.0.0/8")),
        ports: vec![(443, 443)],
        protocol: Protocol::Any,
        origin,
    });
    let policy = Policy {
        writable: Vec::new(),
        name: "big".into(),
        mode: Mode::Enforce,
        dns: DnsSettings::default(),
        rules,
        files: vec![],
    };
    let start = std::time::Instant::now();
    let out = cidr_entries(&policy).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.len(), 100_001);
    assert!(out.iter().all(|e| e.value.permits(443, PROTO_UDP)));
}

#[test]
fn includes_are_resolved_relative_to_their_file() {
    let dir = fixtures().join("include");
    let p = load(&dir.join("root.yaml")).unwrap();
    assert_eq!(p.name, "root");
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.dns.min_ttl, Duration::from_secs(10));
    let targets: Vec<String> = p.rules.iter().map(|r| r.target.to_string()).collect();
    assert_eq!(
        targets,
        vec![
            "root.example.com",
            "a.example.com",
            "10.0.0.0/8",
            "192.0.2.1"
        ]
    );
    assert_eq!(
        p.files,
        vec![
            dir.join("root.yaml"),
            dir.join("sub/a.yaml"),
            dir.join("sub/c.yaml"),
            dir.join("sub/../b.yaml"),
        ]
    );
    assert_eq!(p.rules[2].origin.file, dir.join("sub/c.yaml"));
    assert_eq!((p.rules[2].origin.line, p.rules[2].origin.index), (4, 0));
    assert!(p.summary().ends_with("3 includes"), "{}", p.summary());
}

#[test]
fn include_cycles_name_the_chain() {
    let dir = fixtures().join("cycle2");
    let e = load(&dir.join("a.yaml")).unwrap_err();
    let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
    assert_eq!(
        e.to_string(),
        format!(
            "{}:4:11: include[0]: include cycle {} -> {} -> {}",
            b.display(),
            a.display(),
            b.display(),
            a.display()
        )
    );
    assert!(matches!(e, PolicyError::IncludeCycle { ref chain, .. } if chain.len() == 3));

    let dir = fixtures().join("cycle3");
    let e = load(&dir.join("a.yaml")).unwrap_err();
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.join(format!("{n}.yaml")).display().to_string());
    assert_eq!(
        e.to_string(),
        format!("{c}:4:5: include[0]: include cycle {a} -> {b} -> {c} -> {a}")
    );

    // A file including itself; the root need not exist on disk.
    let e = parse_str("version: 1\ninclude: [x.yaml]\n", Path::new(FILE)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "allowlists/x.yaml:2:11: include[0]: include cycle allowlists/x.yaml -> allowlists/x.yaml"
    );
}

#[test]
fn missing_and_invalid_includes() {
    let dir = fixtures().join("bad-include");
    let e = load(&dir.join("missing.yaml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:3:25: include[1]: cannot read {}: No such file or directory (os error 2)",
            dir.join("missing.yaml").display(),
            dir.join("nope.yaml").display()
        )
    );
    let e = load(&dir.join("invalid.yaml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:2:1: missing field \"version\"",
            dir.join("no-version.yaml").display()
        )
    );
    assert_eq!(
        err("version: 1\ninclude: [\"\"]\n"),
        "allowlists/x.yaml:2:11: include[0]: empty path"
    );
}

#[test]
fn missing_root_file() {
    let e = load(Path::new("allowlists/does-not-exist.yaml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "allowlists/does-not-exist.yaml: cannot read: No such file or directory (os error 2)"
    );
    assert!(e.location().is_none());
}

#[test]
fn every_allowlist_in_the_repo_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../allowlists");
    let mut files = Vec::new();
    let mut dirs = vec![dir.clone()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 2, "no allowlists found in {}", dir.display());
    for f in files {
        let p = load(&f).unwrap_or_else(|e| panic!("{e}"));
        cidr_entries(&p).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn demo_allowlist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../allowlists");
    let p = load(&dir.join("demo.yaml")).unwrap();
    let entries = cidr_entries(&p).unwrap();
    let lo = egress_common::keys::addr_from_ip("127.0.0.1".parse().unwrap());
    // The longest prefix holding 127.0.0.1 is the ip: rule, which inherits the /30's UDP.
    let e = entries
        .iter()
        .find(|e| e.addr == lo && e.prefix_len == 128)
        .unwrap();
    assert!(e.value.permits(8080, PROTO_TCP));
    assert!(!e.value.permits(8080, PROTO_UDP));
    assert!(e.value.permits(5353, PROTO_UDP));
    assert!(!e.value.permits(5353, PROTO_TCP));
}

#[test]
fn icmp_rules_parse() {
    let p = parse(
        r#"version: 1
allow:
  - cidr: 198.51.100.0/24
    protocol: icmp
  - ip: 2001:db8::1
    protocol: icmp
  - host: ping.example.com
    protocol: icmp
  - ip: 192.0.2.1
    ports: [443]
"#,
    );
    assert!(p.allows_icmp());
    assert_eq!(p.rules[0].protocol, Protocol::Icmp);
    assert_eq!(p.rules[0].ports, vec![(0, u16::MAX)]);
    assert_eq!(p.rules[2].protocol, Protocol::Icmp);
    assert_eq!(p.rules[3].protocol, Protocol::Any);
    // Without an icmp rule, nothing allows ICMP: `any` is tcp and udp only.
    let q = parse("version: 1\nallow:\n  - cidr: 0.0.0.0/0\n  - cidr: ::/0\n    protocol: any\n");
    assert!(!q.allows_icmp());
    for e in cidr_entries(&q).unwrap() {
        assert!(!e.value.permits(0, PROTO_ICMP), "{e:?}");
    }
}

#[test]
fn icmp_with_ports_is_an_error() {
    assert_eq!(
        err(
            "version: 1\nallow:\n  - cidr: 198.51.100.0/24\n    protocol: icmp\n    ports: [443]\n"
        ),
        "allowlists/x.yaml:5:12: allow[0].ports: protocol icmp has no ports: remove ports, or \
         write a separate tcp or udp rule for them"
    );
    // The order of the keys does not matter; the error points at `ports` either way.
    assert_eq!(
        err(
            "version: 1\nallow:\n  - ip: 10.0.0.1\n  - ports: 80\n    host: a.example.com\n    protocol: icmp\n"
        ),
        "allowlists/x.yaml:4:12: allow[1].ports: protocol icmp has no ports: remove ports, or \
         write a separate tcp or udp rule for them"
    );
}

#[test]
fn icmp_compiles_to_its_own_bit() {
    let p = parse(
        r#"version: 1
allow:
  - cidr: 198.51.100.0/24
    protocol: icmp
  - ip: 198.51.100.7
    ports: [443]
    protocol: tcp
  - ip: 203.0.113.9
    ports: [53]
"#,
    );
    let entries = cidr_entries(&p).unwrap();
    let find = |addr: &str| {
        let ip: std::net::IpAddr = addr.parse().unwrap();
        let key = match ip {
            std::net::IpAddr::V4(v4) => egress_common::addr_from_v4(v4.octets()),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        entries
            .iter()
            .find(|e| e.addr == key && (e.prefix_len == 128 || e.prefix_len == 120))
            .unwrap_or_else(|| panic!("no entry for {addr}: {entries:?}"))
            .value
    };
    let net = find("198.51.100.0");
    assert!(net.permits(0, PROTO_ICMP));
    assert!(!net.permits(443, PROTO_TCP));
    // The /32 inherits ICMP from the /24 that contains it.
    let host = find("198.51.100.7");
    assert!(host.permits(0, PROTO_ICMP) && host.permits(443, PROTO_TCP));
    assert!(!host.permits(443, PROTO_UDP));
    let other = find("203.0.113.9");
    assert!(!other.permits(0, PROTO_ICMP));
    // DNS-derived values are built the same way.
    let q = parse(
        "version: 1\nallow:\n  - host: a.example.com\n    protocol: icmp\n  - host: a.example.com\n    ports: [443]\n",
    );
    let v = rule_value(&q.host_rules_for("a.example.com"), 5).unwrap();
    let got: Vec<(u16, u16, u8)> = v.ranges().iter().map(|r| (r.lo, r.hi, r.protos)).collect();
    assert_eq!(
        got,
        vec![
            (0, 65535, PROTO_ICMP),
            (443, 443, PROTO_ANY | PROTO_NAMED | PROTO_NAMED_UDP)
        ]
    );
    assert!(v.permits(0, PROTO_ICMP) && v.permits(443, PROTO_UDP));
}

#[test]
fn inbound_rules_parse() {
    let p = parse(
        r#"version: 1
allow:
  - inbound: 203.0.113.0/24
    ports: [8080, "9000-9001"]
  - inbound: 2001:db8::7
    ports: 22
    protocol: tcp
  - inbound: "::ffff:198.51.100.0/120"
    ports: "1-65535"
  - ip: 203.0.113.9
    ports: [443]
"#,
    );
    assert_eq!(p.rules[0].target, Target::Inbound(net("203.0.113.0/24")));
    assert_eq!(p.rules[0].ports, vec![(8080, 8080), (9000, 9001)]);
    assert_eq!(p.rules[0].protocol, Protocol::Tcp);
    // A single address is a /128 (or /32); IPv4-mapped is IPv4.
    assert_eq!(p.rules[1].target, Target::Inbound(net("2001:db8::7/128")));
    assert_eq!(p.rules[2].target, Target::Inbound(net("198.51.100.0/24")));
    assert_eq!(p.rules[2].protocol, Protocol::Tcp);
    assert_eq!(p.rules[0].target.to_string(), "inbound 203.0.113.0/24");
    assert_eq!(p.rules[1].target.to_string(), "inbound 2001:db8::7");
    let peer = "203.0.113.50".parse().unwrap();
    assert_eq!(p.inbound_rules_for(peer), vec![&p.rules[0]]);
    assert!(p.inbound_rules_for("192.0.2.1".parse().unwrap()).is_empty());
    assert!(
        p.summary().contains("1 address, 3 inbound)"),
        "{}",
        p.summary()
    );
}

#[test]
fn inbound_errors_name_the_rule() {
    assert_eq!(
        err("version: 1\nallow:\n  - inbound: 203.0.113.0/24\n"),
        "allowlists/x.yaml:3:14: allow[0].inbound: give ports: the local ports \
         203.0.113.0/24 may connect to (\"1-65535\" for all)"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - inbound: 203.0.113.0/24\n    ports: 53\n    protocol: udp\n"),
        "allowlists/x.yaml:5:15: allow[0].protocol: inbound rules are TCP only: remove \
         protocol (a UDP server's replies are sends, judged by the outbound rules)"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 192.0.2.1\n  - inbound: 10.1.2.3/8\n    ports: 80\n"),
        "allowlists/x.yaml:4:14: allow[1].inbound: \"10.1.2.3/8\" has host bits set; did you \
         mean 10.0.0.0/8"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - inbound: peers.example.com\n    ports: 80\n"),
        "allowlists/x.yaml:3:14: allow[0].inbound: \"peers.example.com\" is neither a CIDR \
         nor an IP address"
    );
    assert_eq!(
        err(
            "version: 1\nallow:\n  - inbound: 203.0.113.0/24\n    cidr: 203.0.113.0/24\n    ports: 80\n"
        ),
        "allowlists/x.yaml:3:5: allow[0]: give only one of host, cidr, ip, inbound, unix (found cidr \
         and inbound)"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - inbound: 203.0.113.0/24\n    ports: 0\n"),
        "allowlists/x.yaml:4:12: allow[0].ports: \"0\" is not a port (1-65535)"
    );
}

#[test]
fn inbound_compiles_to_its_own_trie() {
    let p = parse(
        r#"version: 1
allow:
  - inbound: 203.0.113.0/24
    ports: [8080]
  - inbound: 203.0.113.7
    ports: [22]
  - inbound: 2001:db8::/32
    ports: [8080]
  - cidr: 198.51.100.0/24
    ports: [443]
"#,
    );
    // Inbound rules never open a destination, and outbound rules never open inbound.
    let out = cidr_entries(&p).unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    let inbound = inbound_entries(&p).unwrap();
    let keys: Vec<(String, u32)> = inbound
        .iter()
        .map(|e| (std::net::Ipv6Addr::from(e.addr).to_string(), e.prefix_len))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("2001:db8::".to_string(), 32),
            ("::ffff:203.0.113.0".to_string(), 120),
            ("::ffff:203.0.113.7".to_string(), 128),
        ]
    );
    let host = inbound[2].value;
    // The /32 inherits 8080 from the /24 containing it; ports are TCP only.
    assert!(host.permits(22, PROTO_TCP) && host.permits(8080, PROTO_TCP));
    assert!(!host.permits(22, PROTO_UDP) && !host.permits(443, PROTO_TCP));
    let net24 = inbound[1].value;
    assert!(net24.permits(8080, PROTO_TCP) && !net24.permits(22, PROTO_TCP));
}

#[test]
fn unix_rules_parse_and_take_no_ports() {
    let p = parse(
        r#"
version: 1
allow:
  - unix: /run/user/1000/ssh-agent.sock
  - unix: "@my-daemon"
"#,
    );
    assert_eq!(
        p.unix_names(),
        [
            &UnixName::Path("/run/user/1000/ssh-agent.sock".into()),
            &UnixName::Abstract("my-daemon".into())
        ]
    );
    assert!(p.summary().contains(", 2 unix"), "{}", p.summary());
    // No map entry comes from a unix rule.
    assert!(cidr_entries(&p).unwrap().is_empty());
    assert_eq!(
        err("version: 1\nallow:\n  - unix: /run/x.sock\n    ports: [1]\n"),
        "allowlists/x.yaml:4:12: allow[0].ports: a unix rule takes no ports: remove it"
    );
    assert!(err("version: 1\nallow:\n  - unix: run/x.sock\n").contains("absolute path"));
}

#[test]
fn explain_names_the_unix_rule() {
    let p = parse("version: 1\nallow:\n  - unix: /run/a.sock\n");
    let ask = |d: &str| {
        explain::explain(
            &p,
            &explain::Query {
                destination: d.parse().unwrap(),
                transport: None,
            },
        )
    };
    let yes = ask("unix:/run/a.sock");
    assert!(yes.allowed, "{:?}", yes.lines);
    assert!(yes.lines[0].contains("allow[0]"), "{:?}", yes.lines);
    let no = ask("unix:@other");
    assert!(!no.allowed);
    assert!(
        no.lines[0].starts_with("unix:@other: denied"),
        "{:?}",
        no.lines
    );
}

#[test]
fn error_documents_and_budgets() {
    assert_eq!(
        err("version: 1\n---\nversion: 1\n"),
        "allowlists/x.yaml:3:1: more than one YAML document in the file"
    );
    // An anchored list of 10 lists of 10 ... (10^9 items): refused, and soon.
    let mut bomb = String::from("version: 1\nname: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let p = i - 1;
        bomb += &format!(
            "k{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        );
    }
    let start = std::time::Instant::now();
    let e = err(&bomb.replacen("version: 1", "version: 2", 1));
    assert!(e.ends_with(": aliases expand to too many nodes"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    let deep = format!("version: 1\nallow: {}1{}\n", "[".repeat(20), "]".repeat(20));
    assert_eq!(
        err(&deep),
        "allowlists/x.yaml:2:23: over a parser limit: Depth { depth: 17 }"
    );
    let big = format!("version: 1\nname: {}\n", "x".repeat(yaml::MAX_BYTES));
    assert_eq!(
        err(&big),
        format!(
            "allowlists/x.yaml:1:1: {} bytes, more than the 67108864 a file may have",
            big.len()
        )
    );
    // Merge keys are not part of the format.
    assert_eq!(
        err("version: 1\nallow: [{<<: {ip: 10.0.0.1}}]\n"),
        r#"allowlists/x.yaml:2:10: allow[0]: unknown field "<<", expected one of host, cidr, ip, inbound, unix, ports, protocol, name_check"#
    );
    assert_eq!(
        err("version: 1\nallow:\n- ip: 10.0.0.1\n  ports: .inf\n"),
        r#"allowlists/x.yaml:4:10: allow[0].ports: ".inf" is not a port (1-65535)"#
    );
    // A key named like the field `Spanned` wraps values in is a key like any other.
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n    value: 1\n"),
        r#"allowlists/x.yaml:4:5: allow[0]: unknown field "value", expected one of host, cidr, ip, inbound, unix, ports, protocol, name_check"#
    );
    assert_eq!(
        err("version: 1\nallow:\n  - ip: 10.0.0.1\n  - ip: *nope\n"),
        "allowlists/x.yaml:4:9: alias references unknown anchor"
    );
}

#[test]
fn error_positions_of_empty_and_mistyped_values() {
    // An empty list item is reported at its dash, a comment after it or not.
    assert_eq!(
        err("version: 1\nallow:\n  -\n  - ip: 10.0.0.1\n"),
        "allowlists/x.yaml:3:3: allow[0]: expected a mapping, found an empty value"
    );
    assert_eq!(
        err("version: 1\nallow:\n  - # empty\n  - ip: 10.0.0.1\n"),
        "allowlists/x.yaml:3:3: allow[0]: expected a mapping, found an empty value"
    );
    assert_eq!(
        err("version: 1\nallow: [{ip: 10.0.0.1, ports: }]\n"),
        "allowlists/x.yaml:2:24: allow[0].ports: no ports given; leave ports out to allow every port"
    );
    // A value of the wrong type is reported at the value, not at its key.
    assert_eq!(
        err("version: true\n"),
        "allowlists/x.yaml:1:10: version: expected version 1, found true"
    );
    assert_eq!(
        err("version: 1\nmode: [a]\n"),
        "allowlists/x.yaml:2:7: mode: expected a string, found a list"
    );
    assert_eq!(
        err("version: 1\nallow: [{ip: 10.0.0.1, protocol: {tcp: 1}}]\n"),
        "allowlists/x.yaml:2:34: allow[0].protocol: expected a string, found a mapping"
    );
    assert_eq!(
        err("version: 1\nallow:\n- ip: 10.0.0.1\n  ports: [true]\n"),
        r#"allowlists/x.yaml:4:11: allow[0].ports[0]: expected a port or a range like "8000-8080", found true"#
    );
    // A missing field is reported at its mapping.
    assert_eq!(
        err("# comment\n\nname: x\nallow: []\n"),
        r#"allowlists/x.yaml:3:1: missing field "version""#
    );
    // serde reads only up to the first error; a syntax error after it is the one reported.
    assert_eq!(
        err("version: 1\n  bad: indent\n"),
        "allowlists/x.yaml:2:6: mapping values are not allowed in this context"
    );
}

#[test]
fn anchors_and_aliases_are_read() {
    let p = parse(
        "version: 1\nallow:\n  - ip: 192.0.2.1\n    ports: &web [80, 443]\n  - ip: 192.0.2.2\n    ports: *web\n",
    );
    assert_eq!(p.rules[1].ports, vec![(80, 80), (443, 443)]);
    assert_eq!((p.rules[1].origin.line, p.rules[1].origin.column), (5, 5));
}

#[test]
fn a_file_too_large_is_not_read_whole() {
    // 1 GiB of NUL bytes (sparse): the loader stops reading one byte past the limit.
    let path = std::env::temp_dir().join(format!("egress-policy-big-{}.yaml", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 30))
        .unwrap();
    let e = load(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        e.unwrap_err().to_string(),
        format!(
            "{}:1:1: {} bytes, more than the {} a file may have",
            path.display(),
            yaml::MAX_BYTES + 1,
            yaml::MAX_BYTES
        )
    );
}
