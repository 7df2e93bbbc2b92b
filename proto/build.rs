//! Compiles `kormlm.proto` with a vendored `protoc`, so no system protobuf compiler is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds the compiler through PROTOC.
    std::env::set_var("PROTOC", protoc);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kormlm_descriptor.bin"))
        .compile_protos(&["kormlm.proto"], &["."])?;
    println!("cargo:rerun-if-changed=kormlm.proto");
    Ok(())
}
