//! The unix socket watch of `run`: two small cgroup programs on the cgroup unix
//! socket-address hooks (`BPF_CGROUP_UNIX_CONNECT`, `BPF_CGROUP_UNIX_SENDMSG`, Linux 6.7) that
//! copy each unix `connect`/`sendmsg` address of the cgroup, with the process, into a ring
//! buffer. A path they cannot judge: the hooks run before the lookup and see only the address
//! as written (relative, through symlinks), so they cannot tell the command's own sockets from
//! one bound outside; the deputy view does the refusing, and the agent names a refused attempt
//! in a `deny` event (see `crate::workload::deputies`). An abstract name is exact: where
//! Landlock's scope is off, they refuse the names in a deny map (`UNIX_DENIED`).
//!
//! aya 0.14 has no attach type for these hooks (and a program's expected attach type is fixed
//! at load), so the programs are assembled here and loaded and attached with raw `bpf()`
//! calls. Each reads the address through `bpf_probe_read_kernel` of the context's kernel
//! struct (`bpf_sock_addr_kern`: `uaddr` at 8, `uaddrlen` at 32, unchanged since 6.7; this is
//! allowed at lockdown `integrity`, not at `confidentiality`).

use std::{
    ffi::CStr,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};

/// `bpf()` commands and types (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_CGROUP_UNIX_CONNECT` (Linux 6.7).
pub const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
/// `BPF_CGROUP_UNIX_SENDMSG` (Linux 6.7).
pub const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;

/// Ring buffer size: 64 KiB holds about 400 records.
const RING_BYTES: u32 = 64 * 1024;

/// One record: pid_tgid (8), uid_gid (8), comm (16), hook (4), address length (4), the
/// address as the caller gave it (`sockaddr_un`: family, then 108 bytes of path; 112 read).
const RECORD: i32 = 152;
const OFF_COMM: i32 = 16;
const OFF_HOOK: i16 = 32;
const OFF_LEN: i16 = 36;
const OFF_ADDR: i32 = 40;
const ADDR_BYTES: i32 = 112;

/// Room in the deny map for abstract names bound outside after the start.
const MAX_LATE_ABSTRACT: usize = 4096;

/// Where the judged copy of the address sits on the stack (below the 40-byte context copy).
const KEY_AT: i16 = -152;

/// The key of an abstract name in the deny map: the address as the programs read it
/// (`AF_UNIX`, a zero byte, the name), zero-filled to [`ADDR_BYTES`].
pub fn abstract_key(name: &[u8]) -> [u8; ADDR_BYTES as usize] {
    let mut k = [0u8; ADDR_BYTES as usize];
    k[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    let n = name.len().min(k.len() - 3);
    k[3..3 + n].copy_from_slice(&name[..n]);
    k
}

/// One unix `connect` or `sendmsg` of the cgroup, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAttempt {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// The process's command name.
    pub comm: String,
    /// `connect_unix` or `sendmsg_unix`.
    pub hook: &'static str,
    /// The address.
    pub target: UnixTarget,
}

/// A unix address as the caller wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixTarget {
    /// A path (as written: it may be relative).
    Path(String),
    /// An abstract name, without its leading zero byte.
    Abstract(String),
    /// No name (autobind, or an address too short to hold one).
    Unnamed,
}

impl UnixAttempt {
    /// Decodes a record the programs wrote.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < RECORD as usize {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let (pid_tgid, uid_gid) = (u64_at(0), u64_at(8));
        let comm = &b[OFF_COMM as usize..OFF_COMM as usize + 16];
        let comm_end = comm.iter().position(|&c| c == 0).unwrap_or(16);
        let hook = match u32_at(OFF_HOOK as usize) {
            BPF_CGROUP_UNIX_SENDMSG => "sendmsg_unix",
            _ => "connect_unix",
        };
        // sun_path follows the 2-byte family; its length is the address length minus 2.
        let len = (u32_at(OFF_LEN as usize) as usize).min(ADDR_BYTES as usize);
        let path = &b[OFF_ADDR as usize + 2..OFF_ADDR as usize + len.max(2)];
        let target = match path.first() {
            None => UnixTarget::Unnamed,
            Some(0) if path.len() == 1 => UnixTarget::Unnamed,
            Some(0) => UnixTarget::Abstract(String::from_utf8_lossy(&path[1..]).into_owned()),
            Some(_) => {
                let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                UnixTarget::Path(String::from_utf8_lossy(&path[..end]).into_owned())
            }
        };
        Some(Self {
            pid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            comm: String::from_utf8_lossy(&comm[..comm_end]).into_owned(),
            hook,
            target,
        })
    }
}

/// The attached programs and their ring buffer; dropping it detaches them.
pub struct UnixWatch {
    ring: RingBuf<MapData>,
    /// The abstract deny map, when the programs judge abstract names.
    deny: Option<OwnedFd>,
    /// The links, then the programs.
    fds: Vec<OwnedFd>,
}

