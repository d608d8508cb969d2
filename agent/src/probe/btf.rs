//! Kernel struct field offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya-ebpf has no CO-RE relocations for Rust programs, so the agent resolves the offsets the
//! programs need here and hands them over as the global `OFFSETS` before load. Nothing about
//! the kernel's struct layout is compiled into the programs.

use std::path::{Path, PathBuf};

use edgeward_common::{NO_OFFSET, Offsets};

/// Why BTF could not be read. The probe still loads without it, with fewer fields.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read.
    #[error("reading kernel BTF {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The BTF file did not parse.
    #[error("parsing kernel BTF {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
}

/// The offsets found, and the event fields that cannot be filled in for lack of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelOffsets {
    /// For the programs.
    pub offsets: Offsets,
    /// Event fields (as named in [`super::event::ConnectionEvent`]) left empty.
    pub missing_fields: Vec<&'static str>,
}

/// A kernel struct field the probe reads: struct, member path, the event fields left empty
/// without it, and where its offset goes.
struct Field {
    ty: &'static str,
    path: &'static str,
    loses: &'static [&'static str],
    slot: fn(&mut Offsets) -> &mut u32,
}

macro_rules! field {
    ($ty:literal, $path:literal, $loses:expr, $slot:ident) => {
        Field {
            ty: $ty,
            path: $path,
            loses: $loses,
            slot: |o| &mut o.$slot,
        }
    };
}

/// The fields that need BTF offsets.
const FIELDS: &[Field] = &[
    field!("tcp_sock", "srtt_us", &["srtt_us"], srtt_us),
    field!("tcp_sock", "mdev_us", &["rttvar_us"], mdev_us),
    field!("tcp_sock", "bytes_acked", &["bytes_sent"], bytes_acked),
    field!(
        "tcp_sock",
        "bytes_received",
        &["bytes_received"],
        bytes_received
    ),
    field!("tcp_sock", "total_retrans", &[], total_retrans),
    field!(
        "sock",
        "sk_err",
        &["close_reason (refused/timed_out/reset by peer)"],
        sk_err
    ),
    field!("sock", "__sk_common.skc_net.net", &["netns"], sk_net),
    field!("net", "ns.inum", &["netns"], net_inum),
    // The raw-tracepoint programs read these from the socket. Without any of them the
    // classic tracepoints run instead, which find them in the tracepoint record: no event
    // field is lost.
    field!("sock", "sk_protocol", &[], sk_protocol),
    field!("sock", "__sk_common.skc_family", &[], skc_family),
    field!("sock", "__sk_common.skc_dport", &[], skc_dport),
    field!("sock", "__sk_common.skc_num", &[], skc_num),
    field!("sock", "__sk_common.skc_daddr", &[], skc_daddr),
    field!("sock", "__sk_common.skc_rcv_saddr", &[], skc_rcv_saddr),
    field!("sock", "__sk_common.skc_v6_daddr", &[], skc_v6_daddr),
    field!(
        "sock",
        "__sk_common.skc_v6_rcv_saddr",
        &[],
        skc_v6_rcv_saddr
    ),
    field!("sock", "__sk_common.skc_state", &[], skc_state),
    field!("inet_sock", "inet_sport", &[], inet_sport),
    // The `held_sockets` iterator, which finds the sockets open before the probe without
    // /proc's `ptrace` checks; without it the agent reads /proc.
    field!("task_struct", "tgid", &[], task_tgid),
    field!("file", "f_inode", &[], file_inode),
    field!("inode", "i_ino", &[], inode_ino),
    field!("socket", "sk", &[], socket_sk),
    field!("task_struct", "cgroups", &[], task_cgroups),
    field!("css_set", "dfl_cgrp", &[], css_set_dfl_cgrp),
    field!("cgroup", "kn", &[], cgroup_kn),
    field!("kernfs_node", "id", &[], kernfs_node_id),
];

