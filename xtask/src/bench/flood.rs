//! Part 4: a deny flood. One process of the enforced cgroup makes up to a million denied
//! connects as fast as it can, while another keeps making allowed ones; the agent's CPU and
//! RSS are sampled, and its counters read from `egress-agent status`.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    Ctx,
    connect::{CIDR_DST, DENIED_DST, Enforced},
    report::{Report, Table},
    sandbox::Sandbox,
    stats::us,
};
use crate::cmd::Cmd;

const FLOOD_MAX: u64 = 1_000_000;
const FLOOD_MS: u64 = 20_000;

pub fn run(sb: &mut Sandbox, ctx: &Ctx, enf: &mut Enforced, report: &mut Report) -> Result<()> {
    let mut other = sb.worker(
        &ctx.worker_bin,
        &enf.netns,
        Some(&enf.cgroup),
        "enf-allowed",
    )?;
    let lat_cmd = format!("lat {CIDR_DST}:8080 1000");
    other.ask(&lat_cmd)?;
    let before = other.ask(&lat_cmd)?;
    let before_status = status(ctx, &enf.instance);
    let pid = enf.agent_pid;
    let (cpu0, t0) = (cpu_ticks(pid), Instant::now());
    let (rss0, _) = super::rss_kb(pid);

    let flood_cmd = format!("flood {DENIED_DST}:8080 {FLOOD_MAX} {FLOOD_MS}");
    let worker = &mut enf.worker;
    let (flood, during, samples) = thread::scope(|s| {
        let h = s.spawn(move || worker.ask(&flood_cmd));
        let mut during = Vec::new();
        let mut samples = Vec::new();
        let start = Instant::now();
        while !h.is_finished() && start.elapsed() < Duration::from_millis(FLOOD_MS + 10_000) {
            if let Ok(a) = other.ask("lat 198.51.100.10:8080 300") {
                during.push((a.f("p50"), a.f("p99")));
            }
            samples.push((
                start.elapsed().as_secs_f64(),
                super::rss_kb(pid).0,
                cpu_ticks(pid),
            ));
            thread::sleep(Duration::from_millis(200));
        }
        (
            h.join()
                .map_err(|_| anyhow::anyhow!("flood thread panicked")),
            during,
            samples,
        )
    });
    let flood = flood??;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(pid) - cpu0) as f64 / ticks_per_s();
    // The agent drains what is queued after the flood: give it a moment, then read again.
    thread::sleep(Duration::from_secs(2));
    let after_status = status(ctx, &enf.instance);
    let (rss1, hwm) = super::rss_kb(pid);
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(rss1);
    let half = samples.len() / 2;
    let rss_first = samples[..half].iter().map(|s| s.1).max().unwrap_or(0);
    let rss_second = samples[half..].iter().map(|s| s.1).max().unwrap_or(0);
    let events_bytes = std::fs::metadata(&enf.events).map_or(0, |m| m.len());
    let p99_during = super::stats::median(&during.iter().map(|d| d.1).collect::<Vec<_>>());
    let p50_during = super::stats::median(&during.iter().map(|d| d.0).collect::<Vec<_>>());

    let mut t = Table::new("4. Deny flood", &["what", "value"]);
    let count = flood.f("count");
    let ms = flood.f("ms");
    t.row(vec![
        "denied connects made".into(),
        format!(
            "{count:.0} in {:.1} s ({:.0}/s), EPERM: {:.0}",
            ms / 1000.0,
            count / (ms / 1000.0),
            flood.f("eperm")
        ),
    ]);
    t.row(vec![
        "agent CPU during the flood".into(),
        format!(
            "{cpu_s:.2} s of CPU in {elapsed:.1} s ({:.0}% of one CPU)",
            100.0 * cpu_s / elapsed
        ),
    ]);
    t.row(vec![
        "agent RSS before / max during / after".into(),
        format!(
            "{} / {} / {} MiB (peak {} MiB); max in first / second half of the flood: {} / {} MiB",
            rss0 / 1024,
            rss_max / 1024,
            rss1 / 1024,
            hwm / 1024,
            rss_first / 1024,
            rss_second / 1024
        ),
    ]);
    let d = |k: &str| {
        after_status.get(k).copied().unwrap_or(0) - before_status.get(k).copied().unwrap_or(0)
    };
    t.row(vec![
        "kernel counters (Δ): denied / ring-buffer drops".into(),
        format!("{} / {}", d("denied"), d("ringbuf_drops")),
    ]);
    t.row(vec![
        "events file after the flood".into(),
        format!("{} MiB of deny lines written", events_bytes >> 20),
    ]);
    t.row(vec![
        "allowed connect latency, other process: before".into(),
        format!(
            "p50 {} µs, p99 {} µs",
            us(before.f("p50")),
            us(before.f("p99"))
        ),
    ]);
    t.row(vec![
        "... during the flood (median over samples)".into(),
        format!(
            "p50 {} µs, p99 {} µs ({} samples of 300 connects)",
            us(p50_during),
            us(p99_during),
            during.len()
        ),
    ]);
    t.note("The machine has 2 CPUs: the flooding process, the agent and the allowed-traffic process share them, so some latency rise is CPU contention, not the hook.");
    report.tables.push(t);

    let bounded = rss_second <= rss_first + 8 * 1024;
    report.goal(
        "deny flood: agent CPU and RSS bounded, drops counted, no unbounded backlog",
        format!(
            "{count:.0} denies; agent {:.0}% CPU; RSS {}→{} MiB; drops {}",
            100.0 * cpu_s / elapsed,
            rss0 / 1024,
            rss_max / 1024,
            d("ringbuf_drops")
        ),
        Some(bounded && flood.f("eperm") == count),
        format!(
            "RSS max first half {} MiB vs second half {} MiB ({}); every connect got EPERM: {}",
            rss_first / 1024,
            rss_second / 1024,
            if bounded { "flat" } else { "growing" },
            flood.f("eperm") == count
        ),
    );
    report.goal(
        "deny flood: allowed traffic keeps its latency",
        format!(
            "p99 {} µs before, {} µs during",
            us(before.f("p99")),
            us(p99_during)
        ),
        Some(p99_during <= before.f("p99") * 2.0 + 20_000.0),
        "judged met when p99 during the flood stays within 2× + 20 µs of before (the two \
         processes share 2 CPUs with the flood)"
            .into(),
    );
    Ok(())
}

/// `denied`, `ringbuf_drops`, `allowed` from `egress-agent status --json`.
fn status(ctx: &Ctx, name: &str) -> std::collections::HashMap<String, u64> {
    let out = Cmd::new(&ctx.agent_bin)
        .args(["status", "--name", name, "--json"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    ["denied", "ringbuf_drops", "allowed", "errors"]
        .iter()
        .filter_map(|k| {
            let at = out.find(&format!("\"{k}\""))? + k.len() + 2;
            let rest = out[at..].trim_start_matches([':', ' ']);
            let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some(((*k).to_owned(), n.parse().ok()?))
        })
        .collect()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime: fields 14 and 15 of the whole line, 12 and 13 after ')'.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
