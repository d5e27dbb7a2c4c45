//! The harness itself, without enforcement: the sandbox works and cannot leak.

use std::{fs, time::Duration};

use egress_tests::{
    Probe, TcpListener, TestCgroup, TestNetns, UdpListener, cgroup2_mount, require_root,
};

const WAIT: Duration = Duration::from_secs(2);

#[test]
fn cgroup_is_created_under_the_mount_and_removed_on_drop() {
    require_root();
    let mount = cgroup2_mount();
    let cg = TestCgroup::new();
    let path = cg.path().to_path_buf();
    assert_eq!(
        path.parent(),
        Some(mount.as_path()),
        "test cgroups are children of the mount"
    );
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("egress-test-{}-", std::process::id())),
        "unexpected cgroup name {name}"
    );
    assert!(cg.id() > 1, "a cgroup id is its directory's inode number");
    drop(cg);
    assert!(!path.exists(), "{} still exists after drop", path.display());
}

#[test]
fn cgroup_drop_kills_what_is_left_in_it() {
    let cg = TestCgroup::new();
    let path = cg.path().to_path_buf();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("cannot start sleep");
    fs::write(path.join("cgroup.procs"), child.id().to_string()).expect("cannot move sleep");
    assert_eq!(cg.pids(), vec![child.id() as i32]);
    drop(cg);
    let status = child.wait().expect("wait for sleep");
    assert!(
        !status.success(),
        "sleep must have been killed, got {status}"
    );
    assert!(!path.exists(), "{} still exists after drop", path.display());
}

#[test]
fn netns_has_only_loopback_and_is_deleted_on_drop() {
    let netns = TestNetns::new();
    let path = netns.path();
    assert!(path.exists(), "{} missing", path.display());
    // Not /sys/class/net: it shows the namespace sysfs was mounted in, not the thread's.
    let ifaces = netns.run_in(|| {
        let mut names = Vec::new();
        // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
        unsafe {
            let list = libc::if_nameindex();
            assert!(!list.is_null(), "if_nameindex failed");
            let mut p = list;
            while (*p).if_index != 0 {
                names.push(
                    std::ffi::CStr::from_ptr((*p).if_name)
                        .to_string_lossy()
                        .into_owned(),
                );
                p = p.add(1);
            }
            libc::if_freenameindex(list);
        }
        names
    });
    assert_eq!(
        ifaces,
        vec!["lo".to_owned()],
        "a test namespace holds only lo"
    );
    drop(netns);
    assert!(!path.exists(), "{} still exists after drop", path.display());
}

/// The premise of every deny test: from inside a test namespace, a "remote" address is
/// unreachable, so a broken enforcement shows up as ENETUNREACH, never as a packet out.
#[test]
fn remote_destinations_are_unreachable_without_enforcement() {
    let netns = TestNetns::new();
    for (action, dst) in [
        ("tcp-connect", "198.51.100.20:443"),
        ("udp-sendto", "198.51.100.20:443"),
        ("udp-connect", "198.51.100.20:443"),
        ("tcp-connect", "[2001:db8::20]:443"),
        ("udp-sendto", "[2001:db8::20]:443"),
        ("udp-connect", "[2001:db8::20]:443"),
        ("tcp-connect", "[::ffff:198.51.100.20]:443"),
    ] {
        let out = Probe::new(&netns).run(&[action, dst]);
        assert_eq!(
            out.errno,
            Some(libc::ENETUNREACH),
            "{action} {dst} from the test namespace: {out:?}"
        );
    }
}

#[test]
fn probes_reach_loopback_listeners_without_enforcement() {
    let netns = TestNetns::new();
    let cg = TestCgroup::new();
    let tcp4 = TcpListener::bind(&netns, "127.0.0.1:8080");
    let tcp6 = TcpListener::bind(&netns, "[::1]:8080");
    let udp4 = UdpListener::bind(&netns, "127.0.0.2:5300");
    let udp6 = UdpListener::bind(&netns, "[::1]:5300");

    let out = Probe::new(&netns).run(&["tcp-connect", "127.0.0.1:8080"]);
    assert!(out.ok, "tcp 127.0.0.1:8080: {out:?}");
    // In a cgroup with no programs attached, everything works too.
    let out = Probe::new(&netns)
        .in_cgroup(&cg)
        .run(&["tcp-connect", "[::ffff:127.0.0.1]:8080"]);
    assert!(out.ok, "tcp [::ffff:127.0.0.1]:8080: {out:?}");
    assert!(tcp4.wait_received(2, WAIT), "tcp4 got {}", tcp4.received());
    assert_eq!(tcp4.payloads(), vec![b"probe\n".to_vec(); 2]);

    let out = Probe::new(&netns).run(&["tcp-connect", "[::1]:8080"]);
    assert!(out.ok, "tcp [::1]:8080: {out:?}");
    assert!(tcp6.wait_received(1, WAIT), "tcp6 got {}", tcp6.received());

    for action in ["udp-sendto", "udp-connect"] {
        let out = Probe::new(&netns).run(&[action, "127.0.0.2:5300"]);
        assert!(out.ok, "{action} 127.0.0.2:5300: {out:?}");
        let out = Probe::new(&netns)
            .in_cgroup(&cg)
            .run(&[action, "[::1]:5300"]);
        assert!(out.ok, "{action} [::1]:5300: {out:?}");
    }
    assert!(udp4.wait_received(2, WAIT), "udp4 got {}", udp4.received());
    assert!(udp6.wait_received(2, WAIT), "udp6 got {}", udp6.received());
    assert_eq!(udp6.payloads(), vec![b"probe\n".to_vec(); 2]);
    assert!(
        cg.pids().is_empty(),
        "finished probes left the cgroup empty"
    );
}

#[test]
fn probe_reports_connection_refused_as_an_error() {
    let netns = TestNetns::new();
    let out = Probe::new(&netns).run(&["tcp-connect", "127.0.0.1:9"]);
    assert!(!out.ok);
    assert_eq!(out.errno, Some(libc::ECONNREFUSED), "{out:?}");
    assert!(!out.is_eperm());
}
