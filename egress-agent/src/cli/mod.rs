//! Command-line interface: clap's argument types, one function per command, exit codes and
//! rendering. The top of the dependency graph: it may use every room; nothing uses it.

use std::{
    ffi::OsString,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

pub mod approve;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum, builder::PossibleValue};
use clap_mangen::Man;

use crate::{
    daemon::attach,
    daemon::session,
    daemon::status,
    policy,
    policy::explain::{self, Destination, Transport},
    policy::schema,
    workload::confine::Capability,
    workload::run,
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
        #[command(flatten)]
        ask: approve::AskArgs,
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
    },
    /// Run a command in audit mode (nothing is blocked) and write the allowlist it needed.
    ///
    /// Names rather than addresses where a name was used, the ports and protocols seen,
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
        #[command(flatten)]
        confine: ConfineArgs,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Enforce an allowlist on an existing cgroup (a Kubernetes pod's, found from its UID)
    /// until stopped. The agent's own cgroup, when inside the enforced one, is exempted. The
    /// allowlist is reloaded when it changes. SIGTERM leaves enforcement in place (the cgroup
    /// stays closed) unless --detach-on-exit.
    #[command(after_help = "Examples:\n  \
        egress-agent attach --cgroup /sys/fs/cgroup/agents/a1 --allowlist team.yaml\n  \
        egress-agent attach --pod-uid $POD_UID --allowlist /etc/egress/allowlist.yaml --health 0.0.0.0:9901\n\n\
        Exit status: 0 after SIGTERM/SIGINT; 125 if the agent failed.")]
    Attach {
        /// The cgroup v2 directory (absolute, or relative to the cgroup v2 mount).
        #[arg(long, value_name = "PATH", conflicts_with = "pod_uid")]
        cgroup: Option<PathBuf>,
        /// The pod whose cgroup to enforce (kubelet systemd or cgroupfs layout).
        #[arg(long, env = "POD_UID", value_name = "UID")]
        pod_uid: Option<String>,
        /// Where the host's cgroup v2 hierarchy is mounted (default: found in /proc/mounts).
        #[arg(long, value_name = "DIR")]
        cgroup_root: Option<PathBuf>,
        /// The allowlist (YAML), watched for changes.
        #[arg(long, value_name = "FILE")]
        allowlist: PathBuf,
        /// Append event lines (JSON) here instead of stderr.
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Instance name (pins under /sys/fs/bpf/egress/<name>); default pod-<uid> or the
        /// cgroup's directory name.
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: Option<String>,
        /// Serve /healthz, /readyz and /metrics (Prometheus) on this address.
        #[arg(long, value_name = "ADDR")]
        health: Option<std::net::SocketAddr>,
        /// On SIGTERM/SIGINT, detach and remove the pins instead of leaving the cgroup closed.
        #[arg(long)]
        detach_on_exit: bool,
        #[command(flatten)]
        ask: approve::AskArgs,
        /// Ask mode: serve `GET /approvals` and `POST /approvals/<id>` on --health, to
        /// requests bearing `Authorization: Bearer <the token in this file>`.
        #[arg(long, value_name = "FILE", requires = "health")]
        approval_token_file: Option<PathBuf>,
        /// Debugging aid: log every verdict of the kernel programs (allow, deny, audit; hook,
        /// protocol, destination, port, reason) to stderr. Costs a log record per connect and
        /// send; without it the tracing code is not even loaded.
        #[arg(long)]
        trace_verdicts: bool,
    },
    /// Detach the programs an agent named NAME pinned and remove its pins (the enforced
    /// cgroup is open again once no agent holds the links).
    #[command(after_help = "Example:\n  egress-agent detach --name pod-1f2e3d4c\n\n\
        Exit status: 0 when removed, 1 when nothing of that name is pinned.")]
    Detach {
        /// Instance name.
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: String,
    },
    /// Show what an agent named NAME enforces: mode, counters, map fill, the running policy
    /// and the latest denies (from its pins and state file; works when the agent is gone).
    #[command(after_help = "Examples:\n  egress-agent status --name run-4242\n  \
        egress-agent status --name pod-1f2e3d4c --json\n\n\
        Exit status: 0; 1 when nothing of that name is pinned.")]
    Status {
        /// Instance name.
        #[arg(long, value_name = "NAME", value_parser = parse_name)]
        name: String,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask mode: list the requests an agent holds for a decision (id, name or address, who
    /// asked, when). Needs root.
    #[command(after_help = "Examples:\n  \
        sudo egress-agent pending --name run-4242\n  \
        sudo egress-agent pending --name pod-1f2e3d4c --json\n\n\
        Exit status: 0; 1 when no agent of that name runs in ask mode.")]
    Pending(approve::PendingArgs),
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
    Deny(approve::DenyArgs),
    /// Validate allowlist files and print a one-line summary of each.
    #[command(after_help = "Examples:\n  \
        egress-agent check allowlists/*.yaml\n  \
        egress-agent check team.yaml || exit 1\n\n\
        Exit status: 0 if every file is valid, 1 otherwise.")]
    Check {
        /// Allowlist files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Say which rule of an allowlist lets a destination through, or why none does.
    ///
    /// One line per finding. A name is reachable through the addresses DNS answers for it; an
    /// address only through cidr/ip rules, or while DNS answered it for a permitted name
    /// (never a link-local or metadata address). Port 53 always goes to egress's own resolver.
    #[command(after_help = "Examples:\n  \
        egress-agent explain --allowlist allowlists/default.yaml api.anthropic.com:443\n  \
        egress-agent explain --allowlist team.yaml github.com:22 pypi.org evil.test\n  \
        egress-agent explain --allowlist team.yaml --protocol udp 10.0.0.5:5353 '[2001:db8::1]:443'\n\n\
        Exit status: 0 if every destination is allowed, 1 if one is denied, 2 if the\n\
        allowlist cannot be loaded or a destination is not one.")]
    Explain {
        /// The allowlist (YAML).
        #[arg(long, short = 'a', value_name = "FILE")]
        allowlist: PathBuf,
        /// The protocol to judge; default: tcp when a port is given, any without one.
        #[arg(long, short = 'p', value_name = "PROTOCOL")]
        protocol: Option<Transport>,
        /// Destinations: NAME, NAME:PORT, IP, IP:PORT or [IPV6]:PORT. Without a port: what
        /// the matching rules allow.
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<Destination>,
    },
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
        Command::Explain {
            allowlist,
            protocol,
            targets,
        } => explain(&allowlist, &targets, protocol),
        Command::Schema => print(&schema::allowlist_schema_json()),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "egress-agent", &mut out);
            print(&String::from_utf8_lossy(&out))
        }
        Command::Man { command } => man(command.as_deref()),
        Command::Run {
            allowlist,
            events,
            name,
            audit,
            ask,
            confine,
            trace_verdicts,
            command,
        } => {
            if audit && ask.forced() {
                eprintln!("egress-agent: --audit and --ask exclude each other");
                return ExitCode::from(EXIT_USAGE);
            }
            let ask = match ask.config(&allowlist, None) {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("egress-agent: {e:#}");
                    return ExitCode::from(run::EXIT_AGENT_ERROR as u8);
                }
            };
            let config = run::RunConfig {
                allowlist: Some(allowlist),
                learn_output: None,
                events,
                name,
                audit,
                keep_caps: confine.keep_caps,
                allow_io_uring: confine.allow_io_uring,
                pass_fds: confine.pass_fds,
                trace_verdicts,
                ask,
                command,
            };
            run_command(config)
        }
        Command::Attach {
            cgroup,
            pod_uid,
            cgroup_root,
            allowlist,
            events,
            name,
            health,
            detach_on_exit,
            trace_verdicts,
            ask,
            approval_token_file,
        } => {
            let ask = match ask.config(&allowlist, approval_token_file.as_deref()) {
                Ok(a) => Some(a),
                Err(e) => {
                    eprintln!("egress-agent: {e:#}");
                    return ExitCode::from(run::EXIT_AGENT_ERROR as u8);
                }
            };
            let config = attach::AttachConfig {
                cgroup,
                pod_uid,
                cgroup_root,
                allowlist,
                events,
                name,
                health,
                detach_on_exit,
                trace_verdicts,
                ask,
            };
            block_on(attach::attach(config))
        }
        Command::Detach { name } => match session::detach_pins(&name) {
            Ok(true) => {
                println!("detached {name}");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("egress-agent: nothing pinned under the name {name:?}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("egress-agent: {e:#}");
                ExitCode::from(run::EXIT_AGENT_ERROR as u8)
            }
        },
        Command::Status { name, json } => match status::read(&name) {
            Ok(s) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    print!("{}", status::render(&s));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("egress-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Learn {
            output,
            allowlist,
            events,
            confine,
            command,
        } => run_command(run::RunConfig {
            allowlist,
            learn_output: Some(output),
            events,
            name: None,
            audit: true,
            keep_caps: confine.keep_caps,
            allow_io_uring: confine.allow_io_uring,
            pass_fds: confine.pass_fds,
            trace_verdicts: false,
            ask: None,
            command,
        }),
        Command::Pending(args) => approve::pending(&args),
        Command::Approve(args) => approve::approve(&args),
        Command::Deny(args) => approve::deny(&args),
    }
}

fn run_command(config: run::RunConfig) -> ExitCode {
    block_on(run::run(config))
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
            return ExitCode::from(run::EXIT_AGENT_ERROR as u8);
        }
    };
    match rt.block_on(f) {
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

fn explain(allowlist: &Path, targets: &[Destination], protocol: Option<Transport>) -> ExitCode {
    let policy = match policy::load(allowlist) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut text = String::new();
    let mut allowed = true;
    for destination in targets {
        let e = explain::explain(
            &policy,
            &explain::Query {
                destination: destination.clone(),
                transport: protocol,
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

fn man(command: Option<&str>) -> ExitCode {
    match man_page(command) {
        Ok(page) => print(&page),
        Err(e) => {
            eprintln!("egress-agent: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The roff manual page of egress-agent (`None`) or of one of its commands.
pub fn man_page(command: Option<&str>) -> Result<String, String> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let cmd = match command {
        None => cmd,
        Some(name) => {
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            // Built from the root, it is named egress-agent-NAME (the page's title and NAME)
            // and its synopsis reads `egress-agent NAME`.
            cmd.find_subcommand(name)
                .ok_or_else(|| format!("no command {name:?}; one of: {}", names.join(", ")))?
                .clone()
        }
    };
    let man = Man::new(cmd.clone()).source(format!("egress-agent {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    let sections = [
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
    ];
    for render in sections {
        render(&man, &mut out).map_err(|e| e.to_string())?;
    }
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)
            .map_err(|e| e.to_string())?;
    }
    if cmd.get_subcommands().any(|c| !c.is_hide_set()) {
        man.render_subcommands_section(&mut out)
            .map_err(|e| e.to_string())?;
    }
    // The after-help text is written in sections ("Examples:", "Exit status:") of
    // preformatted lines; clap_mangen would run them together into one paragraph.
    if let Some(after) = cmd.get_after_help() {
        out.extend_from_slice(roff_sections(&after.to_string()).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)
            .map_err(|e| e.to_string())?;
    }
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// Text of `Heading:` lines followed by indented lines, as roff sections of unfilled lines.
/// A line `Heading: text` (text on the heading's own line) keeps its text in the section.
fn roff_sections(text: &str) -> String {
    let mut out = String::new();
    let mut open = false;
    for line in text.lines() {
        let heading = (!line.starts_with(' ') && !line.is_empty())
            .then(|| line.split_once(':'))
            .flatten()
            .filter(|(h, _)| !h.is_empty() && h.chars().all(|c| c.is_alphabetic() || c == ' '));
        if let Some((h, rest)) = heading {
            if open {
                out.push_str(".fi\n");
            }
            out.push_str(&format!(".SH \"{}\"\n.nf\n", h.to_uppercase()));
            open = true;
            if !rest.trim().is_empty() {
                out.push_str(&roff_line(rest.trim()));
            }
            continue;
        }
        if line.trim().is_empty() {
            // A blank line ends a section; inside one it would print as an empty line.
            continue;
        }
        if !open {
            out.push_str(".SH EXTRA\n.nf\n");
            open = true;
        }
        out.push_str(&roff_line(line));
    }
    if open {
        out.push_str(".fi\n");
    }
    out
}

/// One line of text for roff: backslashes and hyphens escaped, a leading `.` or `'` guarded.
fn roff_line(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}\n")
    } else {
        format!("{escaped}\n")
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
    fn every_command_has_examples_and_a_man_page() {
        let root = man_page(None).unwrap();
        assert!(root.contains(".SH \"EXAMPLES\"") && root.contains(".SH \"EXIT STATUS\""));
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.starts_with("Examples:\n") || help.starts_with("Example:\n"),
                "{name}: no examples"
            );
            let page = man_page(Some(name)).unwrap();
            assert!(
                page.contains(&format!(".TH egress-agent-{name} 1")),
                "{name}"
            );
            assert!(page.contains(".SH \"EXAMPLE"), "{name}");
        }
        assert!(man_page(Some("nope")).unwrap_err().contains("one of: run"));
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

    #[test]
    fn roff_sections_keep_lines_and_escape() {
        assert_eq!(
            roff_sections("Examples:\n  a --b\n.c\n\nExit status: 0 if ok\n"),
            ".SH \"EXAMPLES\"\n.nf\n  a \\-\\-b\n\\&.c\n.fi\n.SH \"EXIT STATUS\"\n.nf\n0 if ok\n.fi\n"
        );
    }
}
