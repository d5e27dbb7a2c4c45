//! Which host names each DNS-derived address was answered for, and until when.
//!
//! An address answered for two names keeps the union of their rules, until the later of their
//! expiries; when one name's grant expires, the entry shrinks to what the others still allow.
//! Pure bookkeeping: the caller writes the resulting values into the kernel map.
//!
//! The grants are also persisted (`/run/egress/<name>/grants.json`, see [`Grants::to_json`]),
//! so that an agent restarted on pinned maps knows which names each adopted entry was answered
//! for, and keeps only what the current policy still permits ([`restore`]).

use std::{collections::HashMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

/// Names kept per address at most: a new name beyond them replaces the one that expires
/// first. A flood of random names under a wildcard (all answered with the same address) then
/// costs a bounded amount of memory and grants-file space; the addresses stay granted. The
/// number of addresses is bounded by the kernel map's capacity (a failed write forgets it).
pub const NAMES_PER_ADDRESS: usize = 64;

/// One name's grant on an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The permitted name the address was answered for.
    pub name: String,
    /// Expiry on `CLOCK_BOOTTIME`.
    pub expires: Duration,
}

/// What changed for an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The address is still allowed by these grants: rewrite its entry.
    Update(IpAddr, Vec<Grant>),
    /// No grant is left: remove the entry.
    Remove(IpAddr),
}

/// Grants by address.
#[derive(Debug, Default)]
pub struct Grants {
    by_ip: HashMap<IpAddr, Names>,
    /// Bumped on every change, so that the persisted copy is rewritten only when needed.
    generation: u64,
}

/// The names one address was answered for. Behind a CDN thousands of names share an address:
/// a repeated answer must cost the same whatever their number.
#[derive(Debug, Default)]
struct Names {
    /// Each name's expiry.
    expiries: HashMap<String, Duration>,
    /// The latest of them.
    latest: Duration,
}

