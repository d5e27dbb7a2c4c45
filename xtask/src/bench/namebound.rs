//! Name binding's cost (issues 13 and 14): a TLS connection setup (connect, a ClientHello as
//! its first flight, close) to a destination only a name-checking host rule admits, against
//! the same setup to a destination a `name_check: false` host rule admits, on the same
//! enforced side; and bulk throughput of an established connection of each kind. Both
//! destinations are the DNS-derived address of part 1, on ports of their own.

use std::path::Path;

use anyhow::Result;

use super::{
    Ctx,
    connect::DNS_DST,
    progs::{Side, measure_commands},
    progstats::{attached, attached_to_machine, attached_to_map},
    report::{Report, Table},
    sandbox::Worker,
    stats::{Summary, abba_commands, us},
};

/// The name the host rules permit (both rules: the name-bound one judges it).
pub const NAME: &str = "bench.example.com";
/// A TLS setup to a name-bound port (a listener that accepts and closes).
pub const NAMED_TLS: u16 = 8443;
/// The same to a port of a `name_check: false` host rule.
pub const PLAIN_TLS: u16 = 8444;
/// Bulk transfer to a name-bound port (a sink that reads).
pub const NAMED_BULK: u16 = 8445;
/// The same to a `name_check: false` port.
pub const PLAIN_BULK: u16 = 8446;
const TLS_BATCH: u32 = 2000;
const BULK_MIB: u32 = 128;

/// The allowlist rules of the name-bound and the unbound destinations.
pub fn rules() -> String {
    format!(
        "  - host: {NAME}\n    ports: [{NAMED_TLS}, {NAMED_BULK}]\n  \
         - host: plain.{NAME}\n    ports: [{PLAIN_TLS}, {PLAIN_BULK}]\n    name_check: false\n"
    )
}

