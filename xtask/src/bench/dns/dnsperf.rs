//! Part 2 driven by dnsperf (Debian's `dnsperf`, which `cargo xtask deps` installs): the
//! resolver, dnsmasq with `--nftset`, and the upstream itself ("direct") get the same load
//! generator, the same client sockets and the same query files, ABBA-alternated in one run.
//!
//! Two measurements per kind of name: latency at a fixed rate (`-Q`, every query's latency
//! from `-v`), and the maximum rate (`-q` queries in flight, as fast as answers come). Beside
//! each maximum-rate run, the CPU each process used over it: the load generator's (its
//! rusage), the server's and the upstream's (`/proc`), so that the report shows which of them
//! was the limit.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{KINDS, PATHS};
use crate::bench::{
    report::Table,
    sandbox::Sandbox,
    stats::{quantile, us},
};

/// Client sockets of each run (`-c`). The resolver limits each client socket to 200
/// queries/s (burst 400; egress-agent/src/dns/ratelimit.rs): over 500 sockets a run of
/// [`RUN_S`] stays under it up to 250,000 queries/s (each socket: its burst and 2 s of its
/// rate), above what this machine reaches. A query the limit dropped would show as lost.
pub const CLIENTS: u32 = 500;
/// Client sockets of the latency runs: dnsperf's receiving thread polls every socket, and
/// over 500 that adds some 50 µs to each answer (measured: direct p50 57 µs over 20 sockets,
/// 112 µs over 500); 20 keep each under 50 queries/s.
pub const LAT_CLIENTS: u32 = 20;
/// Queries in flight in the maximum-rate runs (`-q`; dnsperf's default).
pub const OUTSTANDING: u32 = 100;
/// The rate of the latency runs (`-Q`).
pub const LAT_QPS: u32 = 1000;
/// Seconds per run (`-l`).
pub const RUN_S: u32 = 2;
/// Names in the hit file, answered once before the runs so that both caches hold them.
const HIT_NAMES: usize = 100;
/// Names in a miss file of a maximum-rate run: more than a run gets through (each name is
/// asked once, `-n 1`).
const MAX_MISS_NAMES: u32 = 400_000;

/// Where each path's queries go, and the processes whose CPU each run reports.
pub struct Setup<'a> {
    pub ns: &'a Path,
    pub enf_cg: &'a Path,
    pub ctl_cg: &'a Path,
    pub dir: &'a Path,
    pub upstream: &'a str,
    pub peer: &'a str,
    pub agent_pid: u32,
    pub peer_pid: u32,
    pub upstream_pid: u32,
}

/// What the goals need: p50/p99 (ns) and queries/s, by (kind, path).
#[derive(Debug, Default)]
pub struct Figures {
    pub lat: HashMap<(String, String), (f64, f64)>,
    pub qps: HashMap<(String, String), f64>,
}

