//! Errors of loading an allowlist, each naming the file, line, column and field like rustc
//! and ripgrep do: `allowlists/x.yaml:7:5: allow[2].cidr: "10.0.0.300/8" is not a CIDR`.

use std::{fmt, io, path::PathBuf};

use super::Net;

/// Where in which file a problem is: printed as `file:line:column: field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as the caller named it (an include is joined to its including file's folder).
    pub file: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// The field path, like `allow[2].ports[1]`; empty for the document itself.
    pub field: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        Ok(())
    }
}

/// Why an allowlist could not be loaded.
///
/// The `Display` form is the whole one-line message (the io error included), so it is not
/// repeated as an error `source`.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The root file could not be read.
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        /// The file, as the caller named it.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// The text is not well-formed YAML.
    #[error("{at}: {message}")]
    Syntax {
        /// Where the parser gave up.
        at: Location,
        /// The parser's message.
        message: String,
    },
    /// A value, key or structure the format does not allow.
    #[error("{at}: {message}")]
    Invalid {
        /// The offending value (or key, for an unknown field).
        at: Location,
        /// What is wrong with it.
        message: String,
    },
    /// An `include:` entry names a file that cannot be read.
    #[error("{at}: cannot read {}: {error}", path.display())]
    Include {
        /// The `include[n]` entry.
        at: Location,
        /// The included file, joined to the including file's folder.
        path: PathBuf,
        /// What the operating system said.
        error: io::Error,
    },
    /// Files include each other in a loop.
    #[error("{at}: include cycle {}", chain_display(chain))]
    IncludeCycle {
        /// The `include[n]` entry that closes the loop.
        at: Location,
        /// The files of the loop, the first one repeated at the end.
        chain: Vec<PathBuf>,
    },
    /// A `cidr:`/`ip:` entry needs more port ranges than one kernel value holds, once the
    /// ranges of the broader prefixes containing it are added.
    #[error(
        "{at}: {net} needs {count} port ranges{}, more than the {max} one entry can hold",
        if *inherited { " (with those of the broader prefixes containing it)" } else { "" }
    )]
    TooManyRanges {
        /// The first rule of the entry.
        at: Location,
        /// The entry's network.
        net: Net,
        /// How many distinct ranges it would need.
        count: usize,
        /// The limit, `egress_common::consts::MAX_PORT_RANGES`.
        max: usize,
        /// Whether broader prefixes contributed ranges.
        inherited: bool,
    },
}

impl PolicyError {
    /// Where the problem is, when it is inside a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { at, .. }
            | Self::Invalid { at, .. }
            | Self::Include { at, .. }
            | Self::IncludeCycle { at, .. }
            | Self::TooManyRanges { at, .. } => Some(at),
        }
    }
}

fn chain_display(chain: &[PathBuf]) -> String {
    chain
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}
