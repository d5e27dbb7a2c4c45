//! Host names and `*.` wildcards: validation, normal form and matching.

use std::{fmt, net::IpAddr};

use serde::Deserialize;

use super::yaml::quoted;

/// Longest name in presentation form without the trailing dot (RFC 1035 2.3.4).
const MAX_NAME: usize = 253;
/// Longest label (RFC 1035 2.3.4).
const MAX_LABEL: usize = 63;

/// A `host:` value: an exact name or a wildcard, lowercased, without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// Any name below this suffix, at any depth, but not the suffix itself (`*.example.com`
    /// holds `example.com`).
    Wildcard(String),
}

impl HostPattern {
    /// Whether `name` (any case, with or without its trailing dot) is covered.
    ///
    /// A wildcard needs a whole label boundary: `*.example.com` covers `a.b.example.com` but
    /// neither `example.com` nor `evilexample.com`.
    ///
    /// Matching is label by label: `name` is the dotted form of a name whose labels hold only
    /// what a host name label may hold (`a-z`, `0-9`, `-`, `_`, any case). A name with any
    /// other byte (a presentation form such as `x\.ok.example.com`, whose first label holds a
    /// dot, or an empty label) matches nothing: its text could otherwise line up with a
    /// pattern's labels that its wire labels do not. See [`HostPattern::matches_labels`] for
    /// wire labels.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || !name.split('.').all(|l| is_label(l.as_bytes())) {
            return false;
        }
        match self {
            Self::Exact(exact) => name.eq_ignore_ascii_case(exact),
            Self::Wildcard(suffix) => {
                let Some(cut) = name.len().checked_sub(suffix.len() + 1) else {
                    return false;
                };
                cut > 0
                    && name.is_char_boundary(cut)
                    && name.as_bytes()[cut] == b'.'
                    && name[cut + 1..].eq_ignore_ascii_case(suffix)
            }
        }
    }

    /// Whether a name given as its wire labels (the root label left out) is covered: each
    /// label compared whole, so a label holding a dot never stands for two.
    pub fn matches_labels(&self, labels: &[&[u8]]) -> bool {
        if labels.is_empty() || !labels.iter().all(|l| is_label(l)) {
            return false;
        }
        let eq = |want: &str, have: &[&[u8]]| {
            want.split('.').count() == have.len()
                && want
                    .split('.')
                    .zip(have)
                    .all(|(w, h)| w.as_bytes().eq_ignore_ascii_case(h))
        };
        match self {
            Self::Exact(exact) => eq(exact, labels),
            Self::Wildcard(suffix) => {
                let n = suffix.split('.').count();
                labels.len() > n && eq(suffix, &labels[labels.len() - n..])
            }
        }
    }

    /// Whether this is a wildcard.
    pub fn is_wildcard(&self) -> bool {
        matches!(self, Self::Wildcard(_))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

impl std::str::FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{} is not a host name: {why}", quoted(s));
        if s.parse::<IpAddr>().is_ok()
            || s.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .is_some_and(|r| r.parse::<IpAddr>().is_ok())
        {
            return Err(format!(
                "{} is an IP address, not a host name; use ip: instead",
                quoted(s)
            ));
        }
        if let Some((ip, len)) = s.split_once('/')
            && ip.parse::<IpAddr>().is_ok()
            && len.parse::<u8>().is_ok()
        {
            return Err(format!(
                "{} is a network, not a host name; use cidr: instead",
                quoted(s)
            ));
        }
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        let (wildcard, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if rest.contains('*') || name == "*" {
            return Err(bad(
                "a wildcard is only allowed as the whole leftmost label, like *.example.com",
            ));
        }
        if name.len() > MAX_NAME {
            return Err(bad(&format!("longer than {MAX_NAME} characters")));
        }
        for label in rest.split('.') {
            check_label(label).map_err(|why| bad(&why))?;
        }
        if wildcard {
            if !rest.contains('.') {
                return Err(format!(
                    "{}: wildcard too broad, the part after *. needs at least two labels \
                     (like *.example.com)",
                    quoted(s)
                ));
            }
            Ok(Self::Wildcard(rest.to_string()))
        } else {
            Ok(Self::Exact(name.to_string()))
        }
    }
}

