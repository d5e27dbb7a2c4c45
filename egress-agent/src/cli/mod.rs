//! Command-line interface: clap's argument types, one file per command, exit codes and
//! rendering. The top of the dependency graph: it may use every room; nothing uses it.
//!
//! Each command's file holds its arguments (a `clap::Args` struct) and an `execute` that
//! hands them to the room doing the work and turns the outcome into an exit status. The
//! command's help (its doc comment and examples) stays on its variant of [`Command`], so
//! `--help`, the man pages and the completions read from one place.

mod approve;
mod ask;
mod attach;
mod check;
mod deny;
mod explain;
mod man;
mod pending;
mod run;
mod status;

use std::{
    io::{self, Write as _},
    process::ExitCode,
};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{policy::schema, workload::run::EXIT_AGENT_ERROR as AGENT_ERROR};

pub use man::man_page;

/// Exit status when egress-agent itself failed (`run`, `learn`, `attach`, `detach`).
pub(crate) const EXIT_AGENT_ERROR: u8 = AGENT_ERROR as u8;

/// Exit status of `check` for an invalid file and of `explain` for a denied destination.
pub const EXIT_NO: u8 = 1;
/// Exit status of a usage error (clap's) and of `explain` for an allowlist it cannot load.
pub const EXIT_USAGE: u8 = 2;