/// Whether dnsperf can be run.
pub fn available() -> bool {
    std::process::Command::new("dnsperf")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Its version line (`Version 2.10.0`), for the report.
pub fn version() -> String {
    std::process::Command::new("dnsperf")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .chain(String::from_utf8_lossy(&o.stdout).lines())
                .find_map(|l| l.strip_prefix("Version ").map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into())
}

/// One dnsperf run.
#[derive(Debug, Default)]
struct Run {
    sent: u64,
    lost: u64,
    qps: f64,
    /// The first response code of dnsperf's tally (all of them, when nothing failed).
    rcode: String,
    /// Each answered query's latency (ns), from `-v`.
    lat: Vec<f64>,
    /// CPU seconds per second of the run: load generator, server, upstream.
    cpu: [f64; 3],
}

/// Runs both measurements for every kind of name, calling `between` after each run; adds
/// tables 2a and 2b to `tables`.
pub fn measure(
    s: &Setup,
    rounds: usize,
    tables: &mut Vec<Table>,
    mut between: impl FnMut(),
) -> Result<Figures> {
    let mut fig = Figures::default();
    let hits = s.dir.join("dnsperf-hit.txt");
    write_names(&hits, (0..HIT_NAMES).map(|i| format!("h{i}.example.com")))?;
    let refused = s.dir.join("dnsperf-refused.txt");
    write_names(&refused, (0..HIT_NAMES).map(|i| format!("r{i}.evil.test")))?;
    // Both caches hold the hit names before any run (and the upstream has answered them once).
    for path in PATHS {
        run(s, path, &hits, &["-n", "1", "-Q", "2000", "-c", "1"], false)
            .with_context(|| format!("dnsperf: warming the cache of {path}"))?;
    }

    let mut lat = Table::new(
        &format!(
            "2a. DNS latency at {LAT_QPS} queries/s (dnsperf {}, {LAT_CLIENTS} client sockets, \
             {RUN_S} s per run, {rounds} run(s) per path ABBA-alternated; p50/p99 over every query of \
             the runs, µs)",
            version()
        ),
        &[
            "names",
            "path",
            "p50 µs",
            "p99 µs",
            "answered",
            "lost",
            "rcode",
            "p50 − direct µs",
            "p50 / dnsmasq",
            "p99 / dnsmasq",
        ],
    );
    let mut max = Table::new(
        &format!(
            "2b. Maximum DNS rate (dnsperf, {CLIENTS} client sockets, {OUTSTANDING} queries in \
             flight, {RUN_S} s per run, mean of {rounds} run(s) per path ABBA-alternated)"
        ),
        &[
            "names",
            "path",
            "queries/s",
            "lost",
            "CPU/s: dnsperf",
            "CPU/s: server",
            "CPU/s: upstream",
            "ours / this",
        ],
    );
    let mut seq = 0u32;
    for kind in KINDS {
        // Latency at a fixed rate.
        let runs = each_path(rounds, |path| {
            seq += 1;
            let file = file_for(s, kind, seq, LAT_QPS * RUN_S * 11 / 10, &hits, &refused)?;
            let (q, c) = (LAT_QPS.to_string(), LAT_CLIENTS.to_string());
            let r = run(
                s,
                path,
                &file,
                &["-Q", &q, "-c", &c, "-n", passes(kind)],
                true,
            );
            between();
            r
        })?;
        let mut rows = Vec::new();
        for (i, path) in PATHS.iter().enumerate() {
            let all: Vec<f64> = runs[i].iter().flat_map(|r| r.lat.iter().copied()).collect();
            let (p50, p99) = (quantile(&all, 0.5), quantile(&all, 0.99));
            let lost: u64 = runs[i].iter().map(|r| r.lost).sum();
            let rcode = runs[i].last().map(|r| r.rcode.clone()).unwrap_or_default();
            fig.lat.insert((kind.into(), (*path).into()), (p50, p99));
            rows.push(((*path).to_owned(), p50, p99, all.len(), lost, rcode));
        }
        let get = |p: &str| fig.lat[&(kind.to_owned(), p.to_owned())];
        for (path, p50, p99, n, lost, rcode) in rows {
            lat.row(vec![
                kind.into(),
                path,
                us(p50),
                us(p99),
                n.to_string(),
                lost.to_string(),
                rcode,
                us(p50 - get("direct").0),
                format!("{:.2}×", p50 / get("dnsmasq+nftset").0.max(1.0)),
                format!("{:.2}×", p99 / get("dnsmasq+nftset").1.max(1.0)),
            ]);
        }

        // The maximum rate.
        let runs = each_path(rounds, |path| {
            seq += 1;
            let file = file_for(s, kind, seq, MAX_MISS_NAMES, &hits, &refused)?;
            let (q, c) = (OUTSTANDING.to_string(), CLIENTS.to_string());
            let r = run(
                s,
                path,
                &file,
                &["-q", &q, "-c", &c, "-n", passes(kind)],
                false,
            );
            between();
            r
        })?;
        let ours = mean(runs[1].iter().map(|r| r.qps));
        for (i, path) in PATHS.iter().enumerate() {
            let qps = mean(runs[i].iter().map(|r| r.qps));
            let lost: u64 = runs[i].iter().map(|r| r.lost).sum();
            let cpu = |k: usize| mean(runs[i].iter().map(|r| r.cpu[k]));
            fig.qps.insert((kind.into(), (*path).into()), qps);
            max.row(vec![
                kind.into(),
                (*path).into(),
                format!("{qps:.0}"),
                lost.to_string(),
                format!("{:.2}", cpu(0)),
                format!("{:.2}", cpu(1)),
                if *path == "direct" {
                    "–".into()
                } else {
                    format!("{:.2}", cpu(2))
                },
                format!("{:.2}×", ours / qps.max(1.0)),
            ]);
        }
    }
    lat.note(format!(
        "Names: hit, {HIT_NAMES} permitted names below example.com in turn, each answered once \
         before the runs (both resolvers answer them from their caches; ours also grants their \
         addresses again); miss, a name never asked before in each query (`-n 1` over a fresh \
         file per run: both forward it upstream); refused, {HIT_NAMES} names below evil.test \
         (ours answers REFUSED itself and writes a dns-refused event; dnsmasq forwards them \
         and the upstream refuses). Paths: direct, dnsperf to the upstream (dnsmasq answering \
         every name below example.com from memory, no cache); ours, dnsperf in the enforced \
         cgroup asking the upstream's address, steered to the agent's resolver, which forwards \
         and writes the answered addresses into the allow map before it replies; \
         dnsmasq+nftset, dnsmasq forwarding to the same upstream and adding each answer to an \
         nftables set. Runs alternate A B C C B A. p50 − direct: what the resolver adds."
    ));
    max.note(
        "CPU/s: CPU seconds each process used per second of the run (dnsperf from its rusage; \
         the server, the agent or dnsmasq, and the upstream from /proc), on a machine with the \
         CPUs the machine line says: a server near 1.00 is the limit (each of them answers on \
         one thread); the load generator is not, as long as some path goes faster than the one \
         compared. ours / this: our rate over this path's. Reproduce: `sudo \
         EGRESS_BENCH_ONLY=dns cargo xtask bench` (report in target/BENCHMARKS.dns.md); each \
         run is `dnsperf -s SERVER -d FILE -c 500 -q 100 -l 2 -t 1 -n N` inside the bench's \
         network namespace (and, for ours, its enforced cgroup); the latency runs \
         `-c 20 -Q 1000 -v`.",
    );
    tables.push(lat);
    tables.push(max);
    Ok(fig)
}

/// dnsperf's `-n`: a miss file once (each name new), the short files until the time limit.
fn passes(kind: &str) -> &'static str {
    if kind == "miss" { "1" } else { "1000000" }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The query file of one run: the shared one for hits and refused names, a fresh one of `n`
/// never-asked names for misses.
fn file_for(
    s: &Setup,
    kind: &str,
    seq: u32,
    n: u32,
    hits: &Path,
    refused: &Path,
) -> Result<PathBuf> {
    Ok(match kind {
        "hit" => hits.to_path_buf(),
        "refused" => refused.to_path_buf(),
        _ => {
            let file = s.dir.join("dnsperf-miss.txt");
            write_names(&file, (0..n).map(|i| format!("m{seq}-{i}.example.com")))?;
            file
        }
    })
}

fn write_names(file: &Path, names: impl Iterator<Item = String>) -> Result<()> {
    let mut w = BufWriter::new(
        File::create(file).with_context(|| format!("cannot create {}", file.display()))?,
    );
    for name in names {
        writeln!(w, "{name} A")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", file.display()))
}

/// Runs `command(path)` once per path and round: A B C in even rounds, C B A in odd ones.
fn each_path(rounds: usize, mut command: impl FnMut(&str) -> Result<Run>) -> Result<Vec<Vec<Run>>> {
    let mut runs: Vec<Vec<Run>> = PATHS.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..PATHS.len() {
            let i = if round % 2 == 0 {
                k
            } else {
                PATHS.len() - 1 - k
            };
            crate::interrupt::check()?;
            runs[i].push(command(PATHS[i])?);
        }
    }
    Ok(runs)
}

/// One dnsperf run on `path` with `file`; `verbose` collects each query's latency.
fn run(s: &Setup, path: &str, file: &Path, extra: &[&str], verbose: bool) -> Result<Run> {
    let (cgroup, server, pids) = match path {
        "ours" => (s.enf_cg, s.upstream, [s.agent_pid, s.upstream_pid]),
        "dnsmasq+nftset" => (s.ctl_cg, s.peer, [s.peer_pid, s.upstream_pid]),
        _ => (s.ctl_cg, s.upstream, [s.upstream_pid, s.upstream_pid]),
    };
    let out = s.dir.join("dnsperf.out");
    let mut cmd = Sandbox::command("dnsperf", s.ns, Some(cgroup))?;
    cmd.args(["-s", server, "-d"])
        .arg(file)
        .args(["-l", &RUN_S.to_string()])
        // A lost query holds its slot this long: one second, not the default five.
        .args(["-t", "1"])
        .args(extra);
    if verbose {
        cmd.arg("-v");
    }
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out)?)
        .stderr(File::create(s.dir.join("dnsperf.err"))?);
    let before = pids.map(cpu_s);
    let start = Instant::now();
    let child = cmd.spawn().context("cannot start dnsperf")?;
    let (status, gen_cpu) = wait_with_cpu(child.id())?;
    let wall = start.elapsed().as_secs_f64();
    let after = pids.map(cpu_s);
    let text = fs::read_to_string(&out).unwrap_or_default();
    if status != 0 {
        let err = fs::read_to_string(s.dir.join("dnsperf.err")).unwrap_or_default();
        bail!("dnsperf on {path} exited with {status}: {}", err.trim());
    }
    let mut r = parse(&text);
    r.cpu = [
        gen_cpu / wall,
        (after[0] - before[0]) / wall,
        (after[1] - before[1]) / wall,
    ];
    Ok(r)
}

