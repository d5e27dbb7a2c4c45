//! Ask mode on the command line: `--ask` and its options for `run` and `attach`, and what
//! `pending`, `approve` and `deny` share: the scope of a decision, the calls to the agent's
//! control socket (see `daemon::control`) and the way a request is shown.

use std::{path::Path, process::ExitCode, time::Duration};

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
    approvals: Option<std::path::PathBuf>,
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
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Once => "once",
            Self::Session => "session",
            Self::Always => "always",
        }
    }
}

pub(super) fn decide(
    name: &str,
    target: &str,
    what: &str,
    scope: Scope,
    ports: Option<String>,
) -> ExitCode {
    match send_decision(name, target, what, scope, ports) {
        Ok(m) => {
            println!("{m}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

pub(super) fn send_decision(
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

pub(super) fn fetch_pending(name: &str) -> Result<Vec<ApprovalRequest>, String> {
    let answer = control::call(name, &Request::Pending).map_err(|e| format!("{e:#}"))?;
    if !answer.ok {
        return Err(answer.error.unwrap_or_else(|| "refused".into()));
    }
    Ok(answer.pending.unwrap_or_default())
}

pub(super) fn fail(e: &str) -> ExitCode {
    eprintln!("egress-agent: {e}");
    ExitCode::from(super::EXIT_NO)
}

/// One request as a line: id, what (shown plainly), who, how long ago.
pub(super) fn line(r: &ApprovalRequest) -> String {
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
pub(super) fn data_hint(name: &str) -> String {
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

pub(super) fn uid(r: &ApprovalRequest) -> String {
    r.uid.map_or_else(|| "?".into(), |u| u.to_string())
}

/// An address request's subject; only digits, dots, colons and brackets can appear.
pub(super) fn plain_subject(r: &ApprovalRequest) -> String {
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
