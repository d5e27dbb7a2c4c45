//! Reading a root file and its includes into one [`Policy`].

use std::{
    collections::HashSet,
    fs,
    io::{self, Read},
    path::{Component, Path, PathBuf},
};

use egress_common::consts::MAX_PORT_RANGES;

use super::{
    DnsSettings, Mode, Origin, Policy, PolicyError, Protocol, Rule, Target,
    dns::format_duration,
    error::Location,
    ports::ALL_PORTS,
    raw::{RawAllow, RawDns, RawFile},
    yaml::{self, Spanned},
};

/// Loads the policy rooted at `path`; `text` is its content if the caller already has it.
pub(super) fn load_root(path: &Path, text: Option<&str>) -> Result<Policy, PolicyError> {
    let owned;
    let text = match text {
        Some(t) => t,
        None => {
            owned = read(path).map_err(|error| PolicyError::Read {
                path: path.to_path_buf(),
                error,
            })?;
            &owned
        }
    };
    let mut loader = Loader::default();
    let root = loader.file(path, text)?;
    let name = match root.name {
        Some(name) => name,
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "policy".into()),
    };
    Ok(Policy {
        name,
        mode: root.mode,
        dns: root.dns,
        rules: loader.rules,
        files: loader.files,
        writable: root.writable,
    })
}

/// What only the root file's copy of is used.
struct Header {
    name: Option<String>,
    mode: Mode,
    dns: DnsSettings,
    writable: Vec<String>,
}

#[derive(Default)]
struct Loader {
    files: Vec<PathBuf>,
    loaded: HashSet<PathBuf>,
    /// The files being read, outermost first: (identity, path as displayed).
    stack: Vec<(PathBuf, PathBuf)>,
    rules: Vec<Rule>,
}

impl Loader {
    fn file(&mut self, path: &Path, text: &str) -> Result<Header, PolicyError> {
        let id = identity(path);
        self.loaded.insert(id.clone());
        self.files.push(path.to_path_buf());
        self.stack.push((id, path.to_path_buf()));

        let raw: RawFile = yaml::from_str(text).map_err(|e| {
            let at = Location {
                file: path.to_path_buf(),
                line: e.line,
                column: e.column,
                field: e.field,
            };
            let message = e.message;
            if e.syntax {
                PolicyError::Syntax { at, message }
            } else {
                PolicyError::Invalid { at, message }
            }
        })?;

        let name = match raw.name {
            Some(name) if name.value.trim().is_empty() => {
                return Err(invalid(path, &name, "name", "empty name".into()));
            }
            name => name.map(|n| n.value),
        };
        let dns = match raw.dns {
            Some(dns) => dns_settings(path, dns)?,
            None => DnsSettings::default(),
        };

        let mut writable = Vec::new();
        for (i, entry) in raw.writable.into_iter().flatten().enumerate() {
            if !(entry.value.starts_with('/') || entry.value.starts_with("~/")) {
                return Err(invalid(
                    path,
                    &entry,
                    &format!("writable[{i}]"),
                    format!("{:?} is neither absolute nor below ~/", entry.value),
                ));
            }
            writable.push(entry.value);
        }

        for (index, item) in raw.allow.into_iter().flatten().enumerate() {
            self.rules.push(rule(path, index, item)?);
        }

        for (i, entry) in raw.include.iter().flatten().enumerate() {
            let field = format!("include[{i}]");
            if entry.value.trim().is_empty() {
                return Err(invalid(path, entry, &field, "empty path".into()));
            }
            let included = path.parent().unwrap_or(Path::new("")).join(&entry.value);
            let id = identity(&included);
            if let Some(pos) = self.stack.iter().position(|(s, _)| *s == id) {
                let mut chain: Vec<PathBuf> =
                    self.stack[pos..].iter().map(|(_, p)| p.clone()).collect();
                chain.push(self.stack[pos].1.clone());
                return Err(PolicyError::IncludeCycle {
                    at: location(path, entry, field),
                    chain,
                });
            }
            if self.loaded.contains(&id) {
                // Reached before through another include: its rules are already in.
                continue;
            }
            let text = read(&included).map_err(|error| PolicyError::Include {
                at: location(path, entry, field),
                path: included.clone(),
                error,
            })?;
            self.file(&included, &text)?;
        }

        self.stack.pop();
        Ok(Header {
            name,
            mode: raw.mode.unwrap_or_default(),
            dns,
            writable,
        })
    }
}

