//! `--trace-verdicts`: the real `egress-agent run` loads its programs with the `TRACE` global
//! on and writes each verdict of the kernel to its log (stderr); without the flag it writes
//! none. Build the agent first: `cargo build -p egress-agent`.

use std::time::Duration;

use egress_tests::{AgentRun, Outcome, TcpListener, TestNetns, probe_bin};

const ALLOW_8080: &str =
    "version: 1\nname: trace-test\nallow:\n  - ip: 127.0.0.1\n    ports: [8080]\n";

/// Runs a denied connect to 198.51.100.20:443, then an allowed one to 127.0.0.1:8080 (where
/// a listener waits), under `egress-agent run` with `args`; returns the run (exited) and the
/// two probes' outcomes.
fn denied_then_allowed(netns: &TestNetns, args: &[&str]) -> (AgentRun, Vec<Outcome>) {
    let probe = probe_bin();
    let probe = probe.to_str().expect("utf-8 path");
    let script =
        format!("{probe} tcp-connect 198.51.100.20:443; {probe} tcp-connect 127.0.0.1:8080");
    let mut run = args
        .iter()
        .fold(
            AgentRun::builder(netns, ALLOW_8080, &["sh", "-c", &script]),
            |b, a| b.arg(a),
        )
        .start();
    assert_eq!(run.exit_code(), 0, "the probes exit 0\n{}", run.output());
    let outcomes: Vec<Outcome> = run
        .stdout()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| Outcome::parse(l).unwrap_or_else(|e| panic!("{e}\n{}", run.output())))
        .collect();
    assert_eq!(outcomes.len(), 2, "two probe lines\n{}", run.output());
    assert!(
        outcomes[0].is_eperm(),
        "the unlisted address was not denied: {:?}\n{}",
        outcomes[0],
        run.output()
    );
    assert!(
        outcomes[1].ok,
        "the allowed connect failed: {:?}\n{}",
        outcomes[1],
        run.output()
    );
    (run, outcomes)
}

/// The agent's trace lines (stderr).
fn trace_lines(run: &AgentRun) -> Vec<String> {
    run.read("stderr")
        .lines()
        .filter(|l| l.contains("kernel verdict:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn trace_verdicts_names_each_verdict_and_its_destination() {
    let netns = TestNetns::new();
    let listener = TcpListener::bind(&netns, "127.0.0.1:8080");
    let (run, _) = denied_then_allowed(&netns, &["--trace-verdicts"]);
    let lines = trace_lines(&run);
    assert!(
        lines
            .iter()
            .any(|l| l
                .ends_with("kernel verdict: deny connect4 tcp 198.51.100.20:443 reason no-rule")),
        "no trace line names the denied destination: {lines:?}\n{}",
        run.output()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("kernel verdict: allow connect4 tcp 127.0.0.1:8080 reason -")),
        "no trace line names the allowed destination: {lines:?}\n{}",
        run.output()
    );
    // Tracing changes no verdict: the denied address got nothing (it is not even routed
    // here), the allowed one got the probe's payload, and the deny is still an event.
    assert!(
        listener.wait_received(1, Duration::from_secs(2)),
        "the listener got nothing"
    );
    assert_eq!(run.events_of("deny").len(), 1, "{}", run.output());
}

#[test]
fn without_the_flag_no_verdict_is_traced() {
    let netns = TestNetns::new();
    let _listener = TcpListener::bind(&netns, "127.0.0.1:8080");
    let (run, _) = denied_then_allowed(&netns, &[]);
    let lines = trace_lines(&run);
    assert!(
        lines.is_empty(),
        "trace lines without --trace-verdicts: {lines:?}"
    );
    // Not silent because nothing happened: the deny was judged and reported.
    let denies = run.events_of("deny");
    assert_eq!(denies.len(), 1, "{}", run.output());
    assert_eq!(denies[0]["dst"], "198.51.100.20");
}
