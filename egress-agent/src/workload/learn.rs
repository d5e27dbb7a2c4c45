//! `learn`: turn what a command did under audit mode into a minimal allowlist.
//!
//! Input: the event lines of an audit run (`audit` lines for connects and sends that an
//! empty policy would have denied, `dns-refused` lines with verdict `audit` for the names it
//! looked up). Output: YAML with comments, names rather than addresses wherever a name was
//! used, the ports and protocols seen, wildcards only where several sibling names appeared,
//! and IP literals flagged for review.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use serde_json::Value;

use crate::policy::UnixName;

/// Sibling names under one parent that make `learn` propose a wildcard.
pub const WILDCARD_SIBLINGS: usize = 3;

/// Ports and protocols seen for one destination.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Use {
    /// (protocol, port) of TCP and UDP.
    seen: BTreeSet<(String, u16)>,
    /// ICMP echo requests (ping) went there.
    icmp: bool,
    /// TCP ports whose first bytes carried no TLS server name or HTTP Host (name binding
    /// refused them, or would have): the rule must admit by address (`name_check: false`),
    /// with why (`name_why` of the events).
    no_name: BTreeMap<u16, String>,
}

/// What the command used, gathered from event lines.
#[derive(Debug, Default)]
pub struct Observed {
    hosts: BTreeMap<String, Use>,
    ips: BTreeMap<IpAddr, Use>,
    looked_up: BTreeSet<String>,
    /// Peers that connected in (`hook: accept`), with the local ports they connected to.
    inbound: BTreeMap<IpAddr, BTreeSet<u16>>,
    /// Unix sockets outside the sandbox the command tried (`proto: unix`): absolute paths
    /// and `@` abstract names.
    unix: BTreeSet<String>,
}

impl Observed {
    /// Reads event lines (JSON objects); lines of other kinds are ignored.
    pub fn from_events<'a>(lines: impl IntoIterator<Item = &'a Value>) -> Self {
        let mut o = Self::default();
        for v in lines {
            match v["event"].as_str() {
                Some("audit" | "deny") if v["proto"].as_str() == Some("unix") => {
                    // A relative path names no rule (its directory is unknown).
                    if let Some(d) = v["dst"].as_str().filter(|d| d.parse::<UnixName>().is_ok()) {
                        o.unix.insert(d.to_owned());
                    }
                }
                Some("audit" | "deny") => {
                    let (Some(proto), Some(port)) = (v["proto"].as_str(), v["port"].as_u64())
                    else {
                        continue;
                    };
                    let icmp = matches!(proto, "icmp" | "icmpv6");
                    // Events without a destination (a socket refused when created, a socket
                    // family) make no rule.
                    if !(icmp || matches!(proto, "tcp" | "udp"))
                        || matches!(v["hook"].as_str(), Some("sock_create" | "socket_create"))
                    {
                        continue;
                    }
                    let dst: Option<IpAddr> = v["dst"].as_str().and_then(|d| d.parse().ok());
                    if v["hook"].as_str() == Some("accept") {
                        // A peer connecting in: an inbound rule, never a destination.
                        if let Some(peer) = dst {
                            o.inbound.entry(peer).or_default().insert(port as u16);
                        }
                        continue;
                    }
                    if v["reason"].as_str() == Some("name") {
                        // A first flight name binding judged: the name it carried needs a
                        // rule of its own (a client may connect to one name's address and ask
                        // for another); no name means the rule must admit by address.
                        if let Some(name) = v["name"].as_str() {
                            let name = name.trim_end_matches('.').to_ascii_lowercase();
                            if name.parse::<crate::policy::HostPattern>().is_ok() {
                                let u = o.hosts.entry(name).or_default();
                                u.seen.insert((proto.to_owned(), port as u16));
                            }
                            continue;
                        }
                        let why = v["name_why"].as_str().unwrap_or("no name").to_owned();
                        let u = match (v["host"].as_str(), dst) {
                            (Some(h), _) => o.hosts.entry(h.to_owned()).or_default(),
                            (None, Some(ip)) => o.ips.entry(ip).or_default(),
                            _ => continue,
                        };
                        u.seen.insert((proto.to_owned(), port as u16));
                        u.no_name.insert(port as u16, why);
                        continue;
                    }
                    let u = match v["host"].as_str() {
                        Some(h) => o.hosts.entry(h.to_owned()).or_default(),
                        None => match dst {
                            Some(ip) if !ip.is_unspecified() => o.ips.entry(ip).or_default(),
                            _ => continue,
                        },
                    };
                    if icmp {
                        u.icmp = true;
                    } else {
                        u.seen.insert((proto.to_owned(), port as u16));
                    }
                }
                Some("dns-refused") => {
                    if let Some(q) = v["query"].as_str() {
                        o.looked_up.insert(q.to_owned());
                    }
                }
                _ => {}
            }
        }
        for u in o.hosts.values_mut().chain(o.ips.values_mut()) {
            drop_sorting_probes(u);
        }
        o
    }

    /// Whether nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.ips.is_empty()
            && self.looked_up.is_empty()
            && self.inbound.is_empty()
            && self.unix.is_empty()
    }
}

