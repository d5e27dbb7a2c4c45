//! Every allowlist shipped in `allowlists/` loads, compiles into kernel entries, and (but for
//! the demo's) names the JSON Schema in its first line so that editors validate it.

use std::path::{Path, PathBuf};

use egress_agent::{
    policy,
    policy::explain::{self, Query},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../allowlists")
}

/// Every `*.yaml` under `allowlists/`, at any depth, sorted.
fn allowlists() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![root()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_allowlist_loads_and_compiles() {
    let files = allowlists();
    assert!(files.len() >= 10, "allowlists missing: {files:?}");
    for f in &files {
        let p = policy::load(f).unwrap_or_else(|e| panic!("{e}"));
        policy::cidr_entries(&p).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn every_allowlist_names_the_schema_in_its_first_line() {
    for f in allowlists() {
        if f.file_name().is_some_and(|n| n == "demo.yaml") {
            continue;
        }
        let depth = f
            .strip_prefix(root())
            .unwrap()
            .components()
            .count()
            .saturating_sub(1);
        let schema = format!("{}schema.json", "../".repeat(depth));
        let schema = if depth == 0 {
            "./schema.json".to_string()
        } else {
            schema
        };
        let want = format!("# yaml-language-server: $schema={schema}");
        let text = std::fs::read_to_string(&f).unwrap();
        let first = text.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            want,
            "{}: the first line must name the schema",
            f.display()
        );
    }
}

#[test]
fn curated_allowlists_say_what_they_are_for_and_whom_to_ask() {
    for f in allowlists() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if ["demo.yaml", "example.yaml"].contains(&name.as_str()) || f.parent() != Some(&root()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let header: Vec<&str> = text
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with('#'))
            .collect();
        let header = header.join("\n");
        for key in ["owner:", "upstream:", "ports:"] {
            assert!(header.contains(key), "{name}: header lacks {key:?}");
        }
        assert!(
            header.lines().next().is_some_and(|l| l.len() > 10),
            "{name}: the header's first line says what the file is for"
        );
    }
}

/// Well-known ports of protocols whose first bytes carry no TLS server name or HTTP Host:
/// SSH, git://, and databases and caches an agent might be given.
const NAMELESS_PORTS: [(u16, &str); 8] = [
    (22, "ssh"),
    (9418, "git://"),
    (5432, "postgres"),
    (3306, "mysql"),
    (6379, "redis"),
    (27017, "mongodb"),
    (11211, "memcached"),
    (1433, "sql server"),
];

#[test]
fn host_rules_for_protocols_without_a_name_admit_by_address() {
    // Name binding refuses a first flight that names nothing: such a rule would never work
    // unless it says name_check: false.
    for f in allowlists() {
        let p = policy::load(&f).unwrap_or_else(|e| panic!("{e}"));
        for r in &p.rules {
            if !matches!(r.target, policy::Target::Host(_)) || !r.name_check {
                continue;
            }
            for (port, proto) in NAMELESS_PORTS {
                assert!(
                    !r.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi)
                        || r.ports == [(0, u16::MAX)],
                    "{}:{}: a host rule on port {port} ({proto}, which carries no name) needs \
                     name_check: false",
                    r.origin.file.display(),
                    r.origin.line
                );
            }
        }
    }
}

fn allowed(file: &str, target: &str) -> bool {
    let p = policy::load(&root().join(file)).unwrap_or_else(|e| panic!("{e}"));
    explain::explain(
        &p,
        &Query {
            destination: target.parse().unwrap(),
            transport: None,
        },
    )
    .allowed
}

#[test]
fn the_default_allowlist_holds_the_development_set() {
    for ok in [
        "api.anthropic.com:443",
        "statsig.anthropic.com:443",
        "github.com:443",
        "github.com:22",
        "api.github.com:443",
        "codeload.github.com:443",
        "raw.githubusercontent.com:443",
        "objects.githubusercontent.com:443",
        "pypi.org:443",
        "files.pythonhosted.org:443",
        "registry.npmjs.org:443",
        "crates.io:443",
        "index.crates.io:443",
        "static.crates.io:443",
    ] {
        assert!(allowed("default.yaml", ok), "{ok}");
    }
    for no in [
        "api.anthropic.com:80",
        "githubusercontent.com:443",
        "upload.pypi.org:443",
        "example.com:443",
        "deb.debian.org:80",
        "169.254.169.254:80",
    ] {
        assert!(!allowed("default.yaml", no), "{no}");
    }
    assert!(allowed("apt-debian.yaml", "deb.debian.org:80"));
    assert!(allowed("apt-debian.yaml", "security.debian.org:443"));
    assert!(allowed("apt-ubuntu.yaml", "archive.ubuntu.com:80"));
    assert!(allowed("apt-ubuntu.yaml", "security.ubuntu.com:443"));
}

/// Runs `egress-agent explain` on `allowlists/FILE`: exit status and stdout.
fn explain_command(file: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-agent"))
        .arg("explain")
        .arg("--allowlist")
        .arg(root().join(file))
        .args(args)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn explain_exit_status_is_0_allowed_1_denied_2_unusable() {
    let (code, out) = explain_command("default.yaml", &["api.anthropic.com:443"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("api.anthropic.com:443/tcp: allowed by ")
            && out.contains("anthropic-api.yaml:")
            && out
                .lines()
                .next()
                .is_some_and(|l| l.ends_with("(host api.anthropic.com, ports 443, tcp)")),
        "{out}"
    );
    assert!(
        out.contains("api.anthropic.com:443/tcp: name-bound: ")
            && out.contains("permitted on 443/tcp (api.anthropic.com, "),
        "{out}"
    );

    let (code, out) = explain_command("default.yaml", &["pypi.org:443", "evil.test"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("evil.test: no rule permits this name: its DNS queries are refused"));

    let (code, out) = explain_command("default.yaml", &["--protocol", "udp", "pypi.org:443"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("pypi.org:443/udp: denied: "), "{out}");

    let (code, _) = explain_command("no-such-file.yaml", &["pypi.org"]);
    assert_eq!(code, Some(2));
    let (code, _) = explain_command("default.yaml", &["pypi.org:http"]);
    assert_eq!(code, Some(2));
}
