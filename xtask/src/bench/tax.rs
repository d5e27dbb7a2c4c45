//! What the agent's machine-wide programs cost every task of the machine. Where the family
//! guard cannot load, the agent arms the packet-socket tripwire on the raw tracepoint
//! `sys_enter` (docs/KERNEL-NOTES.md): every system call of every task then enters the kernel
//! through the slow path and runs the program. The control, the floor and nftables pay that
//! too while the agent runs, so table 1's Δ cannot show it. Here an unenforced worker times
//! the same batches before the agent starts and once it is attached, back to back (a global
//! tracepoint the bench does not own cannot be switched on and off between batches).

use anyhow::Result;

use super::{
    report::Table,
    sandbox::Worker,
    stats::{median, us},
};

/// What one worker measured: per command, ns per operation of each repetition.
pub struct Samples(Vec<Vec<f64>>);

/// The batches, with their labels: the cheapest system call, and a UDP sendto (one call per
/// operation). A TCP connect+close is left out: its 30 µs vary by ±2 µs between batches that
/// are not alternated, far above what its system calls would show.
pub fn commands(udp: &str) -> [(&'static str, String); 2] {
    [
        ("getppid (one system call)", "getppid 200000".into()),
        ("UDP sendto, unenforced", udp.into()),
    ]
}

/// One warm-up batch of each command, then `reps` rounds of each in turn.
pub fn sample(w: &mut Worker, cmds: &[(&'static str, String)], reps: usize) -> Result<Samples> {
    for (_, c) in cmds {
        let _ = w.ask(c);
    }
    let mut out = vec![Vec::with_capacity(reps); cmds.len()];
    for _ in 0..reps {
        for ((_, c), v) in cmds.iter().zip(out.iter_mut()) {
            v.push(w.ask(c)?.f("ns"));
        }
    }
    Ok(Samples(out))
}

/// The table: before, with the agent attached, the difference; `armed` names the programs
/// the agent attached to the machine (none where the family guard runs), `others` counts the
/// `sys_enter` programs already attached by anyone before the agent started.
pub fn table(
    cmds: &[(&'static str, String)],
    before: &Samples,
    during: &Samples,
    armed: &[&str],
    others: usize,
) -> Table {
    let mut t = Table::new(
        "1t. Every task's system calls: an unenforced worker before the agent starts and \
         while it runs (µs of thread CPU per op, median over repetitions)",
        &["operation", "before", "agent attached", "Δ"],
    );
    for (i, (label, _)) in cmds.iter().enumerate() {
        let (b, d) = (median(&before.0[i]), median(&during.0[i]));
        t.row(vec![(*label).into(), us(b), us(d), us(d - b)]);
    }
    t.note(format!(
        "Programs the agent attached to the whole machine: {}. {} The worker is in the \
         control's network namespace and cgroup, outside the enforced one: no cgroup program \
         of the agent runs for it. Not alternated: the agent's tracepoint cannot be switched \
         between batches, so the two columns are seconds-adjacent runs, and a Δ of a few ns \
         is within this machine's noise. Table 1's Δs do not include this cost (the control, \
         the floor and nftables pay it too); table 1p counts the tripwire's own run time for \
         egress. A TCP connect+close makes four system calls of its own (socket, setsockopt, \
         connect, close) and its listener about three, each paying the getppid row's Δ; a \
         sendto makes one.",
        if armed.is_empty() {
            "none (the family guard runs here)".to_owned()
        } else {
            armed.join(", ")
        },
        match others {
            0 => "No other program was on `sys_enter` before it started.".to_owned(),
            n => format!(
                "**{n} program(s) of others were already on `sys_enter` before it started**: \
                 the slow path was on in both columns."
            ),
        }
    ));
    t
}
