#!/usr/bin/env python3
"""Validates the deployment files, offline: `python3 deploy/validate.py [PATH...]`.

1. Every Kubernetes manifest (default: deploy/kubernetes) against the API's own schemas,
   strictly (an unknown field is an error), for the oldest Kubernetes with native sidecars
   and the newest one the pinned kubernetes-validate ships. An unknown kind is an error too.
2. What the schemas cannot see, for pods (and workload templates) with an egress-agent
   container: the sidecar is the first init container with `restartPolicy: Always`, its
   probes hit its --health port, its mounts are the documented ones, it drops every
   capability it does not add; every other container gives up what would let it bypass the
   hooks (NET_RAW and the rest); the pod sets ndots:1 (a warning); the allowlist comes from a ConfigMap
   that is in the manifests, mounted without subPath (so that reloads reach it); references
   between containers, volumes and env vars resolve.
3. deploy/Containerfile builds with the same versions as a developer machine (the
   workspace's rust-version, xtask's bpf-linker) and copies every workspace member.

With --allowlists-out DIR it writes each ConfigMap that a sidecar reads its allowlist from
to DIR/<configmap>/<key>, for `egress-agent check` (cargo xtask deploy-check does that).

kubernetes-validate ships the schemas, so nothing is fetched while validating. It is
installed once, at pinned versions, into a virtualenv (default target/deploy-check/venv);
this script re-runs itself there. Exit status: 0 valid, 1 invalid, 2 cannot validate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# kubernetes-validate and everything it imports, pinned (installed with --no-deps, so that
# the set cannot drift); `pip check` confirms the set is complete.
PINNED = (
    "kubernetes-validate==1.37.0",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing_extensions==4.16.0",
)

# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29;
# 1.37 is the newest whose schemas kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.29", "1.37")

# What an app container beside the sidecar must not hold: each one lets a process bypass or
# undo cgroup socket hooks (raw and packet sockets, detaching programs, leaving the cgroup,
# reading or writing the agent's memory). The same list as `egress-agent run` drops.
FORBIDDEN_APP_CAPS = frozenset(
    {"NET_RAW", "NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO"}
)
CGROUP_FS = "/sys/fs/cgroup"
BPF_FS = "/sys/fs/bpf"
STATE_DIR = "/run/egress"

# Kinds whose pod spec is at spec.template.spec, and CronJob's.
TEMPLATE_KINDS = {
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "ReplicationController",
}

IN_VENV = "EGRESS_VALIDATE_IN_VENV"


# ---------------------------------------------------------------------------------------------
# Bootstrap: the pinned packages in a virtualenv of our own.


def ensure_venv(venv: Path) -> Path:
    """The virtualenv's python, after creating it and installing PINNED if needed."""
    python = venv / "bin" / "python"
    stamp = venv / "egress-validate-requirements.txt"
    wanted = "".join(f"{req}\n" for req in PINNED)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        print(f"validate: creating a virtualenv in {venv}", flush=True)
        run_or_exit(
            [sys.executable, "-m", "venv", str(venv)],
            "cannot create a virtualenv (on Debian: apt-get install python3-venv)",
        )
    print(f"validate: installing {PINNED[0]} into {venv} (once; PyPI)", flush=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    run_or_exit(
        [*pip, "install", "--no-deps", *PINNED],
        "cannot install the validator (no PyPI? run once with network, or set PIP_FIND_LINKS "
        "to a directory of wheels and PIP_NO_INDEX=1)",
    )
    run_or_exit([*pip, "check"], "the pinned validator packages are incomplete")
    stamp.write_text(wanted)
    return python


def run_or_exit(argv: list[str], why: str) -> None:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        print(f"validate: {why}: `{' '.join(argv)}` failed (exit status {done.returncode})")
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Findings.


class Report:
    """Errors and warnings, each naming the file, the resource and the field."""

    def __init__(self) -> None:
        self.errors = 0
        self.warnings = 0

    def error(self, where: str, message: str) -> None:
        self.errors += 1
        print(f"error: {where}: {message}")

    def warning(self, where: str, message: str) -> None:
        self.warnings += 1
        print(f"warning: {where}: {message}")


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Loading.


class Doc:
    """One YAML document of a manifest file."""

    def __init__(self, path: Path, index: int, body: dict) -> None:
        self.path = path
        self.index = index
        self.body = body

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name", "?"))

    @property
    def namespace(self) -> str | None:
        return (self.body.get("metadata") or {}).get("namespace")

    def where(self, field: str = "") -> str:
        doc = f"[document {self.index + 1}]" if self.index else ""
        name = (self.body.get("metadata") or {}).get("name")
        at = f"{rel(self.path)}{doc}: {self.kind.lower() or '?'}" + (f"/{name}" if name else "")
        return f"{at}: {field}" if field else at


def manifest_files(paths: list[Path], report: Report) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
            if not found:
                report.error(rel(path), "no .yaml or .yml file in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            report.error(rel(path), "no such file or directory")
    return files


def load(files: list[Path], report: Report) -> list[Doc]:
    import yaml

    docs: list[Doc] = []
    for path in files:
        try:
            bodies = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as e:
            report.error(rel(path), f"cannot read as YAML: {e}")
            continue
        for index, body in enumerate(bodies):
            if body is None:
                continue
            if not isinstance(body, dict) or "apiVersion" not in body or "kind" not in body:
                report.error(
                    f"{rel(path)}[document {index + 1}]", "not a resource: no apiVersion and kind"
                )
                continue
            docs.append(Doc(path, index, body))
    return docs


# ---------------------------------------------------------------------------------------------
# 1. Schemas.


def check_schemas(docs: list[Doc], versions: tuple[str, ...], report: Report) -> None:
    import kubernetes_validate as kv

    for doc in docs:
        if doc.kind == "Kustomization":
            continue
        for version in versions:
            try:
                kv.validate(doc.body, version, strict=True)
            except kv.ValidationError as e:
                field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path).lstrip(
                    "."
                )
                report.error(doc.where(field or "(document)"), f"Kubernetes {version}: {e.message}")
            except kv.SchemaNotFoundError as e:
                report.error(doc.where(), f"unknown kind or apiVersion: {e.message}")
                break
            except kv.VersionNotSupportedError:
                report.error(
                    doc.where(), f"kubernetes-validate has no schemas for Kubernetes {version}"
                )
                break


def check_kustomizations(docs: list[Doc], files: list[Path], report: Report) -> None:
    for doc in docs:
        if doc.kind != "Kustomization":
            continue
        if doc.body.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
            report.error(doc.where("apiVersion"), "expected kustomize.config.k8s.io/v1beta1")
        base = doc.path.parent
        listed = doc.body.get("resources") or []
        for resource in listed:
            if not (base / resource).exists():
                report.error(doc.where("resources"), f"{resource}: no such file")
        # A manifest beside the kustomization that it does not apply is a forgotten one.
        for path in files:
            if path.parent == base and path != doc.path and path.name not in listed:
                report.error(doc.where("resources"), f"does not list {path.name}")
        images = {
            image_name(str(c.get("image", "")))
            for other in docs
            if other.path.parent == base
            for c in containers(pod_spec(other) or {})
        }
        for image in doc.body.get("images") or []:
            if image.get("name") not in images:
                report.error(
                    doc.where("images"), f"{image.get('name')}: no container uses this image"
                )


# ---------------------------------------------------------------------------------------------
# 2. Pods with an egress sidecar.


def image_name(image: str) -> str:
    """An image reference without its tag or digest (a registry's :port stays)."""
    image = image.split("@", 1)[0]
    name, colon, tag = image.rpartition(":")
    return name if colon and "/" not in tag else image


def pod_spec(doc: Doc) -> dict | None:
    spec = doc.body.get("spec") or {}
    if doc.kind == "Pod":
        return spec
    if doc.kind in TEMPLATE_KINDS:
        return (spec.get("template") or {}).get("spec")
    if doc.kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return (job.get("template") or {}).get("spec")
    return None


def spec_prefix(doc: Doc) -> str:
    if doc.kind == "Pod":
        return "spec"
    if doc.kind == "CronJob":
        return "spec.jobTemplate.spec.template.spec"
    return "spec.template.spec"


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def is_egress_agent(container: dict) -> bool:
    repo = image_name(str(container.get("image", ""))).rsplit("/", 1)[-1]
    command = container.get("command") or []
    return repo == "egress-agent" or (
        bool(command) and Path(str(command[0])).name == "egress-agent"
    )


def options(tokens: list[str]) -> dict[str, str | None]:
    """`--opt=value`, `--opt value` and `--flag` of a command line."""
    found: dict[str, str | None] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            if "=" in token:
                key, value = token.split("=", 1)
                found[key] = value
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                found[token] = tokens[i + 1]
                i += 1
            else:
                found[token] = None
        i += 1
    return found


def caps(names) -> set[str]:
    return {str(n).upper().removeprefix("CAP_") for n in names or []}


def check_pods(docs: list[Doc], report: Report, allowlists: list[tuple[Doc, dict, str]]) -> None:
    configmaps = {(d.namespace, d.name): d for d in docs if d.kind == "ConfigMap"}
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        prefix = spec_prefix(doc)
        check_references(doc, spec, prefix, report)
        init = list(spec.get("initContainers") or [])
        sidecars = [
            (f"{prefix}.{group}[{i}]", c)
            for group in ("initContainers", "containers")
            for i, c in enumerate(spec.get(group) or [])
            if is_egress_agent(c)
        ]
        if not sidecars:
            continue
        if len(sidecars) > 1:
            report.error(doc.where(prefix), "more than one egress-agent container")
        field, sidecar = sidecars[0]
        where = f"{field} ({sidecar.get('name')})"
        if sidecar not in init:
            report.error(
                doc.where(where),
                "egress-agent must be an init container with restartPolicy: Always (a native "
                "sidecar); as a regular container it starts together with the app, which then "
                "runs unenforced until it attaches",
            )
        elif init[0] is not sidecar:
            report.error(
                doc.where(where),
                "egress-agent must be the first init container: the ones before it run unenforced",
            )
        if sidecar in init and sidecar.get("restartPolicy") != "Always":
            report.error(
                doc.where(f"{where}.restartPolicy"),
                "must be Always (a native sidecar), or the agent exits before the app starts",
            )
        check_pod_level(doc, spec, prefix, report)
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        check_sidecar(doc, spec, sidecar, where, volumes, configmaps, report, allowlists)
        for group in ("initContainers", "containers"):
            for i, container in enumerate(spec.get(group) or []):
                if container is not sidecar:
                    check_app(
                        doc,
                        spec,
                        container,
                        f"{prefix}.{group}[{i}] ({container.get('name')})",
                        volumes,
                        report,
                    )


def check_references(doc: Doc, spec: dict, prefix: str, report: Report) -> None:
    """What the API server rejects but the schemas allow, and $(VAR)s that would stay verbatim."""
    names: set[str] = set()
    for c in containers(spec):
        if c.get("name") in names:
            report.error(doc.where(prefix), f"two containers are named {c.get('name')}")
        names.add(c.get("name"))
    volumes = [v.get("name") for v in spec.get("volumes") or []]
    for name in {v for v in volumes if volumes.count(v) > 1}:
        report.error(doc.where(f"{prefix}.volumes"), f"two volumes are named {name}")
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            where = f"{prefix}.{group}[{i}] ({c.get('name')})"
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    report.error(
                        doc.where(f"{where}.volumeMounts"), f"no volume named {m.get('name')}"
                    )
            env = {e.get("name") for e in c.get("env") or []}
            for token in list(c.get("command") or []) + list(c.get("args") or []):
                # $(VAR) expands only if VAR is defined; $$(VAR) is an escape.
                for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(token)):
                    if var not in env and not c.get("envFrom"):
                        report.error(
                            doc.where(f"{where}.args"),
                            f"$({var}) is not defined in env and would be passed verbatim",
                        )


