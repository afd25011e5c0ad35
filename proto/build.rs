//! Generates the gRPC code and the file descriptor set used by server reflection.
//! protoc comes from `protoc-bin-vendored` unless `PROTOC` is set, so a fresh
//! machine needs no system package to build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point; nothing else reads the environment.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "nodeos/v1/pool.proto",
        "nodeos/v1/metadata.proto",
        "nodeos/v1/peer.proto",
        "nodeos/v1/vm.proto",
        "nodeos/v1/volume.proto",
        "nodeos/v1/network.proto",
        "nodeos/v1/node.proto",
        "nodeos/v1/pxe.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("nodeos_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
