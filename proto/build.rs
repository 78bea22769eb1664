use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor = out.join("gridforge_descriptor.bin");
    let protos = ["proto/gridforge/v1/agent.proto", "proto/gridforge/v1/coordinator.proto"];
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&protos, &["proto"])?;
    let set = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new().register_descriptors(&set)?.build(&[".gridforge"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