/// Every field that needs BTF: what the probe lacks when there is none at all.
pub fn all_btf_fields() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = FIELDS
        .iter()
        .flat_map(|f| f.loses.iter().copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A minimal reader of the BTF type section: just enough to resolve struct member offsets by
/// name. It keeps the raw bytes and one offset per type (the `btfparse` crate builds maps of
/// every type and left ~65 MB of heap behind for the kernel's 6 MB of BTF).
struct Types<'a> {
    data: &'a [u8],
    /// Start of the string section.
    strings: usize,
    /// Byte offset of each type record; type id N is at index N - 1.
    records: Vec<usize>,
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl<'a> Types<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, String> {
        let magic = data.get(0..2).ok_or("file too short")?;
        if magic != [0x9f, 0xeb] {
            return Err("not little-endian BTF (bad magic)".to_owned());
        }
        let field = |at| {
            u32_at(data, at)
                .map(|v| v as usize)
                .ok_or("truncated header")
        };
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let str_off = field(16)?;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        if types_end > data.len() || hdr_len + str_off > data.len() {
            return Err("sections beyond the end of the file".to_owned());
        }
        let mut records = Vec::new();
        let mut at = types_start;
        while at < types_end {
            let info = u32_at(data, at + 4).ok_or("truncated type")?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func_proto
                0 | 2 | 7..=12 | 16 | 18 => 0,
                kind => return Err(format!("unknown BTF kind {kind}")),
            };
            records.push(at);
            at += 12 + extra;
        }
        Ok(Self {
            data,
            strings: hdr_len + str_off,
            records,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let rest = self.data.get(start..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// (name_off, kind, kind_flag, vlen, size_or_type, record offset) of type `id`.
    fn header(&self, id: u32) -> Option<(u32, u32, bool, usize, u32, usize)> {
        let at = *self.records.get((id as usize).checked_sub(1)?)?;
        let info = u32_at(self.data, at + 4)?;
        Some((
            u32_at(self.data, at)?,
            (info >> 24) & 0x1f,
            info >> 31 == 1,
            (info & 0xffff) as usize,
            u32_at(self.data, at + 8)?,
            at,
        ))
    }

    /// The struct (with members, not a forward declaration) named `name`.
    fn struct_named(&self, name: &str) -> Option<u32> {
        (1..=self.records.len() as u32).find(|&id| {
            self.header(id).is_some_and(|(n, kind, _, vlen, _, _)| {
                kind == KIND_STRUCT && vlen > 0 && self.name(n) == name.as_bytes()
            })
        })
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let (_, kind, ..) = self.header(id)?;
            match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = self.header(id)?.4
                }
                _ => return Some(id),
            }
        }
        None
    }

    /// Bit offset and type of member `name` of struct/union `id`, looking into anonymous
    /// struct/union members too.
    fn member(&self, id: u32, name: &[u8], depth: u32) -> Option<(u32, u32)> {
        let (_, kind, kind_flag, vlen, _, at) = self.header(self.resolve(id)?)?;
        if (kind != KIND_STRUCT && kind != KIND_UNION) || depth > 8 {
            return None;
        }
        for i in 0..vlen {
            let m = at + 12 + 12 * i;
            let (m_name, m_type, m_off) = (
                u32_at(self.data, m)?,
                u32_at(self.data, m + 4)?,
                u32_at(self.data, m + 8)?,
            );
            let (bits, bitfield) = if kind_flag {
                (m_off & 0xff_ffff, m_off >> 24 != 0)
            } else {
                (m_off, false)
            };
            if m_name == 0 {
                if let Some((inner, ty)) = self.member(m_type, name, depth + 1) {
                    return Some((bits + inner, ty));
                }
            } else if self.name(m_name) == name {
                return (!bitfield).then_some((bits, m_type));
            }
        }
        None
    }

    /// Byte offset of a dotted member path in struct `ty`.
    fn offset_of(&self, ty: &str, path: &str) -> Option<u32> {
        let mut id = self.struct_named(ty)?;
        let mut bits = 0;
        for part in path.split('.') {
            let (off, next) = self.member(id, part.as_bytes(), 0)?;
            bits += off;
            id = next;
        }
        (bits % 8 == 0).then_some(bits / 8)
    }
}