impl UnixWatch {
    /// The ring buffer, and what keeps the programs attached (drop it to detach them).
    pub fn into_parts(self) -> (RingBuf<MapData>, Vec<OwnedFd>) {
        (self.ring, self.fds)
    }

    /// A descriptor of the abstract deny map, when the programs judge abstract names (add
    /// names with [`deny_abstract`]).
    pub fn deny_map(&self) -> Option<OwnedFd> {
        self.deny.as_ref().and_then(|d| d.try_clone().ok())
    }
}

impl std::fmt::Debug for UnixWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnixWatch")
    }
}

/// Loads the two programs and attaches them to `cgroup`. Fails on kernels before 6.7 (the
/// attach types do not exist: `EINVAL`). With `deny_abstract` names, the programs also refuse
/// (`EPERM`) a connect or send to any of them, and to any name added later with
/// [`deny_abstract`]: an abstract address is exact, so the hooks can judge it before the
/// lookup. `None`: they judge nothing.
pub fn attach(cgroup: &Path, deny_abstract: Option<&[Vec<u8>]>) -> anyhow::Result<UnixWatch> {
    let ring = map_create()?;
    let deny = if let Some(deny_abstract) = deny_abstract {
        let m = hash_create(deny_abstract.len() + MAX_LATE_ABSTRACT)?;
        for name in deny_abstract {
            map_update(&m, &abstract_key(name), &[1])
                .context("cannot fill the unix watch's abstract deny map")?;
        }
        Some(m)
    } else {
        None
    };
    let dir =
        std::fs::File::open(cgroup).with_context(|| format!("cannot open {}", cgroup.display()))?;
    let mut progs = Vec::new();
    let mut links = Vec::new();
    for (hook, name) in [
        (BPF_CGROUP_UNIX_CONNECT, c"connect_unix"),
        (BPF_CGROUP_UNIX_SENDMSG, c"sendmsg_unix"),
    ] {
        let deny_fd = deny.as_ref().map(|d| d.as_raw_fd());
        let prog = prog_load(&program(ring.as_raw_fd(), hook, deny_fd), hook, name)
            .with_context(|| format!("cannot load {}", name.to_string_lossy()))?;
        links.push(
            link_create(prog.as_fd(), dir.as_raw_fd(), hook)
                .with_context(|| format!("cannot attach {}", name.to_string_lossy()))?,
        );
        progs.push(prog);
    }
    let map = MapData::from_fd(ring).context("cannot open the unix watch's ring buffer")?;
    let ring = RingBuf::try_from(Map::RingBuf(map)).context("not a ring buffer")?;
    links.extend(progs);
    let kept = deny.as_ref().map(|d| d.try_clone()).transpose()?;
    links.extend(deny);
    Ok(UnixWatch {
        ring,
        deny: kept,
        fds: links,
    })
}

/// Whether this kernel has the cgroup unix socket hooks (Linux 6.7): a two-instruction
/// program for `BPF_CGROUP_UNIX_CONNECT` loads (and is closed at once).
pub fn hooks_available() -> bool {
    let p = [ins(MOV_K, 0, 0, 0, 1), ins(EXIT, 0, 0, 0, 0)];
    prog_load(&p, BPF_CGROUP_UNIX_CONNECT, c"unix_probe").is_ok()
}

/// One eBPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

const MOV_X: u8 = 0xbf;
const MOV_K: u8 = 0xb7;
const ADD_K: u8 = 0x07;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGT_K: u8 = 0x25;
const JLE_K: u8 = 0xb5;
const ST_B: u8 = 0x72;
const LDX_B: u8 = 0x71;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const STX_DW: u8 = 0x7b;
const STX_W: u8 = 0x63;
const ST_W: u8 = 0x62;
const LDX_DW: u8 = 0x79;
const LDX_W: u8 = 0x61;
const PSEUDO_MAP_FD: u8 = 1;
const FN_GET_CURRENT_PID_TGID: i32 = 14;
const FN_GET_CURRENT_UID_GID: i32 = 15;
const FN_GET_CURRENT_COMM: i32 = 16;
const FN_PROBE_READ_KERNEL: i32 = 113;
const FN_RINGBUF_RESERVE: i32 = 131;
const FN_RINGBUF_SUBMIT: i32 = 132;

/// The program for `hook`: judge an abstract address against `deny` (when given: r9 = 0 to
/// refuse, 1 to allow), then reserve a record, fill it, submit it, return r9. The judgement
/// comes first so that a full ring cannot skip it.
fn program(ring_fd: i32, hook: u32, deny: Option<i32>) -> Vec<Insn> {
    let mut p = vec![
        ins(MOV_X, 6, 1, 0, 0), // r6 = ctx
        ins(MOV_K, 9, 0, 0, 1), // r9 = allow
    ];
    if let Some(fd) = deny {
        p.extend(judge(fd));
    }
    p.extend(record(ring_fd, hook));
    p
}

