//! Builds the eBPF programs (`egress-ebpf`) for the BPF target with aya-build, which runs
//! `rustup run nightly cargo build -Z build-std=core --target bpfel-unknown-none`; the object
//! lands in `OUT_DIR/egress` and `src/enforcer.rs` embeds it.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "egress-ebpf")
        .ok_or_else(|| anyhow!("egress-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // aya-build relays every stderr line of the inner cargo as a `cargo:warning`, so a clean
    // build would print a wall of `warning: ... Compiling ...` lines. A quiet inner cargo
    // prints only what matters: compiler diagnostics (warnings and errors of the eBPF crate)
    // and, on failure, the error.
    // SAFETY: the build script is single-threaded here; the variable is read by the child.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
