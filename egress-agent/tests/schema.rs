//! `allowlists/schema.json` is what `egress-agent schema` prints, and it agrees with the
//! loader: every allowlist the loader accepts validates (an editor never flags a good file),
//! and the mistakes a schema can see are flagged.
//!
//! The validation is a small JSON Schema (draft 7) interpreter for the keywords the generated
//! schema uses; it refuses a keyword it does not know, so a schema change cannot make this test
//! pass by being ignored.

use std::path::{Path, PathBuf};

use egress_agent::{policy, policy::schema};
use serde_json::Value;

const REGENERATE: &str = "allowlists/schema.json is out of date: run `cargo run -p egress-agent -- schema > \
     allowlists/schema.json`";

fn allowlists() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../allowlists")
}

fn checked_in() -> Value {
    let path = allowlists().join("schema.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()))
}

#[test]
fn the_checked_in_schema_is_the_generated_one() {
    let generated: Value = serde_json::from_str(&schema::allowlist_schema_json()).unwrap();
    assert!(generated == checked_in(), "{REGENERATE}");
}

/// Validates `value` against `schema` (a subschema of `root`); the errors found, as
/// `path: what`.
fn validate(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        panic!("{path}: schema is not an object: {schema}");
    };
    let mut mine = Vec::new();
    let mut fail = |what: String| mine.push(format!("{path}: {what}"));
    for (key, want) in obj {
        match key.as_str() {
            "$schema" | "title" | "description" | "examples" | "definitions" => {}
            "$ref" => {
                let name = want
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/definitions/"))
                    .unwrap_or_else(|| panic!("unsupported $ref {want}"));
                let target = &root["definitions"][name];
                assert!(!target.is_null(), "dangling $ref {want}");
                let mut inner = Vec::new();
                validate(root, target, value, path, &mut inner);
                errors.extend(inner);
            }
            "type" => {
                let ok = match want.as_str().expect("one type") {
                    "object" => value.is_object(),
                    "array" => value.is_array(),
                    "string" => value.is_string(),
                    "integer" => value.is_u64() || value.is_i64(),
                    "boolean" => value.is_boolean(),
                    other => panic!("unsupported type {other}"),
                };
                if !ok {
                    fail(format!("{value} is not of type {want}"));
                }
            }
            "const" if value != want => fail(format!("{value} is not {want}")),
            "enum" if !want.as_array().unwrap().contains(value) => {
                fail(format!("{value} is not one of {want}"));
            }
            "pattern" => {
                let re = regex::Regex::new(want.as_str().unwrap()).unwrap();
                if let Some(s) = value.as_str()
                    && !re.is_match(s)
                {
                    fail(format!("{s:?} does not match {re}"));
                }
            }
            "maxLength" | "minLength" => {
                let n = want.as_u64().unwrap() as usize;
                if let Some(s) = value.as_str() {
                    let len = s.chars().count();
                    if (key == "maxLength" && len > n) || (key == "minLength" && len < n) {
                        fail(format!("{s:?}: {key} {n}"));
                    }
                }
            }
            "minimum" | "maximum" => {
                let n = want.as_i64().unwrap();
                if let Some(v) = value.as_i64()
                    && ((key == "minimum" && v < n) || (key == "maximum" && v > n))
                {
                    fail(format!("{v}: {key} {n}"));
                }
            }
            "minItems" => {
                if let Some(a) = value.as_array()
                    && (a.len() as u64) < want.as_u64().unwrap()
                {
                    fail(format!("fewer than {want} items"));
                }
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    validate(root, want, item, &format!("{path}[{i}]"), errors);
                }
            }
            "properties" => {
                if let Some(map) = value.as_object() {
                    for (k, v) in map {
                        if let Some(sub) = want.get(k) {
                            validate(root, sub, v, &format!("{path}.{k}"), errors);
                        }
                    }
                }
            }
            "additionalProperties" => {
                assert_eq!(
                    want,
                    &Value::Bool(false),
                    "unsupported additionalProperties"
                );
                let known = obj["properties"].as_object().unwrap();
                for k in value.as_object().into_iter().flat_map(|m| m.keys()) {
                    if !known.contains_key(k) {
                        fail(format!("unknown property {k:?}"));
                    }
                }
            }
            "required" => {
                if let Some(map) = value.as_object() {
                    for k in want.as_array().unwrap() {
                        if !map.contains_key(k.as_str().unwrap()) {
                            fail(format!("{k} is required"));
                        }
                    }
                }
            }
            "allOf" | "anyOf" | "oneOf" => {
                let passing = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|sub| {
                        let mut inner = Vec::new();
                        validate(root, sub, value, path, &mut inner);
                        inner.is_empty()
                    })
                    .count();
                let n = want.as_array().unwrap().len();
                let ok = match key.as_str() {
                    "allOf" => passing == n,
                    "anyOf" => passing >= 1,
                    _ => passing == 1,
                };
                if !ok {
                    fail(format!("{key}: {passing} of {n} subschemas match"));
                }
            }
            "if" => {
                let mut cond = Vec::new();
                validate(root, want, value, path, &mut cond);
                let branch = if cond.is_empty() { "then" } else { "else" };
                if let Some(sub) = obj.get(branch) {
                    let mut inner = Vec::new();
                    validate(root, sub, value, path, &mut inner);
                    if !inner.is_empty() {
                        fail(format!("if/{branch}: {}", inner.join("; ")));
                    }
                }
            }
            "not" => {
                let mut inner = Vec::new();
                validate(root, want, value, path, &mut inner);
                if inner.is_empty() {
                    fail(format!("matches what it must not: {want}"));
                }
            }
            "const" | "enum" | "then" | "else" => {}
            other => panic!("the test's validator does not know the keyword {other:?}"),
        }
    }
    errors.extend(mine);
}

