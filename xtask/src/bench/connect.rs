//! Part 1: the per-operation CPU cost of connect/close and sendto, enforced vs. an identical
//! unenforced control, at several allowlist sizes; nftables (`socket cgroupv2`) the same way;
//! an A/A pair (two controls) for the noise floor in the same run.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result};

use super::{
    Ctx, maps, namebound,
    progs::{Floor, Side, SideFigures, measure, paired, paired_ratio},
    progstats,
    report::{Report, Table},
    sandbox::{Sandbox, Worker, listen, sa},
    stats::{Summary, abba, us},
    tax,
};
use crate::cmd::Cmd;

/// The destination allowed by an `ip:` rule (CIDR trie).
pub const CIDR_DST: &str = "198.51.100.10";
/// The destination allowed by a DNS-derived entry (hash; both lookups run).
pub const DNS_DST: &str = "198.51.100.20";
/// A destination nothing allows.
pub const DENIED_DST: &str = "198.51.100.99";
/// How many destinations the spread rows of table 1p cycle through, each kind (`ip:` rule,
/// DNS-derived) its own. One destination measures one key, whose bucket and element stay in
/// cache from one connect to the next, at one place in its bucket's chain (every map load
/// draws a new hash seed; the floor's own program read 140-176 ns/run on two keys of one map).
/// Cycling through 16 measures lookups of keys that left the cache in between, at 16 places,
/// as an agent talking to many destinations sees them, for egress and the floor alike.
const SPREAD: u8 = 16;

/// The `i`-th destination of the `ip:` rows' spread: 198.51.100.32 + `i`.
fn ip_spread() -> Vec<String> {
    (0..SPREAD)
        .map(|i| format!("198.51.100.{}", 32 + i))
        .collect()
}

/// The `i`-th destination of the DNS-derived rows' spread: 198.51.100.64 + `i`.
fn dns_spread() -> Vec<String> {
    (0..SPREAD)
        .map(|i| format!("198.51.100.{}", 64 + i))
        .collect()
}

