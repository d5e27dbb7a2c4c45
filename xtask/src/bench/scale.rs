//! Part 3: loading a 100,000-rule allowlist (parse and validate; attach until ready), the
//! agent's memory, and kernel map memory per 1,000 entries.

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::Result;

use super::{
    Ctx,
    connect::Enforced,
    maps,
    report::{Report, Table},
    sandbox::Sandbox,
};
use crate::cmd::Cmd;

const RULES: u32 = 100_000;

pub fn run(
    sb: &mut Sandbox,
    ctx: &Ctx,
    enf: &Enforced,
    dns: &super::dns::DnsOutcome,
    report: &mut Report,
) -> Result<()> {
    // 100k rules: three in four /32 `ip:` rules, one in four CIDRs, a few ports each; the
    // same synthetic space as part 1.
    let file = sb.dir.join("scale-100k.yaml");
    let mut y = String::with_capacity(RULES as usize * 48);
    y.push_str("version: 1\nname: bench-scale\ndns:\n  upstream: [\"192.0.2.53:53\"]\nallow:\n");
    for i in 0..RULES {
        let (a, len) = maps::cidr_entry(i);
        let ip = std::net::Ipv4Addr::from(a);
        if len == 32 {
            let _ = writeln!(y, "  - ip: {ip}\n    ports: [443]");
        } else {
            let _ = writeln!(
                y,
                "  - cidr: {ip}/{len}\n    ports: [80, \"8000-8080\"]\n    protocol: tcp"
            );
        }
    }
    fs::write(&file, &y)?;

    let t = Instant::now();
    let check = Cmd::new(&ctx.agent_bin).arg("check").arg(&file).output()?;
    let check_s = t.elapsed().as_secs_f64();
    let check_rss = peak_rss_of(&ctx.agent_bin, &file);

    let ns = sb.netns("scale", &[])?;
    let cg = sb.cgroup("scale")?;
    let instance = sb.name("scale");
    let (pid, ready, _) = sb.agent(&instance, &ns, &cg, &file)?;
    let (rss, hwm) = super::rss_kb(pid);
    let pins = Path::new("/sys/fs/bpf/egress").join(&instance);
    let trie = maps::memlock(&pins.join("maps").join("ALLOW_CIDR")).unwrap_or(0)
        + maps::memlock(&pins.join("maps").join("ALLOW_EXACT")).unwrap_or(0);
    sb.stop_agent(&instance);

    let mut t1 = Table::new(
        "3a. Loading a 100,000-rule allowlist",
        &["step", "time", "memory"],
    );
    t1.row(vec![
        format!(
            "`egress-agent check` ({} KiB of YAML; {})",
            y.len() / 1024,
            if check.status.success() {
                "valid"
            } else {
                "**rejected**"
            }
        ),
        format!("{check_s:.2} s"),
        check_rss.map_or("—".into(), |k| format!("peak RSS {} MiB", k / 1024)),
    ]);
    t1.row(vec![
        "`egress-agent attach` until `ready` (parse, load programs, write the trie, attach, resolver)".into(),
        format!("{:.2} s", ready.as_secs_f64()),
        format!("RSS {} MiB (peak {} MiB); CIDR trie and exact hash {} MiB in the kernel", rss / 1024, hwm / 1024, trie >> 20),
    ]);
    report.tables.push(t1);

    let mut t2 = Table::new("3b. Agent memory and kernel map memory", &["what", "value"]);
    let (idle, _) = super::rss_kb(enf.agent_pid);
    t2.row(vec![
        "agent RSS at idle (part 1's agent, maps filled)".into(),
        format!("{} MiB", idle / 1024),
    ]);
    t2.row(vec![
        "resolver agent RSS before the DNS load".into(),
        format!("{} MiB", dns.agent_idle_kb / 1024),
    ]);
    t2.row(vec![
        "resolver agent peak RSS under the DNS load".into(),
        format!("{} MiB", dns.agent_hwm_kb / 1024),
    ]);
    // Per 1,000 entries: what the trie and exact hash grew by over the smallest size, per
    // entry added. Divided by its own count, a 10-entry row shows the fixed bucket array.
    let base = enf
        .memory
        .iter()
        .min_by_key(|m| m.3)
        .map(|&(_, cm, _, cn, _)| (cm, cn));
    for &(size, cm, dm, cn, dn) in &enf.memory {
        let growth = match base {
            Some((bm, bn)) if cn > bn => format!(
                "; per 1,000 entries more than at the smallest size: trie and exact hash {:.1} KiB",
                cm.saturating_sub(bm) as f64 / 1024.0 / ((cn - bn) as f64 / 1000.0)
            ),
            _ => String::new(),
        };
        t2.row(vec![
            format!(
                "kernel maps at {size} entries: ALLOW_CIDR + ALLOW_EXACT ({cn}) / ALLOW_DNS ({dn})"
            ),
            format!(
                "{} KiB / {} KiB{growth}{}",
                cm / 1024,
                dm / 1024,
                if size >= 100_000 {
                    format!(
                        "; the DNS-derived hash (preallocated) {:.1} KiB per 1,000 of its entries",
                        dm as f64 / 1024.0 / (dn as f64 / 1000.0)
                    )
                } else {
                    String::new()
                }
            ),
        ]);
    }
    t2.note(
        "memlock as bpftool reports it (kernel 6.4+: the map's actual usage). The DNS-derived \
         hash is preallocated for its 65,536 entries whatever its fill; the LPM trie allocates \
         per entry (a node of 16+20+112 bytes plus slab overhead, and intermediate nodes); \
         the exact-rule hash beside it is not preallocated, but its bucket array (16 bytes for \
         each of its 65,536 slots, 1 MiB) is there from the start.",
    );
    report.tables.push(t2);
    Ok(())
}

/// Peak RSS (kB) of `egress-agent check FILE`, from GNU time if present.
fn peak_rss_of(bin: &Path, file: &Path) -> Option<u64> {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(bin)
        .arg("check")
        .arg(file)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}
