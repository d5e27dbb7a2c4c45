//! Ask mode on the command line: `--ask` and its options for `run` and `attach`, and the
//! `pending`, `approve` and `deny` commands (clients of the agent's control socket, see
//! `daemon::control`).

use std::{
    io::{self, BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::ValueEnum;

use crate::{
    daemon::{
        approvals::{AskConfig, Decision, plain},
        control::{self, Request},
    },
    events::ApprovalRequest,
    policy,
};

/// Ask mode's options of `run` and `attach`.
#[derive(Debug, Clone, clap::Args)]
pub struct AskArgs {
    /// Ask mode, whatever the allowlist says: a lookup of a name no rule permits waits for a
    /// person's decision (`egress-agent approve`/`deny` as root); a denied connection to an
    /// unknown address raises a request too.
    #[arg(long)]
    ask: bool,
    /// How long a request waits before it is refused (`500ms`, `30s`, `2m`).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = policy::parse_duration)]
    ask_timeout: Duration,
    /// Where `approve --for always` appends its rules: an ordinary allowlist (default:
    /// `<allowlist>.approved.yaml` beside the allowlist, read at start in ask mode).
    #[arg(long, value_name = "FILE")]
    approvals: Option<PathBuf>,
}

impl AskArgs {
    /// Whether `--ask` was given.
    pub fn forced(&self) -> bool {
        self.ask
    }

    /// The session's ask settings (used only if `--ask` or `mode: ask`).
    pub fn config(&self, allowlist: &Path, token_file: Option<&Path>) -> anyhow::Result<AskConfig> {
        AskConfig::new(
            self.ask,
            self.ask_timeout,
            allowlist,
            self.approvals.clone(),
            token_file,
        )
    }
}

/// How long a decision holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    /// This request only (a name: the answered addresses, for their TTL).
    Once,
    /// Until the agent stops.
    Session,
    /// Also appended to the approvals file (approve only).
    Always,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Self::Once => "once",
            Self::Session => "session",
            Self::Always => "always",
        }
    }
}

/// `pending`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct PendingArgs {
    /// Instance name of the agent.
    #[arg(long, value_name = "NAME", value_parser = super::parse_name)]
    name: String,
    /// One JSON array instead of lines.
    #[arg(long)]
    json: bool,
}

/// `approve`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ApproveArgs {
    /// Instance name of the agent.
    #[arg(long, value_name = "NAME", value_parser = super::parse_name)]
    name: String,
    /// The request: its id, its name or its address (as `pending` shows them).
    #[arg(
        value_name = "ID|NAME",
        required_unless_present = "watch",
        conflicts_with = "watch"
    )]
    target: Option<String>,
    /// How long the approval holds.
    #[arg(long = "for", value_name = "SCOPE", default_value = "once")]
    scope: Scope,
    /// Only these ports (`443,8000-8080`); default: every port for a name, the denied port
    /// for an address.
    #[arg(long, value_name = "PORTS")]
    ports: Option<String>,
    /// Show each request as it comes and ask o(nce), s(ession), a(lways), d(eny) or skip.
    #[arg(long)]
    watch: bool,
}

/// `deny`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DenyArgs {
    /// Instance name of the agent.
    #[arg(long, value_name = "NAME", value_parser = super::parse_name)]
    name: String,
    /// The request: its id, its name or its address.
    #[arg(value_name = "ID|NAME")]
    target: String,
    /// `once` refuses this request; `session` also refuses the same name or address
    /// without asking until the agent stops.
    #[arg(long = "for", value_name = "SCOPE", default_value = "once", value_parser = deny_scope)]
    scope: Scope,
}

fn deny_scope(s: &str) -> Result<Scope, String> {
    match s {
        "once" => Ok(Scope::Once),
        "session" => Ok(Scope::Session),
        _ => Err("deny is for once or session".into()),
    }
}

/// `egress-agent pending`.
pub fn pending(args: &PendingArgs) -> ExitCode {
    let list = match fetch_pending(&args.name) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let text = if args.json {
        format!("{}\n", serde_json::to_string(&list).unwrap_or_default())
    } else {
        list.iter().map(|r| format!("{}\n", line(r))).collect()
    };
    super::print(&text)
}

/// `egress-agent approve`.
pub fn approve(args: &ApproveArgs) -> ExitCode {
    if args.watch {
        return watch(&args.name);
    }
    let target = args.target.clone().unwrap_or_default();
    decide(&args.name, &target, "allow", args.scope, args.ports.clone())
}

/// `egress-agent deny`.
pub fn deny(args: &DenyArgs) -> ExitCode {
    decide(&args.name, &args.target, "deny", args.scope, None)
}

