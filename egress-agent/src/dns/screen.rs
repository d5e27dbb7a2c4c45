//! The resolver's decisions on messages, without I/O: what to do with a client's query, and
//! which addresses an upstream answer grants. Pure, so the fuzz targets can drive them with
//! arbitrary bytes.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, RecordType},
};

use super::answer::{addresses_for, host_name, normalize};
use crate::policy::Policy;

/// The query types forwarded upstream: what a client needs to connect to a name (addresses,
/// the alias chain, and the HTTPS record browsers and HTTP clients ask for beside them). Any
/// other type, and any class but IN, is refused for a permitted name too: the client's choice
/// among 65,536 types would be 16 bits per query sent towards the permitted name's servers.
pub const FORWARDED_TYPES: [RecordType; 4] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::HTTPS,
];

/// The UDP payload size our own EDNS record offers upstream (the DNS flag day 2020 value),
/// whatever the client offered.
pub const EDNS_PAYLOAD: u16 = 1232;

/// What to do with a query.
#[derive(Debug)]
pub enum Screened {
    /// Nothing to answer (not a query, or not even a header).
    Drop,
    /// Answer this at once (FORMERR for garbage, NOTIMP for other opcodes or no question).
    Reply(Vec<u8>),
    /// Every name not permitted is a permitted name with a search domain appended (a stub
    /// resolver walking its search list, as with Kubernetes' ndots:5): answer this NXDOMAIN at
    /// once, so that the stub goes on to the name itself. Nothing to report (the names carry
    /// no free-form data: both parts are fixed) and nothing is forwarded, in audit mode too.
    NxDomain(Vec<u8>),
    /// Some names are not permitted: `reply` is the REFUSED answer; `names` are the refused
    /// (name, type) pairs to report. `query` is the parsed query (audit mode forwards it).
    Refused {
        /// The REFUSED answer.
        reply: Vec<u8>,
        /// (name, record type) of each refused question.
        names: Vec<(String, String)>,
        /// The query.
        query: Box<Message>,
    },
    /// Every name is permitted: forward the query.
    Forward(Box<Message>),
}

/// Decides what to do with a client's query under `policy`; `search` holds the system
/// resolver's search domains (lowercase, no trailing dot).
pub fn screen(query: &[u8], policy: &Policy, search: &[String]) -> Screened {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            // Unparseable: answer FORMERR if there is an id to answer to.
            if query.len() < 12 {
                return Screened::Drop;
            }
            let id = u16::from_be_bytes([query[0], query[1]]);
            return encode(&Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            ));
        }
    };
    if msg.message_type() != MessageType::Query {
        return Screened::Drop;
    }
    if msg.op_code() != OpCode::Query || msg.queries().is_empty() {
        return encode(&reply_to(&msg, ResponseCode::NotImp));
    }
    // Judged on the wire labels: a name with a label no host name can hold (a dot inside a
    // label, say) is permitted by nothing, whatever its escaped text looks like.
    let names: Vec<(String, String)> = msg
        .queries()
        .iter()
        .filter(|q| !permitted(q, policy))
        .map(|q| (normalize(q.name()), q.query_type().to_string()))
        .collect();
    if names.is_empty() {
        return Screened::Forward(Box::new(msg));
    }
    if names
        .iter()
        .all(|(name, _)| is_search_expansion(name, policy, search))
    {
        return match reply_to(&msg, ResponseCode::NXDomain).to_vec() {
            Ok(reply) => Screened::NxDomain(reply),
            Err(_) => Screened::Drop,
        };
    }
    match reply_to(&msg, ResponseCode::Refused).to_vec() {
        Ok(reply) => Screened::Refused {
            reply,
            names,
            query: Box::new(msg),
        },
        Err(_) => Screened::Drop,
    }
}

