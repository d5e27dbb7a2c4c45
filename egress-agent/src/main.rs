//! The `egress-agent` binary: logging, then the CLI.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
        // The programs' verdict trace, which exists only when asked for (--trace-verdicts).
        .add_directive(egress_agent::bpf::trace::directive());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    egress_agent::cli::main(egress_agent::cli::Cli::parse())
}
