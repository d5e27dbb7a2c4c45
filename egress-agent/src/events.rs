//! Events: decoding the kernel's deny records and writing them as JSON lines.
//!
//! Every line is one JSON object with an `event` field: `ready` once enforcement is attached,
//! `deny` for each denied connect or send, `warning` for conditions the operator must know.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    net::IpAddr,
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use egress_common::{
    DenyEvent,
    events::{NameDenyEvent, hook, name_why, reason},
    keys::ip_from_addr,
};
use serde::Serialize;

/// One denied connect or UDP send, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DenyRecord {
    /// When the kernel decided.
    #[serde(serialize_with = "ser_time")]
    pub ts: SystemTime,
    /// `tcp`, `udp`, or `ip:N` for another IP protocol; for the family guard
    /// (`hook: socket_create`) and the packet-socket tripwire (`hook: tripwire`), the socket's
    /// address family (`af_packet`, `af_vsock`, `af:N`).
    pub proto: String,
    /// Destination; IPv4-mapped IPv6 is shown as the IPv4 address it carries. For
    /// `hook: accept`, the peer that connected in.
    pub dst: IpAddr,
    /// Destination port; for `hook: accept`, the local port the peer connected to.
    pub port: u16,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// The process's command name (`comm`).
    pub comm: String,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// cgroup v2 id of the process.
    pub cgroup: u64,
    /// Why: `no-rule`, `port`, `expired`, `protocol`, `family` or `error`.
    pub reason: &'static str,
    /// Which hook decided: `connect4`, `connect6`, `sendmsg4`, `sendmsg6`, `sock_create`,
    /// `egress` (the packet backstop), `socket_create` (the family guard), `tripwire` (the
    /// packet-socket tripwire, where the guard cannot load: the process was killed), `accept`
    /// (a peer connecting in to a listening socket, no `inbound:` rule allowing it),
    /// `first_flight` and `setsockopt` (name binding).
    pub hook: &'static str,
    /// `deny`, or `audit` when audit mode let the call through.
    pub verdict: &'static str,
    /// The host name this address was last answered for, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The rule that almost allowed it (right address, wrong port or protocol), when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub near_rule: Option<String>,
    /// `reason: name` (a name-bound connection's first flight): the name it carried, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `reason: name`: why the first flight was refused (`not-permitted`, `no-sni`, `ech`,
    /// `bad-tls`, `no-host`, `two-hosts`, `h2c`, `unknown-protocol`, `bad-name`, `too-large`,
    /// `error`; from the backstop, `unjudged`: payload that never met the judge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_why: Option<&'static str>,
    /// Present when this line stands for several identical denies (same process,
    /// destination, port, protocol, hook, reason and verdict) within the last second: how
    /// many, beyond the lines already written for it (see `throttle`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeats: Option<u64>,
    /// Present when the task the kernel ran the hook in is not the workload's but a kernel
    /// worker acting for one of its sockets (an MPTCP subflow the path manager opens): its
    /// `comm`. `pid` and `tid` are then 0 (the socket's owner is not known), `comm` is empty,
    /// and `cgroup` is the enforced cgroup's (the socket's, or one above it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl DenyRecord {
    /// Decodes a kernel record. `boot_offset` converts `CLOCK_BOOTTIME` to wall time
    /// (see [`boot_to_wall_offset`]).
    pub fn from_kernel(e: &DenyEvent, boot_offset: Duration) -> Self {
        let proto = match (e.hook, e.ip_proto) {
            // The family guard: no destination; the family rides in `port`.
            (hook::TRIPWIRE, _) if e.reason == reason::IO_URING => "io_uring".to_owned(),
            (hook::SOCKET_CREATE | hook::TRIPWIRE, _) => family_name(e.port),
            (_, 1) => "icmp".to_owned(),
            (_, 6) => "tcp".to_owned(),
            (_, 17) => "udp".to_owned(),
            (_, 58) => "icmpv6".to_owned(),
            (_, n) => format!("ip:{n}"),
        };
        let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
        Self {
            ts: SystemTime::UNIX_EPOCH + boot_offset + Duration::from_nanos(e.ts_ns),
            proto,
            dst: ip_from_addr(&e.addr),
            port: e.port,
            pid: e.pid,
            tid: e.tid,
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
            uid: e.uid,
            gid: e.gid,
            cgroup: e.cgroup_id,
            reason: reason_name(e.reason),
            hook: hook_name(e.hook),
            verdict: if e.audited != 0 { "audit" } else { "deny" },
            host: None,
            near_rule: None,
            name: None,
            name_why: None,
            repeats: None,
            worker: None,
        }
    }

    /// Attributes the record to the socket's side when its task is not in `workload` (see
    /// [`DenyRecord::worker`]). The family guard runs at socket creation, in the creating
    /// task: always its own. Packet hooks (`egress`, `accept`) name no task (cgroup 0).
    pub fn attribute(&mut self, workload: &mut crate::sys::cgroup::Subtree) {
        if matches!(self.hook, "socket_create" | "tripwire")
            || self.cgroup == 0
            || workload.contains(self.cgroup)
        {
            return;
        }
        self.worker = Some(std::mem::take(&mut self.comm));
        self.pid = 0;
        self.tid = 0;
        self.cgroup = workload.root_id();
    }

    /// Decodes a ring-buffer item; `None` if it is not a whole [`DenyEvent`].
    pub fn from_bytes(bytes: &[u8], boot_offset: Duration) -> Option<Self> {
        raw_event(bytes).map(|e| {
            let mut r = Self::from_kernel(&e, boot_offset);
            r.add_name(bytes);
            r
        })
    }

    /// Adds the name part of a [`NameDenyEvent`] record (`reason: name`), if `bytes` is one.
    pub fn add_name(&mut self, bytes: &[u8]) {
        if self.reason != "name" || bytes.len() < size_of::<NameDenyEvent>() {
            return;
        }
        // SAFETY: plain old data of this size; read_unaligned needs no alignment.
        let n = unsafe { bytes.as_ptr().cast::<NameDenyEvent>().read_unaligned() };
        let len = usize::from(n.name_len).min(n.name.len());
        if len > 0 {
            self.name = Some(String::from_utf8_lossy(&n.name[..len]).into_owned());
        }
        self.name_why = Some(name_why_text(n.why));
    }
}

