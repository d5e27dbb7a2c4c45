//! The seccomp filter `run` puts on its command (after `no_new_privs`):
//! - `ioctl(TIOCSTI)` and `ioctl(TIOCLINUX)` answer `EPERM`: they type into the caller's
//!   terminal, which runs it after `run` exits;
//! - `setsockopt` of a source-routing option (`IP_OPTIONS`, `IPV6_RTHDR`, `IPV6_2292RTHDR`,
//!   `IPV6_2292PKTOPTIONS`) answers `EPERM`: the packets would go on past the judged address;
//! - io_uring answers `ENOSYS` where the family rule is on (see [`Rules::io_uring`]);
//! - `clone3` answers `ENOSYS`: `clone3(CLONE_INTO_CGROUP)` could place a child in another
//!   cgroup (docs/KERNEL-NOTES.md); glibc falls back to `clone`, which cannot name one;
//! - `request_key` answers `ENOSYS`, as on a kernel built without keys: a key the caller's
//!   keyrings lack makes the kernel run `/sbin/request-key` as root, in the root cgroup and the
//!   machine's namespaces, with the description the caller chose; with keyutils installed, a
//!   `dns_resolver` key resolves that description through the host's resolver, a name out past
//!   the agent's (docs/THREATS.md). `add_key` and `keyctl` start no helper and stay;
//! - `socket` and `socketpair` of a family other than unix, inet, inet6, netlink and alg answer
//!   `EPERM`: a packet socket, a vsock to the hypervisor's host, TIPC, RDS, SMC and the rest
//!   carry data past every cgroup socket hook. This is the family guard of the BPF LSM program
//!   (`lsm_cgroup/socket_create`) for kernels that cannot load it, and it holds whatever
//!   capabilities the command keeps.
//!
//! On x86_64 the i386 entry points are covered too (a 32-bit binary runs under the same
//! filter): `socket`/`socketpair` are judged the same way, and `socketcall`, whose arguments
//! sit behind a pointer the filter cannot read, answers `EPERM` (glibc has used the direct
//! calls since Linux 4.3). A system call through any other ABI, whose numbers this filter
//! does not know (AArch32 on an arm64 kernel built with `COMPAT`), kills the process: let
//! through, it would pass every rule above, `clone3` included.

/// The families a confined command may open.
pub const ALLOWED_FAMILIES: [u32; 5] = [
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
    libc::AF_NETLINK as u32,
    libc::AF_ALG as u32,
];

const SYS_CLONE3: u32 = 435;
/// `io_uring_setup`, `io_uring_enter`, `io_uring_register`: the same numbers on every
/// architecture (and the i386 entry points).
const SYS_IO_URING: [u32; 3] = [425, 426, 427];
/// `TIOCSTI` (push a byte into a terminal's input queue) and `TIOCLINUX` (its subcode 2 pastes
/// the console selection): either types a command into the shell that started `run`.
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541c;
/// Socket options that source-route a socket's packets past the destination its connect or
/// send was judged for: (level, option). `IP_OPTIONS` (LSRR/SSRR among the options; nothing
/// an ordinary program sets), `IPV6_RTHDR`, `IPV6_2292RTHDR`, and `IPV6_2292PKTOPTIONS`, which
/// can carry a routing header too.
const ROUTING_OPTIONS: [(u32, u32); 4] = [
    (libc::IPPROTO_IP as u32, libc::IP_OPTIONS as u32),
    (libc::IPPROTO_IPV6 as u32, 57),
    (libc::IPPROTO_IPV6 as u32, 5),
    (libc::IPPROTO_IPV6 as u32, 6),
];

/// System call numbers of the architecture the agent runs on.
struct Abi {
    arch: u32,
    socket: u32,
    socketpair: u32,
    ioctl: u32,
    setsockopt: u32,
    request_key: u32,
    /// Bits to clear from the number first (x32's flag).
    mask: u32,
}

#[cfg(target_arch = "x86_64")]
const NATIVE: Option<Abi> = Some(Abi {
    arch: 0xc000_003e,
    socket: 41,
    socketpair: 53,
    ioctl: 16,
    setsockopt: 54,
    request_key: 249,
    mask: !0x4000_0000,
});
#[cfg(target_arch = "aarch64")]
const NATIVE: Option<Abi> = Some(Abi {
    arch: 0xc000_00b7,
    socket: 198,
    socketpair: 199,
    ioctl: 29,
    setsockopt: 208,
    request_key: 218,
    mask: !0,
});
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE: Option<Abi> = None;