impl Names {
    fn grants(&self) -> Vec<Grant> {
        let mut list: Vec<Grant> = self
            .expiries
            .iter()
            .map(|(name, &expires)| Grant {
                name: name.clone(),
                expires,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Keeps the names `keep` accepts; whether any was dropped.
    fn retain(&mut self, keep: impl Fn(&str, Duration) -> bool) -> bool {
        let before = self.expiries.len();
        self.expiries
            .retain(|name, &mut expires| keep(name, expires));
        self.latest = self.expiries.values().copied().max().unwrap_or_default();
        self.expiries.len() != before
    }
}

/// An address's state right after [`Grants::add`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// How many names it is granted for.
    pub names: usize,
    /// The latest expiry among them.
    pub latest: Duration,
    /// The name dropped to make room ([`NAMES_PER_ADDRESS`]), if one was: the entry must be
    /// computed again from the names left, unless the dropped name's rules are the new one's.
    pub evicted: Option<String>,
}

impl Grants {
    /// Records that `ip` was answered for `name` until `expires` (a later expiry of the same
    /// name wins); constant time whatever the number of names on the address.
    pub fn add(&mut self, ip: IpAddr, name: &str, expires: Duration) -> Added {
        self.generation += 1;
        let names = self.by_ip.entry(ip).or_default();
        let mut evicted = None;
        match names.expiries.get_mut(name) {
            Some(e) => *e = (*e).max(expires),
            None => {
                if names.expiries.len() >= NAMES_PER_ADDRESS
                    && let Some(first) = names
                        .expiries
                        .iter()
                        .min_by_key(|(_, e)| **e)
                        .map(|(n, _)| n.clone())
                {
                    names.expiries.remove(&first);
                    evicted = Some(first);
                }
                names.expiries.insert(name.to_owned(), expires);
            }
        }
        names.latest = if evicted.is_some() {
            names.expiries.values().copied().max().unwrap_or_default()
        } else {
            names.latest.max(expires)
        };
        Added {
            names: names.expiries.len(),
            latest: names.latest,
            evicted,
        }
    }

    /// The live grants of `ip`, by name.
    pub fn live(&self, ip: &IpAddr) -> Vec<Grant> {
        self.by_ip.get(ip).map(Names::grants).unwrap_or_default()
    }

    /// Drops grants expired at `now` and says which entries must change.
    pub fn sweep(&mut self, now: Duration) -> Vec<Change> {
        let mut changes = Vec::new();
        self.by_ip.retain(|ip, names| {
            if names.latest > now && names.expiries.len() == 1 {
                // The common case: one name, not expired.
                return true;
            }
            let dropped = names.retain(|_, expires| expires > now);
            if names.expiries.is_empty() {
                changes.push(Change::Remove(*ip));
                false
            } else {
                if dropped {
                    changes.push(Change::Update(*ip, names.grants()));
                }
                true
            }
        });
        if !changes.is_empty() {
            self.generation += 1;
        }
        changes
    }

    /// Keeps only the grants of names `keep` accepts (after a policy change) and says which
    /// entries must change.
    pub fn retain_names(&mut self, keep: impl Fn(&str) -> bool) -> Vec<Change> {
        let mut changes = Vec::new();
        self.by_ip.retain(|ip, names| {
            names.retain(|name, _| keep(name));
            if names.expiries.is_empty() {
                changes.push(Change::Remove(*ip));
                false
            } else {
                // The rules behind a kept name may have changed too: rewrite every entry.
                changes.push(Change::Update(*ip, names.grants()));
                true
            }
        });
        self.generation += 1;
        changes
    }

    /// Forgets an address (its map write failed).
    pub fn forget(&mut self, ip: &IpAddr) {
        if self.by_ip.remove(ip).is_some() {
            self.generation += 1;
        }
    }

    /// A number that changes whenever the grants do.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The persisted form: every address with its names and their expiries.
    pub fn to_json(&self) -> Vec<u8> {
        let mut addresses: Vec<Persisted> = self
            .by_ip
            .iter()
            .map(|(ip, names)| Persisted {
                ip: *ip,
                grants: names
                    .expiries
                    .iter()
                    .map(|(name, expires)| PersistedGrant {
                        name: name.clone(),
                        expires_ns: expires.as_nanos() as u64,
                    })
                    .collect(),
            })
            .collect();
        addresses.sort_by_key(|a| a.ip);
        serde_json::to_vec(&PersistedFile {
            version: PERSISTED_VERSION,
            addresses,
        })
        .expect("grants serialize")
    }

    /// Number of addresses held.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// The version of the persisted form this agent writes and reads.
const PERSISTED_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct PersistedFile {
    version: u32,
    addresses: Vec<Persisted>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    ip: IpAddr,
    grants: Vec<PersistedGrant>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedGrant {
    name: String,
    /// Expiry on `CLOCK_BOOTTIME`, in nanoseconds.
    expires_ns: u64,
}

/// Reads what [`Grants::to_json`] wrote: the names each address was answered for.
pub fn from_json(bytes: &[u8]) -> Result<HashMap<IpAddr, Vec<Grant>>, String> {
    let file: PersistedFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != PERSISTED_VERSION {
        return Err(format!("unknown version {}", file.version));
    }
    Ok(file
        .addresses
        .into_iter()
        .map(|a| {
            let list = a
                .grants
                .into_iter()
                .map(|g| Grant {
                    name: g.name,
                    expires: Duration::from_nanos(g.expires_ns),
                })
                .collect();
            (a.ip, list)
        })
        .collect())
}

/// What an agent restarted on pinned maps does with the DNS entries it adopted (`adopted`:
/// each address with its entry's expiry, 0 for none), given the `recorded` grants of the
/// earlier agent and the current policy's `permitted` names: an entry keeps the grants of
/// names still permitted and not expired at `now` (never past the entry's own expiry), and
/// its value is rewritten from them; an entry with no such grant (a name no longer permitted,
/// or no record at all: fail closed, the app resolves again) is removed.
pub fn restore(
    adopted: &[(IpAddr, Duration)],
    recorded: &HashMap<IpAddr, Vec<Grant>>,
    now: Duration,
    permitted: impl Fn(&str) -> bool,
) -> (Grants, Vec<Change>) {
    let mut grants = Grants::default();
    let mut changes = Vec::new();
    for &(ip, entry_expires) in adopted {
        for g in recorded.get(&ip).map(Vec::as_slice).unwrap_or_default() {
            let expires = if entry_expires.is_zero() {
                g.expires
            } else {
                g.expires.min(entry_expires)
            };
            if expires > now && permitted(&g.name) {
                grants.add(ip, &g.name, expires);
            }
        }
        changes.push(match grants.by_ip.get(&ip) {
            Some(names) => Change::Update(ip, names.grants()),
            None => Change::Remove(ip),
        });
    }
    (grants, changes)
}

/// The latest expiry among `grants`.
pub fn latest(grants: &[Grant]) -> Duration {
    grants.iter().map(|g| g.expires).max().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_names_share_an_address_until_the_later_expiry() {
        let mut g = Grants::default();
        g.add(ip("198.51.100.10"), "a.example.com", S(10));
        let both = g.add(ip("198.51.100.10"), "b.example.com", S(20));
        assert_eq!(
            both,
            Added {
                names: 2,
                latest: S(20),
                evicted: None,
            }
        );
        assert_eq!(latest(&g.live(&ip("198.51.100.10"))), S(20));

        let changes = g.sweep(S(15));
        assert_eq!(
            changes,
            vec![Change::Update(
                ip("198.51.100.10"),
                vec![Grant {
                    name: "b.example.com".into(),
                    expires: S(20)
                }]
            )]
        );
        assert_eq!(g.sweep(S(20)), vec![Change::Remove(ip("198.51.100.10"))]);
        assert!(g.is_empty());
    }

    #[test]
    fn the_persisted_form_round_trips() {
        let mut g = Grants::default();
        g.add(ip("198.51.100.10"), "a.example.com", S(10));
        g.add(
            ip("198.51.100.10"),
            "b.example.com",
            Duration::from_nanos(20_000_000_123),
        );
        g.add(ip("2001:db8::1"), "a.example.com", S(30));
        let back = from_json(&g.to_json()).unwrap();
        assert_eq!(back.len(), 2);
        let mut both = back[&ip("198.51.100.10")].clone();
        both.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(
            both,
            vec![
                Grant {
                    name: "a.example.com".into(),
                    expires: S(10)
                },
                Grant {
                    name: "b.example.com".into(),
                    expires: Duration::from_nanos(20_000_000_123)
                }
            ]
        );
        assert_eq!(back[&ip("2001:db8::1")][0].expires, S(30));
        assert!(from_json(b"{}").is_err());
        assert!(from_json(br#"{"version":99,"addresses":[]}"#).is_err());
        assert!(from_json(b"not json").is_err());
    }

    #[test]
    fn every_change_moves_the_generation() {
        let mut g = Grants::default();
        let g0 = g.generation();
        g.add(ip("198.51.100.1"), "a.example.com", S(10));
        let g1 = g.generation();
        assert_ne!(g0, g1);
        assert!(g.sweep(S(5)).is_empty());
        assert_eq!(g.generation(), g1, "nothing swept, nothing to write");
        g.sweep(S(10));
        assert_ne!(g.generation(), g1);
    }

    #[test]
    fn a_restart_keeps_only_what_the_current_policy_permits() {
        let mut recorded = HashMap::new();
        let grant = |name: &str, expires| Grant {
            name: name.into(),
            expires,
        };
        // a and b on .1; only b (no longer permitted) on .2; a expired on .3; nothing
        // recorded for .4 (state lost); a on .5, recorded past the entry's own expiry.
        recorded.insert(
            ip("198.51.100.1"),
            vec![grant("a.example.com", S(50)), grant("b.example.com", S(60))],
        );
        recorded.insert(ip("198.51.100.2"), vec![grant("b.example.com", S(60))]);
        recorded.insert(ip("198.51.100.3"), vec![grant("a.example.com", S(5))]);
        recorded.insert(ip("198.51.100.5"), vec![grant("a.example.com", S(90))]);
        let adopted = [
            (ip("198.51.100.1"), S(60)),
            (ip("198.51.100.2"), S(60)),
            (ip("198.51.100.3"), S(5)),
            (ip("198.51.100.4"), S(60)),
            (ip("198.51.100.5"), S(40)),
        ];
        let (grants, changes) = restore(&adopted, &recorded, S(10), |n| n == "a.example.com");
        assert_eq!(
            changes,
            vec![
                Change::Update(ip("198.51.100.1"), vec![grant("a.example.com", S(50))]),
                Change::Remove(ip("198.51.100.2")),
                Change::Remove(ip("198.51.100.3")),
                Change::Remove(ip("198.51.100.4")),
                Change::Update(ip("198.51.100.5"), vec![grant("a.example.com", S(40))]),
            ]
        );
        assert_eq!(grants.len(), 2);
        // A recorded address the maps no longer hold is not brought back.
        let (grants, changes) = restore(&[], &recorded, S(10), |_| true);
        assert!(grants.is_empty() && changes.is_empty());
    }

    #[test]
    fn an_address_keeps_a_bounded_number_of_names() {
        let mut g = Grants::default();
        let a = ip("198.51.100.30");
        for i in 0..NAMES_PER_ADDRESS as u64 {
            let added = g.add(a, &format!("n{i}.flood.test"), S(100 + i));
            assert!(added.evicted.is_none());
        }
        // One more: the name that expires first (n0) makes room.
        let added = g.add(a, "late.flood.test", S(50));
        assert_eq!(added.evicted.as_deref(), Some("n0.flood.test"));
        assert_eq!(added.names, NAMES_PER_ADDRESS);
        let live = g.live(&a);
        assert!(!live.iter().any(|x| x.name == "n0.flood.test"));
        assert!(live.iter().any(|x| x.name == "late.flood.test"));
        // A name already there is no new name.
        assert!(g.add(a, "late.flood.test", S(60)).evicted.is_none());
        for i in 0..10_000u64 {
            g.add(a, &format!("r{i}.flood.test"), S(200 + i));
        }
        assert_eq!(g.live(&a).len(), NAMES_PER_ADDRESS);
        assert_eq!(latest(&g.live(&a)), S(200 + 9_999));
    }

    #[test]
    fn a_new_answer_extends_but_never_shortens() {
        let mut g = Grants::default();
        g.add(ip("2001:db8::1"), "a.example.com", S(30));
        let l = g.add(ip("2001:db8::1"), "a.example.com", S(5));
        assert_eq!(
            l,
            Added {
                names: 1,
                latest: S(30),
                evicted: None,
            }
        );
        assert_eq!(g.live(&ip("2001:db8::1"))[0].expires, S(30));
        assert!(g.sweep(S(29)).is_empty());
    }
}
