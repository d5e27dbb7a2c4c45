//! `approve`: allow a held request, once, for the session or always (appended to the
//! approvals file); `--watch` asks about each request as it comes.

use std::{
    io::{self, BufRead as _, Write as _},
    process::ExitCode,
    time::{Duration, Instant},
};

use super::ask::{Scope, decide, fail, fetch_pending, line, send_decision};

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

impl ApproveArgs {
    /// Sends the decision (or, with `--watch`, asks about each request as it comes).
    pub fn execute(self) -> ExitCode {
        if self.watch {
            return watch(&self.name);
        }
        let target = self.target.unwrap_or_default();
        decide(&self.name, &target, "allow", self.scope, self.ports)
    }
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
