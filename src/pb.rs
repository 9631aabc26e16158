//! The protobuf types and gRPC stubs generated from `proto/` by `build.rs`.
//! Only the gRPC layer (`crate::grpc`) and the clients use them; the core
//! never does.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// `gpulease.v1`: the lease broker's contract.
pub mod v1 {
    tonic::include_proto!("gpulease.v1");
    include!(concat!(env!("OUT_DIR"), "/gpulease.v1.serde.rs"));
}

/// The encoded descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gpulease_descriptor.bin"));
