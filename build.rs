//! Compiles `proto/` into Rust without a system `protoc`: `protox` parses the
//! proto in pure Rust, the descriptor set is written for server reflection,
//! and `tonic-prost-build` and `pbjson-build` generate the messages, the
//! service and their canonical JSON form (for `gpulease status --json`).

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/gpulease/v1/lease.proto";
    println!("cargo:rerun-if-changed={proto}");

    let out = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile([proto], ["proto"])?;
    let descriptor_path = out.join("gpulease_descriptor.bin");
    std::fs::write(&descriptor_path, fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".gpulease.v1"])?;
    Ok(())
}
