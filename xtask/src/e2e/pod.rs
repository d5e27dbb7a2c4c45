//! A pod as the kubelet would make it, with podman: `podman pod create` in a cgroup of the
//! kubelet's cgroupfs layout (`kubepods/besteffort/pod<uid>`, below the e2e's own cgroup),
//! and each container run with the flags its manifest entry implies ([`run_flags`]). The
//! fake world: a veth from a network namespace of our own into the pod's.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use egress_netns::Netns;

use super::{
    images,
    manifest::{Container, EnvValue, PodSpec, Seccomp, Volume, expand},
    podman::Podman,
};

/// The world's addresses (documentation ranges), on its end of the veth.
pub const WORLD_V4: [&str; 3] = ["198.51.100.10", "198.51.100.20", "198.51.100.53"];
pub const WORLD_V6: &str = "2001:db8::10";
/// The pod's end.
const POD_V4: &str = "198.51.100.2/24";
const POD_V6: &str = "2001:db8::2/64";
/// The world's DNS server (dnsmasq), the pod's `nameserver` (the kubelet's cluster DNS).
pub const DNS: &str = "198.51.100.53";

/// Where the manifest's volumes come from on this machine.
#[derive(Debug)]
pub struct Site {
    /// The ConfigMap volume's directory (`..data` layout, see `super::configmap`).
    pub configmap: PathBuf,
    /// Stands for the node's `/sys/fs/cgroup`: the e2e's own cgroup v2 directory, so that the
    /// pods' kubelet-style layout lies inside a cgroup the e2e created.
    pub cgroup: PathBuf,
    /// emptyDir volumes go below this, one directory per pod and volume.
    pub empty_dirs: PathBuf,
    /// The pod's resolv.conf (what the kubelet writes from dnsConfig).
    pub resolv_conf: PathBuf,
    /// Seccomp `Localhost` profiles: the kubelet's `<root>/seccomp`; here deploy/.
    pub seccomp_dir: PathBuf,
    /// Stands for the node's bpffs (`/sys/fs/bpf`): a bpffs instance of the e2e's own.
    pub bpffs: PathBuf,
}

/// A running podman pod.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// The pod UID (the Downward API's `metadata.uid`).
    pub uid: String,
    /// The pod's cgroup, relative to the cgroup v2 mount.
    pub cgroup: PathBuf,
    /// `/proc/<infra pid>/ns/net`.
    pub netns: PathBuf,
}

impl Pod {
    /// Creates and starts the pod `name` (infra container only) below `cgroup_base`
    /// (relative to the cgroup v2 mount).
    pub fn create(podman: &Podman, name: &str, spec: &PodSpec, cgroup_base: &str) -> Result<Self> {
        let uid = fs::read_to_string("/proc/sys/kernel/random/uuid")?
            .trim()
            .to_owned();
        let cgroup = PathBuf::from(format!("{cgroup_base}/kubepods/besteffort/pod{uid}"));
        // The namespaces a Kubernetes pod shares: network, IPC, UTS; PID only with
        // shareProcessNamespace.
        let share = if spec.share_pid {
            "net,ipc,uts,pid"
        } else {
            "net,ipc,uts"
        };
        podman.run(&[
            "pod",
            "create",
            "--name",
            name,
            "--network",
            "none",
            "--share",
            share,
            "--infra-command",
            images::PAUSE_COMMAND,
            "--cgroup-parent",
            &format!("/{}", cgroup.display()),
        ])?;
        podman.run(&["pod", "start", name])?;
        let infra = podman.run(&["pod", "inspect", "--format", "{{.InfraContainerID}}", name])?;
        let pid = podman.run(&["inspect", "--format", "{{.State.Pid}}", &infra])?;
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if !netns.exists() {
            bail!("the infra container of pod {name} has no network namespace ({pid})");
        }
        Ok(Self {
            name: name.to_owned(),
            uid,
            cgroup,
            netns,
        })
    }

    /// The instance name the manifest's `--name=pod-$(POD_UID)` gives.
    pub fn instance(&self) -> String {
        format!("pod-{}", self.uid)
    }

