//! The gridforge contract. Every program speaks these messages; spec files are their proto3 JSON mapping
//! (field names in snake_case or lowerCamelCase, enums by name).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("gridforge.v1");
    include!(concat!(env!("OUT_DIR"), "/gridforge.v1.serde.rs"));
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gridforge_descriptor");