/// dnsperf's statistics, and with `-v` each query's latency.
fn parse(text: &str) -> Run {
    let mut r = Run::default();
    let field = |l: &str, name: &str| {
        l.trim()
            .strip_prefix(name)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    for l in text.lines() {
        // `> NOERROR h1.example.com A 0.000212`
        if let Some(rest) = l.strip_prefix("> ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() >= 4
                && f[0] != "T"
                && let Ok(secs) = f[f.len() - 1].parse::<f64>()
            {
                r.lat.push(secs * 1e9);
            }
            continue;
        }
        if let Some(v) = field(l, "Queries sent:") {
            r.sent = v as u64;
        } else if let Some(v) = field(l, "Queries lost:") {
            r.lost = v as u64;
        } else if let Some(v) = field(l, "Queries per second:") {
            r.qps = v;
        } else if let Some(v) = l.trim().strip_prefix("Response codes:") {
            r.rcode = v.split_whitespace().next().unwrap_or_default().to_owned();
        }
    }
    r
}

/// Waits for the child `pid`; its exit code and the CPU seconds it used (user + system).
fn wait_with_cpu(pid: u32) -> Result<(i32, f64)> {
    let mut status = 0;
    // SAFETY: rusage is plain data; zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; both pointers are valid for the call.
        let rc = unsafe { libc::wait4(pid as i32, &raw mut status, 0, &raw mut ru) };
        if rc == pid as i32 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("wait4 on dnsperf");
        }
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((code, t(ru.ru_utime) + t(ru.ru_stime)))
}