impl TryFrom<String> for HostPattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Whether `label` is a non-empty host name label: `a-z` (any case), `0-9`, `-`, `_` only.
pub fn is_label(label: &[u8]) -> bool {
    !label.is_empty()
        && label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label".into());
    }
    if label.len() > MAX_LABEL {
        return Err(format!("label longer than {MAX_LABEL} characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(if c.is_ascii() {
            format!(
                "{} is not allowed (only a-z, 0-9, - and _)",
                quoted(&c.to_string())
            )
        } else {
            format!(
                "{} is not allowed (write internationalized names in their xn-- form)",
                quoted(&c.to_string())
            )
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {} starts or ends with -", quoted(label)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        s.parse().unwrap()
    }

    fn err(s: &str) -> String {
        s.parse::<HostPattern>().unwrap_err()
    }

    #[test]
    fn names_are_lowercased_without_the_trailing_dot() {
        assert_eq!(
            p("API.Anthropic.COM."),
            HostPattern::Exact("api.anthropic.com".into())
        );
        assert_eq!(
            p("*.Example.com"),
            HostPattern::Wildcard("example.com".into())
        );
        assert_eq!(p("_dmarc.example.com").to_string(), "_dmarc.example.com");
        assert_eq!(p("localhost"), HostPattern::Exact("localhost".into()));
    }

    #[test]
    fn wildcard_matches_any_depth_but_not_the_apex() {
        let w = p("*.example.com");
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.c.example.com"));
        assert!(w.matches("A.EXAMPLE.COM"));
        assert!(w.matches("a.example.com."));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("example.com."));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("evilexample.com"));
        assert!(!w.matches("a.evilexample.com"));
        assert!(!w.matches("example.com.evil.test"));
        assert!(!w.matches("a.example.com.evil.test"));
        // A multi-byte character just before the suffix must not panic the slicing.
        assert!(!p("*.b.c").matches("\u{e9}b.c"));
        assert!(!w.matches(""));
    }

    #[test]
    fn a_dot_inside_a_label_matches_nothing() {
        // The wire name ["x.ok", "test"] in presentation form: its text would line up with
        // the labels of *.ok.test, its labels do not.
        let w = p("*.ok.test");
        assert!(!w.matches("x\\.ok.test"));
        assert!(!w.matches_labels(&[b"x.ok", b"test"]));
        assert!(w.matches_labels(&[b"x", b"ok", b"test"]));
        assert!(w.matches_labels(&[b"A", b"b", b"OK", b"Test"]));
        assert!(!w.matches_labels(&[b"ok", b"test"]));
        assert!(!w.matches_labels(&[b"x", b"ok.test"]));
        let e = p("ok.test");
        assert!(!e.matches("ok\\.test"));
        assert!(!e.matches_labels(&[b"ok.test"]));
        assert!(e.matches_labels(&[b"OK", b"test"]));
        // Other bytes a label cannot hold, and empty labels.
        for bad in [
            "x\\032.ok.test",
            "x ok.test",
            "x..ok.test",
            ".x.ok.test",
            "x.ok.test..",
        ] {
            assert!(!w.matches(bad), "{bad}");
        }
        assert!(!w.matches_labels(&[b"", b"ok", b"test"]));
        assert!(!w.matches_labels(&[b"a\0", b"ok", b"test"]));
    }

    #[test]
    fn exact_matches_only_the_name() {
        let e = p("example.com");
        assert!(e.matches("example.com"));
        assert!(e.matches("EXAMPLE.com."));
        assert!(!e.matches("a.example.com"));
        assert!(!e.matches("evilexample.com"));
        assert!(!e.matches("example.com.evil.test"));
        assert!(!e.matches("example.co"));
    }

    #[test]
    fn bad_names_say_why() {
        assert_eq!(
            err("a..b.com"),
            r#""a..b.com" is not a host name: empty label"#
        );
        assert_eq!(err(""), r#""" is not a host name: it is empty"#);
        assert_eq!(
            err("-a.com"),
            r#""-a.com" is not a host name: label "-a" starts or ends with -"#
        );
        assert_eq!(
            err("a b.com"),
            r#""a b.com" is not a host name: " " is not allowed (only a-z, 0-9, - and _)"#
        );
        assert!(err("bücher.de").contains("xn--"));
        assert!(err(&format!("{}.com", "a".repeat(64))).contains("label longer than 63"));
        let long = vec!["a".repeat(60); 5].join(".");
        assert!(err(&long).contains("longer than 253"));
    }

    #[test]
    fn wildcards_only_as_the_leftmost_label() {
        for bad in [
            "a*.b.com",
            "foo.*.com",
            "*",
            "*.*.com",
            "**.b.com",
            "*a.b.com",
            "*.",
        ] {
            assert!(
                err(bad).contains("wildcard is only allowed as the whole leftmost label"),
                "{bad}: {}",
                err(bad)
            );
        }
        assert_eq!(
            err("*.com"),
            r#""*.com": wildcard too broad, the part after *. needs at least two labels (like *.example.com)"#
        );
    }

    #[test]
    fn addresses_are_pointed_to_ip_and_cidr() {
        assert_eq!(
            err("10.0.0.1"),
            r#""10.0.0.1" is an IP address, not a host name; use ip: instead"#
        );
        assert!(err("2001:db8::1").contains("use ip:"));
        assert!(err("[::1]").contains("use ip:"));
        assert!(err("10.0.0.0/8").contains("use cidr:"));
    }
}
