//! Struct member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`), for the programs
//! that read kernel memory by offset (the packet-socket tripwire: `pt_regs`, `thread_info`,
//! `io_kiocb`). aya-ebpf has no CO-RE relocations, so the agent checks the offsets the
//! programs assume, or hands them the right ones, before loading.

use std::collections::HashMap;

use anyhow::{Context as _, bail};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// The structs and unions of one BTF blob: name → (member name → byte offset).
#[derive(Debug, Default)]
pub struct Layouts {
    structs: HashMap<String, HashMap<String, u32>>,
}

impl Layouts {
    /// Reads the structs named `wanted` from `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs(wanted: &[&str]) -> anyhow::Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        Self::parse(&data, wanted).with_context(|| format!("{path}: not BTF this agent can read"))
    }

    /// Parses a little-endian BTF blob, keeping the members of the structs and unions named
    /// `wanted` (bitfields at their byte).
    pub fn parse(data: &[u8], wanted: &[&str]) -> anyhow::Result<Self> {
        let u32_at = |off: usize| -> anyhow::Result<u32> {
            let b = data.get(off..off + 4).context("truncated")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let magic = data.get(..2).context("truncated")?;
        if u16::from_le_bytes([magic[0], magic[1]]) != BTF_MAGIC {
            bail!("bad magic");
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let str_off = u32_at(16)? as usize;
        let strings = data.get(hdr_len + str_off..).context("truncated")?;
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut me = Self::default();
        let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while at < end {
            let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let bitfields = info >> 31 != 0;
            at += 12;
            let extra = match kind {
                // INT, VAR, DECL_TAG
                1 | 14 | 17 => 4,
                // ARRAY
                3 => 12,
                KIND_STRUCT | KIND_UNION | 15 | 19 => vlen * 12,
                // ENUM, FUNC_PROTO
                6 | 13 => vlen * 8,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7..=12 | 16 | 18 => 0,
                k => bail!("unknown BTF kind {k}"),
            };
            if matches!(kind, KIND_STRUCT | KIND_UNION)
                && name_off != 0
                && wanted.contains(&name(name_off).as_str())
            {
                let mut members = HashMap::new();
                for m in 0..vlen {
                    let base = at + m * 12;
                    let bits = u32_at(base + 8)?;
                    let bits = if bitfields { bits & 0x00ff_ffff } else { bits };
                    members.insert(name(u32_at(base)?), bits / 8);
                }
                me.structs.entry(name(name_off)).or_insert(members);
            }
            at += extra;
        }
        Ok(me)
    }

    /// The byte offset of `member` in `strukt`.
    pub fn offset(&self, strukt: &str, member: &str) -> Option<u32> {
        self.structs.get(strukt)?.get(member).copied()
    }

    /// Checks that `strukt.member` sits at `expected`, naming what differs.
    pub fn expect(&self, strukt: &str, member: &str, expected: u32) -> anyhow::Result<()> {
        match self.offset(strukt, member) {
            Some(o) if o == expected => Ok(()),
            Some(o) => bail!("struct {strukt}: {member} is at byte {o}, not {expected}"),
            None => bail!("the kernel's BTF has no struct {strukt} with a member {member}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob with `struct s { int a; int b; }` (b at bit 32).
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0int\0".to_vec();
        let mut types = Vec::new();
        let mut put = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] INT 'int' size 4
        put(7);
        put(1 << 24);
        put(4);
        put(32);
        // [2] STRUCT 's' size 8 vlen 2
        put(1);
        put((KIND_STRUCT << 24) | 2);
        put(8);
        put(3);
        put(1);
        put(0);
        put(5);
        put(1);
        put(32);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn member_offsets_are_read_in_bytes() {
        assert!(
            Layouts::parse(&blob(), &["t"])
                .unwrap()
                .offset("s", "a")
                .is_none()
        );
        let l = Layouts::parse(&blob(), &["s"]).unwrap();
        assert_eq!(l.offset("s", "a"), Some(0));
        assert_eq!(l.offset("s", "b"), Some(4));
        assert!(l.expect("s", "b", 4).is_ok());
        let e = l.expect("s", "b", 8).unwrap_err().to_string();
        assert_eq!(e, "struct s: b is at byte 4, not 8");
        assert!(l.expect("t", "a", 0).is_err());
        assert!(Layouts::parse(b"nope", &["s"]).is_err());
    }
}
