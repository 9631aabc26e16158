//! The protobuf types and gRPC stubs generated from the broker's proto
//! (`proto/gpulease/v1/lease.proto`) by this crate's `build.rs`.
//!
//! The client stub is always here; the server stubs come with the `server`
//! feature and the canonical JSON serde impls with the `json` feature.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// `gpulease.v1`: the lease broker's contract.
pub mod v1 {
    tonic::include_proto!("gpulease.v1");
    #[cfg(feature = "json")]
    include!(concat!(env!("OUT_DIR"), "/gpulease.v1.serde.rs"));
}
