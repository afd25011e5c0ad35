//! The nodeos gRPC API, generated from `proto/nodeos/v1/*.proto`.
//!
//! # Layout
//! - `nodeos/v1/pool.proto`: `PoolService`, the public pool API.
//! - `nodeos/v1/metadata.proto`: `MetadataService`, the operator's key space.
//! - `nodeos/v1/vm.proto`: `VmService`, virtual machines and their consoles.
//! - `nodeos/v1/volume.proto`: `VolumeService`, replicated volumes, snapshots, clones, import.
//! - `nodeos/v1/image.proto`: `ImageService`, guest kernels and initramfs images VMs boot from.
//! - `nodeos/v1/network.proto`: `NetworkService`, tenant networks, their ports, security
//!   groups and each node's switch.
//! - `nodeos/v1/node.proto`: `NodeService`, power-off and reboot of one node.
//! - `nodeos/v1/peer.proto`: `PeerService`, the authenticated node-to-node API
//!   (raft RPCs, discovery hello, join, request forwarding).
//! - `nodeos/v1/pxe.proto`: `PxeService`, the pool booting new machines from its image.
//! - `nodeos/v1/auth.proto`: `AuthService` (credentials) and `AuditService` (the audit trail).
//! - `text.rs`: how messages read as text: enum fields by name, bytes as UTF-8;
//!   the public messages derive `serde::Serialize` with these (see `build.rs`).
//!
//! Only generated code lives here, and the serializers it names; conversions to
//! domain types live at the edge (the `api` crate and the CLI).

pub mod text;

#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("nodeos.v1");
}

/// Serialized `FileDescriptorSet` of every nodeos proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nodeos_descriptor");
