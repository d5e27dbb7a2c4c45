//! `cargo xtask bench` (issue #7): the cost of enforcement, measured against identical
//! unenforced controls in the same run, printed and written to BENCHMARKS.md.
//!
//! Everything runs in objects the bench creates and removes (cgroups and network namespaces
//! named `egress-bench-{pid}-*`, nftables only inside those namespaces), every loop is bounded
//! in count and time, and the whole run takes a few minutes.

mod connect;
mod dns;
mod flood;
mod maps;
mod namebound;
mod progs;
mod progstats;
mod report;
mod sandbox;
mod scale;
mod stats;
mod tax;

use std::{fs, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};

use crate::{cmd::Cmd, deps, interrupt};
use report::Report;
use sandbox::Sandbox;

/// What every part needs.
pub struct Ctx {
    pub agent_bin: PathBuf,
    pub worker_bin: PathBuf,
    /// `egress-bench-floor`: the reference floor's loader.
    pub floor_bin: PathBuf,
    /// Part 1's outside view (thread CPU, ABBA against controls, nftables); off for
    /// EGRESS_BENCH_ONLY=progs, which measures the per-program figures alone.
    pub outside: bool,
    pub cgroup_root: PathBuf,
    /// Allowlist sizes of part 1.
    pub sizes: Vec<u32>,
    /// ABBA repetitions per measurement.
    pub reps: usize,
    /// ABBA repetitions of the per-program figures (cheap: batches of a tenth of a second).
    pub prog_reps: usize,
    /// Rounds of each DNS measurement.
    pub dns_rounds: usize,
    pub cpus: usize,
}

/// Runs every part; needs root.
pub fn run() -> Result<()> {
    crate::require_root(
        "cargo xtask bench needs root (it attaches eBPF programs to cgroups it creates, in \
         network namespaces it creates): run it with sudo",
    )?;
    let started = Instant::now();
    deps::install()?;
    Cmd::cargo()
        .args(["build", "--release", "-p", "egress-agent", "--bins"])
        .run()?;
    Cmd::cargo()
        .args(["build", "--release", "-p", "xtask", "--bins"])
        .run()?;
    let release = crate::target_dir().join("release");
    let abs =
        |p: PathBuf| fs::canonicalize(&p).with_context(|| format!("{} is missing", p.display()));
    // EGRESS_BENCH_QUICK=1: fewer sizes and repetitions, for working on the bench itself.
    let quick = std::env::var_os("EGRESS_BENCH_QUICK").is_some();
    let ctx = Ctx {
        agent_bin: abs(release.join("egress-agent"))?,
        worker_bin: abs(release.join("bench-worker"))?,
        floor_bin: abs(release.join("egress-bench-floor"))?,
        outside: only().as_deref() != Some("progs"),
        cgroup_root: PathBuf::from(cgroup2_mount()?),
        // EGRESS_BENCH_SIZES=10000,1000000: only these allowlist sizes (a partial run).
        sizes: match std::env::var("EGRESS_BENCH_SIZES") {
            Ok(v) => v
                .split(',')
                .map(|n| n.trim().parse::<u32>())
                .collect::<Result<_, _>>()
                .context("EGRESS_BENCH_SIZES: a comma-separated list of entry counts")?,
            Err(_) if quick => vec![10, 10_000],
            Err(_) => vec![10, 10_000, 1_000_000],
        },
        reps: if quick { 3 } else { 7 },
        prog_reps: if quick { 5 } else { 11 },
        dns_rounds: if quick { 1 } else { 2 },
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
    };

    interrupt::catch()?;
    let mut report = Report {
        machine: machine(&ctx),
        ..Report::default()
    };
    report.commands = vec![
        "sudo cargo xtask bench    # builds release egress-agent and bench-worker, then runs parts 1-4".into(),
        "sudo EGRESS_BENCH_ONLY=progs cargo xtask bench    # table 1p alone (per-program figures, ~3 min), report in target/BENCHMARKS.progs.md".into(),
        "sudo EGRESS_BENCH_ONLY=progs EGRESS_BENCH_SIZES=10000 cargo xtask bench    # one size only (any comma-separated list)".into(),
        "# floor: egress-bench-floor <cgroup> <egress's ALLOW_DNS pin> (connect4 + sendmsg4, one hash lookup each in that map; empty sock_create and cgroup_skb/egress)".into(),
        "# each measured batch: bench-worker in its own netns + cgroup, e.g. `tcp 198.51.100.10:8080 2000` (a spread row: `tcp 198.51.100.32:8080,198.51.100.33:8080,... 2000`)".into(),
        "# enforcement: egress-agent attach --cgroup <cgroup> --allowlist <file> --name <n> --detach-on-exit".into(),
        "# nftables peer: socket cgroupv2 level 1 \"<cgroup>\" ip daddr != @allowed reject (output hook, own netns)".into(),
        "# dnsmasq peer: --server=192.0.2.53 --nftset=/example.com/4#inet#egress_bench_dns#allowed".into(),
    ];
    report.method = vec![
        format!(
            "Per-operation cost: thread CPU time (CLOCK_THREAD_CPUTIME_ID) around a batch of \
             2,000 TCP connect+close (SO_LINGER 0) or 20,000 UDP sendto, to a listener on a \
             documentation address on lo of the worker's own network namespace (the rows \
             \"16 destinations\" of table 1p: 16 addresses in turn, each kind its own, so \
             lookups find their key out of cache and at 16 places in the hash chains, as with \
             an agent talking to many destinations). Batches \
             alternate A B B A between the enforced side and an identical unenforced control \
             (own netns and cgroup), {} repetitions after one warm-up batch each; the figure is \
             the median over repetitions of mean(A) − mean(B).",
            ctx.reps
        ),
        "A/A: a second unenforced control against the control, in the same run, at every size \
         and operation: its Δ (and the spread of Δ) is the noise floor quoted beside each \
         figure."
            .into(),
        "Allowlist sizes: synthetic entries written into the agent's pinned maps through the \
         bpf syscall (a 1M-rule YAML takes too long to parse for a 10-minute bench; part 3 \
         times a 100k-rule YAML): half DNS-derived addresses (hash, capped at 60,000 by its \
         64k capacity), the rest CIDRs (one in four a /28 in 10/8, the rest /32s spread over \
         198/8, around the destination's own /24). nftables gets the same addresses in an \
         interval set."
            .into(),
        "The floor: `egress-floor` (built by the agent's eBPF pipeline, loaded only by the \
         bench-only `egress-bench-floor`), a cgroup/connect4 and a cgroup/sendmsg4 program that \
         do one hash lookup of the destination in egress's own DNS-derived hash (the agent's \
         pinned `ALLOW_DNS`, reused: the same key, hash seed, bucket and chain as the first \
         lookup of egress's verdict, which finds every destination measured there, an `ip:` one \
         as the copy of its exact entry), on a cgroup of its own; it is a column of table 1 (outside view, ABBA against the same control) and the \
         reference of table 1p (kernel BPF statistics, in the same run)."
            .into(),
        "The established-flow row: one TCP connection to a sink that reads, then 20,000 \
         writes of 32 bytes with TCP_NODELAY (autocorking merges some: runs/op of the backstop \
         is below 1); its goal is the backstop's ns per packet. The DNS-derived destination is \
         written with an expiry (an hour ahead), as the resolver writes one, so the programs \
         read the clock as they do in use."
            .into(),
        "Listeners run as threads of xtask inside each namespace, so their sockets are outside \
         the measured cgroups (no hook or nftables rule judges the accepting side)."
            .into(),
    ];
    let mut sb = Sandbox::new(ctx.cgroup_root.clone(), ctx.agent_bin.clone())?;
    let result = parts(&mut sb, &ctx, &mut report);
    drop(sb);
    report.runtime_s = started.elapsed().as_secs_f64();
    if let Err(e) = &result {
        report
            .findings
            .push(format!("**the run stopped early: {e:#}**"));
    }
    let md = report.markdown();
    println!("\n{md}");
    // A partial run (EGRESS_BENCH_ONLY) never replaces the full report.
    let out = match only() {
        Some(part) => crate::target_dir().join(format!("BENCHMARKS.{part}.md")),
        None => PathBuf::from("BENCHMARKS.md"),
    };
    fs::write(&out, &md).with_context(|| format!("cannot write {}", out.display()))?;
    println!("bench: wrote {} ({:.0} s)", out.display(), report.runtime_s);
    result
}