/// Sets r9 = 0 when the address is an abstract name in the deny map: the address is copied
/// to the stack, the bytes past its length zeroed (the kernel's copy holds garbage there),
/// and looked up whole.
fn judge(deny_fd: i32) -> Vec<Insn> {
    // Jumps to the end are written with offset 0 and patched below.
    let mut p = vec![
        // The kernel context onto the stack: uaddrlen at -8, uaddr at -32.
        ins(MOV_X, 1, 10, 0, 0),
        ins(ADD_K, 1, 0, 0, -40),
        ins(MOV_K, 2, 0, 0, 40),
        ins(MOV_X, 3, 6, 0, 0),
        ins(CALL, 0, 0, 0, FN_PROBE_READ_KERNEL),
        ins(LDX_W, 8, 10, -8, 0), // r8 = uaddrlen
        ins(MOV_X, 1, 10, 0, 0),
        ins(ADD_K, 1, 0, 0, KEY_AT as i32),
        ins(MOV_K, 2, 0, 0, ADDR_BYTES),
        ins(LDX_DW, 3, 10, -32, 0),
        ins(CALL, 0, 0, 0, FN_PROBE_READ_KERNEL),
    ];
    let mut to_end = vec![p.len()];
    p.push(ins(JLE_K, 8, 0, 0, 3)); // unnamed, or no name after the zero byte
    p.push(ins(LDX_B, 1, 10, KEY_AT + 2, 0)); // sun_path[0]
    to_end.push(p.len());
    p.push(ins(JNE_K, 1, 0, 0, 0)); // a path: the view judges it
    for i in 0..ADDR_BYTES {
        p.push(ins(JGT_K, 8, 0, 1, i)); // within the address: keep the byte
        p.push(ins(ST_B, 10, 0, KEY_AT + i as i16, 0));
    }
    p.push(ins(LD_IMM64, 1, PSEUDO_MAP_FD, 0, deny_fd));
    p.push(ins(0, 0, 0, 0, 0));
    p.push(ins(MOV_X, 2, 10, 0, 0));
    p.push(ins(ADD_K, 2, 0, 0, KEY_AT as i32));
    p.push(ins(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
    to_end.push(p.len());
    p.push(ins(JEQ_K, 0, 0, 0, 0)); // not in the map
    p.push(ins(MOV_K, 9, 0, 0, 0)); // refuse
    let end = p.len();
    for j in to_end {
        p[j].off = (end - j - 1) as i16;
    }
    p
}

/// Reserves a record, fills it, submits it; returns r9.
fn record(ring_fd: i32, hook: u32) -> Vec<Insn> {
    vec![
        ins(LD_IMM64, 1, PSEUDO_MAP_FD, 0, ring_fd),
        ins(0, 0, 0, 0, 0),
        ins(MOV_K, 2, 0, 0, RECORD),
        ins(MOV_K, 3, 0, 0, 0),
        ins(CALL, 0, 0, 0, FN_RINGBUF_RESERVE),
        ins(JEQ_K, 0, 0, 25, 0), // full ring: allow, unrecorded
        ins(MOV_X, 7, 0, 0, 0),
        ins(CALL, 0, 0, 0, FN_GET_CURRENT_PID_TGID),
        ins(STX_DW, 7, 0, 0, 0),
        ins(CALL, 0, 0, 0, FN_GET_CURRENT_UID_GID),
        ins(STX_DW, 7, 0, 8, 0),
        ins(MOV_X, 1, 7, 0, 0),
        ins(ADD_K, 1, 0, 0, OFF_COMM),
        ins(MOV_K, 2, 0, 0, 16),
        ins(CALL, 0, 0, 0, FN_GET_CURRENT_COMM),
        ins(ST_W, 7, 0, OFF_HOOK, hook as i32),
        // The kernel context (struct bpf_sock_addr_kern, 40 bytes) onto the stack.
        ins(MOV_X, 1, 10, 0, 0),
        ins(ADD_K, 1, 0, 0, -40),
        ins(MOV_K, 2, 0, 0, 40),
        ins(MOV_X, 3, 6, 0, 0),
        ins(CALL, 0, 0, 0, FN_PROBE_READ_KERNEL),
        ins(LDX_W, 1, 10, -8, 0), // uaddrlen (offset 32)
        ins(STX_W, 7, 1, OFF_LEN, 0),
        ins(LDX_DW, 3, 10, -32, 0), // uaddr (offset 8)
        ins(MOV_X, 1, 7, 0, 0),
        ins(ADD_K, 1, 0, 0, OFF_ADDR),
        ins(MOV_K, 2, 0, 0, ADDR_BYTES),
        ins(CALL, 0, 0, 0, FN_PROBE_READ_KERNEL),
        ins(MOV_X, 1, 7, 0, 0),
        ins(MOV_K, 2, 0, 0, 0),
        ins(CALL, 0, 0, 0, FN_RINGBUF_SUBMIT),
        ins(MOV_X, 0, 9, 0, 0),
        ins(EXIT, 0, 0, 0, 0),
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix the kernel reads (and may
    // write) within its 128 bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put32(attr: &mut [u8; 128], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(attr: &mut [u8; 128], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn map_create() -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_MAP_TYPE_RINGBUF);
    put32(&mut attr, 12, RING_BYTES);
    attr[28..28 + 11].copy_from_slice(b"UNIX_EVENTS");
    bpf(BPF_MAP_CREATE, &mut attr).context("cannot create the unix watch's ring buffer")
}

fn hash_create(entries: usize) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_MAP_TYPE_HASH);
    put32(&mut attr, 4, ADDR_BYTES as u32);
    put32(&mut attr, 8, 1);
    put32(&mut attr, 12, entries.max(1) as u32);
    attr[28..28 + 11].copy_from_slice(b"UNIX_DENIED");
    bpf(BPF_MAP_CREATE, &mut attr).context("cannot create the unix watch's abstract deny map")
}

/// Adds the abstract `name` to the deny map: the programs refuse it from now on.
pub fn deny_abstract(map: &OwnedFd, name: &[u8]) -> io::Result<()> {
    map_update(map, &abstract_key(name), &[1])
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, map.as_raw_fd() as u32);
    put64(&mut attr, 8, key.as_ptr() as u64);
    put64(&mut attr, 16, value.as_ptr() as u64);
    // SAFETY: `attr` holds pointers to `key` and `value`, which outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn prog_load(insns: &[Insn], hook: u32, name: &CStr) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1);
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    let n = name.to_bytes().len().min(15);
    attr[48..48 + n].copy_from_slice(&name.to_bytes()[..n]);
    put32(&mut attr, 68, hook);
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&c| c == 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&log[..end]);
        let tail: Vec<&str> = text.lines().rev().take(4).collect();
        anyhow::anyhow!("{e} (verifier: {})", tail.join(" | "))
    })
}