/// CPU seconds (user + system) process `pid` has used so far (0 when unknown).
fn cpu_s(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Table 2c: the ratios the goals read, one row per kind of name.
pub fn ratios(fig: &Figures, tables: &mut Vec<Table>) {
    let mut t = Table::new(
        "2c. DNS ratios (from 2a and 2b, same run)",
        &[
            "names",
            "queries/s: ours / dnsmasq+nftset",
            "queries/s: ours / direct",
            "p50: ours − direct µs",
            "p50: ours / dnsmasq+nftset",
            "p99: ours / dnsmasq+nftset",
            "p99: ours µs",
        ],
    );
    for kind in KINDS {
        let q = |p: &str| {
            fig.qps
                .get(&(kind.to_owned(), p.to_owned()))
                .copied()
                .unwrap_or(0.0)
        };
        let l = |p: &str| {
            fig.lat
                .get(&(kind.to_owned(), p.to_owned()))
                .copied()
                .unwrap_or_default()
        };
        let (o, d, m) = (l("ours"), l("direct"), l("dnsmasq+nftset"));
        t.row(vec![
            kind.into(),
            format!("{:.2}×", q("ours") / q("dnsmasq+nftset").max(1.0)),
            format!("{:.2}×", q("ours") / q("direct").max(1.0)),
            us(o.0 - d.0),
            format!("{:.2}×", o.0 / m.0.max(1.0)),
            format!("{:.2}×", o.1 / m.1.max(1.0)),
            us(o.1),
        ]);
    }
    tables.push(t);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dnsperf_output() {
        let text = "> NOERROR h1.example.com A 0.000212\n> T h2.example.com A\n\
                    Statistics:\n\n  Queries sent:         4\n  Queries completed:    3 \
                    (75.00%)\n  Queries lost:         1 (25.00%)\n\n  Response codes:       \
                    NOERROR 3 (100.00%)\n  Queries per second:   2700.877785\n";
        let r = parse(text);
        assert_eq!((r.sent, r.lost, r.rcode.as_str()), (4, 1, "NOERROR"));
        assert_eq!(r.lat.len(), 1);
        assert!((r.lat[0] - 212_000.0).abs() < 1.0);
        assert!((r.qps - 2700.877785).abs() < 1e-6);
    }
}
