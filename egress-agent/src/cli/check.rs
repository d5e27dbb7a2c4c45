//! `check`: validates allowlist files and prints a one-line summary of each.

use std::{path::PathBuf, process::ExitCode};

use crate::policy;

/// The arguments of `check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Allowlist files.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

impl CheckArgs {
    /// 0 if every file is valid; 1 otherwise (each error on stderr, `FILE:LINE:COL: ...`).
    pub fn execute(self) -> ExitCode {
        let mut failed = false;
        for f in &self.files {
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
}
