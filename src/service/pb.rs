//! Generated gRPC types and services (`proto/keyfront/v1/keyfront.proto`).

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    unused_qualifications
)]

tonic::include_proto!("keyfront.v1");

/// The encoded file descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyfront_descriptor");
