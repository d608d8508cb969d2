//! Builds the kernel programs in `ebpf/edgeward-ebpf` for `bpfel-unknown-none` with aya-build
//! (nightly + bpf-linker) and leaves the object in `OUT_DIR/edgeward-probes`, where
//! `probe::PROGRAMS` embeds it. Set `AYA_BUILD_SKIP=1` to skip the kernel build (the agent then
//! builds without a usable probe object and says so at start).
use std::{env, path::PathBuf};

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../ebpf/edgeward-ebpf");
    let common_dir = manifest_dir.join("../ebpf/edgeward-common");
    // aya-build watches the kernel crate; the shared types change the object too.
    println!("cargo:rerun-if-changed={}", common_dir.display());

    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let object = out_dir.join("edgeward-probes");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Leave an empty object so include_bytes! still compiles; the loader rejects it clearly.
        if !object.exists() {
            std::fs::write(&object, b"").context("write empty probe object")?;
        }
    }

    // aya-build forwards everything the nested cargo prints as `cargo:warning`; keep its progress
    // lines out of the build output so real compiler diagnostics stand out.
    // SAFETY: build scripts are single-threaded here; nothing else reads the environment.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    let ebpf_root = ebpf_dir.to_str().context("ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "edgeward-ebpf",
            root_dir: ebpf_root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs failed; scripts/setup.sh installs what they need \
         (nightly rust-src, bpf-linker)",
    )
}
