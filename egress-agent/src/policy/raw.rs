//! The file format as serde types: one struct per YAML mapping, `deny_unknown_fields`, a
//! `///` per field (these are the texts a JSON Schema generated from them will carry).
//!
//! Values are checked as they are read (`HostPattern`, `Cidr`, `Ports`, ... reject bad text in
//! their `Deserialize`), so each such error is reported at the value itself. What needs
//! several fields or files (one target per rule, TTL bounds, includes) is checked in
//! `load.rs`, which finds the values it points at through their [`Spanned`] positions (the
//! schema sees the plain type: `#[schemars(with = ...)]`).

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{
    Deserialize, Deserializer,
    de::{self, Visitor},
};

use super::{
    HostPattern, Mode,
    dns::{Dur, Upstream},
    net::{Cidr, InboundNet, SingleIp},
    ports::{Ports, Protocol},
    unix::UnixName,
    yaml::Spanned,
};

/// One allowlist file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Allowlist")]
pub struct RawFile {
    /// Version of the format; must be 1.
    pub version: Version,
    /// Name of the policy in logs and events; default: the file name without its extension.
    /// Only the root file's name is used.
    #[schemars(with = "Option<String>")]
    pub name: Option<Spanned<String>>,
    /// `enforce` denies what is not allowed; `audit` reports it but lets it through; `ask`
    /// denies it but holds a lookup of an unlisted name until a person approves or denies it.
    /// Default `enforce`. Only the root file's mode is used.
    pub mode: Option<Mode>,
    /// Other allowlist files whose `allow` rules (and includes) are added after this file's,
    /// as paths relative to this file. A file including itself, directly or not, is an error.
    #[schemars(with = "Option<Vec<String>>")]
    pub include: Option<Vec<Spanned<String>>>,
    /// How DNS answers are used. Only the root file's settings are used.
    #[schemars(with = "Option<RawDns>")]
    pub dns: Option<Spanned<RawDns>>,
    /// The destinations the workload may reach; anything else is denied. Empty or missing:
    /// deny everything.
    #[schemars(with = "Option<Vec<RawAllow>>")]
    pub allow: Option<Vec<Spanned<RawAllow>>>,
    /// Files that run later outside the sandbox (shell startup files, git hooks, autostart
    /// entries, ...) that a command under `run` may write nonetheless: absolute paths, or
    /// `~/...` below the invoking user's home. Only the root file's list is used.
    #[schemars(with = "Option<Vec<String>>")]
    pub writable: Option<Vec<Spanned<String>>>,
}

/// The `dns:` mapping; every field is optional.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Dns")]
pub struct RawDns {
    /// Shortest time an answer's addresses stay allowed, whatever its TTL (default 30s).
    /// Durations are written `500ms`, `30s`, `5m`, `1h`, or as a number of seconds.
    #[schemars(with = "Option<crate::policy::value_schemas::DurationText>")]
    pub min_ttl: Option<Spanned<Dur>>,
    /// Longest time an answer's addresses stay allowed before the name must be resolved
    /// again (default 1h); not shorter than `min_ttl`.
    #[schemars(with = "Option<crate::policy::value_schemas::DurationText>")]
    pub max_ttl: Option<Spanned<Dur>>,
    /// Extra time an address stays allowed after its TTL ran out, for connections opened
    /// just before (default 60s).
    #[schemars(with = "Option<crate::policy::value_schemas::DurationText>")]
    pub grace: Option<Dur>,
    /// Where queries are forwarded: `system` (the name servers of /etc/resolv.conf, the
    /// default) or a list of `ip`, `ip:port` or `[ipv6]:port` (port 53 if not given).
    pub upstream: Option<Upstream>,
    /// Whether a DNS answer may not allow a private address either (10.0.0.0/8,
    /// 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7): only a `cidr:`/`ip:` rule can
    /// then allow one (default false). Loopback, unspecified, link-local and metadata
    /// addresses are never allowed by an answer.
    pub block_private: Option<bool>,
}

/// One `allow` rule: exactly one of `host`, `cidr`, `ip` (where the workload may go), with
/// optional ports and protocol; or `inbound` (who may connect in) with its local ports.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Rule", transform = crate::policy::value_schemas::exactly_one_target)]
pub struct RawAllow {
    /// A host name (`api.example.com`), or `*.` and a domain of at least two labels
    /// (`*.example.com`: every name below it at any depth, not `example.com` itself). The
    /// addresses it resolves to are allowed for the answer's TTL.
    pub host: Option<HostPattern>,
    /// A network in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`), without host bits.
    #[schemars(with = "Option<crate::policy::value_schemas::CidrText>")]
    pub cidr: Option<Cidr>,
    /// A single IPv4 or IPv6 address.
    #[schemars(with = "Option<crate::policy::value_schemas::IpText>")]
    pub ip: Option<SingleIp>,
    /// Peers that may connect in (TCP) to the workload's listening sockets: a CIDR or a
    /// single address. `ports` (required) are the local ports they may connect to. Loopback
    /// peers (127.0.0.0/8, ::1) are always allowed; any other peer is refused its handshake.
    #[schemars(with = "Option<crate::policy::value_schemas::InboundText>")]
    pub inbound: Option<Spanned<InboundNet>>,
    /// A unix socket bound outside the sandbox that a command under `run` may connect or
    /// send to: an absolute path (`/run/user/1000/ssh-agent.sock`) or an abstract name
    /// (`"@name"`). Takes no `ports` or `protocol`. Without such a rule, none is reachable.
    #[schemars(with = "Option<crate::policy::value_schemas::UnixText>")]
    pub unix: Option<UnixName>,
    /// A port (`443`), a range (`"8000-8080"`), or a list of them; ports are 1-65535.
    /// Missing: every port. Not allowed with `protocol: icmp`. With `inbound`: the local
    /// ports peers may connect to, required.
    #[serde(default, deserialize_with = "present")]
    #[schemars(with = "Option<crate::policy::value_schemas::PortsValue>")]
    pub ports: Option<Spanned<Ports>>,
    /// `tcp`, `udp`, `any` (the default: tcp and udp) or `icmp` (ICMP echo, "ping", to
    /// this destination; takes no `ports`). An `inbound` rule is TCP only (`tcp` or left
    /// out): a UDP server's replies are sends, judged by the outbound rules.
    #[schemars(with = "Option<Protocol>")]
    pub protocol: Option<Spanned<Protocol>>,
    /// Host rules only. `true` (the default): a TCP connection this rule alone admits is
    /// bound to names: its first bytes must be a TLS ClientHello whose server name, or an
    /// HTTP/1.x request whose Host, some host rule permits on that port; anything else (no
    /// name, encrypted client hello, other protocols) is refused before a byte leaves. Over
    /// UDP, QUIC long-header packets are refused (clients fall back to TCP).
    /// `false`: admit by address, as for `ip`/`cidr` (SSH to a git host, databases, any
    /// protocol that carries no name).
    #[schemars(with = "Option<bool>")]
    pub name_check: Option<Spanned<bool>>,
}

/// An explicit empty value is an error, not "field missing": for `ports:` that would
/// silently mean every port.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The format version (only 1 exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub u64);

/// The one version this agent reads.
pub const VERSION: u64 = 1;

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "version {VERSION}")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Version, E> {
                if n == VERSION {
                    Ok(Version(n))
                } else {
                    Err(E::custom(format!(
                        "unsupported version {n}, this agent reads version {VERSION}"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Version {
    fn schema_name() -> Cow<'static, str> {
        "Version".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The format version; the only one is 1.",
            "type": "integer",
            "const": VERSION,
        })
    }
}
