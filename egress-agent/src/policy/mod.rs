//! The allowlist: a YAML file (and the files it includes) read into a validated [`Policy`],
//! and compiled into the values of the kernel maps; its JSON Schema; `explain` (why a
//! destination is allowed or not) as a query on a policy; the DNS rebinding guard's address
//! set. Pure logic: no aya, no tokio. The bottom room of the agent: it uses only
//! `egress-common`.
//!
//! # Format
//!
//! ```yaml
//! version: 1                 # required, must be 1
//! name: claude-code          # optional; default: the file name without extension
//! mode: enforce              # enforce | audit | ask
//! include: [github.yaml]     # relative to this file; their allow rules are added
//! dns: {min_ttl: 30s, max_ttl: 1h, grace: 60s, upstream: system}
//! allow:
//!   - host: api.anthropic.com          # exact name
//!     ports: [443]
//!   - host: "*.githubusercontent.com"  # any depth below, not the apex
//!   - cidr: 192.0.2.0/24
//!     ports: [80, "8000-8080"]
//!     protocol: tcp                    # tcp | udp | any (tcp and udp) | icmp
//!   - ip: 2001:db8::1
//!   - cidr: 198.51.100.0/24
//!     protocol: icmp                   # ping (echo requests) only; no ports
//!   - inbound: 203.0.113.0/24          # peers that may connect in (TCP)
//!     ports: [8080]                    # the local ports; required
//!   - unix: /run/user/1000/ssh.sock    # a local daemon's socket `run` may use
//!   - unix: "@name"                    # an abstract one
//! ```
//!
//! The serde types of [`raw`] are the format's schema (one struct per mapping,
//! `deny_unknown_fields`, a doc per field); `load.rs` turns them into a [`Policy`].
//!
//! # Error positions
//!
//! Every error names file, line, column and field: `x.yaml:7:5: allow[2].cidr: "10.0.0.300/8"
//! is not a CIDR`. The text is read by `serde-saphyr` ([`yaml`]), which pins each error on the
//! node being read, rejects duplicate keys and a second document, and bounds size, nesting and
//! aliases; `serde_path_to_error` gives the field path. A value rejected by its type's
//! `Deserialize`/`TryFrom` is reported at the value, an unknown field at its key, a missing
//! field at its mapping, an empty value at its key. Checks made after deserializing (two
//! targets in one rule, TTL bounds, includes) take positions from the `Spanned` fields of
//! [`raw`], and each [`Rule`] keeps its [`Origin`]. serde's messages are reworded in [`yaml`]
//! (`unknown field "prot", expected one of host, cidr, ...`).

mod compile;
mod dns;
mod error;
pub mod explain;
mod host;
mod load;
mod net;
mod ports;
pub mod raw;
pub mod rebinding;
pub mod schema;
mod unix;
pub mod value_schemas;
mod yaml;

#[cfg(test)]
mod tests;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub use compile::{
    CidrEntry, NameEntry, PortSet, cidr_entries, inbound_entries, name_entries, rule_value,
};
pub use dns::{DnsSettings, Upstream, format_duration, parse_duration};
pub use egress_common::rules::TooManyRanges;
pub use error::{Location, PolicyError};
pub use host::{HostPattern, is_label};
pub use net::Net;
pub use ports::Protocol;
pub use unix::{MAX_UNIX_PATH, UnixName};

/// What the kernel does with a destination no rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny it.
    #[default]
    Enforce,
    /// Allow it, but report it as a deny would be.
    Audit,
    /// Deny it, but hold a DNS query for a name no rule permits until a person approves or
    /// denies it (`egress-agent approve`); a denied address raises a request too.
    Ask,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Ask => "ask",
        })
    }
}

/// A validated allowlist: the root file's settings and the rules of every file it includes.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The root file's `name`, or its file name without extension.
    pub name: String,
    /// The root file's `mode`.
    pub mode: Mode,
    /// The root file's `dns` settings.
    pub dns: DnsSettings,
    /// The root file's rules first, then each include's (depth first, in order).
    pub rules: Vec<Rule>,
    /// Every file read, the root first, each once (for reload watching).
    pub files: Vec<PathBuf>,
    /// The root file's `writable` paths (`~/` not yet expanded).
    pub writable: Vec<String>,
}

/// One `allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What may be reached.
    pub target: Target,
    /// Inclusive port ranges, sorted and merged; never empty (`[(0, 65535)]`: every port).
    pub ports: Vec<(u16, u16)>,
    /// Which protocols.
    pub protocol: Protocol,
    /// Host rules: TCP connections this rule admits are bound to names (`name_check`,
    /// default true). Always false for other rules.
    pub name_check: bool,
    /// Where the rule was written.
    pub origin: Origin,
}

