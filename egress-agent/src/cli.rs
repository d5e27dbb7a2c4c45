//! Command-line interface.

use std::{
    ffi::OsString,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum, builder::PossibleValue};

use crate::{
    confine::Capability,
    explain::{self, Destination, Transport},
    policy, run, schema,
};

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
  check        0 if every file is valid; 1 if one is not
  explain      0 if every destination is allowed; 1 if one is denied; 2 if the allowlist
               cannot be loaded
  any command  2 on a usage error (unknown option, missing argument); 0 otherwise
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
    /// allows. Needs root; a command started through sudo runs as the invoking user. The
    /// command is confined (no_new_privs, no CAP_NET_RAW/NET_ADMIN/SYS_ADMIN/BPF/...,
    /// read-only cgroup filesystems, its own cgroup namespace) so that even as root it cannot
    /// leave the cgroup or detach the programs.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent run --allowlist allowlists/demo.yaml -- curl http://127.0.0.1:8080/\n  \
        sudo egress-agent run --allowlist team.yaml --events denies.jsonl -- python agent.py\n\n\
        Exit status: the command's own; 128+N if signal N killed it; 125 if the agent failed,\n\
        126 if the command cannot be executed, 127 if it was not found.")]
    Run {
        /// The allowlist (YAML).
        #[arg(long, value_name = "FILE")]
        allowlist: PathBuf,
        /// Append event lines (JSON) here instead of writing them to stderr.
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Instance name (cgroup `egress-<name>`, pins under /sys/fs/bpf/egress/<name>).
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: Option<String>,
        /// Audit mode, whatever the allowlist says: nothing is blocked, every would-be deny and
        /// refused query is reported with verdict `audit`.
        #[arg(long)]
        audit: bool,
        /// Let the command keep one of the capabilities confinement drops (repeatable). Each
        /// one weakens enforcement, and the events say how.
        #[arg(long = "keep-cap", value_name = "CAP")]
        keep_caps: Vec<Capability>,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Run a command in audit mode (nothing is blocked) and write the allowlist it needed:
    /// names rather than addresses where a name was used, the ports and protocols seen,
    /// wildcards only where several sibling names appeared, IP literals flagged for review.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent learn --output allowlists/my-agent.yaml -- python agent.py\n  \
        sudo egress-agent run --allowlist allowlists/my-agent.yaml -- python agent.py\n\n\
        Exit status: as for run (the command's own).")]
    Learn {
        /// Where to write the learned allowlist.
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
        /// Start from this allowlist (its rules are not reported again).
        #[arg(long, value_name = "FILE")]
        allowlist: Option<PathBuf>,
        /// Also append the event lines here (default: stderr).
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// As for run.
        #[arg(long = "keep-cap", value_name = "CAP")]
        keep_caps: Vec<Capability>,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Validate allowlist files and print a one-line summary of each.
    #[command(after_help = "Example:\n  egress-agent check allowlists/*.yaml\n\n\
        Exit status: 0 if every file is valid, 1 otherwise.")]
    Check {
        /// Allowlist files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

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
        Command::Check { files } => check(&files),
        Command::Run {
            allowlist,
            events,
            name,
            audit,
            keep_caps,
            command,
        } => {
            let config = run::RunConfig {
                allowlist: Some(allowlist),
                learn_output: None,
                events,
                name,
                audit,
                keep_caps,
                command,
            };
            run_command(config)
        }
        Command::Learn {
            output,
            allowlist,
            events,
            keep_caps,
            command,
        } => run_command(run::RunConfig {
            allowlist,
            learn_output: Some(output),
            events,
            name: None,
            audit: true,
            keep_caps,
            command,
        }),
    }
}

fn run_command(config: run::RunConfig) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("egress-agent: cannot start the runtime: {e}");
            return ExitCode::from(run::EXIT_AGENT_ERROR as u8);
        }
    };
    match rt.block_on(run::run(config)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("egress-agent: {e:#}");
            ExitCode::from(run::EXIT_AGENT_ERROR as u8)
        }
    }
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for f in files {
        match policy::load(f) {
            Ok(p) => println!("{}: ok: {}", f.display(), p.summary()),
            Err(e) => {
                failed = true;
                eprintln!("{e}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
