//! `egress-agent status --name N`: what an agent of that name enforces, read from its pins
//! (kernel counters, map fill, mode) and from the state file the agent keeps under
//! `/run/egress/<name>/` (policy, latest denies). Works with the agent gone too: the pins are
//! the enforcement. Its rendering is the CLI's (`cli/status.rs`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, lpm_trie::LpmTrie};
use egress_common::{
    Addr, AllowValue, Config,
    config::FLAG_AUDIT,
    consts::{
        COUNTER_ALLOW, COUNTER_DENY, COUNTER_ERROR, COUNTER_NAME_DENY, COUNTER_NAME_PASS,
        COUNTER_RINGBUF_DROP, MAP_ALLOW_CIDR, MAP_ALLOW_DNS, MAP_CONFIG, MAP_COUNTERS, MAP_HELD,
    },
};
use serde::{Deserialize, Serialize};

/// The pin directory of `name`.
pub fn pin_dir(name: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/egress").join(name)
}

/// Where agents keep their state files.
pub const STATE_DIR: &str = "/run/egress";

/// What the agent writes every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Instance name.
    pub name: String,
    /// The agent's pid.
    pub pid: u32,
    /// The enforced cgroup.
    pub cgroup: PathBuf,
    /// The allowlist file, when watched.
    pub allowlist: Option<PathBuf>,
    /// One-line summary of the running policy.
    pub policy: String,
    /// What the command of `run` cannot write or reach, and what stays open (as in the
    /// `ready` event); empty for `attach`.
    #[serde(default)]
    pub protected: Vec<String>,
    /// `applied` (the maps hold the allowlist file's policy), `previous` (the file was
    /// rejected; the maps hold the previous valid policy whole) or `inconsistent`.
    #[serde(default)]
    pub policy_state: String,
    /// Why the allowlist file was rejected, while it is.
    #[serde(default)]
    pub policy_rejected: Option<String>,
    /// Latest deny events, newest last.
    pub latest_denies: Vec<serde_json::Value>,
    /// This agent's deny events by reason (`no-rule`, `port`, `name`, ...), since it started.
    #[serde(default)]
    pub denies_by_reason: std::collections::BTreeMap<String, u64>,
    /// When written (seconds since the epoch).
    pub written: u64,
}

/// The state file of `name`.
pub fn state_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name).join("state.json")
}

/// Writes `state` atomically (rename).
pub fn write_state(state: &AgentState) -> anyhow::Result<()> {
    write_atomically(&state_path(&state.name), &serde_json::to_vec_pretty(state)?)
}

/// The file in which the agent `name` records which names each DNS-derived address was
/// answered for (`grants::Grants::to_json`), for its successor on the same pins.
pub fn grants_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name).join("grants.json")
}

/// Writes the grants file of `name` atomically (rename).
pub fn write_grants(name: &str, json: &[u8]) -> anyhow::Result<()> {
    write_atomically(&grants_path(name), json)
}

/// Writes a file of the state directory atomically (rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomically(path, bytes)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a reader
/// (or a successor after a crash) sees the old content or the new, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().expect("state path has a parent");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Removes the state directory of `name`.
pub fn remove_state(name: &str) {
    let _ = fs::remove_dir_all(Path::new(STATE_DIR).join(name));
}