/// The socket of a refused first flight (a [`NameDenyEvent`] from `first_flight`, not
/// audited), for the agent to reset; `None` for any other record.
pub fn refused_flight(bytes: &[u8]) -> Option<crate::sys::sockdiag::TcpSocket> {
    if bytes.len() < size_of::<NameDenyEvent>() {
        return None;
    }
    // SAFETY: plain old data of this size; read_unaligned needs no alignment.
    let n = unsafe { bytes.as_ptr().cast::<NameDenyEvent>().read_unaligned() };
    let e = &n.event;
    let hooked = e.hook == hook::FIRST_FLIGHT || e.hook == hook::EGRESS;
    if e.reason != reason::NAME || !hooked || e.audited != 0 || n.cookie == 0 {
        return None;
    }
    let v6 = i32::from(n.family) == libc::AF_INET6;
    // An AF_INET6 socket is named by its own addresses (an IPv4-mapped one as such).
    let ip = |a: &[u8; 16]| {
        if v6 {
            IpAddr::V6(std::net::Ipv6Addr::from(*a))
        } else {
            ip_from_addr(a)
        }
    };
    Some(crate::sys::sockdiag::TcpSocket {
        v6,
        local: (ip(&n.local), n.local_port),
        remote: (ip(&e.addr), e.port),
        cookie: n.cookie,
    })
}

/// The name of a `name_why` code.
pub fn name_why_text(code: u8) -> &'static str {
    match code {
        name_why::NOT_PERMITTED => "not-permitted",
        name_why::NO_SNI => "no-sni",
        name_why::ECH => "ech",
        name_why::BAD_TLS => "bad-tls",
        name_why::NO_HOST => "no-host",
        name_why::TWO_HOSTS => "two-hosts",
        name_why::H2C => "h2c",
        name_why::UNKNOWN => "unknown-protocol",
        name_why::BAD_NAME => "bad-name",
        name_why::TOO_LARGE => "too-large",
        name_why::UNJUDGED => "unjudged",
        _ => "error",
    }
}