/// i386, the compat ABI of an x86_64 kernel.
#[cfg(target_arch = "x86_64")]
const COMPAT: Option<(Abi, u32)> = Some((
    Abi {
        arch: 0x4000_0003,
        socket: 359,
        socketpair: 360,
        ioctl: 54,
        setsockopt: 366,
        request_key: 287,
        mask: !0,
    },
    // socketcall
    102,
));
#[cfg(not(target_arch = "x86_64"))]
const COMPAT: Option<(Abi, u32)> = None;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;

/// `seccomp_data` offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of the first argument (little endian).
const OFF_ARG0: u32 = 16;
/// The low 32 bits of the second argument (an ioctl's request: the kernel reads it as an
/// `unsigned int`).
const OFF_ARG1: u32 = 24;
/// The low 32 bits of the third argument (a socket option's name).
const OFF_ARG2: u32 = 32;

const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_KILL_PROCESS` (Linux 4.14).
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

/// One instruction, with jumps to labels resolved by [`assemble`].
enum Op {
    Ld(u32),
    And(u32),
    /// Jump to the label when A equals the constant; fall through otherwise.
    JeqTo(u32, &'static str),
    Ret(u32),
    Label(&'static str),
}

/// What the filter refuses beyond `clone3` and the terminal ioctls, which it always refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Socket families other than [`ALLOWED_FAMILIES`] (left out where the BPF LSM family
    /// guard runs: it refuses them too, and reports each).
    pub families: bool,
    /// io_uring (`ENOSYS`, as on a kernel built without it, so programs fall back to plain
    /// syscalls): `IORING_OP_SOCKET` creates sockets without `socket()`, out of the family
    /// rule's sight, so it goes with the family rule unless `--allow-io-uring`.
    pub io_uring: bool,
}

/// The filter program for `rules`.
pub fn filter(rules: Rules) -> Vec<libc::sock_filter> {
    use Op::*;
    let enosys = RET_ERRNO | libc::ENOSYS as u32;
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let mut ops = Vec::new();
    let Some(native) = NATIVE else {
        // An architecture without known numbers: what has the same number everywhere.
        ops.extend([Ld(OFF_NR), JeqTo(SYS_CLONE3, "enosys")]);
        if rules.io_uring {
            ops.extend(SYS_IO_URING.map(|nr| JeqTo(nr, "enosys")));
        }
        ops.extend([Ret(RET_ALLOW), Label("enosys"), Ret(enosys)]);
        return assemble(&ops);
    };
    ops.push(Ld(OFF_ARCH));
    ops.push(JeqTo(native.arch, "native"));
    if let Some((compat, _)) = &COMPAT {
        ops.push(JeqTo(compat.arch, "compat"));
    }
    // Another ABI (AArch32 on arm64): its numbers are not known here, so nothing could be
    // judged; closed rather than open.
    ops.push(Ret(RET_KILL_PROCESS));
    ops.push(Label("native"));
    ops.push(Ld(OFF_NR));
    if native.mask != !0 {
        ops.push(And(native.mask));
    }
    ops.extend(abi_rules(&native, None, rules));
    if let Some((compat, socketcall)) = &COMPAT {
        ops.extend([Label("compat"), Ld(OFF_NR)]);
        ops.extend(abi_rules(compat, Some(*socketcall), rules));
    }
    ops.extend([
        Label("ioctl"),
        Ld(OFF_ARG1),
        JeqTo(TIOCSTI, "eperm"),
        JeqTo(TIOCLINUX, "eperm"),
        Ret(RET_ALLOW),
    ]);
    // setsockopt: A = level, then the option's name per level.
    ops.extend([
        Label("setsockopt"),
        Ld(OFF_ARG1),
        JeqTo(libc::IPPROTO_IP as u32, "sockopt_ip"),
        JeqTo(libc::IPPROTO_IPV6 as u32, "sockopt_ipv6"),
        Ret(RET_ALLOW),
    ]);
    for (label, level) in [
        ("sockopt_ip", libc::IPPROTO_IP as u32),
        ("sockopt_ipv6", libc::IPPROTO_IPV6 as u32),
    ] {
        ops.extend([Label(label), Ld(OFF_ARG2)]);
        for (l, name) in ROUTING_OPTIONS {
            if l == level {
                ops.push(JeqTo(name, "eperm"));
            }
        }
        ops.push(Ret(RET_ALLOW));
    }
    ops.push(Label("family"));
    ops.push(Ld(OFF_ARG0));
    for f in ALLOWED_FAMILIES {
        ops.push(JeqTo(f, "allow"));
    }
    ops.extend([
        Label("eperm"),
        Ret(eperm),
        Label("enosys"),
        Ret(enosys),
        Label("allow"),
        Ret(RET_ALLOW),
    ]);
    assemble(&ops)
}

/// The checks on the system call number (in A) of one ABI.
fn abi_rules(abi: &Abi, socketcall: Option<u32>, rules: Rules) -> Vec<Op> {
    use Op::*;
    let mut ops = vec![
        JeqTo(SYS_CLONE3, "enosys"),
        JeqTo(abi.request_key, "enosys"),
        JeqTo(abi.ioctl, "ioctl"),
        JeqTo(abi.setsockopt, "setsockopt"),
    ];
    if rules.io_uring {
        ops.extend(SYS_IO_URING.map(|nr| JeqTo(nr, "enosys")));
    }
    if rules.families {
        if let Some(sc) = socketcall {
            ops.push(JeqTo(sc, "eperm"));
        }
        ops.extend([JeqTo(abi.socket, "family"), JeqTo(abi.socketpair, "family")]);
    }
    ops.push(Ret(RET_ALLOW));
    ops
}

/// Resolves labels (forward jumps only, as classic BPF requires).
fn assemble(ops: &[Op]) -> Vec<libc::sock_filter> {
    let mut at = std::collections::HashMap::new();
    let mut pc = 0usize;
    for op in ops {
        match op {
            Op::Label(l) => {
                at.insert(*l, pc);
            }
            _ => pc += 1,
        }
    }
    let ins = |code, jt, k| libc::sock_filter { code, jt, jf: 0, k };
    let mut out = Vec::with_capacity(pc);
    for op in ops {
        let here = out.len();
        out.push(match op {
            Op::Label(_) => continue,
            Op::Ld(off) => ins(LD_W_ABS, 0, *off),
            Op::And(k) => ins(ALU_AND_K, 0, *k),
            Op::Ret(k) => ins(RET_K, 0, *k),
            Op::JeqTo(k, label) => {
                let target = at[label];
                let jt = u8::try_from(target - here - 1).expect("a short forward jump");
                ins(JEQ_K, jt, *k)
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter on (arch, nr, arg0) the way the kernel does (arg0 also stands for
    /// arg1).
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        run3(prog, arch, nr, [arg0, arg0, 0])
    }

    /// The same with three arguments.
    fn run3(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u32; 3]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    a = match i.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0 => args[0],
                        OFF_ARG1 => args[1],
                        OFF_ARG2 => args[2],
                        other => panic!("load of offset {other}"),
                    }
                }
                ALU_AND_K => a &= i.k,
                JEQ_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                RET_K => return i.k,
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_families_clone3_and_the_i386_entry_points() {
        let p = filter(Rules {
            families: true,
            io_uring: true,
        });
        let (x86_64, i386) = (0xc000_003e, 0x4000_0003);
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let enosys = RET_ERRNO | libc::ENOSYS as u32;
        for f in ALLOWED_FAMILIES {
            assert_eq!(run(&p, x86_64, 41, f), RET_ALLOW, "socket({f})");
            assert_eq!(run(&p, x86_64, 53, f), RET_ALLOW, "socketpair({f})");
            assert_eq!(run(&p, i386, 359, f), RET_ALLOW, "i386 socket({f})");
        }
        for f in [17, 40, 44, 30, 21, 43] {
            assert_eq!(run(&p, x86_64, 41, f), eperm, "socket({f})");
            assert_eq!(
                run(&p, x86_64, 41 | 0x4000_0000, f),
                eperm,
                "x32 socket({f})"
            );
            assert_eq!(run(&p, x86_64, 53, f), eperm, "socketpair({f})");
            assert_eq!(run(&p, i386, 359, f), eperm, "i386 socket({f})");
            assert_eq!(run(&p, i386, 360, f), eperm, "i386 socketpair({f})");
        }
        assert_eq!(run(&p, i386, 102, 1), eperm, "socketcall");
        assert_eq!(run(&p, x86_64, 435, 0), enosys);
        assert_eq!(run(&p, i386, 435, 0), enosys);
        // request_key, on every entry point; add_key and keyctl pass.
        assert_eq!(run(&p, x86_64, 249, 0), enosys, "request_key");
        assert_eq!(
            run(&p, x86_64, 249 | 0x4000_0000, 0),
            enosys,
            "x32 request_key"
        );
        assert_eq!(run(&p, i386, 287, 0), enosys, "i386 request_key");
        for (arch, nr) in [(x86_64, 248), (x86_64, 250), (i386, 286), (i386, 288)] {
            assert_eq!(run(&p, arch, nr, 0), RET_ALLOW, "add_key/keyctl {nr}");
        }
        // Everything else passes: read, connect, the x86_64 number 102 (getuid).
        assert_eq!(run(&p, x86_64, 0, 17), RET_ALLOW);
        assert_eq!(run(&p, x86_64, 42, 17), RET_ALLOW);
        assert_eq!(run(&p, x86_64, 102, 17), RET_ALLOW);
        assert_eq!(run(&p, 0x1234, 41, 17), RET_KILL_PROCESS, "an unknown ABI");
        // AArch32's, as an arm64 kernel reports it: no number of it is judged, so none runs.
        assert_eq!(run(&p, 0x4000_0028, 20, 0), RET_KILL_PROCESS, "AArch32");
        // The terminal ioctls, on both entry points; other ioctls pass.
        for (arch, ioctl) in [(x86_64, 16), (i386, 54)] {
            assert_eq!(run(&p, arch, ioctl, TIOCSTI), eperm, "TIOCSTI");
            assert_eq!(run(&p, arch, ioctl, TIOCLINUX), eperm, "TIOCLINUX");
            assert_eq!(run(&p, arch, ioctl, 0x5401), RET_ALLOW, "TCGETS");
            for nr in SYS_IO_URING {
                assert_eq!(run(&p, arch, nr, 0), enosys, "io_uring {nr}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn source_routing_socket_options_are_refused() {
        let p = filter(Rules {
            families: false,
            io_uring: false,
        });
        let eperm = RET_ERRNO | libc::EPERM as u32;
        for (arch, setsockopt) in [(0xc000_003e, 54), (0x4000_0003, 366)] {
            assert_eq!(run3(&p, arch, setsockopt, [3, 0, 4]), eperm, "IP_OPTIONS");
            for opt in [57, 5, 6] {
                assert_eq!(
                    run3(&p, arch, setsockopt, [3, 41, opt]),
                    eperm,
                    "IPv6 {opt}"
                );
            }
            // IP_TOS, IPV6_V6ONLY, SO_REUSEADDR, TCP_NODELAY pass.
            assert_eq!(run3(&p, arch, setsockopt, [3, 0, 1]), RET_ALLOW);
            assert_eq!(run3(&p, arch, setsockopt, [3, 41, 26]), RET_ALLOW);
            assert_eq!(run3(&p, arch, setsockopt, [3, 1, 2]), RET_ALLOW);
            assert_eq!(run3(&p, arch, setsockopt, [3, 6, 1]), RET_ALLOW);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn io_uring_is_refused_only_with_its_rule() {
        let p = filter(Rules {
            families: true,
            io_uring: false,
        });
        for nr in SYS_IO_URING {
            assert_eq!(run(&p, 0xc000_003e, nr, 0), RET_ALLOW, "io_uring {nr}");
        }
        assert_eq!(
            run(&p, 0xc000_003e, 16, TIOCSTI),
            RET_ERRNO | libc::EPERM as u32
        );
    }

    #[test]
    fn without_the_family_rule_sockets_pass() {
        let p = filter(Rules {
            families: false,
            io_uring: false,
        });
        let arch = NATIVE.map_or(0, |n| n.arch);
        assert_eq!(run(&p, arch, 435, 0), RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(run(&p, arch, 41, 17), RET_ALLOW);
        if let Some(n) = NATIVE {
            assert_eq!(
                run(&p, arch, n.request_key, 0),
                RET_ERRNO | libc::ENOSYS as u32,
                "request_key, whatever the rules"
            );
        }
    }

    #[test]
    fn every_jump_lands_inside_the_program() {
        let all = [(true, true), (true, false), (false, true), (false, false)];
        for p in all.map(|(families, io_uring)| filter(Rules { families, io_uring })) {
            for (pc, i) in p.iter().enumerate() {
                if i.code == JEQ_K {
                    assert!(pc + 1 + usize::from(i.jt) < p.len());
                }
            }
            assert_eq!(p.last().map(|i| i.code), Some(RET_K));
        }
    }
}