fn errors(yaml: &str) -> Vec<String> {
    let schema = checked_in();
    let value: Value = serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"));
    let mut errors = Vec::new();
    validate(&schema, &schema, &value, "$", &mut errors);
    errors
}

fn loads(yaml: &str) -> Result<policy::Policy, policy::PolicyError> {
    policy::parse_str(yaml, Path::new("allowlists/x.yaml"))
}

#[test]
fn every_shipped_allowlist_validates() {
    let mut dirs = vec![allowlists()];
    let mut count = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let e = errors(&std::fs::read_to_string(&path).unwrap());
                assert!(e.is_empty(), "{}: {e:#?}", path.display());
                count += 1;
            }
        }
    }
    assert!(count >= 10);
}

/// Files the loader accepts: the schema must accept them too.
const GOOD: &[&str] = &[
    "version: 1",
    "version: 1\nname: x\nmode: audit\ninclude: []\nallow: []",
    "version: 1\ndns: {min_ttl: 500ms, max_ttl: 3600, grace: \"1h\", upstream: system}",
    "version: 1\ndns: {min_ttl: 30 s, upstream: [\"9.9.9.9\", \"[2620:fe::fe]:53\", 2001:db8::53]}",
    "version: 1\nallow: [{host: API.Example.COM.}]",
    "version: 1\nallow: [{host: _dmarc.example.com, protocol: udp}]",
    "version: 1\nallow: [{host: localhost, ports: 8080}]",
    "version: 1\nallow: [{host: \"*.a.example.com\", ports: [443, \"8000-8080\", \" 9000 - 9001 \"]}]",
    "version: 1\nallow: [{host: xn--bcher-kva.de, ports: \"443\"}]",
    "version: 1\nallow: [{cidr: 10.0.0.0/8, protocol: any}, {cidr: \"2001:db8::/32\"}]",
    "version: 1\nallow: [{cidr: \"::ffff:10.0.0.0/104\"}, {cidr: 0.0.0.0/0}]",
    "version: 1\nallow: [{ip: 192.0.2.1}, {ip: \"2001:db8::1\"}, {ip: \"::ffff:192.0.2.1\"}]",
    "version: 1\nallow: [{ip: 192.0.2.1, ports: [1, 65535, \"1-65535\"]}]",
    "version: 1\nallow: [{host: a.example.com, protocol: icmp}, {cidr: 192.0.2.0/24, protocol: icmp}]",
    "version: 1\nallow: [{inbound: 203.0.113.0/24, ports: 8080}, {inbound: \"2001:db8::7\", ports: [22], protocol: tcp}]",
];

/// Mistakes the loader rejects and the schema can see.
const BAD: &[&str] = &[
    "name: no-version",
    "version: 2",
    "version: 1\nallwo: []",
    "version: 1\nmode: block",
    "version: 1\nallow: [{host: a.example.com, prot: tcp}]",
    "version: 1\nallow: [{ports: 443}]",
    "version: 1\nallow: [{host: a.example.com, ip: 192.0.2.1}]",
    "version: 1\nallow: [{host: a.example.com, protocol: sctp}]",
    "version: 1\nallow: [{cidr: 192.0.2.0/24, protocol: icmp, ports: 443}]",
    "version: 1\nallow: [{host: a.example.com, ports: 0}]",
    "version: 1\nallow: [{host: a.example.com, ports: 70000}]",
    "version: 1\nallow: [{host: a.example.com, ports: []}]",
    "version: 1\nallow: [{host: a.example.com, ports: }]",
    "version: 1\nallow: [{host: a.example.com, ports: http}]",
    "version: 1\nallow: [{host: \"a.*.example.com\"}]",
    "version: 1\nallow: [{host: \"*.com\"}]",
    "version: 1\nallow: [{host: \"-a.example.com\"}]",
    "version: 1\nallow: [{host: \"a b.example.com\"}]",
    "version: 1\nallow: [{cidr: 10.0.0.1}]",
    "version: 1\nallow: [{ip: 10.0.0.0/8}]",
    "version: 1\nallow: [{inbound: 203.0.113.0/24}]",
    "version: 1\nallow: [{inbound: 203.0.113.0/24, ports: 53, protocol: udp}]",
    "version: 1\nallow: [{inbound: 203.0.113.0/24, ip: 192.0.2.1, ports: 80}]",
    "version: 1\nallow: [{inbound: example.com, ports: 80}]",
    "version: 1\ndns: {min_ttl: 1.5s}",
    "version: 1\ndns: {upstream: []}",
    "version: 1\ndns: {upstream: google}",
    "version: 1\ndns: {ttl: 5s}",
];

#[test]
fn what_the_loader_accepts_validates() {
    for yaml in GOOD {
        loads(yaml).unwrap_or_else(|e| panic!("{yaml:?}: the loader says {e}"));
        let e = errors(yaml);
        assert!(e.is_empty(), "{yaml:?}: {e:#?}");
    }
}

#[test]
fn mistakes_are_flagged() {
    for yaml in BAD {
        assert!(loads(yaml).is_err(), "{yaml:?}: the loader accepts it");
        assert!(!errors(yaml).is_empty(), "{yaml:?}: the schema accepts it");
    }
}

#[test]
fn rules_and_fields_carry_their_docs() {
    let s = checked_in();
    let rule = &s["definitions"]["Rule"];
    assert!(
        rule["properties"]["ports"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("Missing: every port")),
        "{rule}"
    );
    assert!(s["properties"]["include"]["description"].is_string());
}

#[test]
fn the_schema_command_prints_the_checked_in_file() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-agent"))
        .arg("schema")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(printed == checked_in(), "{REGENERATE}");
}
