//! `cargo xtask e2e`: the Kubernetes sidecar of deploy/kubernetes/pod.yaml, run by a real
//! container runtime (podman + runc from Debian packages) the way the kubelet would run it,
//! and checked from outside. Each check prints `PASS name` or `FAIL name: why`; the last line
//! is `e2e: N passed, M failed`. deploy/README.md lists every difference from a kubelet.
//!
//! Everything it creates is its own and removed at the end, on failure and after Ctrl-C too:
//! a private podman configuration and image store (`podman.rs`), the cgroup
//! `<cgroup mount>/egress-e2e-<pid>` (in every hierarchy podman touched), the network
//! namespace `egress-e2e-<pid>` (the fake world), the pods' pins. The machine's own network
//! namespace, firewall and podman configuration are never touched.

mod images;
mod manifest;
mod pod;
mod podman;

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    manifest::PodSpec,
    pod::{Pod, Site, World},
    podman::Podman,
};
use crate::{cmd::Cmd, deps, interrupt};

/// Debian packages the e2e adds to `cargo xtask deps`' (runc, not crun: crun refuses hybrid
/// cgroup hosts; conmon monitors the containers; busybox-static goes into the images).
const APT_PACKAGES: &[&str] = &["podman", "runc", "conmon", "busybox-static", "python3"];
/// The manifest the e2e runs.
const POD_YAML: &str = "deploy/kubernetes/pod.yaml";
/// The app is held back until enforcement is attached (podman has no native sidecar
/// ordering): this wrapper is its entrypoint. It asks the sidecar's `/readyz` on the pod's
/// loopback; it goes on when that answers 200 (the allowlist allows the health port), or
/// when the connection is refused with EPERM: only the pod's programs refuse a connect so,
/// which proves them attached (the resolver follows within milliseconds). Anything else
/// (connection refused, a 503, a timeout) waits. `EGRESS_WAIT_SECONDS` bounds the wait;
/// past it the app exits 75 without running its command.
pub const WAIT_READY: &str = "n=0; \
    while :; do \
      out=$(timeout 3 wget -q -O /dev/null \"http://127.0.0.1:${EGRESS_HEALTH_PORT}/readyz\" 2>&1) && break; \
      case \"$out\" in *'Operation not permitted'*) break;; esac; \
      n=$((n+1)); \
      if [ \"$n\" -ge \"${EGRESS_WAIT_SECONDS:-60}\" ]; then \
        echo \"egress sidecar not ready after ${n}s: the app does not start\" >&2; exit 75; \
      fi; \
      sleep 1; \
    done; \
    exec \"$@\"";

/// The allowlist the pod's ConfigMap carries in the e2e (the shipped one names real hosts).
const ALLOWLIST: &str = concat!(
    "version: 1\nname: e2e\nmode: enforce\ndns:\n  upstream: system\nallow:\n",
    "  - host: allowed.test\n    ports: [80]\n    protocol: tcp\n",
    "  - cidr: 198.51.100.10/32\n    ports: [80]\n    protocol: tcp\n",
    "  - cidr: 2001:db8::10/128\n    ports: [80]\n    protocol: tcp\n",
);

/// Runs the e2e; an error if any check failed.
pub fn run() -> Result<()> {
    crate::require_root(
        "cargo xtask e2e needs root (it installs podman, runs pods, creates a cgroup and a \
         network namespace): run it with sudo",
    )?;
    deps::install()?;
    deps::apt(APT_PACKAGES)?;
    Cmd::cargo()
        .args(["build", "--release", "-p", "egress-agent", "--bins"])
        .run()?;
    let agent = fs::canonicalize(crate::target_dir().join("release").join("egress-agent"))?;
    let spec = manifest::read(Path::new(POD_YAML))?;
    interrupt::catch()?;

    let mut env = Env::new()?;
    let mut report = Report::default();
    println!("e2e: {}", versions());
    let started = Instant::now();
    images::build(&env.podman, &env.dir, &agent)?;
    println!(
        "e2e: images built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = main_pod(&mut env, &spec, &mut report) {
        report.fail("main-pod", &format!("{e:#}"));
    }
    interrupt::check()?;
    if let Err(e) = failing_sidecar(&mut env, &spec, &mut report) {
        report.fail("failing-sidecar-pod", &format!("{e:#}"));
    }
    drop(env);
    report.finish()
}