fn decide(name: &str, target: &str, what: &str, scope: Scope, ports: Option<String>) -> ExitCode {
    match send_decision(name, target, what, scope, ports) {
        Ok(m) => {
            println!("{m}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn send_decision(
    name: &str,
    target: &str,
    what: &str,
    scope: Scope,
    ports: Option<String>,
) -> Result<String, String> {
    let answer = control::call(
        name,
        &Request::Decide {
            target: target.to_owned(),
            decision: Decision {
                decision: what.to_owned(),
                scope: Some(scope.name().to_owned()),
                ports,
            },
        },
    )
    .map_err(|e| format!("{e:#}"))?;
    if answer.ok {
        Ok(answer.message.unwrap_or_default())
    } else {
        Err(answer.error.unwrap_or_else(|| "refused".into()))
    }
}

fn fetch_pending(name: &str) -> Result<Vec<ApprovalRequest>, String> {
    let answer = control::call(name, &Request::Pending).map_err(|e| format!("{e:#}"))?;
    if !answer.ok {
        return Err(answer.error.unwrap_or_else(|| "refused".into()));
    }
    Ok(answer.pending.unwrap_or_default())
}

fn fail(e: &str) -> ExitCode {
    eprintln!("egress-agent: {e}");
    ExitCode::from(super::EXIT_NO)
}

/// One request as a line: id, what (shown plainly), who, how long ago.
fn line(r: &ApprovalRequest) -> String {
    let what = match &r.name {
        Some(n) => format!("{} ({})", plain(n), r.qtype.as_deref().unwrap_or("?")),
        None => plain_subject(r),
    };
    let who = match (r.pid, &r.comm) {
        (Some(pid), Some(comm)) => format!("{} (pid {pid}, uid {})", plain(comm), uid(r)),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "unknown process".to_owned(),
    };
    let note = r.name.as_deref().map(data_hint).unwrap_or_default();
    format!("{:>4}  {what}  asked by {who}  at {}{note}", r.id, r.asked)
}

/// A warning for a name that looks like it carries data (a long label, or one that reads
/// like hex or base32/64): the command chooses the names it asks for, and an approved name
/// is a query to that domain's servers.
fn data_hint(name: &str) -> String {
    let suspicious = name.len() > 80
        || name.split('.').any(|l| {
            let digits = l.bytes().filter(u8::is_ascii_digit).count();
            l.len() > 30 || (l.len() >= 16 && digits * 4 >= l.len())
        });
    if suspicious {
        "  [!] long or encoded-looking label: a name can carry data out".to_owned()
    } else {
        String::new()
    }
}

fn uid(r: &ApprovalRequest) -> String {
    r.uid.map_or_else(|| "?".into(), |u| u.to_string())
}

/// An address request's subject; only digits, dots, colons and brackets can appear.
fn plain_subject(r: &ApprovalRequest) -> String {
    r.subject()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "[]:./".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// `approve --watch`: polls the agent, shows each new request and asks what to do.
fn watch(name: &str) -> ExitCode {
    let mut seen = std::collections::BTreeSet::new();
    let stdin = io::stdin();
    let mut input = stdin.lock();
    eprintln!(
        "watching agent {name:?}: for each request, o = once, s = session, a = always (appended \
         to the approvals file), d = deny, Enter = skip. Read the name before you approve: a \
         name can carry data out. Ctrl-C to stop."
    );
    let mut last_ok = Instant::now();
    loop {
        let list = match fetch_pending(name) {
            Ok(l) => {
                last_ok = Instant::now();
                l
            }
            Err(e) => {
                if last_ok.elapsed() > Duration::from_secs(5) {
                    return fail(&e);
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        for r in &list {
            if !seen.insert(r.id.clone()) {
                continue;
            }
            print!("\n{}\n[o/s/a/d/Enter]? ", line(r));
            let _ = io::stdout().flush();
            let mut answer = String::new();
            if input.read_line(&mut answer).unwrap_or(0) == 0 {
                return ExitCode::SUCCESS;
            }
            let (what, scope) = match answer.trim() {
                "o" => ("allow", Scope::Once),
                "s" => ("allow", Scope::Session),
                "a" => ("allow", Scope::Always),
                "d" => ("deny", Scope::Once),
                _ => {
                    println!("skipped");
                    continue;
                }
            };
            match send_decision(name, &r.id, what, scope, None) {
                Ok(m) => println!("{m}"),
                Err(e) => println!("not done: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::data_hint;

    #[test]
    fn encoded_looking_names_are_flagged() {
        assert!(data_hint("pypi.org").is_empty());
        assert!(data_hint("files.pythonhosted.org").is_empty());
        assert!(!data_hint("6b2f9a31c0d84e77a1b2.exfil.example").is_empty());
        assert!(!data_hint(&format!("{}.example.com", "a".repeat(40))).is_empty());
    }
}
