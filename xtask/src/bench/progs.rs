//! The reference floor (issue 14) and the per-program figures: egress's programs and the
//! floor's, timed by the kernel's BPF statistics over the same batches of operations.
//!
//! The floor is `egress-bench-floor` (a bench-only binary of egress-agent, built from the
//! project's eBPF pipeline): a `cgroup/connect4` and a `cgroup/sendmsg4` program doing one
//! hash lookup each, in the measured agent's own DNS-derived map (`ALLOW_DNS`, reused from its
//! pin), attached to a cgroup of its own. Sharing the map object makes the floor's lookup the
//! very lookup egress's verdict begins with: the same key, hash seed, bucket and chain (a map
//! of its own drew another seed, and a single destination's place in its chain then moved
//! either ratio by a third from one load to the next).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::ChildStdin,
};

use anyhow::{Context as _, Result, bail};

use super::{
    progstats::{Prog, Runs, StatsOn, attached, attached_to_machine},
    sandbox::{Sandbox, Worker},
    stats::median,
};

/// The floor's programs on the floor's cgroup, reloaded for each allowlist size.
pub struct Floor {
    pub cgroup: PathBuf,
    helper: Option<(u32, ChildStdin)>,
}

impl Floor {
    pub fn new(cgroup: PathBuf) -> Self {
        Self {
            cgroup,
            helper: None,
        }
    }

    /// (Re)loads the floor on the map pinned at `map_pin` (the measured agent's `ALLOW_DNS`,
    /// which holds every destination the bench connects to), its programs attached.
    pub fn load(&mut self, sb: &mut Sandbox, bin: &Path, map_pin: &Path) -> Result<()> {
        self.stop(sb);
        let mut cmd = std::process::Command::new(bin);
        cmd.arg(&self.cgroup).arg(map_pin);
        let (pid, stdin, stdout) = sb.spawn(cmd, "floor.log")?;
        self.helper = Some((pid, stdin));
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("egress-bench-floor")?;
        if line.trim() != "ready" {
            let log = fs::read_to_string(sb.dir.join("floor.log")).unwrap_or_default();
            bail!("egress-bench-floor did not start: {log}");
        }
        Ok(())
    }

    /// Detaches the floor (its helper ends and its links with it; the map is the agent's).
    pub fn stop(&mut self, sb: &mut Sandbox) {
        if let Some((pid, stdin)) = self.helper.take() {
            drop(stdin);
            sb.wait_pid(pid);
        }
    }
}

/// One program's figures: medians over repetitions.
#[derive(Debug, Clone)]
pub struct ProgFigure {
    pub hook: &'static str,
    pub ns_run: f64,
    pub runs_op: f64,
    /// ns/run in each repetition (A B B A order kept: the same index on both sides is the
    /// same repetition), for ratios taken within a repetition ([`paired`]).
    pub per_rep: Vec<f64>,
}

/// The median over repetitions of `f(a, b, empty)`, each taken within one repetition: `a` and
/// `b` ran in adjacent batches (A B B A), so whatever slowed the machine for a moment slowed
/// both, and the ratio of the two leaves it out where a ratio of two medians keeps it. `empty`
/// (a program that does nothing, on `b`'s side) is passed along for net ratios.
pub fn paired(
    a: &ProgFigure,
    b: &ProgFigure,
    empty: Option<&ProgFigure>,
    f: impl Fn(f64, f64, f64) -> f64,
) -> f64 {
    let per: Vec<f64> = a
        .per_rep
        .iter()
        .zip(&b.per_rep)
        .enumerate()
        .map(|(i, (&x, &y))| {
            f(
                x,
                y,
                empty.and_then(|e| e.per_rep.get(i)).map_or(0.0, |&e| e),
            )
        })
        .collect();
    median(&per)
}

/// `a` ÷ `b`, within each repetition ([`paired`]).
pub fn paired_ratio(a: &ProgFigure, b: &ProgFigure) -> f64 {
    paired(a, b, None, |x, y, _| x / y.max(1.0))
}

/// What one side's programs cost per operation.
#[derive(Debug, Clone, Default)]
pub struct SideFigures {
    pub progs: Vec<ProgFigure>,
    /// Median over repetitions of the sum of every program's ns per operation.
    pub total_ns_op: f64,
}

impl SideFigures {
    /// Each program as `hook ns/run×runs/op`, comma-separated.
    pub fn list(&self) -> String {
        self.progs
            .iter()
            .map(|p| format!("{} {:.0}×{:.2}", p.hook, p.ns_run, p.runs_op))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The figure of the program on `hook` (the first one that ran).
    pub fn on(&self, hook: &str) -> Option<&ProgFigure> {
        self.progs.iter().find(|p| p.hook == hook)
    }

    /// ns per operation of the program on `hook` alone (the floor's lookup, without its empty
    /// reference programs); the total when it did not run.
    pub fn ns_op_of(&self, hook: &str) -> f64 {
        self.on(hook)
            .map_or(self.total_ns_op, |p| p.ns_run * p.runs_op)
    }
}

/// One side: its worker and the programs attached to its cgroup.
pub struct Side<'a> {
    pub worker: &'a mut Worker,
    pub progs: Vec<Prog>,
}

impl<'a> Side<'a> {
    pub fn new(worker: &'a mut Worker, cgroup: &Path) -> Result<Self> {
        Ok(Self {
            worker,
            progs: attached(cgroup)?,
        })
    }