/// The kernel's record in a ring-buffer item; `None` if it is not a whole [`DenyEvent`].
pub fn raw_event(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: DenyEvent is plain old data of this size; read_unaligned needs no alignment.
    Some(unsafe { bytes.as_ptr().cast::<DenyEvent>().read_unaligned() })
}

/// The name of a `reason` code.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        reason::NO_RULE => "no-rule",
        reason::PORT => "port",
        reason::EXPIRED => "expired",
        reason::PROTOCOL => "protocol",
        reason::ERROR => "error",
        reason::FAMILY => "family",
        reason::ROUTE => "route",
        reason::NAME => "name",
        reason::IO_URING => "io-uring",
        _ => "unknown",
    }
}

/// The name of a `hook` code.
pub fn hook_name(code: u8) -> &'static str {
    match code {
        hook::CONNECT4 => "connect4",
        hook::CONNECT6 => "connect6",
        hook::SENDMSG4 => "sendmsg4",
        hook::SENDMSG6 => "sendmsg6",
        hook::SOCK_CREATE => "sock_create",
        hook::EGRESS => "egress",
        hook::SOCKET_CREATE => "socket_create",
        hook::ACCEPT => "accept",
        hook::FIRST_FLIGHT => "first_flight",
        hook::SETSOCKOPT => "setsockopt",
        hook::TRIPWIRE => "tripwire",
        _ => "unknown",
    }
}

/// The name of an address family the family guard refused.
pub fn family_name(family: u16) -> String {
    let name = match family {
        3 => "af_ax25",
        4 => "af_ipx",
        5 => "af_appletalk",
        9 => "af_x25",
        15 => "af_key",
        17 => "af_packet",
        21 => "af_rds",
        24 => "af_pppox",
        29 => "af_can",
        30 => "af_tipc",
        31 => "af_bluetooth",
        33 => "af_rxrpc",
        40 => "af_vsock",
        41 => "af_kcm",
        42 => "af_qipcrtr",
        43 => "af_smc",
        44 => "af_xdp",
        45 => "af_mctp",
        n => return format!("af:{n}"),
    };
    name.to_owned()
}

/// `CLOCK_REALTIME - CLOCK_BOOTTIME`: add it to a kernel boot-time stamp to get wall time.
pub fn boot_to_wall_offset() -> Duration {
    let boot = clock(libc::CLOCK_BOOTTIME);
    let wall = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    wall.saturating_sub(boot)
}

