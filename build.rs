//! Build script: compiles the project's own wire formats in `proto/` (the
//! monitor's control protocol) with prost, and links berthd without PIE.

fn main() {
    println!("cargo:rerun-if-changed=proto/monitor.proto");
    // Every monitor is berthd re-run: linked without PIE, its data needs no
    // relocation at start, so those pages stay shared between monitors.
    println!("cargo:rustc-link-arg-bin=berthd=-no-pie");
    if let Err(err) = prost_build::compile_protos(&["proto/monitor.proto"], &["proto/"]) {
        panic!("cannot compile proto/monitor.proto: {err}");
    }
}