/// Reads the offsets from the BTF file at `path`.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })?;
    let types = Types::parse(&data).map_err(|detail| BtfError::Parse {
        path: path.to_owned(),
        detail,
    })?;
    let mut offsets = Offsets::UNKNOWN;
    let mut missing = Vec::new();
    for f in FIELDS {
        let slot = (f.slot)(&mut offsets);
        match types.offset_of(f.ty, f.path) {
            Some(n) => *slot = n,
            None => {
                tracing::warn!(
                    r#type = f.ty,
                    field = f.path,
                    "kernel BTF lacks a field the probe reads"
                );
                *slot = NO_OFFSET;
                missing.extend_from_slice(f.loses);
            }
        }
    }
    offsets.set_sock_head();
    offsets.set_counter_span();
    missing.sort_unstable();
    missing.dedup();
    Ok(KernelOffsets {
        offsets,
        missing_fields: missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_path() {
        let e = kernel_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn garbage_does_not_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, b"not btf at all").unwrap();
        let e = kernel_offsets(&path).unwrap_err();
        assert!(matches!(e, BtfError::Parse { .. }), "{e}");
    }

    #[test]
    fn counters_too_far_apart_or_unknown_are_read_one_by_one() {
        let mut o = Offsets {
            srtt_us: 100,
            mdev_us: 104,
            bytes_acked: 200,
            bytes_received: 208,
            total_retrans: 300,
            ..Offsets::UNKNOWN
        };
        o.set_counter_span();
        assert_eq!((o.counters_base, o.counters_len), (96, 208));
        o.total_retrans = 100 + edgeward_common::COUNTERS_SPAN_MAX as u32;
        o.set_counter_span();
        assert_eq!((o.counters_base, o.counters_len), (NO_OFFSET, 0));
        o.total_retrans = NO_OFFSET;
        o.set_counter_span();
        assert_eq!(o.counters_base, NO_OFFSET);
    }

    #[test]
    fn the_head_takes_in_the_error_and_protocol_only_when_they_fit() {
        let mut o = Offsets {
            skc_daddr: 0,
            skc_rcv_saddr: 4,
            skc_dport: 12,
            skc_num: 14,
            skc_family: 16,
            skc_state: 18,
            skc_v6_daddr: 56,
            skc_v6_rcv_saddr: 72,
            sk_err: 284,
            sk_protocol: 532,
            ..Offsets::UNKNOWN
        };
        o.set_sock_head();
        assert_eq!(o.sock_head_len, 534);
        o.sk_protocol = edgeward_common::SOCK_HEAD_MAX as u32;
        o.set_sock_head();
        assert_eq!(
            o.sock_head_len, 88,
            "a protocol past the limit is read on its own"
        );
        o.sk_protocol = NO_OFFSET;
        o.set_sock_head();
        assert_eq!(o.sock_head_len, 88);
        o.skc_v6_daddr = 60;
        o.set_sock_head();
        assert_eq!(o.sock_head_len, 0, "unaligned IPv6 addresses: no head");
        o.skc_v6_daddr = NO_OFFSET;
        o.set_sock_head();
        assert_eq!(o.sock_head_len, 0);
    }

    #[test]
    fn this_kernel_has_every_offset() {
        // The machines edgeward is developed and tested on ship BTF (TOOLCHAIN.md).
        let k = kernel_offsets(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        assert!(k.missing_fields.is_empty(), "{:?}", k.missing_fields);
        assert_ne!(k.offsets.srtt_us, NO_OFFSET);
        assert_ne!(k.offsets.bytes_acked, k.offsets.bytes_received);
        assert!(k.offsets.has_sock_addresses(), "{:?}", k.offsets);
        // sock_common starts the socket: its address pair comes first, then the hash and
        // the port pair (include/net/sock.h).
        assert_eq!(
            (k.offsets.skc_daddr, k.offsets.skc_rcv_saddr),
            (0, 4),
            "{:?}",
            k.offsets
        );
        assert_eq!(k.offsets.skc_num, k.offsets.skc_dport + 2);
        // The counters are read as one span on this kernel.
        let o = k.offsets;
        assert_ne!(o.counters_base, NO_OFFSET, "{o:?}");
        assert_eq!(o.counters_base % 8, 0);
        for (field, size) in [
            (o.srtt_us, 4),
            (o.mdev_us, 4),
            (o.bytes_acked, 8),
            (o.bytes_received, 8),
            (o.total_retrans, 4),
        ] {
            assert!(field >= o.counters_base && field + size <= o.counters_base + o.counters_len);
        }
    }
}
