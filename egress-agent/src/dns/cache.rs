//! A small answer cache: a permitted name asked again within its TTL is answered without a
//! round trip upstream (dnsmasq, the peer, answers repeats from memory too). Served answers
//! carry the TTLs that remain, and their addresses are granted again with those TTLs, so the
//! allow map follows the cache exactly. Only complete, positive answers are kept. Screening
//! runs before the cache: a name the running policy does not permit is never served from it.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::op::{Message, ResponseCode};

/// Entries kept at most (the whole cache is dropped when full: simple, and bounded).
pub const CAPACITY: usize = 4096;
/// Longest time an answer is served from the cache, whatever its TTL.
pub const MAX_AGE: Duration = Duration::from_secs(300);

/// What makes two queries ask the same thing: their questions (name in lower case, type,
/// class), as the upstream saw them ([`super::screen::upstream_query`] drops every client
/// flag and EDNS option; an answer too large for a UDP client is cut at serving time,
/// [`super::screen::client_answer`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    questions: Vec<(String, u16, u16)>,
}

impl Key {
    /// The key of a (screened) query.
    pub fn of(query: &Message) -> Self {
        Self {
            questions: query
                .queries()
                .iter()
                .map(|q| {
                    (
                        super::answer::normalize(q.name()),
                        u16::from(q.query_type()),
                        u16::from(q.query_class()),
                    )
                })
                .collect(),
        }
    }
}

/// The addresses an answer granted, per queried name, with their TTLs.
pub type Granted = Vec<(String, Vec<(IpAddr, u32)>)>;

struct Entry {
    answer: Message,
    stored: Instant,
    ttl: u32,
    granted: Granted,
}

/// The cache.
#[derive(Default)]
pub struct AnswerCache {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl AnswerCache {
    /// The cached answer to `key`, with the remaining TTLs, and what it grants (with the
    /// remaining TTLs too); `None` on a miss or an expired entry.
    pub fn get(&self, key: &Key, now: Instant) -> Option<(Message, Granted)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(key)?;
        let age = u32::try_from(now.saturating_duration_since(e.stored).as_secs()).ok()?;
        if age >= e.ttl {
            return None;
        }
        let mut answer = e.answer.clone();
        let age_out = |records: &mut Vec<hickory_proto::rr::Record>| {
            for r in records {
                r.set_ttl(r.ttl().saturating_sub(age));
            }
        };
        age_out(answer.answers_mut());
        age_out(answer.name_servers_mut());
        age_out(answer.additionals_mut());
        let granted = e
            .granted
            .iter()
            .map(|(name, addrs)| {
                let addrs = addrs
                    .iter()
                    .map(|&(ip, ttl)| (ip, ttl.saturating_sub(age)))
                    .collect();
                (name.clone(), addrs)
            })
            .collect();
        Some((answer, granted))
    }

    /// Keeps the upstream's `parsed` answer for `key` if it is complete and positive.
    pub fn put(&self, key: Key, parsed: &Message, granted: Granted, now: Instant) {
        if parsed.response_code() != ResponseCode::NoError
            || parsed.truncated()
            || parsed.answers().is_empty()
        {
            return;
        }
        let ttl = parsed
            .answers()
            .iter()
            .map(|r| r.ttl())
            .min()
            .unwrap_or(0)
            .min(MAX_AGE.as_secs() as u32);
        if ttl == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY {
            entries.retain(|_, e| {
                now.saturating_duration_since(e.stored).as_secs() < u64::from(e.ttl)
            });
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(
            key,
            Entry {
                answer: parsed.clone(),
                stored: now,
                ttl,
                granted,
            },
        );
    }

    /// Drops the answers expired at `now`; how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let before = entries.len();
        entries.retain(|_, e| now.saturating_duration_since(e.stored).as_secs() < u64::from(e.ttl));
        let gone = before - entries.len();
        if entries.is_empty() && gone > 0 {
            // Give the table's memory back too.
            entries.shrink_to_fit();
        }
        gone
    }

    /// Forgets everything (after a policy change: grants are recomputed from new answers).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };
    use std::str::FromStr as _;

    fn query(id: u16) -> Message {
        let mut m = Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(Query::query(
            Name::from_str("ok.example.com.").unwrap(),
            RecordType::A,
        ));
        m
    }

    fn answer(ttl: u32) -> Message {
        let mut a = query(1);
        a.set_message_type(MessageType::Response);
        a.add_answer(Record::from_rdata(
            Name::from_str("ok.example.com.").unwrap(),
            ttl,
            RData::A(A::new(198, 51, 100, 10)),
        ));
        a
    }

    fn granted(ttl: u32) -> Granted {
        vec![(
            "ok.example.com".into(),
            vec![("198.51.100.10".parse().unwrap(), ttl)],
        )]
    }

    #[test]
    fn a_repeat_is_served_with_its_id_and_the_remaining_ttl() {
        let c = AnswerCache::default();
        let t0 = Instant::now();
        let key = Key::of(&query(7));
        c.put(key.clone(), &answer(60), granted(60), t0);
        let (m, g) = c.get(&key, t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(m.answers()[0].ttl(), 40);
        assert_eq!(g[0].1[0].1, 40);
        assert!(
            c.get(&key, t0 + Duration::from_secs(60)).is_none(),
            "expired"
        );
    }

    #[test]
    fn only_complete_positive_answers_are_kept() {
        let c = AnswerCache::default();
        let t0 = Instant::now();
        let key = Key::of(&query(7));
        c.put(key.clone(), &answer(0), granted(0), t0);
        assert!(c.get(&key, t0).is_none(), "TTL 0 is not cached");
        let mut refused = query(1);
        refused
            .set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::ServFail);
        c.put(key.clone(), &refused, Vec::new(), t0);
        assert!(c.get(&key, t0).is_none(), "errors are not cached");
    }

    #[test]
    fn only_the_questions_make_the_key() {
        let mut flags = query(2);
        flags.set_checking_disabled(true);
        assert_eq!(
            Key::of(&query(1)),
            Key::of(&flags),
            "not the id, not the flags"
        );
        let mut upper = Message::new();
        upper.add_query(Query::query(
            Name::from_str("OK.Example.COM.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(Key::of(&query(1)), Key::of(&upper), "not the letter case");
        let mut aaaa = Message::new();
        aaaa.add_query(Query::query(
            Name::from_str("ok.example.com.").unwrap(),
            RecordType::AAAA,
        ));
        assert_ne!(Key::of(&query(1)), Key::of(&aaaa));
    }
}