/// A rule's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A `host:` name or wildcard, allowed through the addresses DNS answers give for it.
    Host(HostPattern),
    /// A `cidr:` network or `ip:` address (a `/32` or `/128`).
    Net(Net),
    /// An `inbound:` network or address: peers that may connect in to the rule's local
    /// ports (TCP). Not a destination: no outbound rule comes from it.
    Inbound(Net),
    /// A `unix:` socket path or abstract name a command under `run` may connect or send to.
    /// Not an IP destination: no map entry comes from it.
    Unix(UnixName),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(h) => h.fmt(f),
            Self::Net(n) if n.is_host() => n.addr().fmt(f),
            Self::Net(n) => n.fmt(f),
            Self::Inbound(n) if n.is_host() => write!(f, "inbound {}", n.addr()),
            Self::Inbound(n) => write!(f, "inbound {n}"),
            Self::Unix(u) => write!(f, "unix {u}"),
        }
    }
}

/// Where a rule was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file, as the caller named it (includes joined to their including file's folder).
    pub file: PathBuf,
    /// Line of the rule's first key, from 1.
    pub line: usize,
    /// Column of the rule's first key, from 1.
    pub column: usize,
    /// Index in that file's `allow` list.
    pub index: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: allow[{}]",
            self.file.display(),
            self.line,
            self.column,
            self.index
        )
    }
}

impl Policy {
    /// The host rules (exact or wildcard) that cover a queried `name` (any case, trailing
    /// dot or not), in policy order.
    pub fn host_rules_for(&self, name: &str) -> Vec<&Rule> {
        self.rules
            .iter()
            .filter(|r| matches!(&r.target, Target::Host(h) if h.matches(name)))
            .collect()
    }

    /// Whether some rule allows ICMP (then ping sockets may be created: `FLAG_ICMP`).
    pub fn allows_icmp(&self) -> bool {
        self.rules.iter().any(|r| r.protocol == Protocol::Icmp)
    }

    /// The `inbound:` rules whose peers include `ip`, in policy order.
    pub fn inbound_rules_for(&self, ip: std::net::IpAddr) -> Vec<&Rule> {
        self.rules
            .iter()
            .filter(|r| matches!(&r.target, Target::Inbound(n) if n.contains(ip)))
            .collect()
    }

    /// The `unix:` rules, in policy order.
    pub fn unix_names(&self) -> Vec<&UnixName> {
        self.rules
            .iter()
            .filter_map(|r| match &r.target {
                Target::Unix(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    /// One line for logs and `check`: `name "x", mode enforce, 12 rules (5 hosts,
    /// 2 wildcards, 5 addresses), 1 include` (`, 1 inbound` after the addresses when some
    /// rule lets peers connect in, `, 1 unix` when some rule names a unix socket).
    pub fn summary(&self) -> String {
        let (mut hosts, mut wildcards, mut nets, mut inbound, mut unix) = (0, 0, 0, 0, 0);
        for r in &self.rules {
            match &r.target {
                Target::Host(HostPattern::Exact(_)) => hosts += 1,
                Target::Host(HostPattern::Wildcard(_)) => wildcards += 1,
                Target::Net(_) => nets += 1,
                Target::Inbound(_) => inbound += 1,
                Target::Unix(_) => unix += 1,
            }
        }
        let n = |count: usize, one: &str, many: &str| {
            format!("{count} {}", if count == 1 { one } else { many })
        };
        let inbound = if inbound == 0 {
            String::new()
        } else {
            format!(", {inbound} inbound")
        };
        let unix = if unix == 0 {
            String::new()
        } else {
            format!(", {unix} unix")
        };
        format!(
            "name {:?}, mode {}, {} ({}, {}, {}{inbound}{unix}), {}",
            self.name,
            self.mode,
            n(self.rules.len(), "rule", "rules"),
            n(hosts, "host", "hosts"),
            n(wildcards, "wildcard", "wildcards"),
            n(nets, "address", "addresses"),
            n(self.files.len().saturating_sub(1), "include", "includes"),
        )
    }
}

/// Reads the allowlist at `path` and the files it includes.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    load::load_root(path, None)
}

/// Reads an allowlist from `yaml`; `path` names it in messages and is the base of its
/// includes (it need not exist).
pub fn parse_str(yaml: &str, path: &Path) -> Result<Policy, PolicyError> {
    load::load_root(path, Some(yaml))
}
