//! The reference floor of `cargo xtask bench`, never part of enforcement: loads the
//! `egress-floor` object (a `cgroup/connect4` and a `cgroup/sendmsg4` program doing one hash
//! lookup each, and an empty `cgroup/sock_create` and `cgroup_skb/egress`) with its map taken
//! from a pin (the bench passes the measured agent's own `ALLOW_DNS`: the floor then looks up
//! the same key in the same map object, with the same hash seed, bucket and chain, as egress's
//! first lookup), attaches all four to a cgroup the bench created, prints `ready`, and holds
//! the links until its stdin closes (or it is killed: the links go with its descriptors). The
//! pin is the agent's: it is left in place.
//!
//! Usage: `egress-bench-floor CGROUP MAP_PIN`.

use std::{
    fs,
    io::{self, BufRead as _, Write as _},
    path::Path,
    process::ExitCode,
};

use anyhow::{Context as _, anyhow};
use aya::{
    EbpfLoader, include_bytes_aligned,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr},
};

static FLOOR_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-floor"));

const PROGRAMS: [&str; 2] = ["floor_connect4", "floor_sendmsg4"];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "egress-bench-floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, pin] = args.as_slice() else {
        anyhow::bail!("usage: egress-bench-floor CGROUP MAP_PIN");
    };
    let pin = Path::new(pin);
    // Reused, never created: a missing pin would otherwise make the loader create a map there.
    if !pin.exists() {
        anyhow::bail!("no map pinned at {}", pin.display());
    }
    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("cannot open cgroup {cgroup}"))?;
    let mut ebpf = EbpfLoader::new()
        .map_pin_path("FLOOR", pin)
        .load(FLOOR_OBJECT)
        .with_context(|| {
            format!(
                "cannot load the floor object on the map at {}",
                pin.display()
            )
        })?;
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected {name}"))?;
        // Owned links: detached when this process ends.
        prog.attach(&cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach {name} to {cgroup}"))?;
    }
    let prog: &mut CgroupSock = ebpf
        .program_mut("floor_sock_create")
        .ok_or_else(|| anyhow!("program floor_sock_create missing"))?
        .try_into()?;
    prog.load()
        .context("the kernel rejected floor_sock_create")?;
    prog.attach(&cgroup_dir, CgroupAttachMode::Single)
        .with_context(|| format!("cannot attach floor_sock_create to {cgroup}"))?;
    let prog: &mut CgroupSkb = ebpf
        .program_mut("floor_egress")
        .ok_or_else(|| anyhow!("program floor_egress missing"))?
        .try_into()?;
    prog.load().context("the kernel rejected floor_egress")?;
    prog.attach(
        &cgroup_dir,
        CgroupSkbAttachType::Egress,
        CgroupAttachMode::Single,
    )
    .with_context(|| format!("cannot attach floor_egress to {cgroup}"))?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    // Hold the links until the bench closes our stdin.
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    drop(ebpf);
    Ok(())
}
