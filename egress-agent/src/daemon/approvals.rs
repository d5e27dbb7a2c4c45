//! Ask mode's decisions: what `approve`/`deny` (over the control socket) and `POST
//! /approvals/<id>` (over the health server) do to a held request.
//!
//! - `once`: a held query is answered with the real addresses (forwarded only now), granted
//!   for their TTL; an address is allowed for `min_ttl + grace`.
//! - `session`: a rule is added to the running policy (the reload path), for the agent's
//!   lifetime; it survives reloads of the allowlist.
//! - `always`: `session`, and the rule is appended to the approvals file, an ordinary
//!   allowlist (validated before it is written: a bad append changes nothing).
//! - `deny`: the held query is refused now; `--for session` refuses later ones too.
//!
//! Every decision is checked whole before anything changes: an unknown id, bad ports or a
//! file that would not be valid leave everything as it was.

use std::{
    fs,
    io::{ErrorKind, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    daemon::reload,
    dns::{
        DnsContext,
        attribution::Owner,
        held::{Subject, Verdict},
    },
    events::{ApprovalRequest, DenyRecord, Event, boot_now, rfc3339},
    policy::{self, Policy, Rule},
};

/// Default of `--ask-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a session asks: set by `--ask`, `--ask-timeout`, `--approvals` (and, for `attach`,
/// `--approval-token-file`).
#[derive(Debug, Clone)]
pub struct AskConfig {
    /// `--ask`: ask mode whatever the allowlist's `mode:` says.
    pub forced: bool,
    /// How long a request waits for a decision.
    pub timeout: Duration,
    /// Where `always` rules are appended.
    pub file: PathBuf,
    /// The bearer token of `POST /approvals/<id>` (`None`: no HTTP endpoint).
    pub token: Option<String>,
}

impl AskConfig {
    /// The approvals file beside `allowlist` (`team.yaml` → `team.approved.yaml`) unless
    /// `file` names one; the token read from `token_file` (trimmed, not empty).
    pub fn new(
        forced: bool,
        timeout: Duration,
        allowlist: &Path,
        file: Option<PathBuf>,
        token_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let file = file.unwrap_or_else(|| default_file(allowlist));
        let token = match token_file {
            None => None,
            Some(p) => {
                let t = fs::read_to_string(p).map_err(|e| {
                    anyhow::anyhow!("cannot read the approval token {}: {e}", p.display())
                })?;
                let t = t.trim().to_owned();
                if t.len() < 16 {
                    anyhow::bail!(
                        "the approval token in {} is shorter than 16 characters",
                        p.display()
                    );
                }
                Some(t)
            }
        };
        Ok(Self {
            forced,
            timeout,
            file,
            token,
        })
    }

    /// Whether `policy` runs in ask mode under this configuration.
    pub fn on(&self, policy: &Policy) -> bool {
        self.forced || policy.mode == policy::Mode::Ask
    }
}

/// `<dir>/<stem>.approved.yaml` beside the allowlist.
pub fn default_file(allowlist: &Path) -> PathBuf {
    let stem = allowlist
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "allowlist".into());
    allowlist.with_file_name(format!("{stem}.approved.yaml"))
}

/// The rules of the approvals file at `file`, when it exists and the allowlist does not
/// include it already (an invalid file is an error: the agent does not start on it).
pub fn file_rules(file: &Path, policy: &Policy) -> anyhow::Result<Vec<Rule>> {
    if !file.exists() {
        return Ok(Vec::new());
    }
    let same = |p: &PathBuf| fs::canonicalize(p).ok() == fs::canonicalize(file).ok();
    if policy.files.iter().any(same) {
        return Ok(Vec::new());
    }
    Ok(policy::load(file)
        .map_err(|e| anyhow::anyhow!("the approvals file: {e}"))?
        .rules)
}

/// A decision, as the control socket and the HTTP endpoint take it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// `allow` or `deny`.
    pub decision: String,
    /// `once` (the default), `session` or `always` (`allow` only).
    #[serde(rename = "for", default)]
    pub scope: Option<String>,
    /// Ports to allow, `443,8000-8080` (default: every port for a name, the denied port for
    /// an address).
    #[serde(default)]
    pub ports: Option<String>,
}

/// The decisions of one session.
pub struct Approvals {
    dns: Arc<DnsContext>,
    file: PathBuf,
    /// One decision at a time (the file append and the policy reload).
    busy: Mutex<()>,
}

