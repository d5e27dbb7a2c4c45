//! egress-agent as a library: the CLI in `main.rs` is a thin layer over these modules.
