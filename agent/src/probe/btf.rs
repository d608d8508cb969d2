//! Kernel struct field offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! aya-ebpf has no CO-RE relocations for Rust programs, so the agent resolves the offsets the
//! programs need here and hands them over as the global `OFFSETS` before load. Nothing about
//! the kernel's struct layout is compiled into the programs.

use std::path::{Path, PathBuf};

use btfparse::{Offset, Readable, TypeInformation};
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

/// The event fields that need BTF offsets, and the struct paths they come from.
const FIELDS: &[(&str, &str, &[&str])] = &[
    ("tcp_sock", "srtt_us", &["srtt_us"]),
    ("tcp_sock", "mdev_us", &["rttvar_us"]),
    ("tcp_sock", "bytes_acked", &["bytes_sent"]),
    ("tcp_sock", "bytes_received", &["bytes_received"]),
    ("tcp_sock", "total_retrans", &[]),
    (
        "sock",
        "sk_err",
        &["close_reason (refused/timed_out/reset by peer)"],
    ),
    ("sock", "__sk_common.skc_net.net", &["netns"]),
    ("net", "ns.inum", &["netns"]),
];

/// Every field that needs BTF: what the probe lacks when there is none at all.
pub fn all_btf_fields() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = FIELDS.iter().flat_map(|f| f.2.iter().copied()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::EOF,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// Reads the offsets from the BTF file at `path`.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.to_owned(),
        source,
    })?;
    let types = TypeInformation::new(&Bytes(data)).map_err(|e| BtfError::Parse {
        path: path.to_owned(),
        detail: e.message().to_owned(),
    })?;
    let mut offsets = Offsets::UNKNOWN;
    let mut missing = Vec::new();
    for &(ty, field, event_fields) in FIELDS {
        let found = types
            .id_of(ty)
            .and_then(|id| types.offset_of(id, field).ok())
            .and_then(|(_, offset)| match offset {
                Offset::ByteOffset(n) => Some(n),
                Offset::BitOffsetAndSize(..) => None,
            });
        let slot = match (ty, field) {
            ("tcp_sock", "srtt_us") => &mut offsets.srtt_us,
            ("tcp_sock", "mdev_us") => &mut offsets.mdev_us,
            ("tcp_sock", "bytes_acked") => &mut offsets.bytes_acked,
            ("tcp_sock", "bytes_received") => &mut offsets.bytes_received,
            ("tcp_sock", "total_retrans") => &mut offsets.total_retrans,
            ("sock", "sk_err") => &mut offsets.sk_err,
            ("sock", _) => &mut offsets.sk_net,
            _ => &mut offsets.net_inum,
        };
        match found {
            Some(n) => *slot = n,
            None => {
                tracing::warn!(
                    r#type = ty,
                    field,
                    "kernel BTF lacks a field the probe reads"
                );
                *slot = NO_OFFSET;
                missing.extend_from_slice(event_fields);
            }
        }
    }
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
    fn this_kernel_has_every_offset() {
        // The machines edgeward is developed and tested on ship BTF (TOOLCHAIN.md).
        let k = kernel_offsets(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        assert!(k.missing_fields.is_empty(), "{:?}", k.missing_fields);
        assert_ne!(k.offsets.srtt_us, NO_OFFSET);
        assert_ne!(k.offsets.bytes_acked, k.offsets.bytes_received);
    }
}