impl Approvals {
    /// Decisions on the held requests of `dns`, appending `always` rules to `file`.
    pub fn new(dns: Arc<DnsContext>, file: PathBuf) -> Self {
        Self {
            dns,
            file,
            busy: Mutex::new(()),
        }
    }

    /// The requests waiting.
    pub fn pending(&self) -> Vec<ApprovalRequest> {
        self.dns.held.pending()
    }

    /// Decides the request `target` names (id, name or address); `by` is who decided
    /// (`uid:N` or `http`). Returns what was done, or why nothing was.
    pub fn decide(&self, target: &str, d: &Decision, by: &str) -> Result<String, String> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let held = &self.dns.held;
        let allow = match d.decision.as_str() {
            "allow" => true,
            "deny" => false,
            other => return Err(format!("decision {other:?}: give allow or deny")),
        };
        let scope = d.scope.as_deref().unwrap_or("once");
        match (allow, scope) {
            (_, "once" | "session") | (true, "always") => {}
            (false, "always") => {
                return Err("deny is for once or session (an allowlist only allows)".into());
            }
            (_, other) => return Err(format!("for {other:?}: give once, session or always")),
        }
        if !allow && d.ports.is_some() {
            return Err("--ports goes with approve, not deny".into());
        }
        let id = held.find(target)?;
        let (subject, view) = held.peek(id)?;
        if !allow {
            let taken = held.take(id)?;
            let taken_transport = taken.transport;
            if scope == "session" {
                held.deny_for_session(subject.clone());
            }
            let how = format!("denied for {scope} by {by}");
            held.settle(taken, Verdict::Deny, how.clone());
            self.dns.sink.emit(&Event::ApprovalDenied {
                ts: SystemTime::now(),
                request: &view,
                scope,
                by,
            });
            if let Subject::Name(name) = &subject {
                self.dns.sink.emit(&Event::DnsRefused {
                    ts: SystemTime::now(),
                    query: name,
                    qtype: view.qtype.as_deref().unwrap_or(""),
                    verdict: "refused",
                    proto: taken_transport,
                    pid: view.pid,
                    comm: view.comm.as_deref(),
                    uid: view.uid,
                    reason: Some("approval-denied"),
                });
            }
            return Ok(format!("{} {}", view.subject(), how));
        }
        let (item, ports) = rule_item(&subject, d.ports.as_deref())?;
        let rule = parse_rule(&item)?;
        if scope == "always" {
            self.append(&item, &view, by)?;
        }
        let taken = held.take(id)?;
        let how = format!("allowed for {scope} (ports {ports}) by {by}");
        let verdict = match (&subject, scope) {
            (Subject::Name(_), "once") => Verdict::Allow(Some(rule)),
            (Subject::Addr { ip, .. }, "once") => {
                if let Err(e) = self.allow_address_once(*ip, &rule) {
                    held.settle(taken, Verdict::Deny, format!("failed: {e}"));
                    return Err(e);
                }
                Verdict::Allow(None)
            }
            _ => {
                let new = held.add_rule(rule.clone());
                if let Err(e) = reload::apply_approved(&self.dns) {
                    // Nothing changed in the kernel or the policy in force (rolled back):
                    // the rule must not come back with the next reload either.
                    if new {
                        held.remove_rule(&rule);
                    }
                    held.settle(taken, Verdict::Deny, format!("failed: {e:#}"));
                    let appended = if scope == "always" {
                        format!(" (it was appended to {})", self.file.display())
                    } else {
                        String::new()
                    };
                    return Err(format!("cannot apply the approved rule{appended}: {e:#}"));
                }
                Verdict::Allow(None)
            }
        };
        held.settle(taken, verdict, how.clone());
        self.dns.sink.emit(&Event::ApprovalGranted {
            ts: SystemTime::now(),
            request: &view,
            scope,
            ports: &ports,
            by,
        });
        let saved = if scope == "always" {
            format!("; appended to {}", self.file.display())
        } else {
            String::new()
        };
        Ok(format!("{} {how}{saved}", view.subject()))
    }

    /// `once` for an address: an entry in the DNS-derived map for `min_ttl + grace` (it
    /// expires in the kernel by itself; a restarted agent drops it: no name recorded).
    fn allow_address_once(&self, ip: std::net::IpAddr, rule: &Rule) -> Result<(), String> {
        let policy = self.dns.current_policy();
        let expires = boot_now() + policy.dns.min_ttl + policy.dns.grace;
        let value = policy::rule_value(&[rule], expires.as_nanos() as u64)
            .map_err(|e| format!("too many port ranges ({} needed)", e.0))?;
        self.dns
            .enforcer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow_dns(ip, value)
            .map_err(|e| format!("{e:#}"))
    }

    /// Appends `item` to the approvals file, with a comment saying who approved what for
    /// whom; checked as a whole allowlist (one more rule than before) before the file is
    /// replaced.
    fn append(&self, item: &str, view: &ApprovalRequest, by: &str) -> Result<(), String> {
        let (old, before) = match fs::read_to_string(&self.file) {
            Ok(t) => {
                let n = policy::parse_str(&t, &self.file)
                    .map_err(|e| format!("the approvals file is not valid, nothing changed: {e}"))?
                    .rules
                    .len();
                (t, n)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => (FILE_HEADER.to_owned(), 0),
            Err(e) => return Err(format!("cannot read {}: {e}", self.file.display())),
        };
        let mut text = old;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "  # approved {} by {by}, asked by {} (pid {})\n",
            rfc3339(SystemTime::now()),
            plain(view.comm.as_deref().unwrap_or("?")),
            view.pid.map_or_else(|| "?".into(), |p| p.to_string()),
        ));
        text.push_str(item);
        match policy::parse_str(&text, &self.file) {
            Ok(p) if p.rules.len() == before + 1 => {}
            Ok(_) => {
                return Err(format!(
                    "cannot append to {}: its allow list is not the last block of the file; \
                     nothing changed",
                    self.file.display()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "appending to {} would make it invalid, nothing changed: {e}",
                    self.file.display()
                ));
            }
        }
        write_replacing(&self.file, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", self.file.display()))
    }
}