/// `BPF_LINK_CREATE` of `prog` on the cgroup `cgroup_fd` at attach type `hook` (also for
/// programs aya loads but cannot hand a bpf_link of: `name_bind`'s `setsockopt`).
pub(super) fn link_create(
    prog: BorrowedFd<'_>,
    cgroup_fd: i32,
    hook: u32,
) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, cgroup_fd as u32);
    put32(&mut attr, 8, hook);
    Ok(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// `BPF_OBJ_PIN`: pins the object `fd` (a link) at `path` on a bpffs. Not through [`bpf`]:
/// it returns 0, not a descriptor.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = [0u8; 128];
    put64(&mut attr, 0, c.as_ptr() as u64);
    put32(&mut attr, 8, fd.as_raw_fd() as u32);
    // SAFETY: a zero-padded `union bpf_attr` prefix whose path pointer outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hook: u32, addr: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; RECORD as usize];
        b[0..8].copy_from_slice(&((42u64 << 32) | 43).to_ne_bytes());
        b[8..16].copy_from_slice(&((1000u64 << 32) | 1001).to_ne_bytes());
        b[16..20].copy_from_slice(b"curl");
        b[32..36].copy_from_slice(&hook.to_ne_bytes());
        b[36..40].copy_from_slice(&((addr.len() + 2) as u32).to_ne_bytes());
        b[40..42].copy_from_slice(&1u16.to_ne_bytes());
        b[42..42 + addr.len()].copy_from_slice(addr);
        b
    }

    #[test]
    fn records_decode() {
        let a = UnixAttempt::decode(&record(BPF_CGROUP_UNIX_CONNECT, b"/run/docker.sock\0"))
            .expect("decodes");
        assert_eq!(
            (a.pid, a.tid, a.uid, a.gid, a.comm.as_str(), a.hook),
            (42, 43, 1001, 1000, "curl", "connect_unix")
        );
        assert_eq!(a.target, UnixTarget::Path("/run/docker.sock".into()));
        let a = UnixAttempt::decode(&record(BPF_CGROUP_UNIX_SENDMSG, b"\0name")).expect("decodes");
        assert_eq!(
            (a.hook, a.target),
            ("sendmsg_unix", UnixTarget::Abstract("name".into()))
        );
        let a = UnixAttempt::decode(&record(BPF_CGROUP_UNIX_CONNECT, b"")).expect("decodes");
        assert_eq!(a.target, UnixTarget::Unnamed);
    }
}
