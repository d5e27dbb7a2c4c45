//! `explain`: which rule of an allowlist lets a destination through, or why none does. The
//! query is [`crate::policy::explain`]'s; this file holds the arguments, prints its findings
//! and turns the verdicts into the exit status.

use std::{path::PathBuf, process::ExitCode};

use clap::{ValueEnum, builder::PossibleValue};

use crate::{
    cli::{EXIT_NO, EXIT_USAGE, print},
    policy::{
        self,
        explain::{self, Destination, Transport},
    },
};

/// The arguments of `explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The allowlist (YAML).
    #[arg(long, short = 'a', value_name = "FILE")]
    allowlist: PathBuf,
    /// The protocol to judge; default: tcp when a port is given, any without one.
    #[arg(long, short = 'p', value_name = "PROTOCOL")]
    protocol: Option<Transport>,
    /// Destinations: NAME, NAME:PORT, IP, IP:PORT or [IPV6]:PORT, or a unix socket as
    /// unix:/PATH or unix:@NAME. Without a port: what the matching rules allow.
    #[arg(required = true, value_name = "TARGET")]
    targets: Vec<Destination>,
}

impl ValueEnum for Transport {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Tcp, Self::Udp, Self::Icmp]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        }))
    }
}

impl ExplainArgs {
    /// 0 if every destination is allowed, 1 if one is denied, 2 if the allowlist cannot be
    /// loaded.
    pub fn execute(self) -> ExitCode {
        let policy = match policy::load(&self.allowlist) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let mut text = String::new();
        let mut allowed = true;
        for destination in self.targets {
            let e = explain::explain(
                &policy,
                &explain::Query {
                    destination,
                    transport: self.protocol,
                },
            );
            allowed &= e.allowed;
            for line in e.lines {
                text.push_str(&line);
                text.push('\n');
            }
        }
        match print(&text) {
            c if c != ExitCode::SUCCESS => c,
            _ if allowed => ExitCode::SUCCESS,
            _ => ExitCode::from(EXIT_NO),
        }
    }
}
