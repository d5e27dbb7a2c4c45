//! Reading a root file and its includes into one [`Policy`].

use std::{
    collections::HashSet,
    fs,
    path::{Component, Path, PathBuf},
};

use egress_common::consts::MAX_PORT_RANGES;

use super::{
    DnsSettings, Mode, Origin, Policy, PolicyError, Protocol, Rule, Target,
    dns::format_duration,
    error::Location,
    ports::ALL_PORTS,
    raw::{RawAllow, RawDns, RawFile},
    yaml::{self, Mark, Node},
};

/// Loads the policy rooted at `path`; `text` is its content if the caller already has it.
pub(super) fn load_root(path: &Path, text: Option<&str>) -> Result<Policy, PolicyError> {
    let owned;
    let text = match text {
        Some(t) => t,
        None => {
            owned = fs::read_to_string(path).map_err(|error| PolicyError::Read {
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

        let tree = yaml::parse(text).map_err(|e| PolicyError::Syntax {
            at: location(path, e.mark, String::new()),
            message: e.message,
        })?;
        let raw: RawFile = yaml::from_node(&tree).map_err(|e| {
            let (mark, field) = e.at.unwrap_or((tree.mark, String::new()));
            PolicyError::Invalid {
                at: location(path, mark, field),
                message: e.message,
            }
        })?;

        let name = match (raw.name, tree.get("name")) {
            (Some(name), Some(node)) if name.trim().is_empty() => {
                return Err(invalid(path, node, "name", "empty name".into()));
            }
            (name, _) => name,
        };
        let dns = match raw.dns {
            Some(dns) => dns_settings(path, tree.get("dns").unwrap_or(&tree), dns)?,
            None => DnsSettings::default(),
        };

        let writable_node = tree.get("writable");
        let mut writable = Vec::new();
        for (i, entry) in raw.writable.into_iter().flatten().enumerate() {
            let node = writable_node.and_then(|n| n.at(i)).unwrap_or(&tree);
            if !(entry.starts_with('/') || entry.starts_with("~/")) {
                return Err(invalid(
                    path,
                    node,
                    &format!("writable[{i}]"),
                    format!("{entry:?} is neither absolute nor below ~/"),
                ));
            }
            writable.push(entry);
        }

        let allow = tree.get("allow");
        for (index, item) in raw.allow.into_iter().flatten().enumerate() {
            let node = allow.and_then(|a| a.at(index)).unwrap_or(&tree);
            self.rules.push(rule(path, index, node, item)?);
        }

        let include = tree.get("include");
        for (i, entry) in raw.include.iter().flatten().enumerate() {
            let node = include.and_then(|n| n.at(i)).unwrap_or(&tree);
            let field = format!("include[{i}]");
            if entry.trim().is_empty() {
                return Err(invalid(path, node, &field, "empty path".into()));
            }
            let included = path.parent().unwrap_or(Path::new("")).join(entry);
            let id = identity(&included);
            if let Some(pos) = self.stack.iter().position(|(s, _)| *s == id) {
                let mut chain: Vec<PathBuf> =
                    self.stack[pos..].iter().map(|(_, p)| p.clone()).collect();
                chain.push(self.stack[pos].1.clone());
                return Err(PolicyError::IncludeCycle {
                    at: location(path, node.mark, field),
                    chain,
                });
            }
            if self.loaded.contains(&id) {
                // Reached before through another include: its rules are already in.
                continue;
            }
            let text = fs::read_to_string(&included).map_err(|error| PolicyError::Include {
                at: location(path, node.mark, field),
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

fn location(path: &Path, mark: Mark, field: String) -> Location {
    Location {
        file: path.to_path_buf(),
        line: mark.line,
        column: mark.col,
        field,
    }
}

fn invalid(path: &Path, node: &Node, field: &str, message: String) -> PolicyError {
    PolicyError::Invalid {
        at: location(path, node.mark, field.to_string()),
        message,
    }
}

fn dns_settings(path: &Path, node: &Node, raw: RawDns) -> Result<DnsSettings, PolicyError> {
    let d = DnsSettings::default();
    let settings = DnsSettings {
        min_ttl: raw.min_ttl.map_or(d.min_ttl, |v| v.0),
        max_ttl: raw.max_ttl.map_or(d.max_ttl, |v| v.0),
        grace: raw.grace.map_or(d.grace, |v| v.0),
        upstream: raw.upstream.unwrap_or(d.upstream),
    };
    if settings.min_ttl > settings.max_ttl {
        let (min, max) = (
            format_duration(settings.min_ttl),
            format_duration(settings.max_ttl),
        );
        // Point at the value the user wrote; if only one is written, the other is a default.
        let (field, message) = match (node.get("max_ttl"), node.get("min_ttl")) {
            (Some(n), _) => (
                ("dns.max_ttl", n),
                format!("{max} is shorter than min_ttl ({min})"),
            ),
            (None, Some(n)) => (
                ("dns.min_ttl", n),
                format!("{min} is longer than max_ttl (default {max})"),
            ),
            (None, None) => (("dns", node), format!("min_ttl {min} > max_ttl {max}")),
        };
        return Err(invalid(path, field.1, field.0, message));
    }
    Ok(settings)
}

fn rule(path: &Path, index: usize, node: &Node, raw: RawAllow) -> Result<Rule, PolicyError> {
    let field = format!("allow[{index}]");
    let mut targets = Vec::new();
    if let Some(h) = raw.host {
        targets.push(("host", Target::Host(h)));
    }
    if let Some(c) = raw.cidr {
        targets.push(("cidr", Target::Net(c.0)));
    }
    if let Some(ip) = raw.ip {
        targets.push(("ip", Target::Net(ip.0)));
    }
    if let Some(peers) = raw.inbound {
        targets.push(("inbound", Target::Inbound(peers.0)));
    }
    let target = match targets.len() {
        1 => targets.pop().map(|(_, t)| t).expect("one target"),
        0 => {
            return Err(invalid(
                path,
                node,
                &field,
                "no destination: give one of host, cidr, ip, inbound".into(),
            ));
        }
        _ => {
            let names: Vec<&str> = targets.iter().map(|(n, _)| *n).collect();
            return Err(invalid(
                path,
                node,
                &field,
                format!(
                    "give only one of host, cidr, ip, inbound (found {})",
                    names.join(" and ")
                ),
            ));
        }
    };
    if let Target::Inbound(peers) = &target {
        let at = node.get("inbound").unwrap_or(node);
        let field = format!("{field}.inbound");
        if raw.protocol.is_some_and(|p| p != Protocol::Tcp) {
            return Err(invalid(
                path,
                node.get("protocol").unwrap_or(node),
                &format!("allow[{index}].protocol"),
                "inbound rules are TCP only: remove protocol (a UDP server's replies are \
                 sends, judged by the outbound rules)"
                    .into(),
            ));
        }
        if raw.ports.is_none() {
            return Err(invalid(
                path,
                at,
                &field,
                format!("give ports: the local ports {peers} may connect to (\"1-65535\" for all)"),
            ));
        }
    }
    let protocol = match target {
        Target::Inbound(_) => Protocol::Tcp,
        _ => raw.protocol.unwrap_or_default(),
    };
    let ports_error = |message: String| {
        invalid(
            path,
            node.get("ports").unwrap_or(node),
            &format!("{field}.ports"),
            message,
        )
    };
    if !protocol.has_ports() && raw.ports.is_some() {
        return Err(ports_error(format!(
            "protocol {protocol} has no ports: remove ports, or write a separate tcp or udp \
             rule for them"
        )));
    }
    // ICMP rules keep every port: nothing that looks at ports narrows them.
    let ports = raw.ports.map_or_else(|| vec![ALL_PORTS], |p| p.0);
    if ports.len() > MAX_PORT_RANGES {
        return Err(ports_error(format!(
            "{} separate port ranges, more than the {MAX_PORT_RANGES} one rule can hold",
            ports.len()
        )));
    }
    if raw.name_check.is_some() && !matches!(target, Target::Host(_)) {
        return Err(invalid(
            path,
            node.get("name_check").unwrap_or(node),
            &format!("{field}.name_check"),
            "name_check applies to host rules only (ip and cidr rules admit by address)".into(),
        ));
    }
    let name_check = matches!(target, Target::Host(_)) && raw.name_check.unwrap_or(true);
    Ok(Rule {
        target,
        ports,
        protocol,
        name_check,
        origin: Origin {
            file: path.to_path_buf(),
            line: node.mark.line,
            column: node.mark.col,
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