/// Ask mode: a connect or send to an address no rule allows raises a request (the kernel
/// denied it already; a retry after approval passes). Only `no-rule` denies of the
/// connect/send hooks, TCP or UDP: a wrong port of an allowed address is the allowlist's
/// business, not a question.
pub fn raise_for_deny(dns: &DnsContext, rec: &DenyRecord) {
    let proto = match rec.proto.as_str() {
        "tcp" => "tcp",
        "udp" => "udp",
        _ => return,
    };
    if rec.reason != "no-rule"
        || !matches!(rec.hook, "connect4" | "connect6" | "sendmsg4" | "sendmsg6")
    {
        return;
    }
    let who = Owner {
        pid: rec.pid,
        comm: rec.comm.clone(),
        uid: rec.uid,
    };
    if let Some(request) = dns.held.raise_addr(rec.dst, rec.port, proto, Some(who)) {
        dns.sink.emit(&Event::ApprovalRequested {
            ts: SystemTime::now(),
            request: &request,
        });
    }
}

/// A new approvals file starts with this.
const FILE_HEADER: &str = "\
# Destinations a person approved with `egress-agent approve --for always`. An ordinary
# allowlist: review it like one. Include it from the main allowlist (include: [this file]),
# or leave it beside: an agent in ask mode reads it as well.
version: 1
allow:
";

/// `text` with anything but `[A-Za-z0-9._-]` shown as `?`: a command name goes into a YAML
/// comment and a terminal, and it is the command's to choose.
pub fn plain(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The YAML list item of the rule for `subject` with `ports` (`443,8000-8080`), and the
/// ports as the events show them.
fn rule_item(subject: &Subject, ports: Option<&str>) -> Result<(String, String), String> {
    let list = match ports {
        None => None,
        Some(p) => {
            let mut items = Vec::new();
            for part in p.split(',').map(str::trim) {
                let ok = !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_digit() || b == b'-')
                    && part.split('-').count() <= 2;
                if !ok {
                    return Err(format!(
                        "ports {p:?}: give ports or ranges like 443,8000-8080"
                    ));
                }
                items.push(if part.contains('-') {
                    format!("\"{part}\"")
                } else {
                    part.to_owned()
                });
            }
            Some(items.join(", "))
        }
    };
    Ok(match subject {
        Subject::Name(name) => {
            let mut item = format!("  - host: {name}\n");
            if let Some(l) = &list {
                item.push_str(&format!("    ports: [{l}]\n"));
            }
            (item, ports.unwrap_or("any").to_owned())
        }
        Subject::Addr { ip, port, proto } => {
            let l = list.unwrap_or_else(|| port.to_string());
            (
                format!("  - ip: \"{ip}\"\n    ports: [{l}]\n    protocol: {proto}\n"),
                ports.map_or_else(|| port.to_string(), str::to_owned),
            )
        }
    })
}

