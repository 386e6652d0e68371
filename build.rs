//! Build script: compiles the project's own wire formats in `proto/` (the
//! monitor's control protocol) with prost.

fn main() {
    println!("cargo:rerun-if-changed=proto/monitor.proto");
    if let Err(err) = prost_build::compile_protos(&["proto/monitor.proto"], &["proto/"]) {
        panic!("cannot compile proto/monitor.proto: {err}");
    }
}