/// Reads a file of at most [`yaml::MAX_BYTES`] (and one byte more, so that the parser can
/// say it is too long): a file without end, like a FIFO or `/dev/zero`, is not read forever.
fn read(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    let limit = u64::try_from(yaml::MAX_BYTES).unwrap_or(u64::MAX) + 1;
    fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Where `at` is in `path`, naming `field`.
fn location<T>(path: &Path, at: &Spanned<T>, field: String) -> Location {
    let (line, column) = yaml::position(at);
    Location {
        file: path.to_path_buf(),
        line,
        column,
        field,
    }
}

fn invalid<T>(path: &Path, at: &Spanned<T>, field: &str, message: String) -> PolicyError {
    PolicyError::Invalid {
        at: location(path, at, field.to_string()),
        message,
    }
}

fn dns_settings(path: &Path, node: Spanned<RawDns>) -> Result<DnsSettings, PolicyError> {
    let d = DnsSettings::default();
    let raw = &node.value;
    let settings = DnsSettings {
        min_ttl: raw.min_ttl.as_ref().map_or(d.min_ttl, |v| v.value.0),
        max_ttl: raw.max_ttl.as_ref().map_or(d.max_ttl, |v| v.value.0),
        grace: raw.grace.map_or(d.grace, |v| v.0),
        upstream: raw.upstream.clone().unwrap_or(d.upstream),
        block_private: raw.block_private.unwrap_or(d.block_private),
    };
    if settings.min_ttl > settings.max_ttl {
        let (min, max) = (
            format_duration(settings.min_ttl),
            format_duration(settings.max_ttl),
        );
        // Point at the value the user wrote; if only one is written, the other is a default.
        return Err(match (&raw.max_ttl, &raw.min_ttl) {
            (Some(n), _) => invalid(
                path,
                n,
                "dns.max_ttl",
                format!("{max} is shorter than min_ttl ({min})"),
            ),
            (None, Some(n)) => invalid(
                path,
                n,
                "dns.min_ttl",
                format!("{min} is longer than max_ttl (default {max})"),
            ),
            (None, None) => invalid(path, &node, "dns", format!("min_ttl {min} > max_ttl {max}")),
        });
    }
    Ok(settings)
}

fn rule(path: &Path, index: usize, node: Spanned<RawAllow>) -> Result<Rule, PolicyError> {
    let field = format!("allow[{index}]");
    let raw = &node.value;
    let mut targets = Vec::new();
    if let Some(h) = &raw.host {
        targets.push(("host", Target::Host(h.clone())));
    }
    if let Some(c) = raw.cidr {
        targets.push(("cidr", Target::Net(c.0)));
    }
    if let Some(ip) = raw.ip {
        targets.push(("ip", Target::Net(ip.0)));
    }
    if let Some(peers) = &raw.inbound {
        targets.push(("inbound", Target::Inbound(peers.value.0)));
    }
    if let Some(u) = &raw.unix {
        targets.push(("unix", Target::Unix(u.clone())));
    }
    let target = match targets.len() {
        1 => targets.pop().map(|(_, t)| t).expect("one target"),
        0 => {
            return Err(invalid(
                path,
                &node,
                &field,
                "no destination: give one of host, cidr, ip, inbound, unix".into(),
            ));
        }
        _ => {
            let names: Vec<&str> = targets.iter().map(|(n, _)| *n).collect();
            return Err(invalid(
                path,
                &node,
                &field,
                format!(
                    "give only one of host, cidr, ip, inbound, unix (found {})",
                    names.join(" and ")
                ),
            ));
        }
    };
    if let (Target::Inbound(peers), Some(at)) = (&target, &raw.inbound) {
        if let Some(p) = &raw.protocol
            && p.value != Protocol::Tcp
        {
            return Err(invalid(
                path,
                p,
                &format!("{field}.protocol"),
                "inbound rules are TCP only: remove protocol (a UDP server's replies are \
                 sends, judged by the outbound rules)"
                    .into(),
            ));
        }
        if raw.ports.is_none() {
            return Err(invalid(
                path,
                at,
                &format!("{field}.inbound"),
                format!("give ports: the local ports {peers} may connect to (\"1-65535\" for all)"),
            ));
        }
    }
    if matches!(target, Target::Unix(_)) {
        let no = |key: &str| format!("a unix rule takes no {key}: remove it");
        if let Some(at) = &raw.ports {
            return Err(invalid(path, at, &format!("{field}.ports"), no("ports")));
        }
        if let Some(at) = &raw.protocol {
            return Err(invalid(
                path,
                at,
                &format!("{field}.protocol"),
                no("protocol"),
            ));
        }
    }
    let protocol = match target {
        Target::Inbound(_) => Protocol::Tcp,
        _ => raw.protocol.as_ref().map(|p| p.value).unwrap_or_default(),
    };
    // ICMP rules keep every port: nothing that looks at ports narrows them.
    let mut ports = vec![ALL_PORTS];
    if let Some(given) = &raw.ports {
        let ports_error = |message| invalid(path, given, &format!("{field}.ports"), message);
        if !protocol.has_ports() {
            return Err(ports_error(format!(
                "protocol {protocol} has no ports: remove ports, or write a separate tcp or udp \
                 rule for them"
            )));
        }
        if given.value.0.len() > MAX_PORT_RANGES {
            return Err(ports_error(format!(
                "{} separate port ranges, more than the {MAX_PORT_RANGES} one rule can hold",
                given.value.0.len()
            )));
        }
        ports.clone_from(&given.value.0);
    }
    if let Some(nc) = &raw.name_check
        && !matches!(target, Target::Host(_))
    {
        return Err(invalid(
            path,
            nc,
            &format!("{field}.name_check"),
            "name_check applies to host rules only (ip and cidr rules admit by address)".into(),
        ));
    }
    let name_check =
        matches!(target, Target::Host(_)) && raw.name_check.as_ref().is_none_or(|n| n.value);
    let (line, column) = yaml::position(&node);
    Ok(Rule {
        target,
        ports,
        protocol,
        name_check,
        origin: Origin {
            file: path.to_path_buf(),
            line,
            column,
            index,
        },
    })
}

/// What makes two paths the same file: the canonical path, or (for a file that does not
/// exist, like the root of `parse_str`) the absolute path with `.` and `..` folded.
fn identity(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}
