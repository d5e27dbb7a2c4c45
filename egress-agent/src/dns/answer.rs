//! What an upstream answer allows: the A/AAAA addresses of the queried name, found by
//! following its CNAME chain through the answer section. Records for other names (an
//! attacker's upstream could add any) allow nothing.

use std::{collections::HashMap, net::IpAddr};

use hickory_proto::{
    op::Message,
    rr::{Name, RData},
};

/// Longest CNAME chain followed (loops end here too).
const MAX_CHAIN: usize = 16;

/// A name as compared against the policy: lowercase, without the trailing dot.
pub fn normalize(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// The name as a policy matches it (lowercase labels joined by dots, no trailing dot), or
/// `None` when some wire label is not a host name label (a dot, a backslash, a space or any
/// other byte inside a label): such a name is permitted by no rule, and must not reach the
/// policy as text, where `x\.ok.test` (one label `x.ok`) would line up with `*.ok.test`.
pub fn host_name(name: &Name) -> Option<String> {
    let mut out = String::new();
    for label in name.iter() {
        if !crate::policy::is_label(label) {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    (!out.is_empty()).then_some(out)
}

/// The addresses answered for `qname`, each with the smallest TTL along its chain (the
/// answer is only as fresh as its shortest-lived link).
pub fn addresses_for(qname: &str, response: &Message) -> Vec<(IpAddr, u32)> {
    let mut cnames: HashMap<String, (String, u32)> = HashMap::new();
    let mut addrs: HashMap<String, Vec<(IpAddr, u32)>> = HashMap::new();
    for r in response.answers() {
        let owner = normalize(r.name());
        match r.data() {
            RData::CNAME(target) => {
                cnames.insert(owner, (normalize(&target.0), r.ttl()));
            }
            RData::A(a) => addrs
                .entry(owner)
                .or_default()
                .push((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => addrs
                .entry(owner)
                .or_default()
                .push((IpAddr::V6(a.0), r.ttl())),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut name = qname.to_owned();
    let mut chain_ttl = u32::MAX;
    for _ in 0..=MAX_CHAIN {
        if let Some(list) = addrs.get(&name) {
            out.extend(list.iter().map(|&(ip, ttl)| (ip, ttl.min(chain_ttl))));
        }
        match cnames.get(&name) {
            Some((target, ttl)) => {
                chain_ttl = chain_ttl.min(*ttl);
                name = target.clone();
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{
        RData, Record,
        rdata::{A, AAAA, CNAME},
    };
    use std::str::FromStr as _;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn msg(records: Vec<Record>) -> Message {
        let mut m = Message::new();
        for r in records {
            m.add_answer(r);
        }
        m
    }

    #[test]
    fn direct_answers_are_taken() {
        let m = msg(vec![
            Record::from_rdata(
                n("api.example.com."),
                60,
                RData::A(A::new(198, 51, 100, 10)),
            ),
            Record::from_rdata(
                n("API.Example.com."),
                30,
                RData::AAAA(AAAA::from_str("2001:db8::10").unwrap()),
            ),
        ]);
        let got = addresses_for("api.example.com", &m);
        assert_eq!(
            got,
            vec![
                ("198.51.100.10".parse().unwrap(), 60),
                ("2001:db8::10".parse().unwrap(), 30)
            ]
        );
    }

    #[test]
    fn cname_chains_are_followed_with_the_smallest_ttl() {
        let m = msg(vec![
            Record::from_rdata(
                n("www.example.com."),
                20,
                RData::CNAME(CNAME(n("a.cdn.test."))),
            ),
            Record::from_rdata(n("a.cdn.test."), 300, RData::CNAME(CNAME(n("b.cdn.test.")))),
            Record::from_rdata(n("b.cdn.test."), 600, RData::A(A::new(198, 51, 100, 11))),
        ]);
        assert_eq!(
            addresses_for("www.example.com", &m),
            vec![("198.51.100.11".parse().unwrap(), 20)]
        );
    }

    #[test]
    fn records_for_other_names_allow_nothing() {
        let m = msg(vec![
            Record::from_rdata(n("evil.test."), 60, RData::A(A::new(203, 0, 113, 1))),
            Record::from_rdata(
                n("api.example.com."),
                60,
                RData::A(A::new(198, 51, 100, 10)),
            ),
        ]);
        assert_eq!(
            addresses_for("api.example.com", &m),
            vec![("198.51.100.10".parse().unwrap(), 60)]
        );
        assert!(addresses_for("other.example.com", &m).is_empty());
    }

    #[test]
    fn cname_loops_end() {
        let m = msg(vec![
            Record::from_rdata(n("a.test."), 60, RData::CNAME(CNAME(n("b.test.")))),
            Record::from_rdata(n("b.test."), 60, RData::CNAME(CNAME(n("a.test.")))),
        ]);
        assert!(addresses_for("a.test", &m).is_empty());
    }

    #[test]
    fn a_dot_inside_a_label_is_no_host_name() {
        let crafted = Name::from_labels(vec![&b"x.ok"[..], b"test"]).unwrap();
        assert_eq!(crafted.num_labels(), 2);
        assert_eq!(host_name(&crafted), None);
        assert_eq!(normalize(&crafted), "x\\.ok.test", "reported escaped");
        assert_eq!(host_name(&n("X.Ok.TEST.")).as_deref(), Some("x.ok.test"));
        assert_eq!(host_name(&Name::root()), None);
        let space = Name::from_labels(vec![&b"a b"[..], b"test"]).unwrap();
        assert_eq!(host_name(&space), None);
    }

    #[test]
    fn names_normalize() {
        assert_eq!(normalize(&n("WWW.Example.COM.")), "www.example.com");
        assert_eq!(normalize(&n("example.com")), "example.com");
    }
}