def check_pod_level(doc: Doc, spec: dict, prefix: str, report: Report) -> None:
    for key, why in (
        ("hostNetwork", "the pod would share the node's network namespace"),
        ("hostPID", "the app would see, and could signal, every process of the node"),
        ("hostIPC", "the app would share the node's IPC namespace"),
        ("shareProcessNamespace", "the app could signal the agent"),
    ):
        if spec.get(key) is True:
            report.error(doc.where(f"{prefix}.{key}"), f"must not be true: {why}")
    if spec.get("hostUsers") is False:
        report.error(
            doc.where(f"{prefix}.hostUsers"),
            "must not be false: in a user namespace the agent's capabilities do not reach the bpf syscall",
        )
    ndots = {
        o.get("name"): o.get("value") for o in ((spec.get("dnsConfig") or {}).get("options") or [])
    }.get("ndots")
    if ndots != "1":
        report.warning(
            doc.where(f"{prefix}.dnsConfig.options"),
            'set ndots to "1": with the default ndots:5 an allowed name is first tried with the '
            "cluster's search domains; the agent answers those NXDOMAIN (from the search domains "
            "it reads itself), at the cost of a round trip each, where ndots:1 asks for the name "
            "at once",
        )


def host_path(volume: dict | None) -> str | None:
    if not volume or "hostPath" not in volume:
        return None
    return "/" + str(volume["hostPath"].get("path", "")).strip("/")