/// Whether `policy` permits the question: a permitted name, one of [`FORWARDED_TYPES`],
/// class IN.
pub fn permitted(q: &Query, policy: &Policy) -> bool {
    q.query_class() == DNSClass::IN
        && FORWARDED_TYPES.contains(&q.query_type())
        && host_name(q.name()).is_some_and(|n| !policy.host_rules_for(&n).is_empty())
}

/// The query sent upstream for a screened client query: built afresh, so that nothing the
/// client chose beyond its questions' names and types reaches the upstream. Names in lower
/// case, class IN, recursion desired, no other flag, and our own EDNS record (payload
/// [`EDNS_PAYLOAD`], no options, DNSSEC OK clear) whatever the client sent. The id is
/// replaced by a random one on the way out ([`super::upstream::exchange`]).
pub fn upstream_query(msg: &Message) -> Result<Vec<u8>, String> {
    let mut q = Message::new();
    q.set_id(0)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    for question in msg.queries() {
        let mut question = Query::query(question.name().to_lowercase(), question.query_type());
        question.set_query_class(DNSClass::IN);
        q.add_query(question);
    }
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD).set_version(0);
    q.set_edns(edns);
    q.to_vec().map_err(|e| e.to_string())
}

/// The answer for the client from the upstream's (or the cache's) `answer` to the client's
/// `query`: the client's id, questions (their letter case included) and recursion flag; an
/// EDNS record only if the client sent one; over UDP, if it exceeds what the client takes
/// (512 bytes, or its EDNS payload size), only the header and questions with TC set, so that
/// the client asks again over TCP.
pub fn client_answer(mut answer: Message, query: &Message, udp: bool) -> Option<Vec<u8>> {
    answer
        .set_id(query.id())
        .set_recursion_desired(query.recursion_desired())
        .set_checking_disabled(false);
    answer.take_queries();
    answer.add_queries(query.queries().iter().cloned());
    *answer.extensions_mut() = query.extensions().as_ref().map(|_| {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD).set_version(0);
        edns
    });
    let bytes = answer.to_vec().ok()?;
    let fits = query
        .extensions()
        .as_ref()
        .map_or(512, |e| e.max_payload().max(512));
    if !udp || bytes.len() <= usize::from(fits) {
        return Some(bytes);
    }
    answer.take_answers();
    answer.take_name_servers();
    answer.take_additionals();
    answer.set_truncated(true);
    answer.to_vec().ok()
}

/// Whether `name` is `<permitted name>.<search domain>` for one of `search`.
fn is_search_expansion(name: &str, policy: &Policy, search: &[String]) -> bool {
    search.iter().any(|domain| {
        name.strip_suffix(domain.as_str())
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|head| !head.is_empty() && !policy.host_rules_for(head).is_empty())
    })
}

/// Per address question: the queried name, and the addresses answered with their TTLs.
pub type Answered = Vec<(String, Vec<(IpAddr, u32)>)>;

/// The addresses an upstream `answer` gives for each address question of `query`: (queried
/// name, addresses with their TTLs). An unparseable answer is an error.
pub fn answered_addresses(query: &Message, answer: &[u8]) -> Result<Answered, String> {
    let parsed = Message::from_vec(answer).map_err(|e| e.to_string())?;
    Ok(addresses_in(query, &parsed))
}

/// The addresses the parsed `answer` gives for each address question of `query`.
pub fn addresses_in(query: &Message, parsed: &Message) -> Answered {
    query
        .queries()
        .iter()
        .filter(|q| {
            // Other types carry no address to allow (HTTPS/SVCB hints are not followed).
            matches!(
                q.query_type(),
                RecordType::A | RecordType::AAAA | RecordType::ANY
            )
        })
        .map(|q| {
            let name = normalize(q.name());
            let addrs = addresses_for(&name, parsed);
            (name, addrs)
        })
        .collect()
}

