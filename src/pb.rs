//! The protobuf types and gRPC stubs, generated from `proto/` by the client
//! crate (`gpulease_client::pb`, with its `server` and `json` features) and
//! re-exported here so that the broker names them `crate::pb`. Only the gRPC
//! layer (`crate::grpc`) and the clients use them; the core never does.

pub(crate) use gpulease_client::pb::*;

/// The encoded descriptor set of `proto/`, for server reflection.
pub(crate) const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gpulease_descriptor.bin"));
