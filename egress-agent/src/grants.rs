//! Which host names each DNS-derived address was answered for, and until when.
//!
//! An address answered for two names keeps the union of their rules, until the later of their
//! expiries; when one name's grant expires, the entry shrinks to what the others still allow.
//! Pure bookkeeping: the caller writes the resulting values into the kernel map.

use std::{collections::HashMap, net::IpAddr, time::Duration};

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
    by_ip: HashMap<IpAddr, Vec<Grant>>,
    /// Entries an earlier agent wrote (names unknown): removed at their expiry unless a new
    /// answer takes them over.
    adopted: HashMap<IpAddr, Duration>,
}

impl Grants {
    /// Records that `ip` was answered for `name` until `expires` (a later expiry of the same
    /// name wins) and returns the address's live grants.
    pub fn add(&mut self, ip: IpAddr, name: &str, expires: Duration) -> Vec<Grant> {
        self.adopted.remove(&ip);
        let list = self.by_ip.entry(ip).or_default();
        match list.iter_mut().find(|g| g.name == name) {
            Some(g) => g.expires = g.expires.max(expires),
            None => list.push(Grant {
                name: name.to_owned(),
                expires,
            }),
        }
        list.clone()
    }

    /// Takes over an entry an earlier agent wrote, until `expires` (0: never, static).
    pub fn adopt(&mut self, ip: IpAddr, expires: Duration) {
        if !expires.is_zero() {
            self.adopted.insert(ip, expires);
        }
    }

    /// Drops grants expired at `now` and says which entries must change.
    pub fn sweep(&mut self, now: Duration) -> Vec<Change> {
        let mut changes = Vec::new();
        self.adopted.retain(|ip, expires| {
            if *expires > now {
                return true;
            }
            changes.push(Change::Remove(*ip));
            false
        });
        self.by_ip.retain(|ip, list| {
            let before = list.len();
            list.retain(|g| g.expires > now);
            if list.is_empty() {
                changes.push(Change::Remove(*ip));
                false
            } else {
                if list.len() != before {
                    changes.push(Change::Update(*ip, list.clone()));
                }
                true
            }
        });
        changes
    }

    /// Keeps only the grants of names `keep` accepts (after a policy change) and says which
    /// entries must change.
    pub fn retain_names(&mut self, keep: impl Fn(&str) -> bool) -> Vec<Change> {
        let mut changes = Vec::new();
        self.by_ip.retain(|ip, list| {
            list.retain(|g| keep(&g.name));
            if list.is_empty() {
                changes.push(Change::Remove(*ip));
                false
            } else {
                // The rules behind a kept name may have changed too: rewrite every entry.
                changes.push(Change::Update(*ip, list.clone()));
                true
            }
        });
        changes
    }

    /// Forgets an address (its map write failed).
    pub fn forget(&mut self, ip: &IpAddr) {
        self.by_ip.remove(ip);
    }

    /// Every address with its grants (for re-deriving entries after a policy change).
    pub fn all(&self) -> impl Iterator<Item = (&IpAddr, &Vec<Grant>)> {
        self.by_ip.iter()
    }

    /// Number of addresses held.
    pub fn len(&self) -> usize {
        self.by_ip.len() + self.adopted.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty() && self.adopted.is_empty()
    }
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
        assert_eq!(both.len(), 2);
        assert_eq!(latest(&both), S(20));

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
    fn adopted_entries_expire_unless_taken_over() {
        let mut g = Grants::default();
        g.adopt(ip("198.51.100.1"), S(10));
        g.adopt(ip("198.51.100.2"), S(10));
        g.adopt(ip("198.51.100.3"), Duration::ZERO);
        g.add(ip("198.51.100.2"), "b.example.com", S(30));
        assert_eq!(g.sweep(S(11)), vec![Change::Remove(ip("198.51.100.1"))]);
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_new_answer_extends_but_never_shortens() {
        let mut g = Grants::default();
        g.add(ip("2001:db8::1"), "a.example.com", S(30));
        let l = g.add(ip("2001:db8::1"), "a.example.com", S(5));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].expires, S(30));
        assert!(g.sweep(S(29)).is_empty());
    }
}