/// An error answer to `q`, echoing its question.
pub fn reply_to(q: &Message, code: ResponseCode) -> Message {
    let mut r = Message::error_msg(q.id(), q.op_code(), code);
    r.add_queries(q.queries().iter().cloned());
    r.set_recursion_desired(q.recursion_desired());
    r.set_recursion_available(true);
    r
}

fn encode(m: &Message) -> Screened {
    match m.to_vec() {
        Ok(b) => Screened::Reply(b),
        Err(_) => Screened::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;
    use hickory_proto::{
        op::Query,
        rr::{Name, RData, Record, rdata::A},
    };
    use std::{path::Path, str::FromStr as _};

    fn policy() -> Policy {
        policy::parse_str(
            "version: 1\nallow:\n  - host: ok.example.com\n    ports: [443]\n",
            Path::new("t.yaml"),
        )
        .unwrap()
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn permitted_names_are_forwarded_and_others_refused() {
        let p = policy();
        assert!(matches!(
            screen(&query("OK.example.com.", RecordType::A), &p, &[]),
            Screened::Forward(_)
        ));
        match screen(&query("data.evil.test.", RecordType::TXT), &p, &[]) {
            Screened::Refused { reply, names, .. } => {
                assert_eq!(names, vec![("data.evil.test".into(), "TXT".into())]);
                let r = Message::from_vec(&reply).unwrap();
                assert_eq!(r.response_code(), ResponseCode::Refused);
                assert_eq!(r.id(), 7);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dot_inside_a_label_matches_no_wildcard() {
        let p = wildcard_policy();
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        let name = Name::from_labels(vec![&b"x.wild"[..], b"example", b"com"]).unwrap();
        m.add_query(Query::query(name, RecordType::A));
        assert!(matches!(
            screen(&m.to_vec().unwrap(), &p, &[]),
            Screened::Refused { .. }
        ));
        // The same name with ordinary labels is permitted.
        assert!(matches!(
            screen(&query("x.wild.example.com.", RecordType::A), &p, &[]),
            Screened::Forward(_)
        ));
    }

    fn search() -> Vec<String> {
        [
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]
        .map(String::from)
        .to_vec()
    }

    fn wildcard_policy() -> Policy {
        policy::parse_str(
            "version: 1\nallow:\n  - host: ok.example.com\n    ports: [443]\n  \
             - host: \"*.wild.example.com\"\n",
            Path::new("t.yaml"),
        )
        .unwrap()
    }

    fn code(reply: &[u8]) -> ResponseCode {
        Message::from_vec(reply).unwrap().response_code()
    }

    #[test]
    fn a_permitted_name_with_a_search_domain_gets_nxdomain() {
        let p = wildcard_policy();
        let s = search();
        for name in [
            "ok.example.com.default.svc.cluster.local.",
            "OK.Example.com.svc.cluster.local.",
            "ok.example.com.cluster.local.",
            "a.b.wild.example.com.default.svc.cluster.local.",
        ] {
            for t in [RecordType::A, RecordType::AAAA] {
                match screen(&query(name, t), &p, &s) {
                    Screened::NxDomain(r) => {
                        assert_eq!(code(&r), ResponseCode::NXDomain, "{name}");
                        let m = Message::from_vec(&r).unwrap();
                        assert_eq!(m.id(), 7);
                        assert_eq!(m.queries().len(), 1, "the question is echoed");
                    }
                    other => panic!("{name} {t}: {other:?}"),
                }
            }
        }
        // The name itself is still forwarded.
        assert!(matches!(
            screen(&query("ok.example.com.", RecordType::A), &p, &s),
            Screened::Forward(_)
        ));
    }

    #[test]
    fn anything_else_with_a_search_domain_is_still_refused() {
        let p = wildcard_policy();
        let s = search();
        for name in [
            // Not permitted before the suffix.
            "data.evil.test.default.svc.cluster.local.",
            // The wildcard's suffix itself is not permitted.
            "wild.example.com.svc.cluster.local.",
            // Not one of the search domains.
            "ok.example.com.other.local.",
            "ok.example.com.xcluster.local.",
            // A search domain alone, or a label glued to it.
            "cluster.local.",
            "ok.example.comcluster.local.",
            // Data between the permitted name and the search domain.
            "ok.example.com.exfil.default.svc.cluster.local.",
        ] {
            match screen(&query(name, RecordType::A), &p, &s) {
                Screened::Refused { reply, names, .. } => {
                    assert_eq!(code(&reply), ResponseCode::Refused, "{name}");
                    assert_eq!(names.len(), 1, "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        // Without search domains, an expansion is refused like any other name.
        assert!(matches!(
            screen(
                &query("ok.example.com.default.svc.cluster.local.", RecordType::A),
                &p,
                &[]
            ),
            Screened::Refused { .. }
        ));
    }

    #[test]
    fn a_question_beside_an_expansion_is_judged_on_its_own() {
        let p = wildcard_policy();
        let mut m = Message::new();
        m.set_id(9).set_recursion_desired(true);
        m.add_query(Query::query(
            Name::from_str("ok.example.com.cluster.local.").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_str("data.evil.test.").unwrap(),
            RecordType::A,
        ));
        match screen(&m.to_vec().unwrap(), &p, &search()) {
            Screened::Refused { names, .. } => assert_eq!(names.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dot_inside_a_label_is_refused() {
        let p = policy::parse_str(
            "version: 1\nallow:\n  - host: \"*.ok.test\"\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let mut m = Message::new();
        m.set_id(3).set_recursion_desired(true);
        m.add_query(Query::query(
            Name::from_labels(vec![&b"x.ok"[..], b"test"]).unwrap(),
            RecordType::A,
        ));
        match screen(&m.to_vec().unwrap(), &p, &[]) {
            Screened::Refused { names, .. } => {
                assert_eq!(names, vec![("x\\.ok.test".into(), "A".into())]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            screen(&query("x.ok.test.", RecordType::A), &p, &[]),
            Screened::Forward(_)
        ));
    }

    #[test]
    fn only_the_needed_types_of_a_permitted_name_are_forwarded() {
        let p = policy();
        for t in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::CNAME,
            RecordType::HTTPS,
        ] {
            assert!(
                matches!(
                    screen(&query("ok.example.com.", t), &p, &[]),
                    Screened::Forward(_)
                ),
                "{t}"
            );
        }
        for t in [
            RecordType::TXT,
            RecordType::MX,
            RecordType::NULL,
            RecordType::ANY,
            RecordType::Unknown(65_000),
        ] {
            match screen(&query("ok.example.com.", t), &p, &[]) {
                Screened::Refused { names, .. } => {
                    assert_eq!(names, vec![("ok.example.com".into(), t.to_string())])
                }
                other => panic!("{t}: {other:?}"),
            }
        }
        let mut chaos = Message::new();
        let mut q = Query::query(Name::from_str("ok.example.com.").unwrap(), RecordType::A);
        q.set_query_class(hickory_proto::rr::DNSClass::CH);
        chaos.add_query(q);
        assert!(matches!(
            screen(&chaos.to_vec().unwrap(), &p, &[]),
            Screened::Refused { .. }
        ));
    }

    #[test]
    fn the_upstream_query_carries_nothing_the_client_chose_but_names_and_types() {
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
        let mut m = Message::new();
        m.set_id(0x4242)
            .set_recursion_desired(false)
            .set_checking_disabled(true)
            .set_authentic_data(true);
        m.add_query(Query::query(
            Name::from_ascii("Ok.EXAMPLE.com.").unwrap(),
            RecordType::AAAA,
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(4000).set_dnssec_ok(true);
        edns.options_mut().insert(EdnsOption::Unknown(
            u16::from(EdnsCode::Padding),
            vec![7; 9],
        ));
        m.set_edns(edns);
        let up = Message::from_vec(&upstream_query(&m).unwrap()).unwrap();
        assert_eq!(up.id(), 0);
        assert!(up.recursion_desired());
        assert!(!up.checking_disabled() && !up.authentic_data());
        assert_eq!(up.queries().len(), 1);
        assert_eq!(up.queries()[0].name().to_string(), "ok.example.com.");
        assert_eq!(up.queries()[0].query_type(), RecordType::AAAA);
        let e = up.extensions().as_ref().expect("our EDNS record");
        assert_eq!(e.max_payload(), EDNS_PAYLOAD);
        assert!(!e.flags().dnssec_ok);
        assert!(e.options().as_ref().is_empty(), "no options");
    }

    #[test]
    fn the_client_gets_its_question_back_and_a_size_it_takes() {
        let mut q = Message::new();
        q.set_id(9).set_recursion_desired(true);
        q.add_query(Query::query(
            Name::from_ascii("Ok.Example.COM.").unwrap(),
            RecordType::A,
        ));
        let mut a = Message::from_vec(&query("ok.example.com.", RecordType::A)).unwrap();
        a.set_message_type(MessageType::Response).set_id(77);
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        a.set_edns(edns);
        for i in 0..40u8 {
            a.add_answer(Record::from_rdata(
                Name::from_str("ok.example.com.").unwrap(),
                60,
                RData::A(A::new(198, 51, 100, i)),
            ));
        }
        // Over TCP, whole, with the client's id and question, and no EDNS (it sent none).
        let r = Message::from_vec(&client_answer(a.clone(), &q, false).unwrap()).unwrap();
        assert_eq!(r.id(), 9);
        assert_eq!(r.queries()[0].name().to_string(), "Ok.Example.COM.");
        assert_eq!(r.answers().len(), 40);
        assert!(r.extensions().is_none());
        // Over UDP without EDNS: more than 512 bytes, so cut with TC.
        let r = Message::from_vec(&client_answer(a.clone(), &q, true).unwrap()).unwrap();
        assert!(r.truncated());
        assert!(r.answers().is_empty());
        assert_eq!(r.queries().len(), 1);
        // With EDNS 1232 it fits, and the answer carries our EDNS record.
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        q.set_edns(edns);
        let r = Message::from_vec(&client_answer(a, &q, true).unwrap()).unwrap();
        assert!(!r.truncated());
        assert_eq!(r.answers().len(), 40);
        assert_eq!(
            r.extensions().as_ref().map(|e| e.max_payload()),
            Some(EDNS_PAYLOAD)
        );
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        let p = policy();
        assert!(matches!(screen(&[1, 2, 3], &p, &[]), Screened::Drop));
        match screen(&[0xab, 0xcd, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff], &p, &[]) {
            Screened::Reply(r) => {
                let m = Message::from_vec(&r).unwrap();
                assert_eq!(m.response_code(), ResponseCode::FormErr);
                assert_eq!(m.id(), 0xabcd);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_grant_only_the_queried_chain() {
        let q = Message::from_vec(&query("ok.example.com.", RecordType::A)).unwrap();
        let mut a = Message::new();
        a.set_id(7).set_message_type(MessageType::Response);
        a.add_answer(Record::from_rdata(
            Name::from_str("ok.example.com.").unwrap(),
            60,
            RData::A(A::new(198, 51, 100, 10)),
        ));
        a.add_answer(Record::from_rdata(
            Name::from_str("evil.test.").unwrap(),
            60,
            RData::A(A::new(203, 0, 113, 1)),
        ));
        let got = answered_addresses(&q, &a.to_vec().unwrap()).unwrap();
        assert_eq!(
            got,
            vec![(
                "ok.example.com".to_owned(),
                vec![("198.51.100.10".parse().unwrap(), 60)]
            )]
        );
        assert!(answered_addresses(&q, &[0, 1]).is_err());
    }
}
