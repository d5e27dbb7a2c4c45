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

use schemars::{Schema, SchemaGenerator, generate::SchemaSettings, transform::RecursiveTransform};
use serde_json::Value;

use crate::policy::raw;

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