/// The pod as shipped: every enforcement check.
fn main_pod(env: &mut Env, spec: &PodSpec, report: &mut Report) -> Result<()> {
    let world = World::create(&env.prefix, &env.dir)?;
    let pod = env.pod("main", spec)?;
    let site = env.site("main", spec)?;
    let health = health_port(&spec.sidecar)?;
    pod.run(
        &env.podman,
        spec,
        &spec.sidecar,
        &site,
        images::AGENT_IMAGE,
        None,
        &[],
    )?;
    // The app right after, as `podman kube play` would: only the wrapper holds it back.
    let app_cmd = app_command(&["probe", "first"]);
    let app_env = vec![format!("--env=EGRESS_HEALTH_PORT={health}")];
    pod.run(
        &env.podman,
        spec,
        &spec.app,
        &site,
        images::APP_IMAGE,
        Some(&app_cmd),
        &app_env,
    )?;

    let started = Instant::now();
    let ready = poll(Duration::from_secs(60), Duration::from_secs(1), || {
        matches!(pod.http_get(health, "/readyz"), Ok((200, _)))
    });
    report.check(
        "sidecar-ready",
        if ready {
            Ok(format!(
                "/readyz 200 after {:.1} s",
                started.elapsed().as_secs_f64()
            ))
        } else {
            Err(format!(
                "/readyz not 200 within 60 s; sidecar log:\n{}",
                env.podman.logs("egress")
            ))
        },
    );
    if !ready {
        bail!("the sidecar never became ready");
    }
    pod.connect(&world)?;
    let podman = &env.podman;
    let app = spec.app.name.as_str();
    let exec = |args: &[&str]| -> String {
        let mut a = vec!["exec", app, "probe"];
        a.extend_from_slice(args);
        podman.run(&a).unwrap_or_else(|e| format!("{e:#}"))
    };

    // The app's first instruction is judged: its log's first line.
    let mut first = String::new();
    poll(Duration::from_secs(30), Duration::from_millis(200), || {
        first = podman.logs(app);
        first.contains("first ")
    });
    report.expect(
        "app-first-instruction-enforced",
        &first,
        "first errno EPERM",
    );

    report.expect(
        "allowed-address",
        &exec(&["connect", "198.51.100.10", "80"]),
        "ok HTTP/1.0 200",
    );
    let denied = exec(&["connect", "198.51.100.20", "80"]);
    let log = poll_log(
        podman,
        "egress",
        r#""event":"deny""#,
        r#""dst":"198.51.100.20""#,
    );
    report.check(
        "denied-address-eperm-and-event",
        if denied == "errno EPERM" && log {
            Ok("EPERM, deny event in the sidecar's log".into())
        } else {
            Err(format!("connect said {denied:?}; deny event in log: {log}"))
        },
    );
    report.expect(
        "allowed-name",
        &exec(&["resolve", "allowed.test"]),
        "rcode NOERROR 198.51.100.10",
    );
    report.expect(
        "allowed-name-connect",
        &exec(&["fetch", "allowed.test", "80"]),
        "ok HTTP/1.0 200",
    );
    let refused = exec(&["resolve", "denied.test"]);
    let log = poll_log(podman, "egress", r#""event":"dns-refused""#, "denied.test");
    report.check(
        "denied-name-refused",
        if refused == "rcode REFUSED" && log {
            Ok("REFUSED, dns-refused event".into())
        } else {
            Err(format!(
                "resolve said {refused:?}; dns-refused event in log: {log}"
            ))
        },
    );
    let readyz = pod.http_get(health, "/readyz");
    let metrics = pod.http_get(health, "/metrics");
    report.check(
        "readyz-and-metrics",
        match (&readyz, &metrics) {
            (Ok((200, _)), Ok((200, m))) if m.contains("egress_denied_total") => {
                Ok("/readyz 200, /metrics has egress_denied_total".into())
            }
            _ => Err(format!(
                "/readyz {readyz:?}, /metrics {:?}",
                metrics.as_ref().map(|m| m.0)
            )),
        },
    );
    report.check(
        "sidecar-capabilities",
        sidecar_caps(podman, &spec.sidecar.cap_add),
    );
    report.expect("app-no-packet-socket", &exec(&["packet"]), "errno EPERM");

    // IPv6: the kernel's neighbour discovery from the pod's namespace (router solicitation,
    // neighbour solicitation for the peer) after enforcement was attached.
    thread::sleep(Duration::from_secs(2));
    let v6 = exec(&["connect", pod::WORLD_V6, "80"]);
    let logs = podman.logs("egress");
    let nd_denied: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(r#""event":"deny""#) && (l.contains("ff02:") || l.contains("fe80:")))
        .collect();
    report.check(
        "ipv6-neighbour-discovery",
        if v6.starts_with("ok ") && nd_denied.is_empty() {
            Ok(format!(
                "[{}]:80 {v6}; no deny of link-local traffic",
                pod::WORLD_V6
            ))
        } else {
            Err(format!(
                "[{}]:80 said {v6:?}; denies: {nd_denied:?}",
                pod::WORLD_V6
            ))
        },
    );

    // kill -9: the pinned programs keep the pod closed; the restarted sidecar adopts them.
    podman.run(&["kill", "--signal", "KILL", "egress"])?;
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        podman
            .run(&["inspect", "--format", "{{.State.Running}}", "egress"])
            .is_ok_and(|s| s == "false")
    });
    let down_denied = exec(&["connect", "198.51.100.20", "80"]);
    let down_allowed = exec(&["connect", "198.51.100.10", "80"]);
    podman.run(&["start", "egress"])?;
    let back = poll(Duration::from_secs(60), Duration::from_secs(1), || {
        matches!(pod.http_get(health, "/readyz"), Ok((200, _)))
    });
    let adopted = podman.logs("egress").contains("adopted the pinned state");
    report.check("kill-9-keeps-denying-and-restart-adopts", if down_denied == "errno EPERM"
        && down_allowed.starts_with("ok ")
        && back
        && adopted
    {
        Ok("while down: .20 EPERM, .10 ok; restarted, ready, adopted the pins".into())
    } else {
        Err(format!(
            "while down: .20 {down_denied:?}, .10 {down_allowed:?}; ready again: {back}; adopted: {adopted}"
        ))
    });

    // The ConfigMap volume, updated as the kubelet does: a new timestamped directory, then
    // an atomic swap of the `..data` symlink.
    let reloaded = count(&podman.logs("egress"), r#""event":"policy-reloaded""#);
    let allow_20 =
        format!("{ALLOWLIST}  - cidr: 198.51.100.20/32\n    ports: [80]\n    protocol: tcp\n");
    configmap_swap(&site.configmap, "..2_swap", &allow_20)?;
    let applied = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        count(&podman.logs("egress"), r#""event":"policy-reloaded""#) > reloaded
    });
    report.expect_if(
        "configmap-swap-applied",
        applied,
        &exec(&["connect", "198.51.100.20", "80"]),
        "ok HTTP/1.0 200",
    );
    let rejected = count(&podman.logs("egress"), r#""event":"policy-rejected""#);
    configmap_swap(
        &site.configmap,
        "..3_invalid",
        "version: 1\nallow:\n  - host: [\n",
    )?;
    let seen = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        count(&podman.logs("egress"), r#""event":"policy-rejected""#) > rejected
    });
    report.expect_if(
        "configmap-invalid-rejected",
        seen,
        &exec(&["connect", "198.51.100.20", "80"]),
        "ok HTTP/1.0 200",
    );

    // The app's shipped seccomp profile refuses packet sockets also to root with
    // CAP_NET_RAW (the check below shows such a container opens one without it).
    let app_profile = match &spec.app.seccomp {
        Some(manifest::Seccomp::Localhost(p)) => {
            site.seccomp_dir.join(p.trim_start_matches("profiles/"))
        }
        other => {
            bail!("the app container's seccompProfile is {other:?}, not the shipped Localhost one")
        }
    };
    let under_profile = |probe: &str| {
        podman
            .run(&[
                "run",
                "--rm",
                "--pull=never",
                "--pod",
                &pod.name,
                "--user=0",
                "--cap-drop=ALL",
                "--cap-add=NET_RAW",
                "--read-only",
                &format!("--security-opt=seccomp={}", app_profile.display()),
                "--entrypoint",
                "/usr/local/bin/probe",
                images::APP_IMAGE,
                probe,
            ])
            .unwrap_or_else(|e| format!("{e:#}"))
    };
    report.expect(
        "app-profile-refuses-packet-socket-with-net-raw",
        &under_profile("packet"),
        "errno EPERM",
    );
    // AF_VSOCK needs no capability; ENOSYS is the profile's default action (a kernel
    // without vsock would say EAFNOSUPPORT).
    report.expect(
        "app-profile-refuses-vsock",
        &under_profile("vsock"),
        "errno ENOSYS",
    );

    // A container of the pod without the app's profile, with CAP_NET_RAW (what container
    // runtimes grant by default), asks for a packet socket to send a frame. Where the family
    // guard cannot load (this machine kind), the packet-socket tripwire kills it (137) before
    // the socket exists, and the sidecar logs a deny with hook `tripwire`; where the guard
    // loads, socket() fails with EPERM and the deny's hook is `socket_create`.
    let family_denies = |logs: &str| {
        logs.lines()
            .filter(|l| l.contains(r#""reason":"family""#) && l.contains(r#""proto":"af_packet""#))
            .count()
    };
    let before = family_denies(&podman.logs("egress"));
    let sent = podman.run(&[
        "run",
        "--rm",
        "--pull=never",
        "--pod",
        &pod.name,
        "--user=0",
        "--cap-drop=ALL",
        "--cap-add=NET_RAW",
        "--read-only",
        "--entrypoint",
        "/usr/local/bin/probe",
        images::APP_IMAGE,
        "packet-send",
        "eth0",
    ]);
    let logged = poll(Duration::from_secs(10), Duration::from_millis(250), || {
        family_denies(&podman.logs("egress")) > before
    });
    let deny = podman
        .logs("egress")
        .lines()
        .rev()
        .find(|l| l.contains(r#""reason":"family""#) && l.contains(r#""proto":"af_packet""#))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let outcome = match &sent {
        Ok(out) => out.trim().to_owned(),
        Err(e) if format!("{e:#}").contains("exit status: 137") => "killed (137)".to_owned(),
        Err(e) => format!("{e:#}"),
    };
    let stopped = outcome == "killed (137)" || outcome.starts_with("errno EPERM");
    report.check(
        "packet-socket-tripped",
        if stopped && logged {
            Ok(format!(
                "{}; {deny}",
                outcome.lines().last().unwrap_or_default()
            ))
        } else {
            Err(format!("probe: {outcome}; deny logged: {logged}"))
        },
    );

    // Deleting the pod: the kubelet stops the containers (SIGTERM), then removes the cgroup.
    // The sidecar leaves its pins on purpose (a restart adopts them); the kernel detaches
    // the programs from the removed cgroup, and the next sidecar on the node removes the
    // pins of such instances (bpf/stale.rs).
    let pins = site.bpffs.join("egress").join(pod.instance());
    let progs = pinned_programs(&pins);
    podman.run(&["pod", "rm", "--force", "--time", "10", &pod.name])?;
    // The kubelet removes the pod's cgroup once its containers are gone; podman leaves a
    // pod's --cgroup-parent in place.
    for mount in cgroup_mounts() {
        remove_tree(&mount.join(&pod.cgroup));
    }
    let cgroup_gone = !env.cgroup_v2.join(&pod.cgroup).exists();
    let left_after_delete = pins.exists();
    let next = env.pod("next", spec)?;
    let next_site = env.site("next", spec)?;
    let mut sidecar = manifest_clone(&spec.sidecar);
    sidecar.name = "egress-next".into();
    next.run(
        &env.podman,
        spec,
        &sidecar,
        &next_site,
        images::AGENT_IMAGE,
        None,
        &[],
    )?;
    let next_ready = poll(Duration::from_secs(60), Duration::from_secs(1), || {
        matches!(next.http_get(health, "/readyz"), Ok((200, _)))
    });
    let progs_left: Vec<&u32> = progs.iter().filter(|id| program_exists(**id)).collect();
    report.check(
        "pod-deletion-leaves-nothing",
        if !progs.is_empty() && cgroup_gone && next_ready && !pins.exists() && progs_left.is_empty()
        {
            Ok(format!(
                "cgroup removed; pins {} after deletion, removed by the next pod's sidecar; \
             programs {progs:?} unloaded",
                if left_after_delete { "kept" } else { "gone" }
            ))
        } else {
            Err(format!(
                "programs while running {progs:?}; cgroup removed: {cgroup_gone}; next sidecar \
             ready: {next_ready}; pins left: {}; programs left: {progs_left:?}",
                pins.exists()
            ))
        },
    );
    env.podman
        .run(&["pod", "rm", "--force", "--time", "0", &next.name])?;
    drop(world);
    Ok(())
}

/// The sidecar cannot start (here: the runtime's default seccomp profile, which refuses
/// `bpf()` without CAP_SYS_ADMIN): the app must never run, and the error must say why.
fn failing_sidecar(env: &mut Env, spec: &PodSpec, report: &mut Report) -> Result<()> {
    let pod = env.pod("fail", spec)?;
    let site = env.site("fail", spec)?;
    let health = health_port(&spec.sidecar)?;
    let mut sidecar = manifest_clone(&spec.sidecar);
    sidecar.seccomp = Some(manifest::Seccomp::RuntimeDefault);
    sidecar.name = "egress-fail".into();
    pod.run(
        &env.podman,
        spec,
        &sidecar,
        &site,
        images::AGENT_IMAGE,
        None,
        &[],
    )?;
    let mut app = manifest_clone(&spec.app);
    app.name = "app-fail".into();
    let app_cmd = app_command(&["probe", "first"]);
    let app_env = vec![
        format!("--env=EGRESS_HEALTH_PORT={health}"),
        "--env=EGRESS_WAIT_SECONDS=5".into(),
    ];
    pod.run(
        &env.podman,
        spec,
        &app,
        &site,
        images::APP_IMAGE,
        Some(&app_cmd),
        &app_env,
    )?;
    let podman = &env.podman;
    let exited = poll(Duration::from_secs(30), Duration::from_millis(250), || {
        podman
            .run(&["inspect", "--format", "{{.State.Running}}", "app-fail"])
            .is_ok_and(|s| s == "false")
    });
    let code = podman
        .run(&["inspect", "--format", "{{.State.ExitCode}}", "app-fail"])
        .unwrap_or_default();
    let app_log = podman.logs("app-fail");
    report.check(
        "app-held-when-sidecar-fails",
        if exited && code == "75" && !app_log.contains("first ") {
            Ok("the wrapper exited 75; the app's command never ran".into())
        } else {
            Err(format!("exited: {exited}, code {code:?}, log: {app_log}"))
        },
    );
    let log = podman.logs("egress-fail");
    report.check(
        "seccomp-error-named",
        if log.contains("seccomp") {
            Ok(log
                .lines()
                .find(|l| l.contains("seccomp"))
                .unwrap_or_default()
                .trim()
                .to_owned())
        } else {
            Err(format!("the sidecar's log does not name seccomp:\n{log}"))
        },
    );
    podman.run(&["pod", "rm", "--force", "--time", "0", &pod.name])?;
    Ok(())
}

fn manifest_clone(c: &manifest::Container) -> manifest::Container {
    manifest::Container {
        name: c.name.clone(),
        command: c.command.clone(),
        args: c.args.clone(),
        env: c.env.clone(),
        run_as_user: c.run_as_user,
        run_as_group: c.run_as_group,
        read_only_root: c.read_only_root,
        no_new_privs: c.no_new_privs,
        privileged: c.privileged,
        cap_drop: c.cap_drop.clone(),
        cap_add: c.cap_add.clone(),
        seccomp: c.seccomp.clone(),
        mounts: c.mounts.clone(),
        memory_limit: c.memory_limit.clone(),
    }
}

/// The ids of the programs behind the links pinned under the instance directory `pins`.
fn pinned_programs(pins: &Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for link in fs::read_dir(pins.join("links"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let out = Cmd::new("bpftool")
            .args(["--json", "link", "show", "pinned"])
            .arg(link.path())
            .output();
        if let Ok(o) = out {
            let text = String::from_utf8_lossy(&o.stdout);
            if let Some(id) = text
                .split("\"prog_id\":")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
            {
                ids.push(id);
            }
        }
    }
    ids
}

/// Whether the kernel still has the program `id` loaded.
fn program_exists(id: u32) -> bool {
    Cmd::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The app's command behind the wait wrapper.
fn app_command(cmd: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        WAIT_READY.into(),
        "egress-wait".into(),
    ];
    v.extend(cmd.iter().map(|s| (*s).to_owned()));
    v
}

/// The port of the sidecar's `--health=ADDR:PORT`.
fn health_port(c: &manifest::Container) -> Result<u16> {
    c.args
        .iter()
        .find_map(|a| a.strip_prefix("--health="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .context("the sidecar has no --health=ADDR:PORT")
}

/// The sidecar's process holds exactly the capabilities the manifest adds (effective,
/// permitted and bounding sets), read from the host's /proc.
fn sidecar_caps(podman: &Podman, add: &[String]) -> Result<String, String> {
    let pid = podman
        .run(&["inspect", "--format", "{{.State.Pid}}", "egress"])
        .map_err(|e| format!("{e:#}"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let want = add.iter().try_fold(0u64, |m, c| {
        cap_bit(c)
            .map(|b| m | (1 << b))
            .ok_or_else(|| format!("unknown capability {c}"))
    })?;
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let have = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?;
        if have != want {
            return Err(format!("{field} {have:#x}, the manifest grants {want:#x}"));
        }
    }
    Ok(format!("CapEff = CapPrm = CapBnd = {}", add.join(", ")))
}

fn cap_bit(name: &str) -> Option<u32> {
    Some(match name.trim_start_matches("CAP_") {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        _ => return None,
    })
}

/// Writes `text` as `allowlist.yaml` into a new directory `name` of the ConfigMap volume
/// and swaps `..data` to it atomically (a symlink renamed over the old one).
fn configmap_swap(dir: &Path, name: &str, text: &str) -> Result<()> {
    let d = dir.join(name);
    fs::create_dir(&d)?;
    fs::write(d.join("allowlist.yaml"), text)?;
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(name, &tmp)?;
    fs::rename(&tmp, dir.join("..data")).context("cannot swap ..data")
}

/// Whether the log of `container` gets a line with both `a` and `b` within 5 s.
fn poll_log(podman: &Podman, container: &str, a: &str, b: &str) -> bool {
    poll(Duration::from_secs(5), Duration::from_millis(200), || {
        podman
            .logs(container)
            .lines()
            .any(|l| l.contains(a) && l.contains(b))
    })
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Calls `f` every `every` until it returns true or `limit` has passed.
fn poll(limit: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() >= limit || interrupt::check().is_err() {
            return false;
        }
        thread::sleep(every);
    }
}

/// The versions the e2e ran with.
fn versions() -> String {
    let v = |cmd: &str, arg: &str| {
        Cmd::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_else(|| format!("{cmd}: not found"))
    };
    format!(
        "{}, {}, kernel {}",
        v("podman", "--version"),
        v("runc", "--version"),
        v("uname", "-r")
    )
}

/// Results of the named checks.
#[derive(Debug, Default)]
struct Report {
    passed: usize,
    failed: Vec<String>,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => {
                self.passed += 1;
                println!("PASS {name}: {detail}");
            }
            Err(why) => self.fail(name, &why),
        }
    }

    fn fail(&mut self, name: &str, why: &str) {
        println!("FAIL {name}: {why}");
        self.failed.push(name.to_owned());
    }

    /// Passes when `got` starts with `want`.
    fn expect(&mut self, name: &str, got: &str, want: &str) {
        self.expect_if(name, true, got, want);
    }

    /// Passes when `precondition` holds and `got` starts with `want`.
    fn expect_if(&mut self, name: &str, precondition: bool, got: &str, want: &str) {
        let got = got.trim();
        let line = got.lines().find(|l| l.starts_with(want)).unwrap_or(got);
        self.check(
            name,
            if precondition && line.starts_with(want) {
                Ok(line.to_owned())
            } else {
                Err(format!(
                    "expected {want:?}, got {got:?} (precondition: {precondition})"
                ))
            },
        );
    }

    fn finish(self) -> Result<()> {
        println!("e2e: {} passed, {} failed", self.passed, self.failed.len());
        if self.failed.is_empty() {
            Ok(())
        } else {
            bail!("e2e failed: {}", self.failed.join(", "))
        }
    }
}

/// What the e2e created; dropping it removes everything, pods first.
#[derive(Debug)]
struct Env {
    /// `egress-e2e-<pid>`.
    prefix: String,
    /// Private directory (mode 0700) under the system's temporary directory.
    dir: PathBuf,
    podman: Podman,
    cgroup_v2: PathBuf,
}

impl Env {
    fn new() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let prefix = format!("egress-e2e-{}", process::id());
        let dir = std::env::temp_dir().join(&prefix);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let podman_dir = dir.join("podman");
        fs::create_dir(&podman_dir)?;
        let podman = Podman::setup(&podman_dir, images::PAUSE_IMAGE)?;
        let cgroup_v2 = cgroup2_mount()?;
        let env = Self {
            prefix,
            dir,
            podman,
            cgroup_v2,
        };
        fs::create_dir(env.cgroup_v2.join(&env.prefix))
            .with_context(|| format!("cannot create the cgroup {}", env.prefix))?;
        // A bpffs instance of our own stands for the node's /sys/fs/bpf: every mount of the
        // bpf filesystem is a fresh, empty one, so the pods' pins never mix with the machine's
        // and unmounting it releases whatever is left.
        let bpffs = env.dir.join("bpffs");
        fs::create_dir(&bpffs)?;
        Cmd::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
            .arg(&bpffs)
            .run_captured()?;
        Ok(env)
    }

    fn pod(&self, name: &str, spec: &PodSpec) -> Result<Pod> {
        Pod::create(&self.podman, name, spec, &self.prefix)
    }

    /// The volumes and files of pod `name`: a fresh ConfigMap directory with the e2e's
    /// allowlist, the resolv.conf the kubelet would write.
    fn site(&self, name: &str, spec: &PodSpec) -> Result<Site> {
        let base = self.dir.join("pods").join(name);
        let configmap = base.join("configmap");
        fs::create_dir_all(&configmap)?;
        configmap_swap(&configmap, "..1_initial", ALLOWLIST)?;
        symlink("..data/allowlist.yaml", configmap.join("allowlist.yaml"))?;
        let resolv_conf = base.join("resolv.conf");
        let options = spec
            .ndots
            .as_ref()
            .map_or(String::new(), |n| format!("options ndots:{n}\n"));
        fs::write(&resolv_conf, format!("nameserver {}\n{options}", pod::DNS))?;
        Ok(Site {
            configmap,
            cgroup: self.cgroup_v2.join(&self.prefix),
            empty_dirs: base.join("volumes"),
            resolv_conf,
            seccomp_dir: fs::canonicalize("deploy/seccomp")?,
            bpffs: self.dir.join("bpffs"),
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.podman.destroy();
        // The pods' pins go with the private bpffs.
        let bpffs = self.dir.join("bpffs");
        if bpffs.exists() {
            let _ = Cmd::new("umount").arg(&bpffs).run_captured();
        }
        // The cgroup tree, in every hierarchy (podman's cgroupfs manager also makes it in
        // the v1 ones of a hybrid host), deepest first.
        for mount in cgroup_mounts() {
            remove_tree(&mount.join(&self.prefix));
        }
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: {} is left behind: {e}", self.dir.display());
        }
    }
}

/// Every cgroup (v1 and v2) mount point.
fn cgroup_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

fn cgroup2_mount() -> Result<PathBuf> {
    fs::read_to_string("/proc/self/mounts")?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 mount")
}

/// Removes the cgroup directory `dir` and its children, deepest first; never panics.
fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("warning: cgroup {} is left behind: {e}", dir.display());
    }
}