/// Measures and reports; `cgroup` and `pins` are the enforced side's.
pub fn run(
    worker: &mut Worker,
    cgroup: &Path,
    pins: &Path,
    ctx: &Ctx,
    report: &mut Report,
) -> Result<()> {
    let tls = |port: u16| format!("tls {DNS_DST}:{port} {TLS_BATCH} {NAME}");
    let bulk = |port: u16| format!("bulk {DNS_DST}:{port} {BULK_MIB} {NAME}");
    let flight = attached_to_map(&pins.join("maps").join("BOUND"))?;
    if flight.is_empty() {
        // The agent warns and runs without name binding when its programs do not load: every
        // figure of this run would then be of egress without it.
        anyhow::bail!(
            "name binding does not run in the enforced agent (no sk_msg program on its BOUND \
             map): see its warning in the bench's agent log"
        );
    }
    drop(flight);
    let progs = || -> Result<_> {
        let mut p = attached(cgroup)?;
        p.extend(attached_to_map(&pins.join("maps").join("BOUND"))?);
        p.extend(attached_to_machine(pins)?);
        Ok(p)
    };
    let (setup_named, setup_plain) = {
        let mut side = Side {
            worker: &mut *worker,
            progs: progs()?,
        };
        measure_commands(&mut side, &tls(NAMED_TLS), &tls(PLAIN_TLS), ctx.prog_reps)?
    };
    let (bulk_named, bulk_plain) = {
        let mut side = Side {
            worker: &mut *worker,
            progs: progs()?,
        };
        measure_commands(&mut side, &bulk(NAMED_BULK), &bulk(PLAIN_BULK), ctx.reps)?
    };
    let setup_cpu = Summary::of(
        &abba_commands(worker, &tls(NAMED_TLS), &tls(PLAIN_TLS), &["ns"], ctx.reps)?[0],
    );
    let b = abba_commands(
        worker,
        &bulk(NAMED_BULK),
        &bulk(PLAIN_BULK),
        &["ns", "mbps"],
        ctx.reps,
    )?;
    let (bulk_cpu, bulk_rate) = (Summary::of(&b[0]), Summary::of(&b[1]));

    let mut t = Table::new(
        &format!(
            "1n. Name binding: TLS connection setup and bulk transfer, name-bound vs \
             `name_check: false` (same destination and agent; kernel BPF statistics, median \
             over {} ABBA repetitions; thread CPU, median over {})",
            ctx.prog_reps, ctx.reps
        ),
        &[
            "operation",
            "programs, name-bound: ns/run × runs/op",
            "ns/op",
            "programs, name_check: false: ns/run × runs/op",
            "ns/op",
            "programs Δ ns/op",
            "thread CPU per op: name-bound / unbound / Δ (IQR)",
        ],
    );
    let setup_delta = setup_named.total_ns_op - setup_plain.total_ns_op;
    t.row(vec![
        format!("TLS setup: connect, {NAME} ClientHello (512 bytes), close"),
        setup_named.list(),
        format!("{:.0}", setup_named.total_ns_op),
        setup_plain.list(),
        format!("{:.0}", setup_plain.total_ns_op),
        format!("{setup_delta:.0}"),
        format!(
            "{} / {} / {} ({}) µs",
            us(setup_cpu.a),
            us(setup_cpu.b),
            us(setup_cpu.diff),
            us(setup_cpu.iqr)
        ),
    ]);
    t.row(vec![
        "bulk: 64 KiB writes after the first flight, per MiB".into(),
        bulk_named.list(),
        format!("{:.0}", bulk_named.total_ns_op),
        bulk_plain.list(),
        format!("{:.0}", bulk_plain.total_ns_op),
        format!("{:.0}", bulk_named.total_ns_op - bulk_plain.total_ns_op),
        format!(
            "{} / {} / {} ({}) µs per MiB; {:.0} / {:.0} MiB/s",
            us(bulk_cpu.a),
            us(bulk_cpu.b),
            us(bulk_cpu.diff),
            us(bulk_cpu.iqr),
            bulk_rate.a,
            bulk_rate.b
        ),
    ]);
    t.note(format!(
        "Name-bound: `host: {NAME}` (name_check on, the default) on ports {NAMED_TLS} and \
         {NAMED_BULK}; unbound: a `name_check: false` host rule on ports {PLAIN_TLS} and \
         {PLAIN_BULK}; both on the DNS-derived address {DNS_DST} (its entry written as the \
         resolver writes one, the name-bound ports marked so). Each connection sends the same \
         ClientHello (server name {NAME}); on the name-bound port `first_flight` (sk_msg on the \
         BOUND sockhash) parses and passes it, `sock_ops` put the socket in BOUND at the end of \
         the handshake and takes it out at the ACK of the flight. Programs: every program on \
         the enforced cgroup (sock_ops included) and the sk_msg program on BOUND. The bulk \
         batch ({BULK_MIB} MiB) starts 20 ms after the ClientHello, once the socket has left \
         the judged path."
    ));
    report.tables.push(t);

    report.goal(
        "a name-bound TLS connection setup adds ≤ 2 µs of CPU over `name_check: false`",
        format!(
            "programs: {setup_delta:.0} ns per setup ({:.0} vs {:.0} ns/op); thread CPU: Δ {} \
             µs (IQR {})",
            setup_named.total_ns_op,
            setup_plain.total_ns_op,
            us(setup_cpu.diff),
            us(setup_cpu.iqr)
        ),
        Some(setup_delta <= 2000.0 && setup_cpu.diff <= 2000.0),
        "kernel BPF statistics of every program that ran (connect4, sock_ops, first_flight, \
         the backstop, ...), and the sender's thread CPU, ABBA on the same worker (table 1n); \
         the thread CPU Δ of a connection setup (tens of µs each) carries this machine's noise"
            .into(),
    );
    let rate = bulk_rate.a / bulk_rate.b.max(1.0);
    let cpu = bulk_cpu.a / bulk_cpu.b.max(1.0);
    report.goal(
        "bulk throughput of an established name-bound connection within 3 % of unbound",
        format!(
            "{:.0} vs {:.0} MiB/s = {:.3}×; thread CPU per MiB {:.3}×; backstop and other \
             programs {:.0} vs {:.0} ns per MiB",
            bulk_rate.a, bulk_rate.b, rate, cpu, bulk_named.total_ns_op, bulk_plain.total_ns_op
        ),
        Some(rate >= 0.97 && cpu <= 1.03),
        "median over ABBA repetitions of MiB/s (wall clock) and thread CPU per MiB of 64 KiB \
         writes over loopback in the worker's netns (table 1n)"
            .into(),
    );
    Ok(())
}
