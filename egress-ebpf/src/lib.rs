#![no_std]
// The library target lets egress-agent declare a build-dependency on this crate, so cargo
// rebuilds the agent (whose build.rs compiles the programs) when they change.