/// The directories under `states` (`/run/egress`) that nothing owns any more, except `keep`:
/// an agent's state directory with no pins under `pins` (`/sys/fs/bpf/egress`) whose agent
/// (the pid in its `state.json`) is gone, and a `run` command's resolver view (`view-<pid>`)
/// whose agent is gone. Only directories untouched for `min_age`: an agent that is starting
/// may write its state before it pins.
pub fn orphan_states(
    states: &Path,
    pins: &Path,
    keep: Option<&str>,
    min_age: std::time::Duration,
) -> Vec<String> {
    let Ok(entries) = fs::read_dir(states) else {
        return Vec::new();
    };
    let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age))
        })
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            if Some(name.as_str()) == keep || pins.join(&name).exists() {
                return None;
            }
            let owner = match name.strip_prefix("view-") {
                Some(pid) => pid.parse().ok(),
                None => fs::read(e.path().join("state.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<AgentState>(&b).ok())
                    .map(|s| s.pid),
            };
            (!owner.is_some_and(alive)).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Instance name.
    pub name: String,
    /// Whether the programs are pinned (enforcement in place).
    pub enforcing: bool,
    /// `enforce` or `audit`.
    pub mode: &'static str,
    /// Port of the resolver DNS is steered to (0: none).
    pub dns_port: u16,
    /// Kernel counters.
    pub allowed: u64,
    /// Kernel counters.
    pub denied: u64,
    /// Kernel counters.
    pub ringbuf_drops: u64,
    /// Kernel counters.
    pub errors: u64,
    /// Kernel counters: first flights of name-bound connections judged and let through.
    pub name_passed: u64,
    /// Kernel counters: first flights refused by name binding (reported, in audit mode).
    pub name_refused: u64,
    /// Name-bound connections open now whose first flight is awaited or was refused (the
    /// backstop looks the socket of each payload segment up only while this is not 0; a
    /// connect that failed before its SYN was built is not counted). 0 for pins without it.
    pub name_held: u64,
    /// Static CIDR/IP entries.
    pub cidr_entries: usize,
    /// Live DNS-derived addresses.
    pub dns_entries: usize,
    /// The agent's last state, if any.
    pub agent: Option<AgentState>,
    /// Whether that agent is still running.
    pub agent_running: bool,
}

/// Reads the status of `name`.
pub fn read(name: &str) -> anyhow::Result<Status> {
    let dir = pin_dir(name).join("maps");
    if !dir.exists() {
        bail!(
            "no egress agent named {name:?}: nothing pinned under {}",
            dir.display()
        );
    }
    let open = |m: &str| {
        MapData::from_pin(dir.join(m)).with_context(|| format!("cannot open pinned map {m}"))
    };
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(MAP_COUNTERS)?))?;
    let sum = |slot: u32| -> u64 { counters.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    let name_held = open(MAP_HELD)
        .ok()
        .and_then(|m| Array::<MapData, u64>::try_from(Map::Array(m)).ok())
        .and_then(|a| a.get(&0, 0).ok())
        .unwrap_or(0);
    let config: Array<MapData, Config> = Array::try_from(Map::Array(open(MAP_CONFIG)?))?;
    let cfg = config.get(&0, 0).unwrap_or_default();
    let dns: HashMap<MapData, Addr, AllowValue> =
        HashMap::try_from(Map::HashMap(open(MAP_ALLOW_DNS)?))?;
    let now = crate::events::boot_now().as_nanos() as u64;
    let dns_entries = dns
        .iter()
        .filter_map(Result::ok)
        // Live DNS-derived entries; the copies of static entries never expire.
        .filter(|(_, v)| !crate::bpf::copies::is_copy(v) && v.expires_ns > now)
        .count();
    let cidr: LpmTrie<MapData, Addr, AllowValue> =
        LpmTrie::try_from(Map::LpmTrie(open(MAP_ALLOW_CIDR)?))?;
    let cidr_entries = cidr.keys().filter_map(Result::ok).count();
    let agent: Option<AgentState> = fs::read(state_path(name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let agent_running = agent
        .as_ref()
        .is_some_and(|a| Path::new(&format!("/proc/{}", a.pid)).exists());
    let links = pin_dir(name).join("links");
    let enforcing = fs::read_dir(&links).map(|d| d.count() > 0).unwrap_or(false);
    Ok(Status {
        name: name.to_owned(),
        enforcing,
        mode: if cfg.flags & FLAG_AUDIT != 0 {
            "audit"
        } else {
            "enforce"
        },
        dns_port: cfg.dns_port,
        allowed: sum(COUNTER_ALLOW),
        denied: sum(COUNTER_DENY),
        ringbuf_drops: sum(COUNTER_RINGBUF_DROP),
        errors: sum(COUNTER_ERROR),
        name_passed: sum(COUNTER_NAME_PASS),
        name_refused: sum(COUNTER_NAME_DENY),
        name_held,
        cidr_entries,
        dns_entries,
        agent,
        agent_running,
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path, time::Duration};

    use super::orphan_states;

    /// A scratch directory of this test's own, removed on drop.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn state(dir: &Path, name: &str, pid: u32) {
        let d = dir.join(name);
        fs::create_dir_all(&d).unwrap();
        let json = format!(
            r#"{{"name":"{name}","pid":{pid},"cgroup":"/x","allowlist":null,"policy":"p","latest_denies":[],"written":0}}"#
        );
        fs::write(d.join("state.json"), json).unwrap();
    }

    #[test]
    fn only_state_with_neither_pins_nor_a_live_agent_is_an_orphan() {
        let root = std::env::temp_dir().join(format!("egress-orphans-{}", std::process::id()));
        let _scratch = Scratch(root.clone());
        let (states, pins) = (root.join("run"), root.join("bpf"));
        let me = std::process::id();
        // No pid is this large (pid_max is at most 2^22).
        let gone = 9_999_999;
        state(&states, "dead", gone);
        state(&states, "live", me);
        state(&states, "pinned", gone);
        fs::create_dir_all(pins.join("pinned")).unwrap();
        state(&states, "kept", gone);
        fs::create_dir_all(states.join("unreadable")).unwrap();
        fs::create_dir_all(states.join(format!("view-{gone}"))).unwrap();
        fs::create_dir_all(states.join(format!("view-{me}"))).unwrap();
        fs::write(states.join("a-file"), b"").unwrap();

        assert_eq!(
            orphan_states(&states, &pins, Some("kept"), Duration::ZERO),
            vec![
                "dead".to_owned(),
                "unreadable".to_owned(),
                format!("view-{gone}")
            ]
        );
        // Fresh directories are left to an agent that may be starting.
        assert!(orphan_states(&states, &pins, Some("kept"), Duration::from_secs(3600)).is_empty());
    }
}