/// Now on `CLOCK_BOOTTIME`, the clock of `bpf_ktime_get_boot_ns` (it counts suspend).
pub fn boot_now() -> Duration {
    clock(libc::CLOCK_BOOTTIME)
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An event line.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event<'a> {
    /// Enforcement is attached; the command starts next.
    Ready {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// Instance name (also the pin directory's name).
        name: &'a str,
        /// The enforced cgroup's path.
        cgroup: &'a Path,
        /// Its cgroup v2 id.
        cgroup_id: u64,
        /// The policy's name.
        policy: &'a str,
        /// The policy's mode.
        mode: &'a str,
        /// Number of allow rules.
        rules: usize,
        /// What the command of `run` cannot write or reach (read-only and masked paths, the
        /// user namespace); absent for `attach`.
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        protected: &'a [String],
    },
    /// A connect or send was denied.
    Deny(&'a DenyRecord),
    /// A connect or send would have been denied; audit mode let it through.
    Audit(&'a DenyRecord),
    /// A unix `connect` or `sendmsg` of `run`'s command to a socket bound outside its sandbox
    /// that no `unix:` rule names, refused by its view (see `workload::deputies`).
    #[serde(rename = "deny")]
    UnixDeny {
        /// When the agent read it.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// Always `unix`.
        proto: &'a str,
        /// The path as the command wrote it, or `@` and the abstract name.
        dst: &'a str,
        /// Process id.
        pid: u32,
        /// Thread id.
        tid: u32,
        /// Command name.
        comm: &'a str,
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
        /// cgroup v2 id of the command's cgroup.
        cgroup: u64,
        /// Always `no-rule`.
        reason: &'a str,
        /// `connect_unix` or `sendmsg_unix`.
        hook: &'a str,
    },
    /// A DNS query for a name no rule permits was refused (`verdict: refused`), or answered
    /// anyway in audit mode (`verdict: audit`).
    DnsRefused {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// The name asked for (lowercase, no trailing dot).
        query: &'a str,
        /// The record type asked for (`A`, `TXT`, ...).
        qtype: &'a str,
        /// `refused`, or `audit` when audit mode answered it anyway.
        verdict: &'a str,
        /// `udp` or `tcp`.
        proto: &'a str,
        /// The querying process, when found.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Its command name.
        #[serde(skip_serializing_if = "Option::is_none")]
        comm: Option<&'a str>,
        /// Its user id.
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// Ask mode: why a held query was refused (`approval-denied`, `approval-timeout`,
        /// `approval-queue-full`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// Ask mode: a DNS query or a connection no rule permits waits for a person's decision.
    ApprovalRequested {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// What is asked, by whom.
        #[serde(flatten)]
        request: &'a ApprovalRequest,
    },
    /// Ask mode: a person (or the HTTP endpoint) allowed a request.
    ApprovalGranted {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// What was asked.
        #[serde(flatten)]
        request: &'a ApprovalRequest,
        /// `once`, `session` or `always`.
        #[serde(rename = "for")]
        scope: &'a str,
        /// The ports allowed (`any` for every port).
        ports: &'a str,
        /// Who decided: `uid:N` (the control socket's peer) or `http`.
        by: &'a str,
    },
    /// Ask mode: a person (or the HTTP endpoint) refused a request.
    ApprovalDenied {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// What was asked.
        #[serde(flatten)]
        request: &'a ApprovalRequest,
        /// `once` or `session`.
        #[serde(rename = "for")]
        scope: &'a str,
        /// Who decided: `uid:N` or `http`.
        by: &'a str,
    },
    /// A changed allowlist was validated and applied.
    PolicyReloaded {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// The root allowlist file.
        file: &'a Path,
        /// One-line summary of the new policy.
        summary: &'a str,
    },
    /// A changed allowlist was invalid; the running policy stays.
    PolicyRejected {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// The file the error is in.
        file: &'a Path,
        /// Its line, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        line: Option<usize>,
        /// The error, as `check` prints it.
        error: &'a str,
    },
    /// Denies (or audited would-be denies) written as no line: `cause` `ring-full` (the
    /// kernel's event ring was full; its counter counts them) or `throttle` (held back beyond
    /// the summary lines of a second). With the `repeats` of the deny lines (1 where absent),
    /// the `count`s add up to every deny the kernel counted.
    DeniesUnrecorded {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// How many.
        count: u64,
        /// `ring-full` or `throttle`.
        cause: &'a str,
    },
    /// Something the operator should know (a host that failed to resolve, ...).
    Warning {
        /// When.
        #[serde(serialize_with = "ser_time")]
        ts: SystemTime,
        /// What happened.
        message: &'a str,
    },
}

/// One request of ask mode, as the events, `pending` and `GET /approvals` show it: a name
/// (with `qtype`) or an address (with `port` and `proto`), and who asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ApprovalRequest {
    /// The request's id, for `approve`/`deny`.
    pub id: String,
    /// The name asked for (lowercase, no trailing dot), shown as is: read it before
    /// approving (a name can carry data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The record type of the first query that asked (`A`, `AAAA`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    /// The denied destination address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    /// Its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp` or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// The asking process, when found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its command name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Its user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// When it was first asked (RFC 3339).
    pub asked: String,
}

impl ApprovalRequest {
    /// What is asked for: the name, or `address:port/proto`.
    pub fn subject(&self) -> String {
        match (&self.name, self.dst) {
            (Some(n), _) => n.clone(),
            (None, Some(ip)) => {
                let ip = match ip {
                    IpAddr::V6(v6) => format!("[{v6}]"),
                    IpAddr::V4(v4) => v4.to_string(),
                };
                format!(
                    "{ip}:{}/{}",
                    self.port.unwrap_or(0),
                    self.proto.as_deref().unwrap_or("tcp")
                )
            }
            (None, None) => "?".to_owned(),
        }
    }
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// `2026-11-25T13:34:06.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (y, mo, da) = civil_from_days(days as i64);
    format!(
        "{y:04}-{mo:02}-{da:02}T{h:02}:{m:02}:{s:02}.{:06}Z",
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Where event lines go: a file (appended to) or stderr. Each line is written whole and
/// flushed, so a reader tailing the file sees it at once.
pub struct EventSink {
    out: Mutex<Box<dyn io::Write + Send>>,
    /// Copies of the lines written, when capturing (for `learn`).
    captured: Option<Mutex<Vec<serde_json::Value>>>,
}

impl EventSink {
    /// Appends to `path`, or writes to stderr when `None`.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let out: Box<dyn io::Write + Send> = match path {
            Some(p) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open events file {}", p.display()))?,
            ),
            None => Box::new(io::stderr()),
        };
        Ok(Self {
            out: Mutex::new(out),
            captured: None,
        })
    }

    /// Also keeps a copy of every event written (see [`EventSink::captured`]).
    pub fn capturing(mut self) -> Self {
        self.captured = Some(Mutex::new(Vec::new()));
        self
    }

    /// The events written so far, when capturing.
    pub fn captured(&self) -> Vec<serde_json::Value> {
        self.captured
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// A sink writing into an already open file.
    pub fn from_file(f: File) -> Self {
        Self {
            out: Mutex::new(Box::new(f)),
            captured: None,
        }
    }

    /// Writes one event line. A failing sink is logged, never fatal: enforcement matters more
    /// than reporting.
    pub fn emit(&self, event: &Event<'_>) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot encode event: {e}");
                return;
            }
        };
        if let Some(c) = &self.captured
            && let Ok(v) = serde_json::from_slice(&line)
        {
            c.lock().unwrap_or_else(|p| p.into_inner()).push(v);
        }
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!("cannot write event: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_613_646, 123_456_000);
        assert_eq!(rfc3339(t), "2026-11-25T13:34:06.123456Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn a_refused_flight_names_its_socket_for_the_reset() {
        let event = |hook: u8, audited: u8, family: u8, local: [u8; 16]| {
            let n = NameDenyEvent {
                event: DenyEvent {
                    ts_ns: 1,
                    cgroup_id: 0,
                    pid: 7,
                    tid: 7,
                    uid: 0,
                    gid: 0,
                    addr: egress_common::addr_from_v4([198, 51, 100, 20]),
                    port: 443,
                    ip_proto: 6,
                    hook,
                    reason: reason::NAME,
                    audited,
                    _pad: [0; 2],
                    comm: [0; 16],
                },
                why: name_why::NOT_PERMITTED,
                family,
                name_len: 0,
                local_port: 40_000,
                _pad2: 0,
                cookie: 0x1_0000_0002,
                local,
                name: [0; egress_common::events::NAME_MAX],
            };
            // SAFETY: plain old data without padding, viewed as its bytes.
            unsafe {
                std::slice::from_raw_parts((&raw const n).cast::<u8>(), size_of::<NameDenyEvent>())
            }
            .to_vec()
        };
        let v4 = egress_common::addr_from_v4([10, 0, 0, 2]);
        let s = refused_flight(&event(hook::FIRST_FLIGHT, 0, 2, v4)).unwrap();
        assert_eq!(
            s,
            crate::sys::sockdiag::TcpSocket {
                v6: false,
                local: ("10.0.0.2".parse().unwrap(), 40_000),
                remote: ("198.51.100.20".parse().unwrap(), 443),
                cookie: 0x1_0000_0002,
            }
        );
        // An AF_INET6 socket keeps its IPv4-mapped addresses as such.
        let s = refused_flight(&event(hook::FIRST_FLIGHT, 0, 10, v4)).unwrap();
        assert!(s.v6);
        assert_eq!(s.local.0.to_string(), "::ffff:10.0.0.2");
        assert_eq!(s.remote.0.to_string(), "::ffff:198.51.100.20");
        // The backstop's drop of an unjudged flight names its socket too.
        assert!(refused_flight(&event(hook::EGRESS, 0, 2, v4)).is_some());
        // Audit mode lets the flight through: nothing to reset.
        assert_eq!(refused_flight(&event(hook::FIRST_FLIGHT, 1, 2, v4)), None);
        assert_eq!(refused_flight(&event(hook::CONNECT4, 0, 2, v4)), None);
    }

    #[test]
    fn kernel_records_decode() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let e = DenyEvent {
            ts_ns: 1_000_000_000,
            cgroup_id: 42,
            pid: 7,
            tid: 8,
            uid: 1000,
            gid: 1000,
            addr: egress_common::addr_from_v4([198, 51, 100, 20]),
            port: 443,
            ip_proto: 6,
            hook: hook::CONNECT4,
            reason: reason::NO_RULE,
            audited: 0,
            _pad: [0; 2],
            comm,
        };
        let r = DenyRecord::from_kernel(&e, Duration::from_secs(10));
        assert_eq!(r.dst.to_string(), "198.51.100.20");
        assert_eq!(r.proto, "tcp");
        assert_eq!(r.comm, "curl");
        assert_eq!(r.ts, SystemTime::UNIX_EPOCH + Duration::from_secs(11));
        let line = serde_json::to_string(&Event::Deny(&r)).unwrap();
        assert!(
            line.starts_with(r#"{"event":"deny","ts":"1970-01-01T00:00:11.000000Z","proto":"tcp","dst":"198.51.100.20","port":443,"pid":7,"#),
            "{line}"
        );
        assert!(!line.contains("host"), "no host field when unknown: {line}");
        assert!(
            !line.contains("worker"),
            "no worker field for the workload: {line}"
        );

        // A directory tree stands for the cgroup tree (ids are inode numbers).
        let root = std::env::temp_dir().join(format!("egress-subtree-{}", std::process::id()));
        std::fs::create_dir_all(root.join("app/sub")).unwrap();
        let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&p.metadata().unwrap());
        let mut workload = crate::sys::cgroup::Subtree::new(&root);
        let mut inside = r.clone();
        inside.cgroup = ino(&root.join("app/sub"));
        inside.attribute(&mut workload);
        assert_eq!(
            (inside.pid, inside.worker.as_deref()),
            (7, None),
            "{inside:?}"
        );
        let mut worker = r.clone();
        worker.cgroup = 1;
        worker.comm = "kworker/1:0".to_owned();
        worker.attribute(&mut workload);
        assert_eq!(
            (worker.pid, worker.tid, worker.comm.as_str(), worker.cgroup),
            (0, 0, "", ino(&root))
        );
        assert_eq!(worker.worker.as_deref(), Some("kworker/1:0"));
        let mut packet = r.clone();
        (packet.pid, packet.cgroup, packet.comm, packet.hook) = (0, 0, String::new(), "egress");
        packet.attribute(&mut workload);
        assert_eq!(
            (packet.cgroup, packet.worker),
            (0, None),
            "packet context: no task"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn family_guard_records_name_the_family() {
        let e = DenyEvent {
            ts_ns: 0,
            cgroup_id: 42,
            pid: 7,
            tid: 7,
            uid: 0,
            gid: 0,
            addr: [0; 16],
            port: 17,
            ip_proto: 0,
            hook: hook::SOCKET_CREATE,
            reason: reason::FAMILY,
            audited: 0,
            _pad: [0; 2],
            comm: [0; 16],
        };
        let r = DenyRecord::from_kernel(&e, Duration::ZERO);
        assert_eq!(
            (r.proto.as_str(), r.hook, r.reason),
            ("af_packet", "socket_create", "family")
        );
        let tripped = DenyEvent {
            hook: hook::TRIPWIRE,
            port: 40,
            ..e
        };
        let r = DenyRecord::from_kernel(&tripped, Duration::ZERO);
        assert_eq!(
            (r.proto.as_str(), r.hook, r.reason),
            ("af_vsock", "tripwire", "family")
        );
        let ring = DenyEvent {
            hook: hook::TRIPWIRE,
            reason: reason::IO_URING,
            port: 425,
            ..e
        };
        let r = DenyRecord::from_kernel(&ring, Duration::ZERO);
        assert_eq!(
            (r.proto.as_str(), r.hook, r.reason, r.port),
            ("io_uring", "tripwire", "io-uring", 425)
        );
        assert_eq!(family_name(40), "af_vsock");
        assert_eq!(family_name(99), "af:99");
    }
}
