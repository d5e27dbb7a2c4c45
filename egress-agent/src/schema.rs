//! The allowlist format as a JSON Schema, generated from the serde types of
//! [`policy::raw`](crate::policy::raw) so that it cannot drift from what the loader reads.
//!
//! `egress-agent schema` prints it; `allowlists/schema.json` is a copy that a test keeps equal
//! to it, and every allowlist names it in its first line
//! (`# yaml-language-server: $schema=./schema.json`), so editors with the YAML language server
//! validate and complete allowlists as people type.
//!
//! The structs, their fields and their `///` docs come from `raw.rs` through
//! `#[derive(JsonSchema)]`. The values that serde reads through hand-written `Deserialize`
//! impls (host patterns, networks, ports, durations, ...) get their schemas here: a schema
//! cannot run those parsers, so each one is as close as a pattern gets, and `egress-agent
//! check` stays the authority (it also checks what spans fields or files, like TTL bounds and
//! includes).
//!
//! Draft 7, because it is the draft editors support best (the YAML language server, VS Code).

use std::borrow::Cow;

use schemars::{
    JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings, json_schema,
    transform::RecursiveTransform,
};
use serde_json::Value;

use crate::policy::{HostPattern, Mode, Protocol, Upstream, raw};

/// The title of the root schema.
pub const TITLE: &str = "egress allowlist";

/// The JSON Schema of an allowlist file.
pub fn allowlist_schema() -> Schema {
    let mut settings = SchemaSettings::draft07();
    // First, so that draft 7's own transforms (moving `$ref` siblings into `allOf`) see the
    // result.
    settings
        .transforms
        .insert(0, Box::new(RecursiveTransform(no_null)));
    settings
        .transforms
        .push(Box::new(RecursiveTransform(unwrap_description)));
    let mut schema = SchemaGenerator::new(settings).into_root_schema_for::<raw::RawFile>();
    schema.insert("title".into(), TITLE.into());
    schema
}

/// [`allowlist_schema`] as pretty-printed JSON with a final newline: the text of
/// `allowlists/schema.json`.
pub fn allowlist_schema_json() -> String {
    let mut text =
        serde_json::to_string_pretty(&allowlist_schema()).expect("a schema is plain JSON");
    text.push('\n');
    text
}

/// Removes `null` from the types an optional field takes. The loader reads a written-out
/// null as "missing", but in an allowlist an empty value is at best a no-op and for `ports:`
/// an error (it would silently mean every port), so editors had better flag it.
fn no_null(schema: &mut Schema) {
    let is_null = |v: &Value| v.get("type").and_then(Value::as_str) == Some("null");
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(types)) = obj.get_mut("type") {
        types.retain(|t| t != "null");
        if let [one] = types.as_slice() {
            let one = one.clone();
            obj.insert("type".into(), one);
        }
    }
    if let Some(Value::Array(any_of)) = obj.get_mut("anyOf")
        && any_of.iter().any(is_null)
    {
        any_of.retain(|v| !is_null(v));
        if let [Value::Object(only)] = any_of.as_slice() {
            let only = only.clone();
            obj.remove("anyOf");
            for (k, v) in only {
                obj.entry(k).or_insert(v);
            }
        }
    }
}

/// Joins the lines of each paragraph of a description: the `///` docs are wrapped at 100
/// columns, and an editor's hover wraps on its own.
fn unwrap_description(schema: &mut Schema) {
    if let Some(Value::String(text)) = schema.get_mut("description") {
        *text = text
            .split("\n\n")
            .map(|para| {
                para.split('\n')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
    }
}

/// One DNS label: letters, digits, `_` and `-` (not first or last), 1-63 characters.
const LABEL: &str = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";

/// `RawAllow` takes exactly one of `host`, `cidr`, `ip`, `inbound` (checked in `load.rs`);
/// this says so in the schema, so that an editor marks a rule with none or two of them.
/// It also says that `protocol: icmp` takes no `ports`, and that an `inbound` rule needs
/// `ports` and is TCP only.
pub fn exactly_one_target(schema: &mut Schema) {
    schema.insert(
        "oneOf".into(),
        serde_json::json!([
            {"required": ["host"]},
            {"required": ["cidr"]},
            {"required": ["ip"]},
            {"required": ["inbound"]},
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
        ]),
    );
}

impl JsonSchema for raw::Version {
    fn schema_name() -> Cow<'static, str> {
        "Version".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The format version; the only one is 1.",
            "type": "integer",
            "const": raw::VERSION,
        })
    }
}

impl JsonSchema for Mode {
    fn schema_name() -> Cow<'static, str> {
        "Mode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "What happens to what no rule allows.",
            "type": "string",
            "enum": ["enforce", "audit"],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_a_closed_mapping_with_a_required_version() {
        let s = allowlist_schema();
        assert_eq!(s.get("type"), Some(&"object".into()));
        assert_eq!(s.get("additionalProperties"), Some(&false.into()));
        assert_eq!(s.get("required"), Some(&serde_json::json!(["version"])));
        let props = s.get("properties").and_then(|p| p.as_object()).unwrap();
        let keys: Vec<&str> = props.keys().map(String::as_str).collect();
        for k in ["version", "name", "mode", "include", "dns", "allow"] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn field_docs_become_descriptions() {
        let s = allowlist_schema();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("Other allowlist files whose `allow` rules"));
        assert!(text.contains("Shortest time an answer's addresses stay allowed"));
    }

    #[test]
    fn no_field_admits_null() {
        // A written-out null is either meaningless or (for `ports:`) an error.
        let text = allowlist_schema_json();
        assert!(!text.contains("\"null\""), "{text}");
    }
}
