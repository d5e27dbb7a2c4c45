//! `run` and `learn`: a command under an allowlist, confined. The work is in
//! [`crate::workload::run`]; this file holds the arguments and hands them over.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use crate::{
    cli::{EXIT_AGENT_ERROR, EXIT_USAGE, ask::AskArgs, block_on, parse_name},
    workload::{confine::Capability, run},
};

/// How the command of `run` and `learn` is confined, beyond the defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfineArgs {
    /// Let the command keep one of the capabilities confinement drops (repeatable). Each
    /// one weakens enforcement, and the events say how. A command that would run as root
    /// then runs as uid 65534 with the capability, not as root in a user namespace.
    #[arg(long = "keep-cap", value_name = "CAP")]
    keep_caps: Vec<Capability>,
    /// Let the command use io_uring where the kernel cannot load the family guard (there,
    /// io_uring can create sockets of any family, AF_VSOCK included, past the seccomp
    /// filter; a warning says so). Elsewhere io_uring is always allowed.
    #[arg(long)]
    allow_io_uring: bool,
    /// Pass this inherited file descriptor to the command (repeatable). Without it the
    /// command gets stdin, stdout and stderr only: a socket the caller had open would carry
    /// data past every hook.
    #[arg(long = "pass-fd", value_name = "FD", value_parser = clap::value_parser!(i32).range(3..))]
    pass_fds: Vec<i32>,
}

/// The arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
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
    #[command(flatten)]
    ask: AskArgs,
    #[command(flatten)]
    confine: ConfineArgs,
    /// Debugging aid: log every verdict of the kernel programs (allow, deny, audit; hook,
    /// protocol, destination, port, reason) to stderr. Costs a log record per connect and
    /// send; without it the tracing code is not even loaded.
    #[arg(long)]
    trace_verdicts: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The arguments of `learn`.
#[derive(Debug, clap::Args)]
pub struct LearnArgs {
    /// Where to write the learned allowlist.
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,
    /// Start from this allowlist (its rules are not reported again).
    #[arg(long, value_name = "FILE")]
    allowlist: Option<PathBuf>,
    /// Also append the event lines here (default: stderr).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    #[command(flatten)]
    confine: ConfineArgs,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

impl RunArgs {
    /// Runs the command under the allowlist; its exit status is ours.
    pub fn execute(self) -> ExitCode {
        if self.audit && self.ask.forced() {
            eprintln!("egress-agent: --audit and --ask exclude each other");
            return ExitCode::from(EXIT_USAGE);
        }
        let ask = match self.ask.config(&self.allowlist, None) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("egress-agent: {e:#}");
                return ExitCode::from(EXIT_AGENT_ERROR);
            }
        };
        block_on(run::run(run::RunConfig {
            allowlist: Some(self.allowlist),
            learn_output: None,
            events: self.events,
            name: self.name,
            audit: self.audit,
            keep_caps: self.confine.keep_caps,
            allow_io_uring: self.confine.allow_io_uring,
            pass_fds: self.confine.pass_fds,
            trace_verdicts: self.trace_verdicts,
            ask: Some(ask),
            command: self.command,
        }))
    }
}

impl LearnArgs {
    /// Runs the command in audit mode and writes the allowlist it needed.
    pub fn execute(self) -> ExitCode {
        block_on(run::run(run::RunConfig {
            allowlist: self.allowlist,
            learn_output: Some(self.output),
            events: self.events,
            name: None,
            audit: true,
            keep_caps: self.confine.keep_caps,
            allow_io_uring: self.confine.allow_io_uring,
            pass_fds: self.confine.pass_fds,
            trace_verdicts: false,
            ask: None,
            command: self.command,
        }))
    }
}
