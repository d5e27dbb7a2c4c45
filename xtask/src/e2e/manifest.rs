//! deploy/kubernetes/pod.yaml, read for the fields a container runtime acts on: what
//! `cargo xtask e2e` turns into podman flags (`super::pod`). A field the e2e cannot map is an
//! error naming it, so the test never silently runs something other than the manifest.

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The pod, as far as the e2e needs it.
#[derive(Debug)]
pub struct PodSpec {
    /// The native sidecar (first init container with `restartPolicy: Always`).
    pub sidecar: Container,
    /// The app (first of `containers`).
    pub app: Container,
    /// `dnsConfig.options` `ndots`, if set.
    pub ndots: Option<String>,
    /// `shareProcessNamespace`.
    pub share_pid: bool,
    /// `spec.securityContext.seccompProfile`.
    pub seccomp: Option<Seccomp>,
    /// `spec.volumes`: name and kind.
    pub volumes: Vec<(String, Volume)>,
}

/// One container's runtime-relevant fields.
#[derive(Debug, Default)]
pub struct Container {
    pub name: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Literal values, and `fieldRef: metadata.uid` as [`EnvValue::PodUid`].
    pub env: Vec<(String, EnvValue)>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub read_only_root: bool,
    pub no_new_privs: bool,
    pub privileged: bool,
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    pub seccomp: Option<Seccomp>,
    pub mounts: Vec<Mount>,
    /// `resources.limits.memory` as written (`256Mi`).
    pub memory_limit: Option<String>,
}

/// An environment variable's value.
#[derive(Debug, Clone)]
pub enum EnvValue {
    Literal(String),
    PodUid,
}

/// `seccompProfile`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    RuntimeDefault,
    Unconfined,
    /// `localhostProfile`, relative to the kubelet's seccomp directory.
    Localhost(String),
}

/// A `volumeMounts` entry.
#[derive(Debug, Clone)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    pub read_only: bool,
    /// `mountPropagation: HostToContainer`.
    pub host_to_container: bool,
}

/// A `volumes` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    ConfigMap(String),
    HostPath(String),
    EmptyDir,
}

/// Reads the Pod in `path`.
pub fn read(path: &Path) -> Result<PodSpec> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc: Value =
        serde_saphyr::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    parse(&doc).with_context(|| format!("{}", path.display()))
}

fn parse(doc: &Value) -> Result<PodSpec> {
    if doc["kind"].as_str() != Some("Pod") {
        bail!("not a Pod");
    }
    let spec = &doc["spec"];
    let sidecar = spec["initContainers"]
        .as_array()
        .and_then(|s| s.first())
        .filter(|c| c["restartPolicy"].as_str() == Some("Always"))
        .context("no native sidecar (first init container with restartPolicy: Always)")?;
    let app = spec["containers"]
        .as_array()
        .and_then(|s| s.first())
        .context("no app container")?;
    let ndots = spec["dnsConfig"]["options"].as_array().and_then(|opts| {
        opts.iter()
            .find(|o| o["name"].as_str() == Some("ndots"))
            .and_then(|o| o["value"].as_str().map(str::to_owned))
    });
    let mut volumes = Vec::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let name = text(&v["name"]).context("a volume without a name")?;
        let kind = if let Some(cm) = v["configMap"]["name"].as_str() {
            Volume::ConfigMap(cm.to_owned())
        } else if let Some(p) = v["hostPath"]["path"].as_str() {
            Volume::HostPath(p.to_owned())
        } else if !v["emptyDir"].is_null() {
            Volume::EmptyDir
        } else {
            bail!("volume {name}: only configMap, hostPath and emptyDir are mapped");
        };
        volumes.push((name, kind));
    }
    Ok(PodSpec {
        sidecar: container(sidecar)?,
        app: container(app)?,
        ndots,
        share_pid: spec["shareProcessNamespace"].as_bool().unwrap_or(false),
        seccomp: seccomp(&spec["securityContext"]["seccompProfile"])?,
        volumes,
    })
}

fn container(c: &Value) -> Result<Container> {
    let name = text(&c["name"]).context("a container without a name")?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(text)
            .collect()
    };
    let mut env = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let key = text(&e["name"]).context("an env entry without a name")?;
        let value = if let Some(v) = text(&e["value"]) {
            EnvValue::Literal(v)
        } else if e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("metadata.uid") {
            EnvValue::PodUid
        } else {
            bail!("container {name}: env {key}: only values and metadata.uid are mapped");
        };
        env.push((key, value));
    }
    let sc = &c["securityContext"];
    let mounts = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            Ok(Mount {
                volume: text(&m["name"]).context("a volumeMount without a name")?,
                path: text(&m["mountPath"]).context("a volumeMount without a mountPath")?,
                read_only: m["readOnly"].as_bool().unwrap_or(false),
                host_to_container: m["mountPropagation"].as_str() == Some("HostToContainer"),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Container {
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        env,
        run_as_user: sc["runAsUser"].as_i64(),
        run_as_group: sc["runAsGroup"].as_i64(),
        read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
        // Kubernetes sets no_new_privs unless allowPrivilegeEscalation is true (or the
        // container is privileged or adds CAP_SYS_ADMIN).
        no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        privileged: sc["privileged"].as_bool().unwrap_or(false),
        cap_drop: strings(&sc["capabilities"]["drop"]),
        cap_add: strings(&sc["capabilities"]["add"]),
        seccomp: seccomp(&sc["seccompProfile"])?,
        mounts,
        memory_limit: text(&c["resources"]["limits"]["memory"]),
        name,
    })
}

fn seccomp(v: &Value) -> Result<Option<Seccomp>> {
    Ok(match v["type"].as_str() {
        None => None,
        Some("RuntimeDefault") => Some(Seccomp::RuntimeDefault),
        Some("Unconfined") => Some(Seccomp::Unconfined),
        Some("Localhost") => Some(Seccomp::Localhost(
            text(&v["localhostProfile"])
                .context("seccompProfile Localhost without localhostProfile")?,
        )),
        Some(other) => bail!("seccompProfile type {other:?}"),
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Kubernetes' `$(VAR)` expansion of `command` and `args` from the container's env (`$$` is
/// a literal `$`; an unknown variable stays as written, as the kubelet leaves it).
pub fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env = vec![("POD_UID".to_owned(), "u-1".to_owned())];
        assert_eq!(expand("--name=pod-$(POD_UID)", &env), "--name=pod-u-1");
        assert_eq!(
            expand("$(NOPE) $$(POD_UID) $", &env),
            "$(NOPE) $(POD_UID) $"
        );
    }

    #[test]
    fn the_shipped_pod_is_understood() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let pod = read(&root.join("deploy/kubernetes/pod.yaml")).unwrap();
        assert_eq!(pod.sidecar.name, "egress");
        assert!(pod.sidecar.cap_drop.contains(&"ALL".to_owned()));
        assert!(pod.app.cap_drop.contains(&"ALL".to_owned()));
        assert!(
            pod.sidecar
                .env
                .iter()
                .any(|(k, v)| k == "POD_UID" && matches!(v, EnvValue::PodUid))
        );
    }
}
