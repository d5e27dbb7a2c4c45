//! Test network namespaces: created with `ip netns add`, holding only `lo`.

use std::{ffi::OsStr, fs, path::PathBuf, process::Command, process::Stdio};

use egress_netns::Netns;

use crate::unique_name;

/// A network namespace `egress-test-{pid}-{n}` with `lo` up (127.0.0.0/8 and ::1) and no
/// other interface: nothing sent from inside can leave the machine. Dropping it deletes it.
/// The tests' face of [`egress_netns::Netns`] (the one implementation the bench and the demo
/// use too): it panics where that returns an error.
#[derive(Debug)]
pub struct TestNetns {
    netns: Netns,
}

impl TestNetns {
    /// Creates the namespace and brings `lo` up; panics if it cannot.
    pub fn new() -> Self {
        crate::require_root();
        let netns = Netns::create(&unique_name()).unwrap_or_else(|e| panic!("{e}"));
        Self { netns }
    }

    /// Adds `cidr` (e.g. `198.51.100.20/32`) to the namespace's `lo`: a "remote" host
    /// without a veth (the `dummy` link type may be missing).
    pub fn add_lo_address(&self, cidr: &str) {
        self.netns
            .add_lo_address(cidr)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        self.netns.name()
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        self.netns.path()
    }

    /// A command whose process joins this namespace before `exec`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.netns
            .command(program)
            .unwrap_or_else(|e| panic!("cannot duplicate the netns descriptor: {e}"))
    }

    /// Runs `f` on a fresh thread that first joins this namespace. Network namespaces are
    /// per thread; sockets created in `f` stay in the namespace wherever they are used later.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.netns.run_in(f).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl TestNetns {
    /// Lets every group open ICMP datagram ("ping") sockets in this namespace:
    /// `net.ipv4.ping_group_range` is per namespace (it covers ICMPv6 too), and the host's
    /// value must not change, which this checks. Set through `sysctl` in a child that joined
    /// only the network namespace.
    pub fn enable_ping_sockets(&self) {
        let host = fs::read_to_string(PING_GROUP_RANGE).unwrap_or_default();
        let out = self
            .command("sysctl")
            .args(["-w", "net.ipv4.ping_group_range=0 2147483647"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run sysctl: {e}"));
        assert!(
            out.status.success(),
            "cannot enable ping sockets in {}: {}",
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let after = fs::read_to_string(PING_GROUP_RANGE).unwrap_or_default();
        assert_eq!(host, after, "the host's ping_group_range changed");
    }

    /// `Icmp: InEchos` and `Icmp6: InEchos` of the namespace: the echo requests its stack
    /// received (and answered).
    pub fn in_echos(&self) -> (u64, u64) {
        self.run_in(|| {
            // thread-self: /proc/self/net would show the namespace of the main thread.
            let snmp = fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
            let snmp6 = fs::read_to_string("/proc/thread-self/net/snmp6").expect("read snmp6");
            (
                snmp_field(&snmp, "Icmp", "InEchos"),
                snmp6_field(&snmp6, "Icmp6InEchos"),
            )
        })
    }
}

const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

/// A field of `/proc/net/snmp` (a header line and a value line per protocol).
fn snmp_field(text: &str, proto: &str, field: &str) -> u64 {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {proto} {field} in /proc/net/snmp"))
}

/// A field of `/proc/net/snmp6` (one `name value` a line).
fn snmp6_field(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == field).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/net/snmp6"))
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}
