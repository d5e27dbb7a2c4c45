//! `status`: what an agent named NAME enforces, read from its pins and state file (it works
//! when the agent is gone). [`crate::daemon::status`] reads; this file renders.

use std::{
    fmt::Write as _,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use crate::{
    cli::parse_name,
    daemon::status::{self, Status},
};

/// The arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Instance name.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    name: String,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl StatusArgs {
    /// Prints the status: 0; 1 when nothing of that name is pinned.
    pub fn execute(self) -> ExitCode {
        match status::read(&self.name) {
            Ok(s) => {
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    print!("{}", render(&s));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("egress-agent: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// The human-readable form: one `key value` row each, then the latest denies.
fn render(s: &Status) -> String {
    let mut o = String::new();
    let row = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{k:<10} {v}");
    };
    row(&mut o, "name", s.name.clone());
    row(
        &mut o,
        "enforcing",
        if s.enforcing {
            "yes (programs pinned)".into()
        } else {
            "NO (no links pinned)".into()
        },
    );
    row(&mut o, "mode", s.mode.into());
    match &s.agent {
        Some(a) => {
            let age = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .saturating_sub(Duration::from_secs(a.written));
            row(
                &mut o,
                "agent",
                if s.agent_running {
                    format!("pid {} (running)", a.pid)
                } else {
                    format!(
                        "pid {} NOT RUNNING (state from {}s ago)",
                        a.pid,
                        age.as_secs()
                    )
                },
            );
            row(&mut o, "cgroup", a.cgroup.display().to_string());
            if let Some(f) = &a.allowlist {
                row(&mut o, "allowlist", f.display().to_string());
            }
            row(&mut o, "policy", a.policy.clone());
            match a.policy_state.as_str() {
                "previous" => row(
                    &mut o,
                    "REJECTED",
                    format!(
                        "{} (the previous valid policy runs, whole)",
                        a.policy_rejected.as_deref().unwrap_or("?")
                    ),
                ),
                "inconsistent" => row(
                    &mut o,
                    "MAPS",
                    format!(
                        "INCONSISTENT: a failed change could not be rolled back ({})",
                        a.policy_rejected.as_deref().unwrap_or("?")
                    ),
                ),
                _ => {}
            }
            for (i, p) in a.protected.iter().enumerate() {
                row(&mut o, if i == 0 { "protected" } else { "" }, p.clone());
            }
        }
        None => row(&mut o, "agent", "unknown (no state file)".into()),
    }
    row(
        &mut o,
        "counters",
        format!(
            "allowed {}, denied {}, ring-buffer drops {}, errors {}",
            s.allowed, s.denied, s.ringbuf_drops, s.errors
        ),
    );
    row(
        &mut o,
        "names",
        format!(
            "name-bound first flights passed {}, refused {}; open connections held back {}",
            s.name_passed, s.name_refused, s.name_held
        ),
    );
    if let Some(a) = s.agent.as_ref().filter(|a| !a.denies_by_reason.is_empty()) {
        let by: Vec<String> = a
            .denies_by_reason
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        row(
            &mut o,
            "denies",
            format!("{} (this agent's events, by reason)", by.join(", ")),
        );
    }
    row(
        &mut o,
        "entries",
        format!("{} cidr/ip, {} from DNS", s.cidr_entries, s.dns_entries),
    );
    if let Some(a) = &s.agent {
        let _ = writeln!(o, "latest denies:");
        if a.latest_denies.is_empty() {
            let _ = writeln!(o, "  (none)");
        }
        for d in &a.latest_denies {
            let host = d["host"]
                .as_str()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {}  {} {}:{}{}  {} pid {}  {}",
                d["ts"].as_str().unwrap_or("?"),
                d["proto"].as_str().unwrap_or("?"),
                d["dst"].as_str().unwrap_or("?"),
                d["port"],
                host,
                d["comm"].as_str().unwrap_or("?"),
                d["pid"],
                d["reason"].as_str().unwrap_or("?"),
            );
        }
    }
    o
}