/// The top-level `--help` text after the options (also the man page's EXAMPLES and EXIT
/// STATUS sections).
const AFTER_HELP: &str = "\
Examples:
  egress-agent check allowlists/*.yaml
  egress-agent explain --allowlist allowlists/default.yaml api.github.com:443 10.0.0.1:80
  sudo egress-agent run --allowlist allowlists/default.yaml -- claude
  egress-agent completions bash > ~/.local/share/bash-completion/completions/egress-agent
  egress-agent man | man -l -

Exit status:
  run, learn   the command's own status; 128+N if signal N killed it; 125 if egress-agent
               itself failed (bad allowlist, not root, the kernel refused); 126 if the
               command cannot be executed; 127 if it was not found
  attach       0 after SIGTERM or SIGINT; 125 if egress-agent failed
  detach, status
               0; 1 if nothing of that name is pinned
  pending, approve, deny
               0; 1 for an unknown or decided request, bad input, or no such agent
  check        0 if every file is valid; 1 if one is not
  explain      0 if every destination is allowed; 1 if one is denied; 2 if the allowlist
               cannot be loaded
  schema, completions, man
               0; 1 if the output cannot be written
  all          2 on a usage error (unknown command or option, missing argument)
";

/// Egress control for AI agents: a command (or a cgroup) can reach only what its allowlist
/// names; the kernel denies everything else with EPERM and reports it.
#[derive(Debug, Parser)]
#[command(name = "egress-agent", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command under an allowlist: it and its children can reach only what the file
    /// allows.
    ///
    /// Needs root; a command started through sudo runs as the invoking user. The
    /// command is confined (no_new_privs, no CAP_NET_RAW/NET_ADMIN/SYS_ADMIN/BPF/...,
    /// read-only cgroup filesystems, its own cgroup namespace) so that even as root it cannot
    /// leave the cgroup or detach the programs.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent run --allowlist allowlists/demo.yaml -- curl http://127.0.0.1:8080/\n  \
        sudo egress-agent run --allowlist team.yaml --events denies.jsonl -- python agent.py\n\n\
        Exit status: the command's own; 128+N if signal N killed it; 125 if the agent failed,\n\
        126 if the command cannot be executed, 127 if it was not found.")]
    Run(run::RunArgs),
    /// Run a command in audit mode (nothing is blocked) and write the allowlist it needed.
    ///
    /// Names rather than addresses where a name was used, the ports and protocols seen,
    /// wildcards only where several sibling names appeared, IP literals flagged for review.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent learn --output allowlists/my-agent.yaml -- python agent.py\n  \
        sudo egress-agent run --allowlist allowlists/my-agent.yaml -- python agent.py\n\n\
        Exit status: as for run (the command's own).")]
    Learn(run::LearnArgs),
    /// Enforce an allowlist on an existing cgroup (a Kubernetes pod's, found from its UID)
    /// until stopped. The agent's own cgroup, when inside the enforced one, is exempted. The
    /// allowlist is reloaded when it changes. SIGTERM leaves enforcement in place (the cgroup
    /// stays closed) unless --detach-on-exit.
    #[command(after_help = "Examples:\n  \
        egress-agent attach --cgroup /sys/fs/cgroup/agents/a1 --allowlist team.yaml\n  \
        egress-agent attach --pod-uid $POD_UID --allowlist /etc/egress/allowlist.yaml --health 0.0.0.0:9901\n\n\
        Exit status: 0 after SIGTERM/SIGINT; 125 if the agent failed.")]
    Attach(attach::AttachArgs),
    /// Detach the programs an agent named NAME pinned and remove its pins (the enforced
    /// cgroup is open again once no agent holds the links).
    #[command(
        after_help = "Examples:\n  egress-agent detach --name pod-1f2e3d4c\n  \
        egress-agent detach --stale\n\n\
        Exit status: 0 when removed, 1 when nothing of that name is pinned."
    )]
    Detach(attach::DetachArgs),
    /// Show what an agent named NAME enforces: mode, counters, map fill, the running policy
    /// and the latest denies (from its pins and state file; works when the agent is gone).
    #[command(after_help = "Examples:\n  egress-agent status --name run-4242\n  \
        egress-agent status --name pod-1f2e3d4c --json\n\n\
        Exit status: 0; 1 when nothing of that name is pinned.")]
    Status(status::StatusArgs),
    /// Ask mode: list the requests an agent holds for a decision (id, name or address, who
    /// asked, when). Needs root.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent pending --name run-4242\n  \
        sudo egress-agent pending --name pod-1f2e3d4c --json\n\n\
        Exit status: 0; 1 when no agent of that name runs in ask mode.")]
    Pending(pending::PendingArgs),
    /// Ask mode: allow a held request (answers a held lookup at once with the real
    /// addresses). Read the name first: a name can carry data out.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent approve --name run-4242 pypi.org --for session --ports 443\n  \
        sudo egress-agent approve --name run-4242 3 --for always\n  \
        sudo egress-agent approve --name run-4242 --watch\n\n\
        Exit status: 0 when done; 1 for an unknown or already decided request, bad ports, an\n\
        agent that is not running, or an approvals file that cannot be appended to.")]
    Approve(approve::ApproveArgs),
    /// Ask mode: refuse a held request now (and, --for session, the same one later).
    #[command(after_help = "Examples:\n  \
        sudo egress-agent deny --name run-4242 exfil.example.net\n  \
        sudo egress-agent deny --name run-4242 4 --for session\n\n\
        Exit status: 0 when done; 1 for an unknown or already decided request or an agent\n\
        that is not running.")]
    Deny(deny::DenyArgs),
    /// Validate allowlist files and print a one-line summary of each.
    #[command(after_help = "Examples:\n  \
        egress-agent check allowlists/*.yaml\n  \
        egress-agent check team.yaml || exit 1\n\n\
        Exit status: 0 if every file is valid, 1 otherwise.")]
    Check(check::CheckArgs),
    /// Say which rule of an allowlist lets a destination through, or why none does.
    ///
    /// One line per finding. A name is reachable through the addresses DNS answers for it; an
    /// address only through cidr/ip rules, or while DNS answered it for a permitted name
    /// (never a link-local or metadata address). Port 53 always goes to egress's own resolver.
    #[command(after_help = "Examples:\n  \
        egress-agent explain --allowlist allowlists/default.yaml api.anthropic.com:443\n  \
        egress-agent explain --allowlist team.yaml github.com:22 pypi.org evil.test\n  \
        egress-agent explain --allowlist team.yaml --protocol udp 10.0.0.5:5353 '[2001:db8::1]:443'\n  \
        egress-agent explain --allowlist team.yaml unix:/run/user/1000/ssh-agent.sock\n\n\
        Exit status: 0 if every destination is allowed, 1 if one is denied, 2 if the\n\
        allowlist cannot be loaded or a destination is not one.")]
    Explain(explain::ExplainArgs),
    /// Print the JSON Schema of the allowlist format.
    ///
    /// allowlists/schema.json is its copy; editors with the YAML language server use it to
    /// validate and complete allowlists that name it in their first line.
    #[command(after_help = "Examples:\n  \
        egress-agent schema > allowlists/schema.json\n  \
        # then, first line of an allowlist: # yaml-language-server: $schema=./schema.json")]
    Schema,
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        egress-agent completions bash > ~/.local/share/bash-completion/completions/egress-agent\n  \
        egress-agent completions zsh > ~/.zfunc/_egress-agent\n  \
        egress-agent completions fish > ~/.config/fish/completions/egress-agent.fish")]
    Completions {
        /// The shell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) of egress-agent or of one of its commands.
    #[command(after_help = "Examples:\n  \
        egress-agent man | man -l -\n  \
        egress-agent man run > /usr/local/share/man/man1/egress-agent-run.1")]
    Man {
        /// The command whose page to print (default: egress-agent itself).
        #[arg(value_name = "COMMAND")]
        command: Option<String>,
    },
}

/// A valid instance name (clap value parser of `--name`).
fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !s.starts_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a name is 1-64 of [A-Za-z0-9_-], not starting with '-'".into())
    }
}

/// Runs the parsed command line and returns the process exit status.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => args.execute(),
        Command::Learn(args) => args.execute(),
        Command::Attach(args) => args.execute(),
        Command::Detach(args) => args.execute(),
        Command::Status(args) => args.execute(),
        Command::Pending(args) => args.execute(),
        Command::Approve(args) => args.execute(),
        Command::Deny(args) => args.execute(),
        Command::Check(args) => args.execute(),
        Command::Explain(args) => args.execute(),
        Command::Schema => print(&schema::allowlist_schema_json()),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "egress-agent", &mut out);
            print(&String::from_utf8_lossy(&out))
        }
        Command::Man { command } => man::execute(command.as_deref()),
    }
}

/// Runs an async command on a small runtime; its `Ok` is the exit status.
fn block_on(f: impl std::future::Future<Output = anyhow::Result<i32>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("egress-agent: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_AGENT_ERROR);
        }
    };
    match rt.block_on(f) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("egress-agent: {e:#}");
            ExitCode::from(EXIT_AGENT_ERROR)
        }
    }
}

/// Writes `text` to stdout; a failed write (a closed pipe too) is exit status 1.
fn print(text: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("egress-agent: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_for_each_shell() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "egress-agent", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("explain") && text.contains("allowlist"),
                "{shell}"
            );
        }
    }
}
