//! What the agent's machine-wide programs cost every task of the machine. Where the family
//! guard cannot load, the agent arms the packet-socket tripwire on the raw tracepoint
//! `sys_enter` (docs/KERNEL-NOTES.md): every system call of every task then enters the kernel
//! through the slow path and runs the program. The control, the floor and nftables pay that
//! too while the agent runs, so table 1's Δ cannot show it. Here an unenforced worker times
//! the same batches with no agent, while a `run` agent runs (which puts nothing on
//! `sys_enter`), and once the bench's `attach` agent is attached, back to back (a global
//! tracepoint the bench does not own cannot be switched on and off between batches).

use anyhow::Result;

use super::{
    report::Table,
    sandbox::Worker,
    stats::{median, us},
};

/// What one worker measured: per command, ns per operation of each repetition.
pub struct Samples(Vec<Vec<f64>>);

/// The batches, with their labels: the cheapest system call. Costlier operations are left
/// out: between batches that are not alternated, a UDP sendto drifted by 0.3-0.5 µs whatever
/// ran (as much with a `run` agent, which puts nothing on `sys_enter`, as with `attach`), and
/// a TCP connect+close by ±2 µs, far above what their system calls' entry would show.
pub fn commands() -> [(&'static str, String); 1] {
    [("getppid (one system call)", "getppid 200000".into())]
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

/// The table: before any agent, then each of `during` (a label and what the worker measured
/// while that agent ran) with its difference; `armed` names the programs the `attach` agent
/// attached to the machine (none where the family guard runs), `others` counts the
/// `sys_enter` programs already attached by anyone before the agents started.
pub fn table(
    cmds: &[(&'static str, String)],
    before: &Samples,
    during: &[(&str, &Samples)],
    armed: &[&str],
    others: usize,
) -> Table {
    let mut header = vec!["operation".to_owned(), "no agent".to_owned()];
    for (label, _) in during {
        header.push((*label).to_owned());
        header.push("Δ".to_owned());
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(
        "1t. Every task's system calls: an unenforced worker with no agent on the machine, and \
         while one runs (µs of thread CPU per op, median over repetitions)",
        &header,
    );
    for (i, (label, _)) in cmds.iter().enumerate() {
        let b = median(&before.0[i]);
        let mut row = vec![(*label).into(), us(b)];
        for (_, d) in during {
            let d = median(&d.0[i]);
            row.push(us(d));
            row.push(us(d - b));
        }
        t.row(row);
    }
    t.note(format!(
        "Programs the `attach` agent attached to the whole machine: {}. `run` attaches only \
         the tripwire's io_uring half (its command's seccomp filter refuses the same families \
         first), so nothing of it is on `sys_enter`. {} The worker is in the control's network \
         namespace and cgroup, outside every enforced one: no cgroup program of an agent runs \
         for it. Not alternated: an agent's tracepoint cannot be switched between batches, so \
         the columns are seconds-adjacent runs (no agent, `run` of a `sleep`, then the bench's \
         `attach`), and a Δ of a few ns is within this machine's noise. Table 1's Δs do not \
         include this cost (the control, the floor and nftables pay it too); table 1p counts \
         the tripwire's own run time for egress. A TCP connect+close makes four system calls \
         of its own (socket, setsockopt, connect, close) and its listener about three, each \
         paying the getppid row's Δ; a sendto makes one. Costlier operations are not timed \
         here: not alternated, a UDP sendto drifted by 0.3-0.5 µs whatever ran.",
        if armed.is_empty() {
            "none (the family guard runs here)".to_owned()
        } else {
            armed.join(", ")
        },
        match others {
            0 => "No other program was on `sys_enter` before they started.".to_owned(),
            n => format!(
                "**{n} program(s) of others were already on `sys_enter` before the agents \
                 started**: the slow path was on in every column."
            ),
        }
    ));
    t
}
