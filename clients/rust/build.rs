//! Compiles the broker's proto into Rust without a system `protoc`: `protox`
//! parses it in pure Rust, `tonic-prost-build` generates the messages and the
//! client (and the server stubs with the `server` feature), and
//! `pbjson-build` their canonical JSON form (used with the `json` feature).

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    let proto = "../../proto/gpulease/v1/lease.proto";
    println!("cargo:rerun-if-changed={proto}");

    let out = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile([proto], [root])?;
    let descriptors = fds.encode_to_vec();

    // Cargo tells a build script its package's features this way only.
    let server = env::var_os("CARGO_FEATURE_SERVER").is_some();
    tonic_prost_build::configure()
        .build_server(server)
        .build_client(true)
        .compile_fds(fds)?;

    // Written always (it costs nothing); `pb.rs` includes it with `json` only.
    pbjson_build::Builder::new()
        .out_dir(&out)
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .emit_fields()
        .build(&[".gpulease.v1"])?;
    Ok(())
}