    /// The enforced side: the programs on its cgroup and those the agent pinned at `pins`
    /// attached to the whole machine (the tripwire, where it is armed).
    pub fn egress(worker: &'a mut Worker, cgroup: &Path, pins: &Path) -> Result<Self> {
        let mut progs = attached(cgroup)?;
        progs.extend(attached_to_machine(pins)?);
        Ok(Self { worker, progs })
    }

    fn snapshot(&self) -> Result<Vec<Runs>> {
        self.progs.iter().map(Prog::runs).collect()
    }

    /// One batch: (Δ per program, operations done).
    fn batch(&mut self, command: &str) -> Result<(Vec<Runs>, f64)> {
        let before = self.snapshot()?;
        let n = self.worker.ask(command)?.f("n");
        let after = self.snapshot()?;
        Ok((
            before
                .iter()
                .zip(&after)
                .map(|(b, a)| Runs {
                    ns: a.ns - b.ns,
                    cnt: a.cnt - b.cnt,
                })
                .collect(),
            n,
        ))
    }
}

/// Runs `command` as A B B A `reps` times with the statistics on (they are off again when
/// this returns), and returns the per-program figures of both sides.
pub fn measure(
    a: &mut Side<'_>,
    b: &mut Side<'_>,
    command: &str,
    reps: usize,
) -> Result<(SideFigures, SideFigures)> {
    let (ra, rb) = abba(reps, |first| match first {
        true => a.batch(command),
        false => b.batch(command),
    })?;
    Ok((figures(&a.progs, &ra), figures(&b.progs, &rb)))
}

/// Runs `cmd_a` and `cmd_b` on the same side as A B B A `reps` times with the statistics on,
/// and returns the per-program figures of each command (name binding's row: the same
/// programs, a name-bound destination against a `name_check: false` one).
pub fn measure_commands(
    side: &mut Side<'_>,
    cmd_a: &str,
    cmd_b: &str,
    reps: usize,
) -> Result<(SideFigures, SideFigures)> {
    let (ra, rb) = abba(reps, |first| side.batch(if first { cmd_a } else { cmd_b }))?;
    Ok((figures(&side.progs, &ra), figures(&side.progs, &rb)))
}

type Batch = (Vec<Runs>, f64);

/// One warm-up batch each, then A B B A `reps` times (`batch(true)` runs A) with the
/// statistics on; the summed A and B batches of each repetition.
fn abba(
    reps: usize,
    mut batch: impl FnMut(bool) -> Result<Batch>,
) -> Result<(Vec<Batch>, Vec<Batch>)> {
    let _stats = StatsOn::enable()?;
    batch(true)?;
    batch(false)?;
    let mut ra = Vec::with_capacity(reps);
    let mut rb = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a1 = batch(true)?;
        let b1 = batch(false)?;
        let b2 = batch(false)?;
        let a2 = batch(true)?;
        ra.push(sum(&a1, &a2));
        rb.push(sum(&b1, &b2));
    }
    Ok((ra, rb))
}

fn sum(x: &(Vec<Runs>, f64), y: &(Vec<Runs>, f64)) -> (Vec<Runs>, f64) {
    (
        x.0.iter()
            .zip(&y.0)
            .map(|(p, q)| Runs {
                ns: p.ns + q.ns,
                cnt: p.cnt + q.cnt,
            })
            .collect(),
        x.1 + y.1,
    )
}

fn figures(progs: &[Prog], reps: &[(Vec<Runs>, f64)]) -> SideFigures {
    let mut out = SideFigures::default();
    for (i, p) in progs.iter().enumerate() {
        let runs: Vec<(Runs, f64)> = reps.iter().map(|(r, n)| (r[i], *n)).collect();
        if runs.iter().all(|(r, _)| r.cnt == 0) {
            continue;
        }
        let per = |f: &dyn Fn(&Runs, f64) -> f64| {
            median(&runs.iter().map(|(r, n)| f(r, *n)).collect::<Vec<_>>())
        };
        let ns_run = |r: &Runs| r.ns as f64 / r.cnt.max(1) as f64;
        out.progs.push(ProgFigure {
            hook: p.hook,
            ns_run: per(&|r, _| ns_run(r)),
            runs_op: per(&|r, n| r.cnt as f64 / n.max(1.0)),
            per_rep: runs.iter().map(|(r, _)| ns_run(r)).collect(),
        });
    }
    out.total_ns_op = median(
        &reps
            .iter()
            .map(|(r, n)| r.iter().map(|x| x.ns as f64).sum::<f64>() / n.max(1.0))
            .collect::<Vec<_>>(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(per_rep: &[f64]) -> ProgFigure {
        ProgFigure {
            hook: "connect4",
            ns_run: median(per_rep),
            runs_op: 1.0,
            per_rep: per_rep.to_vec(),
        }
    }

    #[test]
    fn ratios_are_taken_within_each_repetition() {
        // The second repetition ran while the machine was slow for both sides.
        let (a, b) = (fig(&[120.0, 240.0, 130.0]), fig(&[100.0, 200.0, 100.0]));
        assert!((paired_ratio(&a, &b) - 1.2).abs() < 1e-9);
        // The ratio of the two medians keeps the slow repetition in egress's median.
        assert!((a.ns_run / b.ns_run - 1.3).abs() < 1e-9);
        // Net of an empty program, per repetition too: 60/40, 180/140, 70/40.
        let empty = fig(&[60.0, 60.0, 60.0]);
        let net = paired(&a, &b, Some(&empty), |x, y, z| (x - z) / (y - z));
        assert!((net - 1.5).abs() < 1e-9);
    }
}