    /// Runs `c` of `spec` in the pod (detached), as container `name`, from `image`,
    /// with `command` instead of the manifest's (the app) and `extra` flags before the image.
    #[expect(
        clippy::too_many_arguments,
        reason = "what the kubelet combines: the pod, its spec, the container, the node's files, \
                  the image and the e2e's own command and flags"
    )]
    pub fn run(
        &self,
        podman: &Podman,
        spec: &PodSpec,
        c: &Container,
        site: &Site,
        image: &str,
        command: Option<&[String]>,
        extra: &[String],
    ) -> Result<()> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--detach".into(),
            "--pull=never".into(),
            "--pod".into(),
            self.name.clone(),
            "--name".into(),
            c.name.clone(),
        ];
        args.extend(run_flags(spec, c, site, self)?);
        args.extend(extra.iter().cloned());
        let env = self.env(c);
        match command {
            Some(cmd) => {
                args.push("--entrypoint".into());
                args.push(cmd[0].clone());
                args.push(image.into());
                args.extend(cmd[1..].iter().cloned());
            }
            None => {
                if !c.command.is_empty() {
                    bail!("container {}: a command is not mapped", c.name);
                }
                args.push(image.into());
                args.extend(c.args.iter().map(|a| expand(a, &env)));
            }
        }
        podman.run(&args).map(|_| ())
    }

    fn env(&self, c: &Container) -> Vec<(String, String)> {
        c.env
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    EnvValue::Literal(s) => s.clone(),
                    EnvValue::PodUid => self.uid.clone(),
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// Moves the world's veth end into the pod's network namespace and configures it there.
    pub fn connect(&self, world: &World) -> Result<()> {
        let pid = self
            .netns
            .components()
            .nth(2)
            .and_then(|c| c.as_os_str().to_str())
            .context("no pid in the pod's netns path")?
            .to_owned();
        world.netns.ip(&["link", "set", "p0", "netns", &pid])?;
        let n = format!("--net={}", self.netns.display());
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &["ip", "addr", "add", POD_V4, "dev", "p0"][..],
            &["ip", "-6", "addr", "add", POD_V6, "dev", "p0", "nodad"][..],
            &["ip", "link", "set", "p0", "up"][..],
        ] {
            crate::cmd::Cmd::new("nsenter")
                .arg(&n)
                .args(args)
                .run_captured()?;
        }
        Ok(())
    }

    /// `GET path` on `port` of the pod's loopback, from this process (outside the pod's
    /// cgroup); the status code and body.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let netns = self.netns.clone();
        let path = path.to_owned();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<(u16, String)> {
                egress_netns::enter(&netns)?;
                http_get(SocketAddr::from(([127, 0, 0, 1], port)), &path)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("http thread panicked"))?
        })
    }
}

/// A one-shot HTTP/1.0 GET: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: e2e\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((code, body))
}