def overlaps(path: str, fs: str) -> bool:
    """Whether a host path is fs, inside it or above it."""
    return path == fs or path.startswith(fs + "/") or fs.startswith(path.rstrip("/") + "/")


SECCOMP_DIR = ROOT / "deploy" / "seccomp"


def check_seccomp(doc: Doc, spec: dict, sc: dict, where: str, report: Report) -> None:
    """The sidecar's seccomp profile: a Localhost one shipped in deploy/seccomp/, which allows
    bpf() (the runtimes' default profiles from containers-common allow it only with
    CAP_SYS_ADMIN), reads the same in the Docker and OCI formats (no includes/excludes:
    containerd ignores them) and refuses by default; never Unconfined."""
    profile = sc.get("seccompProfile") or (spec.get("securityContext") or {}).get("seccompProfile") or {}
    at = doc.where(f"{where}.securityContext.seccompProfile")
    if profile.get("type") != "Localhost":
        report.error(
            at,
            "must be Localhost with localhostProfile profiles/egress-agent.json "
            "(deploy/seccomp/): RuntimeDefault refuses bpf() under podman and CRI-O, "
            "Unconfined drops the filter",
        )
        return
    name = str(profile.get("localhostProfile") or "")
    path = SECCOMP_DIR / name.removeprefix("profiles/")
    if not name.startswith("profiles/") or not path.is_file():
        report.error(at, f"localhostProfile {name!r}: no such profile in {rel(SECCOMP_DIR)}")
        return
    try:
        body = json.loads(path.read_text())
    except ValueError as e:
        report.error(rel(path), f"not JSON: {e}")
        return
    if body.get("defaultAction") not in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS"):
        report.error(rel(path), "defaultAction must refuse (SCMP_ACT_ERRNO)")
    rules = body.get("syscalls") or []
    if any(r.get("includes") or r.get("excludes") for r in rules):
        report.error(rel(path), "includes/excludes are not read by containerd: resolve them")
    allowed = {n for r in rules if r.get("action") == "SCMP_ACT_ALLOW" and not r.get("args") for n in r.get("names") or []}
    refused = {n for r in rules if r.get("action") != "SCMP_ACT_ALLOW" for n in r.get("names") or []}
    if "bpf" not in allowed or "bpf" in refused:
        report.error(rel(path), "must allow bpf() (and not also refuse it)")


