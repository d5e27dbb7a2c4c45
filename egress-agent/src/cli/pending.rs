//! `pending`: the requests an ask-mode agent holds for a decision.

use std::process::ExitCode;

use super::ask::{fail, fetch_pending, line};

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

impl PendingArgs {
    /// Lists the held requests, as lines or one JSON array.
    pub fn execute(self) -> ExitCode {
        let list = match fetch_pending(&self.name) {
            Ok(l) => l,
            Err(e) => return fail(&e),
        };
        let text = if self.json {
            format!("{}\n", serde_json::to_string(&list).unwrap_or_default())
        } else {
            list.iter().map(|r| format!("{}\n", line(r))).collect()
        };
        super::print(&text)
    }
}