/// The podman flags for container `c` of the pod: user, capabilities, no_new_privs,
/// read-only root, seccomp, mounts and environment as the kubelet would set them.
pub fn run_flags(spec: &PodSpec, c: &Container, site: &Site, pod: &Pod) -> Result<Vec<String>> {
    let mut f: Vec<String> = Vec::new();
    if c.privileged {
        bail!("container {}: privileged is not run by the e2e", c.name);
    }
    if let Some(u) = c.run_as_user {
        f.push(format!(
            "--user={u}{}",
            c.run_as_group.map_or(String::new(), |g| format!(":{g}"))
        ));
    }
    if c.read_only_root {
        // podman would mount tmpfs on /tmp, /run, /var/tmp; the kubelet mounts nothing.
        f.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if c.no_new_privs {
        f.push("--security-opt=no-new-privileges".into());
    }
    for cap in &c.cap_drop {
        f.push(format!("--cap-drop={cap}"));
    }
    for cap in &c.cap_add {
        f.push(format!("--cap-add={cap}"));
    }
    // The container's profile, else the pod's; RuntimeDefault is podman's default profile.
    match c.seccomp.clone().or_else(|| spec.seccomp.clone()) {
        None | Some(Seccomp::RuntimeDefault) => {}
        Some(Seccomp::Unconfined) => f.push("--security-opt=seccomp=unconfined".into()),
        Some(Seccomp::Localhost(p)) => {
            let file = site.seccomp_dir.join(p.trim_start_matches("profiles/"));
            if !file.is_file() {
                bail!(
                    "container {}: no seccomp profile {}",
                    c.name,
                    file.display()
                );
            }
            f.push(format!("--security-opt=seccomp={}", file.display()));
        }
    }
    if let Some(m) = &c.memory_limit {
        let m = m.replace("Mi", "m").replace("Gi", "g");
        f.push(format!("--memory={m}"));
    }
    for (k, v) in pod.env(c) {
        f.push(format!("--env={k}={v}"));
    }
    f.push(format!(
        "--volume={}:/etc/resolv.conf:ro",
        site.resolv_conf.display()
    ));
    for m in &c.mounts {
        let Some((_, kind)) = spec.volumes.iter().find(|(n, _)| n == &m.volume) else {
            bail!("container {}: no volume {}", c.name, m.volume);
        };
        let source = match kind {
            Volume::ConfigMap(_) => site.configmap.clone(),
            Volume::HostPath(p) if p == "/sys/fs/cgroup" => site.cgroup.clone(),
            Volume::HostPath(p) if p == "/sys/fs/bpf" => site.bpffs.clone(),
            Volume::HostPath(p) => bail!("hostPath {p} is not mapped"),
            Volume::EmptyDir => {
                let d = site.empty_dirs.join(&pod.name).join(&m.volume);
                fs::create_dir_all(&d)?;
                // The kubelet makes emptyDirs world-writable (0777).
                set_mode(&d, 0o777)?;
                d
            }
        };
        let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
        if m.host_to_container {
            opts.push("rslave");
        }
        f.push(format!(
            "--volume={}:{}:{}",
            source.display(),
            m.path,
            opts.join(",")
        ));
    }
    Ok(f)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", p.display()))
}

/// The fake world: a network namespace of our own holding one end of a veth (the other end,
/// `p0`, goes into a pod), with HTTP servers on the documentation addresses and dnsmasq.
#[derive(Debug)]
pub struct World {
    pub netns: Netns,
    dnsmasq: Option<std::process::Child>,
}

impl World {
    /// Creates the namespace `name`, the veth, the servers and dnsmasq (answering
    /// `allowed.test` with .10 and `denied.test` with .20).
    pub fn create(name: &str, dir: &Path) -> Result<Self> {
        let netns = Netns::create(name)?;
        let mut world = Self {
            netns,
            dnsmasq: None,
        };
        let n = &world.netns;
        n.ip(&["link", "add", "w0", "type", "veth", "peer", "name", "p0"])?;
        n.ip(&["addr", "add", "198.51.100.1/24", "dev", "w0"])?;
        for a in WORLD_V4 {
            n.ip(&["addr", "add", &format!("{a}/32"), "dev", "w0"])?;
        }
        n.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{WORLD_V6}/64"),
            "dev",
            "w0",
            "nodad",
        ])?;
        n.ip(&["link", "set", "w0", "up"])?;
        let mut addrs: Vec<SocketAddr> = WORLD_V4[..2]
            .iter()
            .map(|a| format!("{a}:80").parse())
            .collect::<Result<_, _>>()?;
        addrs.push(format!("[{WORLD_V6}]:80").parse()?);
        crate::sandbox::serve_hello_at(n, &addrs)?;
        let log = fs::File::create(dir.join("dnsmasq.log"))?;
        let child = n
            .command("dnsmasq")?
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",
                "--no-resolv",
                "--no-poll",
                "--bind-interfaces",
                "--user=root",
                &format!("--listen-address={DNS}"),
                "--address=/allowed.test/198.51.100.10",
                "--address=/denied.test/198.51.100.20",
            ])
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dnsmasq")?;
        world.dnsmasq = Some(child);
        Ok(world)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