def check_sidecar(
    doc: Doc,
    spec: dict,
    c: dict,
    where: str,
    volumes: dict[str, dict],
    configmaps: dict,
    report: Report,
    allowlists: list[tuple[Doc, dict, str]],
) -> None:
    tokens = [str(t) for t in list(c.get("command") or [])[1:] + list(c.get("args") or [])]
    if "attach" not in tokens:
        report.error(doc.where(f"{where}.args"), "the sidecar runs `egress-agent attach ...`")
    opts = options(tokens)
    env = {e.get("name"): e for e in c.get("env") or []}

    if "--cgroup" not in opts:
        uid = env.get("POD_UID")
        field_path = (((uid or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if field_path != "metadata.uid":
            report.error(
                doc.where(f"{where}.env"),
                "POD_UID must come from the Downward API (valueFrom.fieldRef.fieldPath: "
                "metadata.uid): the agent finds the pod's cgroup from it",
            )
        pod_uid = opts.get("--pod-uid")
        if pod_uid is not None and "$(POD_UID)" not in pod_uid:
            report.error(
                doc.where(f"{where}.args"),
                "--pod-uid must be $(POD_UID): a fixed UID names another pod",
            )
    if "--detach-on-exit" in opts:
        report.warning(
            doc.where(f"{where}.args"),
            "--detach-on-exit opens the pod whenever the kubelet stops the agent, a failed "
            "liveness probe included",
        )
    if "$(POD_UID)" not in (opts.get("--name") or ""):
        report.warning(
            doc.where(f"{where}.args"),
            "--name should include $(POD_UID): pins live on the node, shared by every pod there",
        )

    # Probes: startup and readiness on /readyz (attached, resolver answering), liveness on
    # /healthz, all on the --health port.
    health = opts.get("--health")
    port = None
    if not health:
        report.error(doc.where(f"{where}.args"), "--health ADDR:PORT is needed for the probes")
    else:
        host, _, port_text = health.rpartition(":")
        if host in ("127.0.0.1", "localhost", "[::1]"):
            report.error(
                doc.where(f"{where}.args"),
                f"--health {health}: the kubelet probes the pod's IP, not its loopback",
            )
        port = int(port_text) if port_text.isdigit() else None
        if port is None:
            report.error(doc.where(f"{where}.args"), f"--health {health}: no port")
    named = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        get = (c.get(probe) or {}).get("httpGet")
        if not get:
            report.error(doc.where(f"{where}.{probe}"), f"needs an httpGet of {path}")
            continue
        if get.get("path") != path:
            report.error(doc.where(f"{where}.{probe}.httpGet.path"), f"must be {path}")
        probe_port = get.get("port")
        probe_port = (
            named.get(probe_port, probe_port) if isinstance(probe_port, str) else probe_port
        )
        if port is not None and probe_port != port:
            report.error(
                doc.where(f"{where}.{probe}.httpGet.port"),
                f"{get.get('port')} is not the --health port {port}",
            )

    sc = c.get("securityContext") or {}
    if sc.get("privileged") is True:
        report.error(
            doc.where(f"{where}.securityContext.privileged"),
            "the agent needs a few capabilities, not privileged",
        )
    if sc.get("allowPrivilegeEscalation") is not False:
        report.error(
            doc.where(f"{where}.securityContext.allowPrivilegeEscalation"), "must be false"
        )
    if sc.get("readOnlyRootFilesystem") is not True:
        report.error(
            doc.where(f"{where}.securityContext.readOnlyRootFilesystem"),
            "must be true: the agent writes nothing there",
        )
    # The pod's securityContext applies where the container's does not say.
    pod_sc = spec.get("securityContext") or {}
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if run_as_non_root is True or sc.get("runAsUser", pod_sc.get("runAsUser")) not in (None, 0):
        report.error(
            doc.where(f"{where}.securityContext"),
            "the agent runs as uid 0: Kubernetes gives added capabilities to uid 0 only",
        )
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in caps(capabilities.get("drop")):
        report.error(
            doc.where(f"{where}.securityContext.capabilities.drop"),
            "must be [ALL]; add back only what the agent needs",
        )
    if not capabilities.get("add"):
        report.error(
            doc.where(f"{where}.securityContext.capabilities.add"),
            "the agent needs BPF and NET_ADMIN at least",
        )

    check_seccomp(doc, spec, sc, where, report)

    mounts = {m.get("mountPath", "").rstrip("/"): m for m in c.get("volumeMounts") or []}
    for fs, read_only in ((CGROUP_FS, True), (BPF_FS, False)):
        m = mounts.get(fs)
        if m is None or host_path(volumes.get(m.get("name"))) != fs:
            report.error(
                doc.where(f"{where}.volumeMounts"),
                f"needs the node's {fs} (a hostPath volume) at {fs}",
            )
            continue
        if bool(m.get("readOnly")) != read_only:
            report.error(
                doc.where(f"{where}.volumeMounts"),
                f"{fs} must be {'read-only' if read_only else 'writable'}"
                + (
                    ": attaching only opens the pod's cgroup"
                    if read_only
                    else ": the agent pins its programs there"
                ),
            )
        if m.get("mountPropagation") == "Bidirectional":
            report.error(
                doc.where(f"{where}.volumeMounts"),
                f"{fs}: Bidirectional propagation is not needed (HostToContainer is)",
            )

    state = mounts.get(STATE_DIR)
    if state is None or "emptyDir" not in (volumes.get(state.get("name")) or {}):
        report.error(
            doc.where(f"{where}.volumeMounts"),
            f"needs an emptyDir at {STATE_DIR}: the agent keeps its state there (the root "
            "filesystem is read-only), and a restarted agent needs it to keep the adopted DNS "
            "entries",
        )
    elif state.get("readOnly"):
        report.error(doc.where(f"{where}.volumeMounts"), f"{STATE_DIR} must be writable")

    check_allowlist(doc, opts.get("--allowlist"), where, c, volumes, configmaps, report, allowlists)


def check_allowlist(doc, allowlist, where, c, volumes, configmaps, report, allowlists) -> None:
    if not allowlist:
        report.error(doc.where(f"{where}.args"), "--allowlist FILE is missing")
        return
    for m in c.get("volumeMounts") or []:
        mount = m.get("mountPath", "").rstrip("/")
        if not allowlist.startswith(mount + "/"):
            continue
        volume = volumes.get(m.get("name")) or {}
        source = volume.get("configMap")
        if source is None:
            report.warning(
                doc.where(f"{where}.args"),
                f"--allowlist {allowlist} is not from a ConfigMap: not checked",
            )
            return
        if m.get("subPath") or m.get("subPathExpr"):
            report.error(
                doc.where(f"{where}.volumeMounts"),
                f"{m.get('name')}: no subPath: a subPath mount never sees a changed ConfigMap",
            )
        path = allowlist[len(mount) + 1 :]
        items = {i.get("path"): i.get("key") for i in source.get("items") or []}
        key = items.get(path, path) if items else path
        if items and path not in items:
            report.error(
                doc.where(f"{where}.args"),
                f"--allowlist {allowlist}: the volume's items do not include {path}",
            )
            return
        configmap = configmaps.get((doc.namespace, source.get("name")))
        if configmap is None:
            report.error(
                doc.where(f"{where}.args"),
                f"ConfigMap {source.get('name')} is not in the manifests",
            )
            return
        data = configmap.body.get("data") or {}
        if key not in data:
            report.error(
                configmap.where("data"),
                f"no key {key}, which {doc.where(where)} reads as its allowlist",
            )
            return
        allowlists.append((configmap, data, key))
        return
    report.error(doc.where(f"{where}.args"), f"--allowlist {allowlist} is on no mounted volume")


def check_app(doc: Doc, spec: dict, c: dict, where: str, volumes: dict[str, dict], report: Report) -> None:
    sc = c.get("securityContext") or {}
    profile = sc.get("seccompProfile") or (spec.get("securityContext") or {}).get("seccompProfile") or {}
    at = doc.where(f"{where}.securityContext.seccompProfile")
    if profile.get("type") == "Unconfined":
        report.error(at, "Unconfined: nothing refuses packet and vsock sockets where the kernel has no BPF LSM")
    elif profile.get("type") != "Localhost" or profile.get("localhostProfile") != "profiles/egress-app.json":
        report.warning(
            at,
            "not Localhost profiles/egress-app.json (deploy/seccomp/): without it a container that holds "
            "or regains NET_RAW sends packet-socket frames past the programs where the kernel has no BPF LSM",
        )
    if sc.get("privileged") is True:
        report.error(
            doc.where(f"{where}.securityContext.privileged"),
            "a privileged container can detach the programs",
        )
    if sc.get("allowPrivilegeEscalation") is not False:
        report.error(
            doc.where(f"{where}.securityContext.allowPrivilegeEscalation"),
            "must be false (no_new_privs)",
        )
    capabilities = sc.get("capabilities") or {}
    dropped = caps(capabilities.get("drop"))
    if not dropped & {"ALL", "NET_RAW"}:
        report.error(
            doc.where(f"{where}.securityContext.capabilities.drop"),
            "must drop ALL (or at least NET_RAW): raw and packet sockets are not seen by the socket hooks",
        )
    added = caps(capabilities.get("add")) & FORBIDDEN_APP_CAPS
    if added:
        report.error(
            doc.where(f"{where}.securityContext.capabilities.add"),
            f"{', '.join(sorted(added))}: would let the app bypass or detach the egress programs",
        )
    for m in c.get("volumeMounts") or []:
        path = host_path(volumes.get(m.get("name")))
        if path and (overlaps(path, CGROUP_FS) or overlaps(path, BPF_FS)):
            report.error(
                doc.where(f"{where}.volumeMounts"),
                f"{m.get('name')}: the app must not mount the node's {path}",
            )


def write_allowlists(out: Path, allowlists: list[tuple[Doc, dict, str]]) -> None:
    """DIR/<configmap>/<key> for every key of each ConfigMap a sidecar reads (includes resolve
    between keys). Each file starts with blank lines, so that its line numbers, and those in
    `egress-agent check`'s errors, are the manifest's."""
    if out.exists():
        shutil.rmtree(out)
    for configmap, data, key in allowlists:
        directory = out / configmap.name
        directory.mkdir(parents=True, exist_ok=True)
        lines = data_lines(configmap)
        for name, text in data.items():
            (directory / name).write_text("\n" * lines.get(name, 0) + str(text))
        print(
            f"validate: {configmap.where('data.' + key)} -> {rel(directory / key)} (same line numbers)"
        )


def data_lines(configmap: Doc) -> dict[str, int]:
    """The 0-based line on which each `data` value of a ConfigMap starts in its file."""
    import yaml

    lines: dict[str, int] = {}
    node = list(yaml.compose_all(configmap.path.read_text()))[configmap.index]
    for k, v in node.value if isinstance(node, yaml.MappingNode) else []:
        if k.value == "data" and isinstance(v, yaml.MappingNode):
            for key, value in v.value:
                # A block scalar (`|`, `>`) starts on the line after its indicator.
                lines[key.value] = value.start_mark.line + (1 if value.style in ("|", ">") else 0)
    return lines


# ---------------------------------------------------------------------------------------------
# 3. The Containerfile.


def check_containerfile(path: Path, report: Report) -> None:
    where = rel(path)
    try:
        text = path.read_text()
    except OSError as e:
        report.error(where, f"cannot read: {e}")
        return
    cargo = (ROOT / "Cargo.toml").read_text()
    deps = (ROOT / "xtask" / "src" / "deps.rs").read_text()

    rust_version = re.search(r'^rust-version\s*=\s*"([^"]+)"', cargo, re.M)
    stable = re.search(r"^ARG RUST_STABLE=(\S+)", text, re.M)
    if rust_version and (
        not stable or not (stable.group(1) + ".").startswith(rust_version.group(1) + ".")
    ):
        report.error(
            where, f"ARG RUST_STABLE must be the workspace's rust-version {rust_version.group(1)}"
        )

    linker = re.search(r'const BPF_LINKER_VERSION: &str = "([^"]+)"', deps)
    arg = re.search(r"^ARG BPF_LINKER_VERSION=(\S+)", text, re.M)
    if linker and (not arg or arg.group(1) != linker.group(1)):
        report.error(
            where, f"ARG BPF_LINKER_VERSION must be {linker.group(1)}, as in xtask/src/deps.rs"
        )

    members = re.search(r"^members\s*=\s*\[([^\]]*)\]", cargo, re.M)
    copied = set(re.findall(r"^COPY\s+(?!--)(\S+)\s+\S+\s*$", text, re.M))
    for member in re.findall(r'"([^"]+)"', members.group(1) if members else ""):
        if member not in copied:
            report.error(
                where, f"does not COPY the workspace member {member}: cargo would not find it"
            )

    if "cargo build --release --locked -p egress-agent" not in text:
        report.error(
            where,
            "the build step must be `cargo build --release --locked -p egress-agent` (the README's)",
        )
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    if not stages or "bookworm" not in stages[0]:
        report.error(where, "the build stage must be Debian 12 (bookworm), the runtime's glibc")
    if len(stages) < 2 or not re.search(r"(distroless/cc-debian12|debian:bookworm)", stages[-1]):
        report.error(
            where, "the runtime stage must be gcr.io/distroless/cc-debian12 or debian:bookworm-slim"
        )


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "paths", nargs="*", type=Path, help="manifests or directories (default: deploy/kubernetes)"
    )
    parser.add_argument(
        "--kubernetes-version",
        "-k",
        action="append",
        dest="versions",
        help=f"validate against this version (repeatable; default: {', '.join(KUBERNETES_VERSIONS)})",
    )
    parser.add_argument("--allowlists-out", type=Path, help="write the sidecars' allowlists here")
    parser.add_argument("--containerfile", type=Path, default=ROOT / "deploy" / "Containerfile")
    parser.add_argument("--venv", type=Path, default=ROOT / "target" / "deploy-check" / "venv")
    parser.add_argument(
        "--no-venv",
        action="store_true",
        help="use this interpreter's kubernetes-validate, whatever its version",
    )
    args = parser.parse_args()

    if not args.no_venv and os.environ.get(IN_VENV) != "1":
        python = ensure_venv(args.venv.absolute())
        os.environ[IN_VENV] = "1"
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])

    versions = tuple(args.versions or KUBERNETES_VERSIONS)
    report = Report()
    files = manifest_files(args.paths or [ROOT / "deploy" / "kubernetes"], report)
    docs = load(files, report)
    check_schemas(docs, versions, report)
    check_kustomizations(docs, files, report)
    allowlists: list[tuple[Doc, dict, str]] = []
    check_pods(docs, report, allowlists)
    if args.containerfile.exists():
        check_containerfile(args.containerfile, report)
    if args.allowlists_out:
        write_allowlists(args.allowlists_out, allowlists)

    summary = (
        f"{len(files)} files, {len(docs)} resources, Kubernetes {', '.join(versions)} (strict schemas)"
        + (f", {rel(args.containerfile)}" if args.containerfile.exists() else "")
    )
    warnings = (
        f", {report.warnings} warning{'s' if report.warnings > 1 else ''}"
        if report.warnings
        else ""
    )
    if report.errors:
        print(
            f"validate: {summary}: {report.errors} error{'s' if report.errors > 1 else ''}{warnings}"
        )
        return 1
    print(f"validate: {summary}: valid{warnings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
