//! `lsm_cgroup/socket_create`: the address families a process of the cgroup may open.
//!
//! The cgroup socket hooks see AF_INET and AF_INET6 only. A packet socket (AF_PACKET) writes
//! whole frames, a vsock (AF_VSOCK) talks to the hypervisor's host, and a dozen rarer
//! families (TIPC, RDS, SMC, Bluetooth, CAN, XDP...) carry data past every one of them. This
//! program allows the families a program needs to reach the network through the judged path
//! or to talk locally (unix, inet, inet6, netlink, alg) and refuses every other one with
//! EPERM, whatever the process's capabilities: root in the cgroup gets no frame out.
//!
//! BPF LSM cgroup programs need kernel 6.0 and the BPF LSM active (`bpf` in the `lsm=` list);
//! where either is missing, the agent says so at start (docs/KERNEL-NOTES.md).

use aya_ebpf::{macros::lsm_cgroup, programs::LsmContext};
use egress_common::{
    consts::VERDICT_ALLOW,
    events::{hook, reason},
};

use super::verdict::{Destination, deny, exempt};

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const AF_ALG: i32 = 38;

// security_socket_create(int family, int type, int protocol, int kern)
#[lsm_cgroup(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    // A socket the kernel opens for itself (a subflow, a tunnel's carrier) belongs to a
    // socket that was judged when the process opened it.
    if kern != 0 || matches!(family, AF_UNIX | AF_INET | AF_INET6 | AF_NETLINK | AF_ALG) {
        return VERDICT_ALLOW;
    }
    if exempt() {
        return VERDICT_ALLOW;
    }
    let dst = Destination {
        addr: [0; 16],
        // The family rides in the port field of the event (see `hook::SOCKET_CREATE`).
        port: family as u16,
        ip_proto: protocol as u32,
        hook: hook::SOCKET_CREATE,
    };
    deny(&dst, reason::FAMILY)
}