/// The rule of one YAML list item, checked as the loader checks any rule.
fn parse_rule(item: &str) -> Result<Rule, String> {
    let text = format!("version: 1\nallow:\n{item}");
    let mut p = policy::parse_str(&text, Path::new("<approved>")).map_err(|e| {
        // The position is of a file the user never saw: keep the message only.
        let e = e.to_string();
        e.rsplit_once(": ").map_or(e.clone(), |(_, m)| m.to_owned())
    })?;
    p.rules.pop().ok_or_else(|| "no rule".to_owned())
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path` (a reader
/// sees the old file or the new one); a new file gets mode 0644, an existing one keeps its
/// mode and owner.
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let meta = fs::metadata(path).ok();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    let owner = match &meta {
        Some(m) => {
            use std::os::unix::fs::MetadataExt as _;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            Some((m.uid(), m.gid()))
        }
        // A new file belongs to whoever owns the folder (the allowlist's author, not root).
        None => path.parent().and_then(|d| {
            use std::os::unix::fs::MetadataExt as _;
            let d = if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            };
            fs::metadata(d).ok().map(|m| (m.uid(), m.gid()))
        }),
    };
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
    }
    fs::rename(&tmp, path)
}

/// `GET /approvals` and `POST /approvals/<id>` of the health server. `head` is the request
/// line and headers, `body` what followed them. Answers 401 without the right bearer token,
/// whatever the path. Returns (status, JSON body).
pub fn http(approvals: &Approvals, token: &str, head: &str, body: &[u8]) -> (&'static str, String) {
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let given = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Bearer "))
        .map(str::trim);
    if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
        return (
            "401 Unauthorized",
            error_json("missing or wrong bearer token"),
        );
    }
    let path = path.split('?').next().unwrap_or(path);
    match (method, path.strip_prefix("/approvals")) {
        ("GET", Some("" | "/")) => (
            "200 OK",
            serde_json::to_string(&approvals.pending()).unwrap_or_else(|_| "[]".into()),
        ),
        ("POST", Some(rest)) if rest.len() > 1 && rest.starts_with('/') => {
            let id = &rest[1..];
            let d: Decision = match serde_json::from_slice(body) {
                Ok(d) => d,
                Err(e) => {
                    return (
                        "400 Bad Request",
                        error_json(&format!(
                            "the body must be {{\"decision\":\"allow\"|\"deny\",\"for\":\"once\"|\"session\"|\"always\"}}: {e}"
                        )),
                    );
                }
            };
            if id.parse::<u64>().is_err() {
                return (
                    "404 Not Found",
                    error_json("no pending request with that id"),
                );
            }
            match approvals.decide(id, &d, "http") {
                Ok(m) => (
                    "200 OK",
                    serde_json::json!({"ok": true, "message": m}).to_string(),
                ),
                Err(e) if e.contains("no pending request") => ("404 Not Found", error_json(&e)),
                Err(e) if e.contains("already decided") => ("409 Conflict", error_json(&e)),
                Err(e) => ("400 Bad Request", error_json(&e)),
            }
        }
        _ => ("404 Not Found", error_json("not found")),
    }
}

fn error_json(message: &str) -> String {
    serde_json::json!({"ok": false, "error": message}).to_string()
}

/// Compares in time independent of where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_items_are_ordinary_rules() {
        let name = Subject::Name("pypi.org".into());
        let (item, ports) = rule_item(&name, Some("443,8000-8080")).unwrap();
        assert_eq!(
            item,
            "  - host: pypi.org\n    ports: [443, \"8000-8080\"]\n"
        );
        assert_eq!(ports, "443,8000-8080");
        let r = parse_rule(&item).unwrap();
        assert_eq!(r.ports, vec![(443, 443), (8000, 8080)]);
        let addr = Subject::Addr {
            ip: "2001:db8::1".parse().unwrap(),
            port: 8443,
            proto: "udp",
        };
        let (item, ports) = rule_item(&addr, None).unwrap();
        assert_eq!(ports, "8443");
        let r = parse_rule(&item).unwrap();
        assert_eq!(r.protocol, policy::Protocol::Udp);
        assert!(rule_item(&name, Some("443;rm")).is_err());
        assert!(parse_rule(&rule_item(&name, Some("70000")).unwrap().0).is_err());
    }

    #[test]
    fn command_names_are_shown_plainly() {
        assert_eq!(plain("curl"), "curl");
        assert_eq!(plain("x\n- host: evil"), "x?-?host??evil");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn the_default_file_sits_beside_the_allowlist() {
        assert_eq!(
            default_file(Path::new("/etc/egress/team.yaml")),
            Path::new("/etc/egress/team.approved.yaml")
        );
    }
}
