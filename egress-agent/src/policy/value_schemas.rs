//! The JSON Schemas of the values serde reads through hand-written `Deserialize` impls (host
//! patterns, networks, ports, durations, ...), which `raw.rs` names in its
//! `#[schemars(with = ...)]` attributes. A schema cannot run those parsers, so each is as
//! close as a pattern gets; `egress-agent check` stays the authority. Kept apart from
//! [`super::schema`], which generates the whole schema *from* `raw.rs`, so that the two
//! depend one way.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::policy::{HostPattern, Mode, Protocol, Upstream};

/// One DNS label: letters, digits, `_` and `-` (not first or last), 1-63 characters.
const LABEL: &str = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";

/// `RawAllow` takes exactly one of `host`, `cidr`, `ip`, `inbound`, `unix` (checked in
/// `load.rs`); this says so in the schema, so that an editor marks a rule with none or two
/// of them. It also says that `protocol: icmp` takes no `ports`, that an `inbound` rule
/// needs `ports` and is TCP only, and that a `unix` rule takes neither.
pub fn exactly_one_target(schema: &mut Schema) {
    schema.insert(
        "oneOf".into(),
        serde_json::json!([
            {"required": ["host"]},
            {"required": ["cidr"]},
            {"required": ["ip"]},
            {"required": ["inbound"]},
            {"required": ["unix"]},
        ]),
    );
    schema.insert(
        "allOf".into(),
        serde_json::json!([
            {
                "if": {"required": ["protocol"], "properties": {"protocol": {"const": "icmp"}}},
                "then": {"not": {"required": ["ports"]}},
            },
            {
                "if": {"required": ["inbound"]},
                "then": {"required": ["ports"], "properties": {"protocol": {"const": "tcp"}}},
            },
            {
                "if": {"required": ["unix"]},
                "then": {"not": {"anyOf": [{"required": ["ports"]}, {"required": ["protocol"]}]}},
            },
        ]),
    );
}

impl JsonSchema for Mode {
    fn schema_name() -> Cow<'static, str> {
        "Mode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "What happens to what no rule allows.",
            "type": "string",
            "enum": ["enforce", "audit", "ask"],
        })
    }
}

impl JsonSchema for Protocol {
    fn schema_name() -> Cow<'static, str> {
        "Protocol".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The protocols a rule allows: tcp, udp, any (tcp and udp), or icmp \
                            (echo requests, \"ping\"; no ports).",
            "type": "string",
            "enum": ["tcp", "udp", "any", "icmp"],
        })
    }
}

impl JsonSchema for HostPattern {
    fn schema_name() -> Cow<'static, str> {
        "HostPattern".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Exact: labels joined by dots. Wildcard: `*.` and at least two labels. A trailing dot
        // is allowed (and ignored); IP addresses also fit the pattern, `check` rejects them.
        let pattern = format!(r"^(\*\.{LABEL}(\.{LABEL})+|{LABEL}(\.{LABEL})*)\.?$");
        json_schema!({
            "description": "A host name, or `*.` and a domain of at least two labels (any name \
                            below it, at any depth, not the domain itself). Compared \
                            lowercased, without the trailing dot.",
            "type": "string",
            "maxLength": 254,
            "pattern": pattern,
            "examples": ["api.anthropic.com", "*.githubusercontent.com"],
        })
    }
}

impl JsonSchema for Upstream {
    fn schema_name() -> Cow<'static, str> {
        "Upstream".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "`system` (the name servers of /etc/resolv.conf) or a list of \
                            name servers: `ip`, `ip:port` or `[ipv6]:port` (port 53 if not \
                            given).",
            "anyOf": [
                {"type": "string", "const": "system"},
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "string",
                        "pattern": r"^\s*(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+)(:[0-9]{1,5})?\s*$",
                        "examples": ["9.9.9.9", "9.9.9.9:53", "[2620:fe::fe]:53"],
                    },
                },
            ],
        })
    }
}

/// The schema of a `cidr:` value (the type itself is private to `policy`).
pub struct CidrText;

impl JsonSchema for CidrText {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "An IPv4 or IPv6 network in CIDR notation, without host bits.",
            "type": "string",
            "pattern": r"^\s*[0-9A-Fa-f:.]+/[0-9]{1,3}\s*$",
            "examples": ["192.0.2.0/24", "2001:db8::/32"],
        })
    }
}

/// The schema of an `ip:` value (the type itself is private to `policy`).
pub struct IpText;

impl JsonSchema for IpText {
    fn schema_name() -> Cow<'static, str> {
        "Ip".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "One IPv4 or IPv6 address.",
            "type": "string",
            "pattern": r"^\s*[0-9A-Fa-f:.]+\s*$",
            "examples": ["192.0.2.10", "2001:db8::1"],
        })
    }
}

/// The schema of an `inbound:` value (the type itself is private to `policy`).
pub struct InboundText;

impl JsonSchema for InboundText {
    fn schema_name() -> Cow<'static, str> {
        "Inbound".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Peers that may connect in: an IPv4 or IPv6 network in CIDR \
                notation (without host bits), or one address.",
            "type": "string",
            "pattern": r"^\s*[0-9A-Fa-f:.]+(/[0-9]{1,3})?\s*$",
            "examples": ["192.0.2.0/24", "2001:db8::/32", "192.0.2.10"],
        })
    }
}

/// The schema of a `unix:` value.
pub struct UnixText;

impl JsonSchema for UnixText {
    fn schema_name() -> Cow<'static, str> {
        "UnixSocket".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A unix socket outside the sandbox: an absolute path, or `@` and an \
                abstract name.",
            "type": "string",
            "pattern": r"^\s*(/[^\u0000]{0,106}|@[^\u0000]{1,107})\s*$",
            "examples": ["/run/user/1000/ssh-agent.sock", "@my-daemon"],
        })
    }
}

/// The schema of one port or port range.
pub struct PortItem;

impl JsonSchema for PortItem {
    fn schema_name() -> Cow<'static, str> {
        "Port".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A port (1-65535), or a range written as a string \"a-b\".",
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": 65535},
                {"type": "string", "pattern": r"^\s*[0-9]{1,5}\s*(-\s*[0-9]{1,5}\s*)?$"},
            ],
            "examples": [443, "8000-8080"],
        })
    }
}

/// The schema of a `ports:` value (the type itself is private to `policy`).
pub struct PortsValue;

impl JsonSchema for PortsValue {
    fn schema_name() -> Cow<'static, str> {
        "Ports".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let item = generator.subschema_for::<PortItem>();
        json_schema!({
            "description": "A port, a range, or a non-empty list of them.",
            "anyOf": [
                item.clone(),
                {"type": "array", "minItems": 1, "items": item},
            ],
        })
    }
}

/// The schema of a duration (the type itself is private to `policy`).
pub struct DurationText;

impl JsonSchema for DurationText {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: a number and a unit (ms, s, m, h), or a number of \
                            seconds.",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]+\s*(ms|s|m|h)?\s*$"},
            ],
            "examples": ["30s", "5m", "1h"],
        })
    }
}
