//! Running commands: each is echoed (`$ cargo build ...`) before it runs, and a failure names
//! the command and how it ended.

use std::{
    ffi::{OsStr, OsString},
    io::{self, Write as _},
    os::unix::process::ExitStatusExt as _,
    process::{Command, ExitStatus, Output, Stdio},
};

use anyhow::{Result, anyhow, bail};

/// A command to run from the workspace root, and the text it is echoed and named by.
#[derive(Debug)]
pub struct Cmd {
    command: Command,
    shown: String,
}

impl Cmd {
    /// `program`, found on `PATH`.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref();
        Self {
            command: Command::new(program),
            shown: quote(program),
        }
    }

    /// The `cargo` that runs xtask (`$CARGO`), so that every step uses the same toolchain;
    /// echoed as `cargo`.
    pub fn cargo() -> Self {
        let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        Self {
            command: Command::new(program),
            shown: "cargo".to_owned(),
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.shown.push(' ');
        self.shown.push_str(&quote(arg.as_ref()));
        self.command.arg(arg);
        self
    }

    /// Appends arguments.
    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    /// Sets an environment variable (not echoed).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// The command as it is echoed.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Echoes the command, runs it with this process's stdin, stdout and stderr, and returns
    /// how it ended; an error only if it cannot be started.
    pub fn status(mut self) -> Result<ExitStatus> {
        // Never panics (a closed stdout must not turn cleanup in a `Drop` into a panic).
        let _ = writeln!(io::stdout(), "$ {}", self.shown);
        self.command
            .status()
            .map_err(|e| start_error(&self.shown, e))
    }

    /// Like [`Cmd::status`], but passes each line the command prints on stdout to `line`
    /// (after echoing it).
    pub fn status_lines(mut self, mut line: impl FnMut(&str)) -> Result<ExitStatus> {
        use std::io::BufRead as _;
        let _ = writeln!(io::stdout(), "$ {}", self.shown);
        let mut child = self
            .command
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| start_error(&self.shown, e))?;
        if let Some(out) = child.stdout.take() {
            for l in io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                let _ = writeln!(io::stdout(), "{l}");
                line(&l);
            }
        }
        child.wait().map_err(|e| start_error(&self.shown, e))
    }

    /// Echoes and runs the command (see [`Cmd::status`]); an error unless it exits with 0.
    pub fn run(self) -> Result<()> {
        let shown = self.shown.clone();
        let status = self.status()?;
        check(&shown, status, None)
    }

    /// Runs the command without echoing it, its output captured; an error unless it exits
    /// with 0, and the error holds what it printed. For long, noisy installs.
    pub fn run_captured(self) -> Result<()> {
        let shown = self.shown.clone();
        let output = self.output()?;
        check(&shown, output.status, Some(&output))
    }

    /// Runs the command without echoing it, stdin closed and its output captured; an error
    /// only if it cannot be started. For probes (`dpkg-query`, `--version`).
    pub fn output(mut self) -> Result<Output> {
        self.command
            .stdin(Stdio::null())
            .output()
            .map_err(|e| start_error(&self.shown, e))
    }
}

fn start_error(shown: &str, e: io::Error) -> anyhow::Error {
    let program = shown.split(' ').next().unwrap_or(shown);
    if e.kind() == io::ErrorKind::NotFound {
        anyhow!("cannot run `{shown}`: {program} is not on PATH")
    } else {
        anyhow::Error::new(e).context(format!("cannot run `{shown}`"))
    }
}

fn check(shown: &str, status: ExitStatus, output: Option<&Output>) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    let how = describe(status);
    let printed = output.map_or_else(String::new, |o| {
        let mut printed = String::from_utf8_lossy(&o.stdout).into_owned();
        printed.push_str(&String::from_utf8_lossy(&o.stderr));
        printed.trim_end().to_owned()
    });
    if printed.is_empty() {
        bail!("`{shown}` failed ({how})")
    }
    bail!("`{shown}` failed ({how}); it printed:\n{printed}")
}

