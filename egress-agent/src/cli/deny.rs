//! `deny`: refuse a held request now (and, `--for session`, the same one later).

use std::process::ExitCode;

use super::ask::{Scope, decide};

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

impl DenyArgs {
    /// Sends the refusal.
    pub fn execute(self) -> ExitCode {
        decide(&self.name, &self.target, "deny", self.scope, None)
    }
}