/// EGRESS_BENCH_ONLY=connect|progs|dns: part 1, part 1's per-program figures alone (kernel
/// BPF statistics, egress against the floor: a minute or two), or part 2 alone, for working
/// on the programs or the resolver (the report goes to `target/BENCHMARKS.<part>.md`).
fn only() -> Option<String> {
    std::env::var("EGRESS_BENCH_ONLY")
        .ok()
        .filter(|v| v == "connect" || v == "progs" || v == "dns")
}

fn parts(sb: &mut Sandbox, ctx: &Ctx, report: &mut Report) -> Result<()> {
    match only().as_deref() {
        Some("dns") => {
            println!("bench: part 2 only (EGRESS_BENCH_ONLY=dns)");
            dns::run(sb, ctx, report)?;
            return Ok(());
        }
        Some(part) => {
            println!("bench: part 1 only (EGRESS_BENCH_ONLY={part})");
            connect::run(sb, ctx, report)?;
            return Ok(());
        }
        None => {}
    }
    println!(
        "bench: part 1, connect/sendto cost at {:?} entries",
        ctx.sizes
    );
    let mut enf = connect::run(sb, ctx, report)?;
    interrupt::check()?;
    println!("bench: part 4, deny flood");
    flood::run(sb, ctx, &mut enf, report)?;
    interrupt::check()?;
    println!("bench: part 2, DNS path");
    let dns = dns::run(sb, ctx, report)?;
    interrupt::check()?;
    println!("bench: part 3, scale and memory");
    scale::run(sb, ctx, &enf, &dns, report)?;
    Ok(())
}

/// (VmRSS, VmHWM) of `pid` in kB (0 when unknown).
pub fn rss_kb(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn machine(ctx: &Ctx) -> Vec<(String, String)> {
    let read = |f: &str| fs::read_to_string(f).unwrap_or_default().trim().to_owned();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let nft = Cmd::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let dnsmasq = Cmd::new("dnsmasq")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    vec![
        (
            "kernel".into(),
            format!(
                "{} {}",
                read("/proc/sys/kernel/osrelease"),
                read("/proc/sys/kernel/version")
            ),
        ),
        (
            "CPU".into(),
            format!("{cpu}, {} CPUs (shared, noisy machine)", ctx.cpus),
        ),
        ("memory".into(), mem),
        ("cgroup v2".into(), ctx.cgroup_root.display().to_string()),
        ("peers".into(), format!("{nft}; {dnsmasq}")),
    ]
}

/// Where cgroup v2 is mounted, from /proc/mounts.
fn cgroup2_mount() -> Result<String> {
    egress_common::mounts::cgroup2()
        .context("cannot read /proc/mounts")?
        .map(|m| m.display().to_string())
        .context("no cgroup v2 mount")
}