/// `exit status 1`, or `killed by signal 2 (SIGINT)`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
        (None, None) => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => " (SIGINT)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// Shell-quotes `s` when it needs it, so that an echoed command can be pasted back.
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:+@,%".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs checks one after another, going on when one fails, and fails at the end naming
/// every step that failed: one failed step should not hide the others' results.
#[derive(Debug, Default)]
pub struct Steps {
    failed: Vec<String>,
    /// Tests passed and failed, summed from cargo's `test result:` lines.
    passed_tests: u64,
    failed_tests: u64,
}

impl Steps {
    /// Runs `cmd` as the step `name`; returns whether it succeeded. A step killed by SIGINT
    /// (Ctrl-C) stops everything.
    pub fn run(&mut self, name: &str, cmd: Cmd) -> Result<bool> {
        let shown = cmd.shown().to_owned();
        let status = cmd.status();
        self.record(name, &shown, status)
    }

    /// Like [`Steps::run`] for a `cargo test` command: also sums its `test result:` lines.
    pub fn run_tests(&mut self, name: &str, cmd: Cmd) -> Result<bool> {
        let shown = cmd.shown().to_owned();
        let (mut passed, mut failed) = (0, 0);
        let status = cmd.status_lines(|l| {
            if let Some((p, f)) = parse_test_result(l) {
                passed += p;
                failed += f;
            }
        });
        self.passed_tests += passed;
        self.failed_tests += failed;
        self.record(name, &shown, status)
    }

    /// Notes how step `name` (`shown`) ended; an error only for Ctrl-C.
    fn record(&mut self, name: &str, shown: &str, status: Result<ExitStatus>) -> Result<bool> {
        let status = match status {
            Ok(status) => status,
            Err(e) => {
                eprintln!("xtask: {name}: {e:#}");
                self.failed.push(name.to_owned());
                return Ok(false);
            }
        };
        if status.signal() == Some(libc::SIGINT) {
            bail!("interrupted during `{shown}`");
        }
        if !status.success() {
            eprintln!("xtask: {name}: `{shown}` failed ({})", describe(status));
            self.failed.push(name.to_owned());
        }
        Ok(status.success())
    }

    /// Ok if every step succeeded, else an error naming the failed ones. Prints the test
    /// totals as one closing line (`total: N passed, M failed`).
    pub fn finish(self) -> Result<()> {
        if self.passed_tests + self.failed_tests > 0 {
            println!(
                "total: {} passed, {} failed",
                self.passed_tests, self.failed_tests
            );
        }
        if self.failed.is_empty() {
            Ok(())
        } else {
            bail!("failed: {}", self.failed.join(", "))
        }
    }
}

/// `(passed, failed)` from a cargo line `test result: ok. 21 passed; 0 failed; ...`.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut passed = None;
    let mut failed = None;
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        match (words.next(), words.next()) {
            (Some(n), Some("passed")) => passed = n.parse().ok(),
            (Some(n), Some("failed")) => failed = n.parse().ok(),
            _ => {}
        }
    }
    Some((passed?, failed?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_test_result_lines_parse() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 21 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.48s"
            ),
            Some((21, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some((3, 2))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(quote(OsStr::new("--test-threads=1")), "--test-threads=1");
        assert_eq!(quote(OsStr::new("a b")), "'a b'");
        assert_eq!(quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(quote(OsStr::new("")), "''");
    }

    #[test]
    fn echo_names_the_command() {
        let cmd = Cmd::new("sh").args(["-c", "exit 3"]);
        assert_eq!(cmd.shown(), "sh -c 'exit 3'");
        let err = cmd.run_captured().unwrap_err();
        assert_eq!(err.to_string(), "`sh -c 'exit 3'` failed (exit status 3)");
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 1"])
            .run_captured();
        assert_eq!(
            err.unwrap_err().to_string(),
            "`sh -c 'echo oops >&2; exit 1'` failed (exit status 1); it printed:\noops"
        );
    }
}