/// glibc's `getaddrinfo` connects a UDP socket to each candidate address (to pick a source
/// address; nothing is sent). A UDP "use" on a port the same destination also used over TCP is
/// that, not traffic: drop it so the learned policy stays minimal.
fn drop_sorting_probes(u: &mut Use) {
    let tcp_ports: BTreeSet<u16> = u
        .seen
        .iter()
        .filter(|(p, _)| p == "tcp")
        .map(|(_, port)| *port)
        .collect();
    u.seen
        .retain(|(p, port)| !(p == "udp" && tcp_ports.contains(port)));
}

/// One rule to write.
#[derive(Debug)]
struct Proposed {
    key: String,
    value: String,
    ports: Vec<u16>,
    protocol: &'static str,
    comments: Vec<String>,
    /// Write `name_check: false` (the traffic carried no name).
    by_address: bool,
}

/// Writes the allowlist. `name` is the policy name, `command` is quoted in the header,
/// `settings` (YAML lines such as an `include:` of the starting allowlist and its `dns:`
/// block) goes after `mode`.
pub fn render(
    observed: &Observed,
    name: &str,
    command: &str,
    when: &str,
    settings: &str,
) -> String {
    let mut rules: Vec<Proposed> = Vec::new();

    // Names, grouped into wildcards where enough siblings used the same ports.
    let mut by_parent: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (host, u) in &observed.hosts {
        // Only TCP/UDP use is grouped; pings get their own rules.
        let Some((_, parent)) = host.split_once('.').filter(|_| !u.seen.is_empty()) else {
            continue;
        };
        if parent.contains('.') {
            by_parent
                .entry((parent.to_owned(), signature(u)))
                .or_default()
                .push(host.clone());
        }
    }
    let mut in_wildcard: BTreeSet<String> = BTreeSet::new();
    for ((parent, _), names) in &by_parent {
        if names.len() < WILDCARD_SIBLINGS {
            continue;
        }
        let u = &observed.hosts[&names[0]];
        let (ports, protocol) = ports_and_protocol(u);
        let labels: Vec<&str> = names
            .iter()
            .map(|n| {
                n.strip_suffix(parent.as_str())
                    .unwrap_or(n)
                    .trim_end_matches('.')
            })
            .collect();
        rules.push(Proposed {
            key: "host".into(),
            value: format!("\"*.{parent}\""),
            ports,
            protocol,
            comments: vec![format!(
                "wildcard: {} siblings seen ({}); narrow it to exact names if they are known",
                names.len(),
                labels.join(", ")
            )],
            by_address: false,
        });
        in_wildcard.extend(names.iter().cloned());
    }
    for (host, u) in &observed.hosts {
        if u.icmp {
            rules.push(ping("host", host.clone(), Vec::new()));
        }
        if in_wildcard.contains(host) || u.seen.is_empty() {
            continue;
        }
        let (ports, protocol) = ports_and_protocol(u);
        let mut comments = Vec::new();
        if !u.no_name.is_empty() {
            let seen: Vec<String> = u
                .no_name
                .iter()
                .map(|(port, why)| format!("{port} ({why})"))
                .collect();
            comments.push(format!(
                "REVIEW: the first bytes to port {} carried no TLS server name or HTTP Host, \
                 so this rule admits by address (any name served there); keep name-checked \
                 ports in a rule of their own",
                seen.join(", ")
            ));
        }
        rules.push(Proposed {
            key: "host".into(),
            value: host.clone(),
            ports,
            protocol,
            by_address: !u.no_name.is_empty(),
            comments,
        });
    }
    // Names looked up but never connected to: their lookups must keep working.
    for q in &observed.looked_up {
        let used = observed
            .hosts
            .get(q)
            .is_some_and(|u| !u.seen.is_empty() || u.icmp);
        if used || in_wildcard.contains(q) {
            continue;
        }
        rules.push(Proposed {
            key: "host".into(),
            value: q.clone(),
            ports: vec![443],
            protocol: "tcp",
            comments: vec![
                "looked up, never connected to: 443/tcp assumed; narrow or remove it".into(),
            ],
            by_address: false,
        });
    }
    for (ip, u) in &observed.ips {
        let review =
            "REVIEW: IP literal, used without a DNS lookup; prefer a host name if it has one";
        if u.icmp {
            rules.push(ping("ip", ip.to_string(), vec![review.into()]));
        }
        if u.seen.is_empty() {
            continue;
        }
        let (ports, protocol) = ports_and_protocol(u);
        rules.push(Proposed {
            key: "ip".into(),
            value: ip.to_string(),
            ports,
            protocol,
            comments: vec![review.into()],
            by_address: false,
        });
    }

    for (peer, ports) in &observed.inbound {
        rules.push(Proposed {
            key: "inbound".into(),
            value: peer.to_string(),
            ports: ports.iter().copied().collect(),
            protocol: "tcp",
            comments: vec![
                "REVIEW: a peer that connected in to the command; widen it to its network if \
                 it has one"
                    .into(),
            ],
            by_address: false,
        });
    }

    for socket in &observed.unix {
        rules.push(Proposed {
            key: "unix".into(),
            value: yaml_scalar(socket),
            ports: Vec::new(),
            protocol: "unix",
            comments: vec![
                "REVIEW: a local daemon's socket the command used; it acts for the command \
                 outside the sandbox"
                    .into(),
            ],
            by_address: false,
        });
    }

    let mut out = String::new();
    let _ = writeln!(out, "# yaml-language-server: $schema=./schema.json");
    let _ = writeln!(out, "# Learned by `egress-agent learn` on {when} from:");
    // One comment line, whatever the command holds (a script with newlines, say).
    let mut shown: String = command.escape_debug().collect();
    if shown.chars().count() > 300 {
        shown = shown.chars().take(300).collect::<String>() + "...";
    }
    let _ = writeln!(out, "#   {shown}");
    let _ = writeln!(
        out,
        "# Review before enforcing: every rule below is something the command did."
    );
    let _ = writeln!(out, "version: 1");
    let _ = writeln!(out, "name: {}", yaml_scalar(name));
    let _ = writeln!(out, "mode: enforce");
    out.push_str(settings);
    if rules.is_empty() {
        let _ = writeln!(
            out,
            "# The command reached nothing: everything stays denied."
        );
        let _ = writeln!(out, "allow: []");
        return out;
    }
    let _ = writeln!(out, "allow:");
    for r in rules {
        for c in &r.comments {
            let _ = writeln!(out, "  # {c}");
        }
        let _ = writeln!(out, "  - {}: {}", r.key, r.value);
        // A unix rule has neither ports nor a protocol.
        if r.protocol == "unix" {
            continue;
        }
        // An ICMP rule has no ports.
        if r.protocol != "icmp" {
            let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
            let _ = writeln!(out, "    ports: [{}]", ports.join(", "));
        }
        let _ = writeln!(out, "    protocol: {}", r.protocol);
        if r.by_address {
            let _ = writeln!(out, "    name_check: false");
        }
    }
    out
}

