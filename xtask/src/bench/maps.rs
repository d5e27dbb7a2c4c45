//! Filling an agent's pinned allow maps with synthetic entries, through the bpf syscall (the
//! same writes the agent's loader and resolver make), and reading the maps' kernel memory.

use std::{
    ffi::CString,
    mem,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use egress_common::{
    AllowValue,
    consts::{DEFAULT_DNS_CAPACITY, PROTO_ANY, PROTO_NAMED, PROTO_TCP},
    rules::PortRange,
};

use crate::cmd::Cmd;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;

/// `union bpf_attr`, large enough for the commands used here.
#[repr(C, align(8))]
pub struct Attr(pub [u8; 128]);

/// The bpf syscall with `attr`; its result (a descriptor for some commands).
pub fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of a size the kernel accepts.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A pinned map, opened.
pub struct PinnedMap {
    fd: OwnedFd,
}

impl PinnedMap {
    /// Opens the map pinned at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())?;
        let mut attr = Attr([0; 128]);
        attr.0[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
        let fd = bpf(BPF_OBJ_GET, &mut attr)
            .with_context(|| format!("cannot open the pinned map {}", path.display()))?;
        // SAFETY: a fresh descriptor the kernel just gave us.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Inserts or replaces `key` → `value`.
    pub fn update(&self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let mut attr = Attr([0; 128]);
        attr.0[..4].copy_from_slice(&(self.fd.as_raw_fd() as u32).to_ne_bytes());
        attr.0[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
        attr.0[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }
}

/// The bytes of an allow value (a `repr(C)` struct without padding holes).
pub fn value_bytes(v: &AllowValue) -> Vec<u8> {
    // SAFETY: AllowValue is repr(C), Copy, with explicit padding fields (size asserted in
    // egress-common), so every byte is initialised.
    unsafe {
        std::slice::from_raw_parts(
            (v as *const AllowValue).cast::<u8>(),
            mem::size_of::<AllowValue>(),
        )
    }
    .to_vec()
}

/// An allow value for `ports` (inclusive ranges) and `protos`, never expiring.
pub fn allow_value(ports: &[(u16, u16)], protos: u8) -> AllowValue {
    let mut v = AllowValue::EMPTY;
    for (i, &(lo, hi)) in ports.iter().enumerate() {
        v.ranges[i] = PortRange {
            lo,
            hi,
            protos,
            _pad: 0,
        };
    }
    v.len = ports.len() as u32;
    v
}

fn mapped(ip: u32) -> [u8; 16] {
    egress_common::keys::addr_from_v4(ip.to_be_bytes())
}

/// The `i`-th synthetic CIDR entry: one in four a /28 in 10.0.0.0/8, the rest /32s spread
/// over 198.0.0.0/8 (a bijection, so all distinct), never inside 198.51.100.0/24 (where the
/// measured destinations live) — so the trie is dense around the destination.
pub fn cidr_entry(i: u32) -> (u32, u32) {
    if i.is_multiple_of(4) {
        (0x0a00_0000 + (i / 4) * 16, 28)
    } else {
        let off = i.wrapping_mul(2_654_435_761) & 0x00ff_ffff;
        if off >> 8 == 0x3364 {
            // 198.51.100.x: 197.51.100.x instead, which nothing else maps to.
            return (0xc500_0000 + off, 32);
        }
        (0xc600_0000 + off, 32)
    }
}

/// The `i`-th synthetic DNS-derived address: distinct, in 100.64.0.0/10.
pub fn dns_entry(i: u32) -> u32 {
    0x6440_0000 + (i.wrapping_mul(2_654_435_761) & 0x003f_ffff)
}

/// Writes CIDR entries `from..to` into the trie and DNS entries `dfrom..dto` into the hash;
/// each `/32` also into the exact hash beside the trie while it has room, as the agent writes
/// exact entries (beyond its capacity they are in the trie alone), and its copy into the DNS
/// hash while that has room, up to a quarter of its capacity, as the agent writes copies
/// (`egress_agent::bpf::copies`; DNS entries first: the agent evicts copies for them).
pub fn fill(pins: &Path, (from, to): (u32, u32), (dfrom, dto): (u32, u32)) -> Result<()> {
    let cidr = PinnedMap::open(&pins.join("maps").join("ALLOW_CIDR"))?;
    let exact = PinnedMap::open(&pins.join("maps").join("ALLOW_EXACT"))?;
    let dns = PinnedMap::open(&pins.join("maps").join("ALLOW_DNS"))?;
    let value = value_bytes(&allow_value(&[(443, 443)], PROTO_TCP));
    let mut key = [0u8; 20];
    let mut exact_full = false;
    let mut copies = Vec::new();
    for i in from..to {
        let (ip, len) = cidr_entry(i);
        key[..4].copy_from_slice(&(96 + len).to_ne_bytes());
        key[4..].copy_from_slice(&mapped(ip));
        cidr.update(&key, &value)
            .with_context(|| format!("cannot write CIDR entry {i}"))?;
        if len == 32 && !exact_full {
            match exact.update(&key[4..], &value) {
                Ok(()) => copies.push(mapped(ip)),
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) => exact_full = true,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot write exact entry {i}"));
                }
            }
        }
    }
    for i in dfrom..dto {
        dns.update(&mapped(dns_entry(i)), &value)
            .with_context(|| format!("cannot write DNS entry {i}"))?;
    }
    let cap = (DEFAULT_DNS_CAPACITY / 4) as usize;
    for addr in copies.iter().take(cap.saturating_sub(from as usize)) {
        match dns.update(addr, &value) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => break,
            Err(e) => return Err(e).context("cannot write a copy of an exact entry"),
        }
    }
    Ok(())
}

/// Allows `ip` (IPv4) on the given ports and every protocol in the DNS-derived map, expiring
/// in an hour, and TCP on the `named` ports as name-bound: a destination the resolver would
/// have answered (with an expiry, as the resolver writes it, so the programs read the clock
/// as they do in use; the `named` stretches as it writes those of name-checking host rules).
pub fn allow_dns(
    pins: &Path,
    ip: [u8; 4],
    ports: &[(u16, u16)],
    named: &[(u16, u16)],
) -> Result<()> {
    let dns = PinnedMap::open(&pins.join("maps").join("ALLOW_DNS"))?;
    let mut value = allow_value(ports, PROTO_ANY);
    // Name-bound TCP stretches, as the agent writes them for name-checking host rules.
    for (i, &(lo, hi)) in named.iter().enumerate() {
        value.ranges[ports.len() + i] = PortRange {
            lo,
            hi,
            protos: PROTO_TCP | PROTO_NAMED,
            _pad: 0,
        };
    }
    value.len = (ports.len() + named.len()) as u32;
    value.expires_ns = boottime_ns() + 3_600_000_000_000;
    dns.update(&egress_common::keys::addr_from_v4(ip), &value_bytes(&value))
        .context("cannot write the DNS-derived destination")
}

/// CLOCK_BOOTTIME in nanoseconds, the clock of `expires_ns` (`bpf_ktime_get_boot_ns`).
fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel memory (`memlock`, bytes) of the map pinned at `path`, from bpftool.
pub fn memlock(path: &Path) -> Result<u64> {
    let out = Cmd::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(at) = text.find("memlock ") else {
        bail!("bpftool printed no memlock for {}: {text}", path.display());
    };
    let digits: String = text[at + 8..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().context("bad memlock")
}
