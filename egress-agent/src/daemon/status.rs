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
        COUNTER_RINGBUF_DROP, MAP_ALLOW_CIDR, MAP_ALLOW_DNS, MAP_CONFIG, MAP_COUNTERS,
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
    let config: Array<MapData, Config> = Array::try_from(Map::Array(open(MAP_CONFIG)?))?;
    let cfg = config.get(&0, 0).unwrap_or_default();
    let dns: HashMap<MapData, Addr, AllowValue> =
        HashMap::try_from(Map::HashMap(open(MAP_ALLOW_DNS)?))?;
    let now = crate::events::boot_now().as_nanos() as u64;
    let dns_entries = dns
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.expires_ns == 0 || v.expires_ns > now)
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
        cidr_entries,
        dns_entries,
        agent,
        agent_running,
    })
}