/// A rule for the echo requests (ping) seen to `value`.
fn ping(key: &str, value: String, comments: Vec<String>) -> Proposed {
    Proposed {
        key: key.into(),
        value,
        ports: Vec::new(),
        protocol: "icmp",
        comments,
        by_address: false,
    }
}

/// Ports and the protocol covering them (`any` when both were seen).
fn ports_and_protocol(u: &Use) -> (Vec<u16>, &'static str) {
    let ports: BTreeSet<u16> = u.seen.iter().map(|(_, p)| *p).collect();
    let protos: BTreeSet<&str> = u.seen.iter().map(|(p, _)| p.as_str()).collect();
    let protocol = match (protos.contains("tcp"), protos.contains("udp")) {
        (true, false) => "tcp",
        (false, true) => "udp",
        _ => "any",
    };
    (ports.into_iter().collect(), protocol)
}

fn signature(u: &Use) -> String {
    let (ports, protocol) = ports_and_protocol(u);
    format!("{ports:?}/{protocol}")
}

fn yaml_scalar(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.is_empty()
    {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

/// The settings to carry over from the starting allowlist: an include of it (so what it
/// already allowed stays allowed) and its `dns` block.
pub fn carried_settings(base: &crate::policy::Policy, base_path: &std::path::Path) -> String {
    use crate::policy::{Upstream, format_duration};
    let mut out = String::new();
    let shown = std::fs::canonicalize(base_path).unwrap_or_else(|_| base_path.to_owned());
    let _ = writeln!(out, "include: [{:?}]", shown.display().to_string());
    let d = &base.dns;
    let _ = writeln!(out, "dns:");
    let _ = writeln!(out, "  min_ttl: {}", format_duration(d.min_ttl));
    let _ = writeln!(out, "  max_ttl: {}", format_duration(d.max_ttl));
    let _ = writeln!(out, "  grace: {}", format_duration(d.grace));
    match &d.upstream {
        Upstream::System => {
            let _ = writeln!(out, "  upstream: system");
        }
        Upstream::Servers(list) => {
            let shown: Vec<String> = list
                .iter()
                .map(|s| format!("{:?}", s.to_string()))
                .collect();
            let _ = writeln!(out, "  upstream: [{}]", shown.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;
    use std::path::Path;

    fn ev(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn learned(events: &[&str]) -> String {
        let values: Vec<Value> = events.iter().map(|e| ev(e)).collect();
        render(&Observed::from_events(&values), "t", "cmd", "today", "")
    }

    #[test]
    fn names_win_over_addresses_and_ports_are_kept() {
        let y = learned(&[
            r#"{"event":"dns-refused","query":"api.example.com","qtype":"A","verdict":"audit"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.10","port":443,"host":"api.example.com"}"#,
            r#"{"event":"audit","proto":"udp","dst":"198.51.100.10","port":443,"host":"api.example.com"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.10","port":8443,"host":"api.example.com"}"#,
        ]);
        assert!(
            y.contains("  - host: api.example.com\n    ports: [443, 8443]\n    protocol: tcp\n"),
            "{y}"
        );
        assert!(!y.contains("198.51.100.10"), "{y}");
        policy::parse_str(&y, Path::new("learned.yaml")).unwrap();
    }

    #[test]
    fn traffic_without_a_name_makes_an_address_rule_and_a_carried_name_a_rule_of_its_own() {
        let y = learned(&[
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.10","port":22,"host":"git.example.com"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.10","port":22,"host":"git.example.com","reason":"name","name_why":"unknown-protocol"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.11","port":443,"host":"cdn.example.com","reason":"name","name":"Tenant.Example.com","name_why":"not-permitted"}"#,
        ]);
        assert!(
            y.contains(
                "  - host: git.example.com
    ports: [22]
    protocol: tcp
    name_check: false
"
            ),
            "{y}"
        );
        assert!(y.contains("carried no TLS server name"), "{y}");
        assert!(
            y.contains(
                "  - host: tenant.example.com
    ports: [443]
    protocol: tcp
"
            ),
            "{y}"
        );
        assert!(
            !y.contains(
                "host: cdn.example.com
    ports: [443]
    protocol: tcp
    name_check"
            ),
            "{y}"
        );
    }

    #[test]
    fn ip_literals_are_flagged() {
        let y = learned(&[r#"{"event":"audit","proto":"udp","dst":"2001:db8::5","port":5353}"#]);
        assert!(y.contains("REVIEW: IP literal"), "{y}");
        assert!(
            y.contains("  - ip: 2001:db8::5\n    ports: [5353]\n    protocol: udp\n"),
            "{y}"
        );
        policy::parse_str(&y, Path::new("learned.yaml")).unwrap();
    }

    #[test]
    fn siblings_become_a_commented_wildcard() {
        let mut lines = Vec::new();
        for n in ["a", "b", "c"] {
            lines.push(format!(
                r#"{{"event":"audit","proto":"tcp","dst":"198.51.100.1","port":443,"host":"{n}.cdn.example.com"}}"#
            ));
        }
        lines.push(r#"{"event":"audit","proto":"tcp","dst":"198.51.100.2","port":443,"host":"other.example.com"}"#.into());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let y = learned(&refs);
        assert!(y.contains("# wildcard: 3 siblings seen (a, b, c)"), "{y}");
        assert!(y.contains("host: \"*.cdn.example.com\""), "{y}");
        assert!(!y.contains("a.cdn.example.com"), "{y}");
        assert!(y.contains("host: other.example.com"), "{y}");
        let p = policy::parse_str(&y, Path::new("learned.yaml")).unwrap();
        assert!(!p.host_rules_for("x.cdn.example.com").is_empty());
        assert!(p.host_rules_for("cdn.example.com").is_empty());
    }

    #[test]
    fn two_siblings_stay_exact() {
        let y = learned(&[
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.1","port":443,"host":"a.cdn.example.com"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.1","port":443,"host":"b.cdn.example.com"}"#,
        ]);
        assert!(!y.contains('*'), "{y}");
    }

    #[test]
    fn a_multi_line_command_stays_in_the_comment() {
        let y = render(
            &Observed::default(),
            "t",
            "python3 -c '\nimport x\nx: 1\n'",
            "now",
            "",
        );
        policy::parse_str(&y, Path::new("learned.yaml")).unwrap();
        assert_eq!(
            y.lines().filter(|l| l.contains("import x")).count(),
            1,
            "{y}"
        );
    }

    #[test]
    fn nothing_seen_gives_an_empty_allowlist() {
        let y = learned(&[r#"{"event":"ready"}"#]);
        assert!(y.contains("allow: []"), "{y}");
        let p = policy::parse_str(&y, Path::new("learned.yaml")).unwrap();
        assert!(p.rules.is_empty());
    }

    #[test]
    fn pings_become_icmp_rules_and_sockets_without_a_destination_none() {
        let y = learned(&[
            r#"{"event":"audit","proto":"icmp","dst":"198.51.100.7","port":0,"hook":"connect4"}"#,
            r#"{"event":"audit","proto":"icmpv6","dst":"2001:db8::7","port":0,"hook":"egress"}"#,
            r#"{"event":"audit","proto":"icmp","dst":"198.51.100.10","port":0,"host":"api.example.com","hook":"connect4"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"198.51.100.10","port":443,"host":"api.example.com","hook":"connect4"}"#,
            r#"{"event":"audit","proto":"icmp","dst":"::","port":0,"hook":"sock_create"}"#,
            r#"{"event":"audit","proto":"af_packet","dst":"::","port":17,"hook":"socket_create"}"#,
        ]);
        assert!(
            y.contains("  - ip: 198.51.100.7\n    protocol: icmp\n"),
            "{y}"
        );
        assert!(
            y.contains("  - ip: 2001:db8::7\n    protocol: icmp\n"),
            "{y}"
        );
        assert!(
            y.contains("  - host: api.example.com\n    protocol: icmp\n"),
            "{y}"
        );
        assert!(
            y.contains("  - host: api.example.com\n    ports: [443]\n    protocol: tcp\n"),
            "{y}"
        );
        assert!(
            !y.contains("ip: ::"),
            "no rule for a socket without a destination: {y}"
        );
        let p = policy::parse_str(&y, Path::new("learned.yaml")).expect("the result parses");
        assert_eq!(p.rules.len(), 4);
    }

    #[test]
    fn unix_denies_become_unix_rules() {
        let y = learned(&[
            r#"{"event":"deny","proto":"unix","dst":"/run/user/1000/bus","hook":"connect_unix"}"#,
            r#"{"event":"deny","proto":"unix","dst":"@my-daemon","hook":"connect_unix"}"#,
            r#"{"event":"deny","proto":"unix","dst":"relative.sock","hook":"connect_unix"}"#,
        ]);
        assert!(y.contains("  - unix: \"/run/user/1000/bus\"\n"), "{y}");
        assert!(y.contains("  - unix: \"@my-daemon\"\n"), "{y}");
        assert!(
            !y.contains("relative") && !y.contains("protocol: unix"),
            "{y}"
        );
        crate::policy::parse_str(&y, std::path::Path::new("learned.yaml")).expect("parses");
    }

    #[test]
    fn peers_connecting_in_become_inbound_rules() {
        let y = learned(&[
            r#"{"event":"audit","proto":"tcp","dst":"203.0.113.7","port":8080,"hook":"accept"}"#,
            r#"{"event":"audit","proto":"tcp","dst":"203.0.113.7","port":9000,"hook":"accept"}"#,
        ]);
        assert!(
            y.contains("  - inbound: 203.0.113.7\n    ports: [8080, 9000]\n"),
            "{y}"
        );
        assert!(
            !y.contains("- ip: 203.0.113.7"),
            "a peer is not a destination: {y}"
        );
        let p = policy::parse_str(&y, Path::new("learned.yaml")).expect("the result parses");
        assert_eq!(p.rules.len(), 1);
    }
}
