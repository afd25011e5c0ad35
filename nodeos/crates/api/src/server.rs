//! One tonic server carrying every service of the node.

use std::time::Duration;

use nodeos_auth::tls::TlsState;
use nodeos_compute::Compute;
use nodeos_meta::MetaHandle;
use nodeos_meta::network::MAX_PEER_MESSAGE;
use nodeos_network::Networks;
use nodeos_pool::Formation;
use nodeos_proto::v1::audit_service_server::AuditServiceServer;
use nodeos_proto::v1::auth_service_server::AuthServiceServer;
use nodeos_proto::v1::image_service_server::ImageServiceServer;
use nodeos_proto::v1::metadata_service_server::MetadataServiceServer;
use nodeos_proto::v1::network_service_server::NetworkServiceServer;
use nodeos_proto::v1::node_service_server::NodeServiceServer;
use nodeos_proto::v1::peer_service_server::PeerServiceServer;
use nodeos_proto::v1::pool_service_server::PoolServiceServer;
use nodeos_proto::v1::pxe_service_server::PxeServiceServer;
use nodeos_proto::v1::vm_service_server::VmServiceServer;
use nodeos_proto::v1::volume_service_server::VolumeServiceServer;
use nodeos_pxe::agent::PxeHandle;
use nodeos_switch::switch::SwitchHandle;
use nodeos_volumes::Volumes;
use tokio::net::TcpListener;

use crate::auth::{AuditApi, AuthApi, Signer};
use crate::guard::{Guard, GuardLayer};
use crate::image::{ImageApi, MAX_UPLOAD_CHUNK};
use crate::metadata::MetadataApi;
use crate::network::NetworkApi;
use crate::node::NodeApi;
use crate::peer::PeerApi;
use crate::pool::PoolApi;
use crate::pxe::PxeApi;
use crate::vm::VmApi;
use crate::volume::{MAX_IMPORT_CHUNK, VolumeApi};

/// Largest public API message, both ways.
pub const MAX_PUBLIC_MESSAGE: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub pool_name: String,
    /// Mutual TLS with this node's credential, and the CA it signs operators'
    /// credentials with; `None`: plaintext, which the node allows on loopback only.
    pub tls: Option<(TlsState, Signer)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC reflection descriptor is invalid")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
}

/// Serves every service on an already bound listener until `shutdown` resolves.
// One handle per subsystem, each passed in by the composition root.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    cfg: ApiConfig,
    meta: MetaHandle,
    formation: Formation,
    compute: Compute,
    volumes: Volumes,
    networks: Networks,
    switch: SwitchHandle,
    pxe: PxeHandle,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nodeos_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServeError::Reflection)?;
    // Older clients (grpcio-reflection, grpcurl before 1.9) speak only v1alpha.
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nodeos_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(ServeError::Reflection)?;
    let guard = Guard::new(meta.clone(), cfg.tls.is_none());
    let dialer = match &cfg.tls {
        Some((tls, _)) => crate::proxy::Dialer::tls(tls.connector()),
        None => crate::proxy::Dialer::default(),
    };
    tokio::spawn(crate::guard::trim_while_leading(guard.clone()));
    let auth = AuthServiceServer::new(AuthApi::new(meta.clone(), cfg.tls.as_ref().map(|(_, s)| s.clone())))
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
        .max_encoding_message_size(MAX_PUBLIC_MESSAGE);
    let audit = AuditServiceServer::new(AuditApi::new(meta.clone()))
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
        .max_encoding_message_size(MAX_PUBLIC_MESSAGE * 4);
    let pool = PoolServiceServer::new(
        PoolApi::new(meta.clone(), cfg.pool_name, compute.clone()).with_dialer(dialer.clone()),
    )
    .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
    .max_encoding_message_size(MAX_PUBLIC_MESSAGE);
    let metadata = MetadataServiceServer::new(MetadataApi::new(meta.clone()))
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE + 64 * 1024)
        .max_encoding_message_size(MAX_PUBLIC_MESSAGE * 4);
    let images = compute.images().clone();
    let compute_for_peers = compute.clone();
    let vm =
        VmServiceServer::new(VmApi::new(compute, meta.clone(), networks.clone()).with_dialer(dialer.clone()))
            .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
            .max_encoding_message_size(MAX_PUBLIC_MESSAGE);
    // An import chunk is a whole message: room for its largest data plus framing.
    let volume = VolumeServiceServer::new(VolumeApi::new(volumes, images.clone()))
        .max_decoding_message_size(MAX_IMPORT_CHUNK + 64 * 1024)
        .max_encoding_message_size(MAX_PUBLIC_MESSAGE * 4);
    // Likewise an upload chunk.
    let image = ImageServiceServer::new(ImageApi::new(images))
        .max_decoding_message_size(MAX_UPLOAD_CHUNK + 64 * 1024)
        .max_encoding_message_size(MAX_PUBLIC_MESSAGE * 4);
    let network = NetworkServiceServer::new(
        NetworkApi::new(networks, switch, meta.clone()).with_dialer(dialer.clone()),
    )
    .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
    .max_encoding_message_size(MAX_PUBLIC_MESSAGE * 4);
    let node = NodeServiceServer::new(
        NodeApi::new(meta.clone(), compute_for_peers.clone()).with_dialer(dialer.clone()),
    )
    .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
    .max_encoding_message_size(MAX_PUBLIC_MESSAGE);
    let pxe = PxeServiceServer::new(PxeApi::new(meta.clone(), pxe).with_dialer(dialer))
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
        .max_encoding_message_size(MAX_PUBLIC_MESSAGE);
    let peer = PeerServiceServer::new(PeerApi::new(meta, formation, compute_for_peers))
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .concurrency_limit_per_connection(256)
        .layer(GuardLayer(guard))
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(pool)
        .add_service(metadata)
        .add_service(vm)
        .add_service(volume)
        .add_service(image)
        .add_service(network)
        .add_service(node)
        .add_service(pxe)
        .add_service(auth)
        .add_service(audit)
        .add_service(peer);
    match cfg.tls {
        Some((tls, _)) => {
            router.serve_with_incoming_shutdown(nodeos_auth::tls::incoming(listener, tls), shutdown).await
        }
        None => {
            // The server's own tcp_nodelay applies only to listeners it binds: set it
            // on accepted sockets here, or replies (and raft acks) wait for delayed ACKs.
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    }
    .map_err(ServeError::Transport)
}
