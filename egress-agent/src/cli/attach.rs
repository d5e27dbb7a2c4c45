//! `attach` and `detach`: enforcement on an existing cgroup, and its removal. The work is in
//! [`crate::daemon`]; this file holds the arguments and the exit statuses.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    cli::{EXIT_AGENT_ERROR, ask::AskArgs, block_on, parse_name},
    daemon::{attach, session},
};

/// The arguments of `attach`.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
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
    ask: AskArgs,
    /// Ask mode: serve `GET /approvals` and `POST /approvals/<id>` on --health, to
    /// requests bearing `Authorization: Bearer <the token in this file>`.
    #[arg(long, value_name = "FILE", requires = "health")]
    approval_token_file: Option<PathBuf>,
    /// Debugging aid: log every verdict of the kernel programs (allow, deny, audit; hook,
    /// protocol, destination, port, reason) to stderr. Costs a log record per connect and
    /// send; without it the tracing code is not even loaded.
    #[arg(long)]
    trace_verdicts: bool,
    /// Report /readyz not ready while a process of the enforced cgroup holds CAP_NET_RAW or
    /// a packet socket is open there (packet sockets bypass every cgroup program). Without
    /// it they are still reported (warning events, egress_raw_risks).
    #[arg(long)]
    require_no_raw: bool,
    /// Where the kernel cannot load the family guard (the packet-socket tripwire is armed):
    /// kill a process of the cgroup at any io_uring system call, with a deny event (reason
    /// io-uring). Without it, io_uring's IORING_OP_SOCKET trips only for a refused family,
    /// and sends in that same submission still leave. For workloads that do not use io_uring.
    #[arg(long)]
    refuse_io_uring: bool,
}

/// The arguments of `detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// Instance name.
    #[arg(long, value_name = "NAME", value_parser = parse_name, required_unless_present = "stale")]
    name: Option<String>,
    /// Instead: remove the pins of every agent whose cgroup is gone (every pinned link reports
    /// no cgroup), and state directories under /run/egress that have no pins and whose agent is
    /// gone, as each start does.
    #[arg(long, conflicts_with = "name")]
    stale: bool,
}

impl AttachArgs {
    /// Enforces until SIGTERM or SIGINT.
    pub fn execute(self) -> ExitCode {
        let ask = match self
            .ask
            .config(&self.allowlist, self.approval_token_file.as_deref())
        {
            Ok(a) => a,
            Err(e) => {
                eprintln!("egress-agent: {e:#}");
                return ExitCode::from(EXIT_AGENT_ERROR);
            }
        };
        block_on(attach::attach(attach::AttachConfig {
            cgroup: self.cgroup,
            pod_uid: self.pod_uid,
            cgroup_root: self.cgroup_root,
            allowlist: self.allowlist,
            events: self.events,
            name: self.name,
            health: self.health,
            detach_on_exit: self.detach_on_exit,
            trace_verdicts: self.trace_verdicts,
            require_no_raw: self.require_no_raw,
            refuse_io_uring: self.refuse_io_uring,
            ask: Some(ask),
        }))
    }
}

impl DetachArgs {
    /// Removes the pins of the instance: 0 when removed, 1 when nothing was pinned. With
    /// `--stale`, of every instance whose cgroup is gone: 0 unless the sweep failed.
    pub fn execute(self) -> ExitCode {
        let Some(name) = self.name else {
            return match session::sweep_stale(None) {
                Ok(swept) => {
                    for n in swept.pins {
                        println!("detached {n} (its cgroup is gone)");
                    }
                    for n in swept.states {
                        println!("removed the state of {n} (no pins, no agent)");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("egress-agent: {e:#}");
                    ExitCode::from(EXIT_AGENT_ERROR)
                }
            };
        };
        match session::detach_pins(&name) {
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
                ExitCode::from(EXIT_AGENT_ERROR)
            }
        }
    }
}