/// `addrs` at `port`, comma-separated (the worker cycles through them).
fn each(addrs: &[String], port: u16) -> String {
    addrs
        .iter()
        .map(|a| format!("{a}:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9000;
/// A TCP sink that reads what it is sent (the established-flow operation).
const SINK_PORT: u16 = 8081;
const TCP_BATCH: u32 = 2000;
const UDP_BATCH: u32 = 20000;
const STREAM_BATCH: u32 = 20000;
/// Capacity of the DNS-derived hash (the agent's default, 64k) minus headroom.
const DNS_FILL_MAX: u32 = 60_000;

/// The enforced side, kept for the deny flood (part 4).
pub struct Enforced {
    pub worker: Worker,
    pub agent_pid: u32,
    pub instance: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub events: PathBuf,
    /// (size, ALLOW_CIDR + ALLOW_EXACT bytes, ALLOW_DNS bytes, cidr entries, dns entries).
    pub memory: Vec<(u32, u64, u64, u32, u32)>,
}

/// Runs part 1; returns the enforced side for later parts.
pub fn run(sb: &mut Sandbox, ctx: &Ctx, report: &mut Report) -> Result<Enforced> {
    let (ips, dnss) = (ip_spread(), dns_spread());
    let spread: Vec<&str> = ips.iter().chain(&dnss).map(String::as_str).collect();
    let addrs: Vec<&str> = [CIDR_DST, DNS_DST, DENIED_DST]
        .into_iter()
        .chain(spread.iter().copied())
        .collect();
    let side = |sb: &mut Sandbox, name: &str| -> Result<(PathBuf, PathBuf)> {
        let ns = sb.netns(name, &addrs)?;
        let cg = sb.cgroup(name)?;
        let mut tcp = vec![
            sa(CIDR_DST, TCP_PORT),
            sa(DNS_DST, TCP_PORT),
            sa(DNS_DST, namebound::NAMED_TLS),
            sa(DNS_DST, namebound::PLAIN_TLS),
        ];
        tcp.extend(spread.iter().map(|a| sa(a, TCP_PORT)));
        let mut udp = vec![sa(CIDR_DST, UDP_PORT), sa(DNS_DST, UDP_PORT)];
        udp.extend(dnss.iter().map(|a| sa(a, UDP_PORT)));
        listen(
            &ns,
            &tcp,
            &udp,
            &[
                sa(DNS_DST, SINK_PORT),
                sa(DNS_DST, namebound::NAMED_BULK),
                sa(DNS_DST, namebound::PLAIN_BULK),
            ],
        )?;
        Ok((ns, cg))
    };
    let (enf_ns, enf_cg) = side(sb, "enf")?;
    let (ctl_ns, ctl_cg) = side(sb, "ctl")?;
    let (ctl2_ns, ctl2_cg) = side(sb, "ctl2")?;
    let (nft_ns, nft_cg) = side(sb, "nft")?;
    let (floor_ns, floor_cg) = side(sb, "floor")?;
    let mut floor = Floor::new(floor_cg.clone());

    let allowlist = sb.dir.join("connect.yaml");
    fs::write(
        &allowlist,
        format!(
            "version: 1\nname: bench-connect\ndns:\n  upstream: [\"192.0.2.53:53\"]\nallow:\n  \
             - ip: {CIDR_DST}\n    ports: [{TCP_PORT}, {UDP_PORT}, {SINK_PORT}]\n{}{}",
            ips.iter()
                .map(|a| format!("  - ip: {a}\n    ports: [{TCP_PORT}]\n"))
                .collect::<String>(),
            namebound::rules()
        ),
    )?;
    // The control's worker times every task's system calls before the agent starts and once
    // it runs (table 1t): back to back.
    let mut ctl = sb.worker(&ctx.worker_bin, &ctl_ns, Some(&ctl_cg), "ctl")?;
    let tax_cmds = tax::commands();
    let others = progstats::sys_enter_programs()?;
    let tax_before = tax::sample(&mut ctl, &tax_cmds, ctx.reps)?;
    let run_instance = sb.name("run");
    sb.run_agent(&run_instance, &ctl2_ns, &allowlist)?;
    let tax_run = tax::sample(&mut ctl, &tax_cmds, ctx.reps)?;
    sb.stop_agent(&run_instance);
    let instance = sb.name("enf");
    let (agent_pid, _, events) = sb.agent(&instance, &enf_ns, &enf_cg, &allowlist)?;
    let pins = Path::new("/sys/fs/bpf/egress").join(&instance);
    let tax_during = tax::sample(&mut ctl, &tax_cmds, ctx.reps)?;
    let armed: Vec<&str> = progstats::attached_to_machine(&pins)?
        .iter()
        .map(|p| p.hook)
        .collect();
    let tax_table = tax::table(
        &tax_cmds,
        &tax_before,
        &[
            ("`run` running", &tax_run),
            ("`attach` running", &tax_during),
        ],
        &armed,
        others,
    );
    let dns_ip: std::net::Ipv4Addr = DNS_DST.parse()?;
    for a in &dnss {
        let ip: std::net::Ipv4Addr = a.parse()?;
        maps::allow_dns(
            &pins,
            ip.octets(),
            &[(TCP_PORT, TCP_PORT), (UDP_PORT, UDP_PORT)],
            &[],
        )?;
    }
    maps::allow_dns(
        &pins,
        dns_ip.octets(),
        &[
            (TCP_PORT, TCP_PORT),
            (UDP_PORT, UDP_PORT),
            (SINK_PORT, SINK_PORT),
            (namebound::PLAIN_TLS, namebound::PLAIN_TLS),
            (namebound::PLAIN_BULK, namebound::PLAIN_BULK),
        ],
        &[
            (namebound::NAMED_TLS, namebound::NAMED_TLS),
            (namebound::NAMED_BULK, namebound::NAMED_BULK),
        ],
    )?;
    if ctx.outside {
        nft_setup(&ctx.cgroup_root, &nft_ns, &nft_cg)?;
    }

    let mut enf = sb.worker(&ctx.worker_bin, &enf_ns, Some(&enf_cg), "enf")?;
    let mut ctl2 = sb.worker(&ctx.worker_bin, &ctl2_ns, Some(&ctl2_cg), "ctl2")?;
    let mut nft = sb.worker(&ctx.worker_bin, &nft_ns, Some(&nft_cg), "nft")?;
    let mut flo = sb.worker(&ctx.worker_bin, &floor_ns, Some(&floor_cg), "floor")?;

    // (label, command, whether the outside view measures it too: the spread rows are for the
    // per-program figures, whose single-destination rows they complete).
    let ops = [
        (
            "TCP connect+close, ip rule",
            format!("tcp {CIDR_DST}:{TCP_PORT} {TCP_BATCH}"),
            true,
        ),
        (
            "TCP connect+close, DNS-derived",
            format!("tcp {DNS_DST}:{TCP_PORT} {TCP_BATCH}"),
            true,
        ),
        (
            "UDP sendto, DNS-derived",
            format!("udp {DNS_DST}:{UDP_PORT} {UDP_BATCH}"),
            true,
        ),
        (
            "TCP established, 32-byte writes",
            format!("stream {DNS_DST}:{SINK_PORT} {STREAM_BATCH}"),
            true,
        ),
        (
            "TCP connect+close, ip rule, 16 destinations",
            format!("tcp {} {TCP_BATCH}", each(&ips, TCP_PORT)),
            false,
        ),
        (
            "TCP connect+close, DNS-derived, 16 destinations",
            format!("tcp {} {TCP_BATCH}", each(&dnss, TCP_PORT)),
            false,
        ),
        (
            "UDP sendto, DNS-derived, 16 destinations",
            format!("udp {} {UDP_BATCH}", each(&dnss, UDP_PORT)),
            false,
        ),
    ];
    let mut table = Table::new(
        "1. Per-operation CPU (µs of thread CPU per op; median over ABBA repetitions)",
        &[
            "entries",
            "operation",
            "control",
            "ours: enforced",
            "ours: Δ",
            "nftables",
            "nftables: Δ",
            "floor",
            "floor: Δ",
            "A/A Δ (noise)",
            "Δ IQR ours / nft / floor / A/A",
        ],
    );
    let mut prog_table = Table::new(
        &format!(
            "1p. Per-program run time (kernel BPF statistics, ns; median over {} ABBA \
             repetitions)",
            ctx.prog_reps
        ),
        &[
            "entries",
            "operation",
            "egress programs: ns/run × runs/op",
            "egress ns/op",
            "floor ns/run × runs/op",
            "floor ns/op",
            "ns/op egress ÷ floor",
            "verdict program ns/run ÷ floor's (median of per-repetition ratios)",
        ],
    );
    let mut prog_rows: Vec<ProgRow> = Vec::new();
    let mut deny_table = Table::new(
        "1b. Denied connect (wall clock per connect, enforced side)",
        &["entries", "p50 µs", "p99 µs", "max µs", "EPERM"],
    );
    let mut goal_rows = Vec::new();
    let mut deny_p50 = Vec::new();
    let mut memory = Vec::new();
    let (mut cidr_done, mut dns_done) = (0u32, 0u32);
    for &size in &ctx.sizes {
        let dns_n = (size / 2).min(DNS_FILL_MAX);
        let cidr_n = size - dns_n;
        let t = Instant::now();
        maps::fill(&pins, (cidr_done, cidr_n), (dns_done, dns_n))?;
        let fill_s = t.elapsed().as_secs_f64();
        cidr_done = cidr_n;
        dns_done = dns_n;
        let t = Instant::now();
        let nft_ok = if ctx.outside {
            nft_fill(&ctx.cgroup_root, &nft_ns, cidr_n, dns_n)
        } else {
            Err(anyhow::anyhow!("not measured (EGRESS_BENCH_ONLY=progs)"))
        };
        let nft_s = t.elapsed().as_secs_f64();
        floor.load(sb, &ctx.floor_bin, &pins.join("maps").join("ALLOW_DNS"))?;
        let cm = maps::memlock(&pins.join("maps").join("ALLOW_CIDR")).unwrap_or(0)
            + maps::memlock(&pins.join("maps").join("ALLOW_EXACT")).unwrap_or(0);
        let dm = maps::memlock(&pins.join("maps").join("ALLOW_DNS")).unwrap_or(0);
        memory.push((size, cm, dm, cidr_n + 1, dns_n + 1));
        table.note(format!(
            "{size} entries: {cidr_n} in the CIDR trie (its /32s also in the exact hash, up to \
             its 65,536, and copied into the DNS-derived hash up to 16,384), {dns_n} in the \
             DNS-derived hash (plus the destinations: two, and {SPREAD} of each kind the rows \
             cycle through); written in {fill_s:.1} s through the bpf syscall; nftables set \
             loaded in {nft_s:.1} s{}; the floor looks up in that DNS-derived hash itself.",
            match &nft_ok {
                Ok(()) => String::new(),
                Err(e) => format!(" — **failed: {e:#}**; its columns are empty"),
            }
        ));
        for (label, cmd, outside) in &ops {
            let reps = ctx.reps;
            let (e, f) = {
                let mut a = Side::egress(&mut enf, &enf_cg, &pins)?;
                let mut b = Side::new(&mut flo, &floor_cg)?;
                measure(&mut a, &mut b, cmd, ctx.prog_reps)?
            };
            prog_table.row(prog_row(size, label, &e, &f));
            prog_rows.push((size, (*label).to_owned(), e, f));
            if !ctx.outside || !outside {
                continue;
            }
            let ours = Summary::of(&abba(&mut enf, &mut ctl, cmd, reps)?);
            let aa = Summary::of(&abba(&mut ctl2, &mut ctl, cmd, reps)?);
            let nf = match nft_ok {
                Ok(()) => Some(Summary::of(&abba(&mut nft, &mut ctl, cmd, reps)?)),
                Err(_) => None,
            };
            let fl = Summary::of(&abba(&mut flo, &mut ctl, cmd, reps)?);
            table.row(vec![
                size.to_string(),
                (*label).to_owned(),
                us(ours.b),
                us(ours.a),
                us(ours.diff),
                nf.map_or("—".into(), |n| us(n.a)),
                nf.map_or("—".into(), |n| us(n.diff)),
                us(fl.a),
                us(fl.diff),
                us(aa.diff),
                format!(
                    "{} / {} / {} / {}",
                    us(ours.iqr),
                    nf.map_or("—".into(), |n| us(n.iqr)),
                    us(fl.iqr),
                    us(aa.iqr)
                ),
            ]);
            goal_rows.push((size, (*label).to_owned(), ours, nf, aa, fl));
        }
        if !ctx.outside {
            continue;
        }
        let d = enf.ask(&format!("deny {DENIED_DST}:{TCP_PORT} 2000"))?;
        deny_table.row(vec![
            size.to_string(),
            us(d.f("p50")),
            us(d.f("p99")),
            us(d.f("max")),
            format!("{}/{}", d.f("eperm"), d.f("n")),
        ]);
        deny_p50.push((size, d.f("p50"), d.f("p99"), d.f("eperm") == d.f("n")));
    }
    table.note(
        "Δ = enforced − control, per ABBA repetition, then the median; A/A = a second unenforced \
         control against the control: its Δ is the noise floor of this run. IQR: spread of the \
         per-repetition Δ.",
    );
    floor.stop(sb);
    namebound::run(&mut enf, &enf_cg, &pins, ctx, report)?;
    prog_table.note(
        "Kernel BPF statistics (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`: on only while the bench \
         holds its descriptor, during these batches; never the sysctl): `run_time_ns` / \
         `run_cnt` of every program attached to each side's cgroup, over the same ABBA batches \
         (egress, floor, floor, egress); for egress also the programs its agent attached to \
         the whole machine where the family guard cannot load (the tripwire on `sys_enter`: \
         it runs for every system call of every task, so its runs/op counts all the calls \
         made during egress's batches, the listener's and the bench's own included; what \
         it costs every other task is table 1t). ns/run: the program's own run, not the hook \
         machinery around it; runs/op: how many times it ran per connect+close or sendto (the \
         backstop runs per packet: SYN, ACK, RST; setsockopt once, for the worker's \
         SO_LINGER); ns/op = ns/run × runs/op, summed over programs. The \
         floor: one hash lookup in egress's own DNS-derived hash (the same map object, so the \
         same key, hash seed, bucket and chain as egress's first lookup), on a cgroup of its \
         own.",
    );
    report.tables.push(prog_table);
    report.tables.push(tax_table);
    prog_goals(report, &prog_rows);
    if !ctx.outside {
        return Ok(Enforced {
            worker: enf,
            agent_pid,
            instance,
            netns: enf_ns,
            cgroup: enf_cg,
            events,
            memory,
        });
    }
    report.tables.push(table);
    report.tables.push(deny_table);
    goals(report, &goal_rows);
    let worst50 = deny_p50.iter().map(|d| d.1).fold(0.0, f64::max);
    let all_eperm = deny_p50.iter().all(|d| d.3);
    report.goal(
        "a denied connect returns EPERM within 20 µs",
        deny_p50
            .iter()
            .map(|d| format!("@{}: p50 {} µs, p99 {} µs", d.0, us(d.1), us(d.2)))
            .collect::<Vec<_>>()
            .join("; "),
        Some(worst50 <= 20_000.0 && all_eperm),
        format!(
            "judged on the median (worst {} µs); every connect got EPERM: {all_eperm}. The p99 \
             and max include scheduling delays of this shared machine (table 1b)",
            us(worst50)
        ),
    );
    Ok(Enforced {
        worker: enf,
        agent_pid,
        instance,
        netns: enf_ns,
        cgroup: enf_cg,
        events,
        memory,
    })
}

type GoalRow = (u32, String, Summary, Option<Summary>, Summary, Summary);
type ProgRow = (u32, String, SideFigures, SideFigures);

/// The verdict program of an operation (connect4 for TCP, sendmsg4 for UDP) on either side.
fn verdict_hook(label: &str) -> &'static str {
    if label.starts_with("TCP") {
        "connect4"
    } else {
        "sendmsg4"
    }
}

fn prog_row(size: u32, label: &str, e: &SideFigures, f: &SideFigures) -> Vec<String> {
    let hook = verdict_hook(label);
    let ratio = match (e.on(hook), f.on(hook)) {
        (Some(a), Some(b)) => format!("{hook}: {:.2}×", paired_ratio(a, b)),
        _ => "—".into(),
    };
    let floor_op = f.ns_op_of(hook);
    vec![
        size.to_string(),
        label.to_owned(),
        e.list(),
        format!("{:.0}", e.total_ns_op),
        f.list(),
        format!("{floor_op:.0}"),
        format!("{:.2}×", e.total_ns_op / floor_op.max(1.0)),
        ratio,
    ]
}

/// The per-program targets of issue 14, judged at 10,000 entries and more.
fn prog_goals(report: &mut Report, rows: &[ProgRow]) {
    let streams: Vec<(u32, f64, f64)> = rows
        .iter()
        .filter(|r| r.0 >= 10_000 && established(&r.1))
        .filter_map(|r| {
            r.2.on(BACKSTOP).map(|p| {
                let empty = r.3.on(BACKSTOP).map_or(0.0, |f| f.ns_run);
                (r.0, p.ns_run, empty)
            })
        })
        .collect();
    let big: Vec<&ProgRow> = rows
        .iter()
        .filter(|r| r.0 >= 10_000 && !established(&r.1))
        .collect();
    if big.is_empty() {
        return;
    }
    if !streams.is_empty() {
        // (entries, ns/run, the empty program's ns/run)
        let w = streams.iter().map(|s| s.1).fold(0.0, f64::max);
        report.goal(
            "cgroup_skb backstop ≤ 60 ns per packet on established flows",
            streams
                .iter()
                .map(|(n, ns, empty)| {
                    format!(
                        "@{n}: {ns:.0} ns/run (an empty cgroup_skb program: {empty:.0}; net of \
                         it: {:.0})",
                        ns - empty
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Some(w <= 60.0),
            format!(
                "worst {w:.0} ns/run of the backstop on 32-byte writes over one connection \
                 (table 1p, established row; autocorking sends several writes per segment, \
                 hence runs/op below 1). The timing's own cost per run is included: the \
                 floor's empty cgroup_skb program beside it reads what a program that does \
                 nothing costs"
            ),
        );
    }
    let mut text = Vec::new();
    let mut worst = 0.0f64;
    for r in &big {
        let hook = verdict_hook(&r.1);
        if let (Some(a), Some(b)) = (r.2.on(hook), r.3.on(hook)) {
            let q = paired_ratio(a, b);
            worst = worst.max(q);
            // Net of the statistics' own cost per run: the floor's empty cgroup_skb program in
            // the same row (it runs on every packet of every row).
            let e = r.3.on(BACKSTOP);
            let empty = e.map_or(0.0, |p| p.ns_run);
            let net = paired(a, b, e, |x, y, z| (x - z) / (y - z).max(1.0));
            text.push(format!(
                "{} @{}: {:.0} / {:.0} ns, {q:.2}× (net of an empty program's {empty:.0}: \
                 {:.0} / {:.0}, {net:.2}×)",
                short(&r.1),
                r.0,
                a.ns_run,
                b.ns_run,
                a.ns_run - empty,
                b.ns_run - empty,
            ));
        }
    }
    report.goal(
        "connect4 / sendmsg4 ≤ 1.3× the floor's program (ns/run, at 10,000 and 1,000,000 entries)",
        text.join("; "),
        Some(worst <= 1.3),
        format!(
            "worst {worst:.2}×; kernel BPF statistics, table 1p. Beyond the floor's one lookup, \
             the verdict checks the exempt cgroup and DNS steering, a DNS-derived entry's \
             expiry (the boot clock, read once per jiffy and CPU) and its port ranges, and \
             counts the allow; an ip-rule destination is found in the DNS-derived hash too, as \
             the copy of its exact entry (one lookup; the trie is walked only for a real CIDR). \
             Rows marked ×16 cycle through 16 destinations (their keys out of cache between \
             lookups); the others repeat one. The statistics' own cost per run (the empty \
             programs) is in both sides: the raw ratio is judged, the net one is shown beside \
             it. Each ratio is the median over repetitions of the ratio within one repetition \
             (egress and floor batches adjacent, A B B A), not the ratio of the two medians \
             shown: a moment of load on the shared machine slows both sides of one repetition"
        ),
    );
    // Where it runs once per operation (TCP); a UDP batch creates one socket, one cold run.
    let creates: Vec<f64> = big
        .iter()
        .filter_map(|r| r.2.on("sock_create").filter(|p| p.runs_op >= 0.5))
        .map(|p| p.ns_run)
        .collect();
    let empty = big
        .iter()
        .filter_map(|r| r.3.on("sock_create").filter(|p| p.runs_op >= 0.5))
        .map(|p| p.ns_run)
        .fold(0.0, f64::max);
    if !creates.is_empty() {
        let w = creates.iter().copied().fold(0.0, f64::max);
        report.goal(
            "sock_create ≤ 60 ns/run",
            format!("worst {w:.0} ns/run; an empty cgroup/sock_create program: {empty:.0}"),
            Some(w <= 60.0),
            "kernel BPF statistics, TCP rows of table 1p. sock_create decides a TCP or UDP \
             socket on two loads of its context: what it reads is mostly the timing's own \
             cost per run (two sched_clock reads and the statistics update), which the \
             floor's empty program beside it shows"
                .into(),
        );
    }
    let mut totals = Vec::new();
    let mut worst = 0.0f64;
    for r in &big {
        let q = r.2.total_ns_op / r.3.ns_op_of(verdict_hook(&r.1)).max(1.0);
        worst = worst.max(q);
        totals.push(format!("{} @{}: {q:.2}×", short(&r.1), r.0));
    }
    report.goal(
        "programs' ns per operation (sum over every program run) ≤ 1.5× the floor's",
        totals.join("; "),
        Some(worst <= 1.5),
        format!(
            "worst {worst:.2}×; run time inside the programs only (the outside view, table 1, \
             adds the hook machinery and whatever the programs cost outside their runs). The \
             floor runs one program per operation; egress also runs sock_create, sock_ops \
             (five times per TCP connect+close), setsockopt, the ingress program and the \
             backstop on every packet (three per TCP connect+close), and where the family \
             guard cannot load the tripwire on every system call, each run paying the \
             statistics' own ~60 ns, so this ratio cannot reach 1.5× against a floor \
             without them"
        ),
    );
}

fn goals(report: &mut Report, rows: &[GoalRow]) {
    // Issue 14, the outside view: added thread CPU per operation against the floor's and
    // nftables', at 10,000 entries and more.
    let big: Vec<&GoalRow> = rows
        .iter()
        .filter(|r| r.0 >= 10_000 && !established(&r.1))
        .collect();
    if !big.is_empty() {
        let (mut worst_floor, mut worst_nft, mut resolved) = (0.0f64, 0.0f64, 0);
        let text: Vec<String> = big
            .iter()
            .map(|r| {
                // A ratio means something only when both Δ stand above this row's noise.
                let noise = r.4.diff.abs().max(r.4.iqr);
                if r.2.diff <= noise || r.5.diff <= noise {
                    return format!(
                        "{} @{}: ours {} µs, floor {} µs: within the noise (±{} µs)",
                        short(&r.1),
                        r.0,
                        us(r.2.diff),
                        us(r.5.diff),
                        us(noise)
                    );
                }
                resolved += 1;
                let f = r.2.diff / r.5.diff;
                worst_floor = worst_floor.max(f);
                let n = r.3.map(|n| r.2.diff / n.diff.max(1.0));
                worst_nft = worst_nft.max(n.unwrap_or(f64::INFINITY));
                format!(
                    "{} @{}: {} µs = {f:.2}× floor ({} µs), {} nftables",
                    short(&r.1),
                    r.0,
                    us(r.2.diff),
                    us(r.5.diff),
                    n.map_or("—".into(), |n| format!("{n:.2}×"))
                )
            })
            .collect();
        report.goal(
            "added CPU per TCP connect+close and per UDP sendto ≤ 1.5× the floor's and ≤ 1/3 \
             of nftables's (outside view)",
            text.join("; "),
            (resolved > 0).then_some(worst_floor <= 1.5 && worst_nft <= 1.0 / 3.0),
            format!(
                "judged on the rows resolved above this run's noise (A/A): worst \
                 {worst_floor:.2}× the floor, {worst_nft:.2}× nftables; median Δ over ABBA \
                 repetitions against the same control (table 1). Per-program figures (table \
                 1p) resolve what the TCP rows here cannot"
            ),
        );
    }
    // Goal: at most 0.25 µs per connect at every size.
    let connects: Vec<&GoalRow> = rows
        .iter()
        .filter(|r| r.1.starts_with("TCP") && !established(&r.1))
        .collect();
    let worst = connects
        .iter()
        .map(|r| r.2.diff)
        .fold(f64::NEG_INFINITY, f64::max);
    // The noise floor: the A/A pair's own median Δ and the spread of its Δ, whichever is
    // larger, at the worst row.
    let noise = connects
        .iter()
        .map(|r| r.4.diff.abs().max(r.4.iqr))
        .fold(0.0, f64::max);
    let mut measured = String::new();
    for r in &connects {
        let _ = write!(measured, "{} @{}: {} µs; ", short(&r.1), r.0, us(r.2.diff));
    }
    let met = worst <= 250.0;
    let (met, why) = if met {
        (
            Some(true),
            format!(
                "worst median Δ {} µs ≤ 0.25 µs; the noise floor of this run is ±{} µs, so \
                 differences below it are not resolved",
                us(worst),
                us(noise)
            ),
        )
    } else if worst <= noise {
        (
            None,
            format!(
                "worst median Δ {} µs is within this run's noise floor (±{} µs, A/A): a \
                 0.25 µs difference cannot be resolved on this shared 2-CPU machine by TCP \
                 connects (UDP sendto, which is far less noisy, shows the hook's cost: see \
                 table 1)",
                us(worst),
                us(noise)
            ),
        )
    } else {
        (
            Some(false),
            format!(
                "worst median Δ {} µs exceeds 0.25 µs by {} µs (noise floor ±{} µs)",
                us(worst),
                us(worst - 250.0),
                us(noise)
            ),
        )
    };
    report.goal(
        "full hook adds ≤ 0.25 µs per connect at every size",
        format!(
            "{measured}worst {} µs (noise floor ±{} µs)",
            us(worst),
            us(noise)
        ),
        met,
        why,
    );
    // The same goal read on UDP sendto, where the noise floor is low enough to see the hook.
    let udp: Vec<&GoalRow> = rows.iter().filter(|r| r.1.starts_with("UDP")).collect();
    if !udp.is_empty() {
        // Judged per size against that size's own noise floor.
        let noise_of = |r: &GoalRow| r.4.diff.abs().max(r.4.iqr);
        let over = udp.iter().any(|r| r.2.diff > 250.0 + noise_of(r));
        let under = udp.iter().all(|r| r.2.diff <= 250.0);
        let text: Vec<String> = udp
            .iter()
            .map(|r| {
                let nft = r.3.map_or(String::new(), |n| {
                    format!(
                        ", nftables {} µs = {:.1}× ours",
                        us(n.diff),
                        n.diff / r.2.diff.max(1.0)
                    )
                });
                format!("@{}: {} µs ±{}{nft}", r.0, us(r.2.diff), us(noise_of(r)))
            })
            .collect();
        report.goal(
            "(same hook, read on UDP sendto) ≤ 0.25 µs per call",
            text.join("; "),
            if under {
                Some(true)
            } else if over {
                Some(false)
            } else {
                None
            },
            "an unconnected send runs two programs: sendmsg4 (the verdict: a hash lookup for a \
             DNS-derived destination, the exact-rule hash and then the trie only when that \
             misses) and the egress backstop (which judges the datagram again). Each Δ is \
             judged against its own size's noise floor (±, the A/A pair); 20,000-call batches \
             of ~4 µs keep that floor far below the TCP one"
                .into(),
        );
    }
    // Goal: at least 6x less than nftables, per connect.
    let mut ratios = Vec::new();
    for r in &connects {
        if let Some(n) = r.3 {
            // Our Δ below the noise floor cannot be divided by: use the floor (conservative).
            let floor = r.4.diff.abs().max(r.4.iqr / 2.0).max(1.0);
            ratios.push((r.0, n.diff / r.2.diff.max(floor)));
        }
    }
    if ratios.is_empty() {
        report.goal(
            "≥ 6× less than nftables per connect",
            "nftables not measured".into(),
            None,
            "the nftables set could not be loaded".into(),
        );
    } else {
        let min = ratios.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
        let text: Vec<String> = ratios
            .iter()
            .map(|(s, r)| format!("@{s}: {r:.1}×"))
            .collect();
        report.goal(
            "≥ 6× less added CPU than nftables per connect",
            format!("{} (worst {min:.1}×)", text.join(", ")),
            Some(min >= 6.0),
            "nftables Δ / our Δ, where our Δ is taken as at least the A/A noise floor \
             (a conservative ratio when ours is below noise)"
                .into(),
        );
    }
}

/// The backstop's label in the per-program figures.
const BACKSTOP: &str = "egress (cgroup_skb)";

/// The established-flow row: one connection, the backstop's per-packet path.
fn established(label: &str) -> bool {
    label.starts_with("TCP established")
}

fn short(label: &str) -> &str {
    let spread = label.ends_with("16 destinations");
    if established(label) {
        "tcp/established"
    } else if label.starts_with("UDP") {
        if spread { "udp/dns×16" } else { "udp/dns" }
    } else if label.contains("ip rule") {
        if spread {
            "tcp/ip-rule×16"
        } else {
            "tcp/ip-rule"
        }
    } else if spread {
        "tcp/dns×16"
    } else {
        "tcp/dns"
    }
}

/// The nftables peer: a set of allowed addresses and one rule in the output chain matching
/// the bench's cgroup, inside the namespace `ns` only.
fn nft_setup(root: &Path, ns: &Path, cgroup: &Path) -> Result<()> {
    let name = cgroup
        .file_name()
        .context("cgroup without a name")?
        .to_string_lossy()
        .into_owned();
    let script = format!(
        "table inet egress_bench {{\n  set allowed {{ type ipv4_addr; flags interval; }}\n  \
         chain out {{ type filter hook output priority 0; policy accept;\n    \
         socket cgroupv2 level 1 \"{name}\" ip daddr != @allowed reject\n  }}\n}}\n\
         add element inet egress_bench allowed {{ {CIDR_DST}, {DNS_DST}, {} }}\n",
        ip_spread()
            .iter()
            .chain(&dns_spread())
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    nft_file(root, ns, &script)
}

/// Runs `nft -f` on `script` inside `ns`. nft resolves cgroup paths below `/sys/fs/cgroup`;
/// on a hybrid layout the v2 tree is at `/sys/fs/cgroup/unified`, so nft runs in a private
/// mount namespace where the v2 tree is bind-mounted there (the host's mounts are untouched).
fn nft_file(root: &Path, ns: &Path, script: &str) -> Result<()> {
    let file = std::env::temp_dir().join(format!("egress-bench-{}.nft", std::process::id()));
    fs::write(&file, script)?;
    let inner = format!(
        "{}timeout 120 nsenter --net={} nft -f {}",
        if root == Path::new("/sys/fs/cgroup") {
            String::new()
        } else {
            format!("mount --bind {} /sys/fs/cgroup && ", root.display())
        },
        ns.display(),
        file.display()
    );
    let r = Cmd::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &inner])
        .run_captured();
    let _ = fs::remove_file(&file);
    r
}

/// Replaces the set's elements with the two destinations and the same synthetic entries as
/// the maps: `cidr_n` CIDR entries and `dns_n` DNS-derived addresses.
fn nft_fill(root: &Path, ns: &Path, cidr_n: u32, dns_n: u32) -> Result<()> {
    let mut s = String::from("flush set inet egress_bench allowed\n");
    let mut elems: Vec<String> = vec![CIDR_DST.into(), DNS_DST.into()];
    elems.extend(ip_spread().into_iter().chain(dns_spread()));
    let ip = |v: u32| std::net::Ipv4Addr::from(v).to_string();
    for i in 0..cidr_n {
        let (a, len) = maps::cidr_entry(i);
        elems.push(if len == 32 {
            ip(a)
        } else {
            format!("{}/{len}", ip(a))
        });
    }
    for i in 0..dns_n {
        elems.push(ip(maps::dns_entry(i)));
    }
    for chunk in elems.chunks(20_000) {
        let _ = writeln!(
            s,
            "add element inet egress_bench allowed {{ {} }}",
            chunk.join(", ")
        );
    }
    nft_file(root, ns, &s)
}
