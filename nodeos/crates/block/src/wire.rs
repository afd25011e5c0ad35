//! The replica protocol, version 1: how volume clients and repairers talk to
//! a node's replica server over TCP.
//!
//! # Framing
//! Every message is a frame: a `u32` little-endian length, then that many
//! bytes of postcard-encoded payload. Frames larger than [`MAX_FRAME`] are a
//! protocol error and close the connection.
//!
//! # Handshake (mutual proof of the pool key)
//! 1. client → server: [`HELLO_LEN`] raw bytes: [`MAGIC`], the client's
//!    protocol version (`u16` LE), a 32-byte random nonce. This layout never
//!    changes, so any version can refuse any other clearly.
//! 2. server → client: a [`ServerHello`] frame. Variant 0 is always
//!    `Refused { reason }` (wrong version, busy); `Challenge` carries the
//!    server's node id, nonce and a MAC over both nonces.
//! 3. client → server: a [`ClientProof`] frame (MAC over both nonces).
//! 4. server → client: a [`ServerHello`] frame, `Ready` or `Refused`.
//!
//! # Requests
//! Then the client sends [`Request`] frames and the server answers each with a
//! [`Reply`] carrying the same id, in any order (the server may run requests
//! concurrently: the block rules in `replica.rs` make the result independent
//! of arrival order).

use nodeos_types::auth::PoolKey;
use nodeos_types::{NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::store::{BlockMeta, LayerExtent, StoreUsage};

pub const MAGIC: [u8; 8] = *b"NODEOSBK";
pub const PROTOCOL_VERSION: u16 = 1;
pub const HELLO_LEN: usize = 8 + 2 + 32;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 2 * 1024 * 1024;
/// Most blocks one request may read or write (1 MiB).
pub const MAX_BLOCKS_PER_REQUEST: u32 = 256;
/// Most metas one `ReadMetas` returns.
pub const MAX_METAS_PER_REQUEST: u32 = 16384;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("malformed message")]
    Decode(#[from] postcard::Error),
    #[error("not a nodeos replica protocol hello")]
    BadMagic,
    #[error("refused by replica: {0}")]
    Refused(String),
    #[error("replica could not prove the pool key (another pool?)")]
    BadProof,
    #[error("unexpected message during the handshake")]
    Unexpected,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServerHello {
    /// Always variant 0, in every protocol version.
    Refused {
        reason: String,
    },
    Challenge {
        version: u16,
        node: NodeId,
        nonce: [u8; 32],
        mac: Vec<u8>,
    },
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientProof {
    pub mac: Vec<u8>,
}

/// What a replica is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Records `generation` as the volume's fence (refusing older writers).
    Fence {
        volume: VolumeId,
        generation: u64,
    },
    /// Writes `data` (`crcs.len()` blocks) from block `first` of `key`.
    Write {
        volume: VolumeId,
        generation: u64,
        seq: u64,
        key: LayerExtent,
        first: u32,
        data: Vec<u8>,
        crcs: Vec<u32>,
    },
    /// Writes zeroes (trim and write-zeroes).
    WriteZeroes {
        volume: VolumeId,
        generation: u64,
        seq: u64,
        key: LayerExtent,
        first: u32,
        count: u32,
    },
    /// Reads through a layer chain (`chain[0]` is the top layer): for each
    /// block, the newest layer that has it.
    Read {
        chain: Vec<u64>,
        index: u32,
        first: u32,
        count: u32,
    },
    /// Makes everything this replica has accepted durable.
    Flush,
    /// A digest of the block metas of `blocks` blocks of one layer extent.
    Digest {
        key: LayerExtent,
        blocks: u32,
    },
    ReadMetas {
        key: LayerExtent,
        first: u32,
        count: u32,
    },
    /// Reads blocks of exactly one layer (for repair); corrupt blocks are
    /// reported, not returned.
    ReadLayer {
        key: LayerExtent,
        first: u32,
        count: u32,
    },
    /// Copies blocks from another replica, each applied only where it is
    /// newer than (or the same version as a corrupt) local copy.
    Repair {
        volume: VolumeId,
        key: LayerExtent,
        first: u32,
        metas: Vec<BlockMeta>,
        data: Vec<u8>,
    },
    /// Checks the checksums of `blocks` blocks; answers the corrupt ones.
    Verify {
        key: LayerExtent,
        blocks: u32,
    },
    DeleteLayer {
        layer: u64,
    },
    Usage,
    Extents,
}

/// A replica's answer to one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    Done,
    /// The fence after a `Fence`.
    Fenced {
        generation: u64,
    },
    /// Blocks and their metas (zeroes for `Absent`/`Zero`).
    Blocks {
        data: Vec<u8>,
        metas: Vec<BlockMeta>,
    },
    Metas(Vec<BlockMeta>),
    Digest {
        digest: [u8; 32],
        written: u32,
    },
    /// How many blocks a `Repair` changed.
    Applied(u32),
    /// Block numbers that failed their checksum.
    Corrupt(Vec<u32>),
    Usage(StoreUsage),
    Extents(Vec<LayerExtent>),
}

/// Why a replica refused a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ReplicaError {
    #[error("generation {ours} is fenced; the volume's current writer has generation {current}")]
    StaleGeneration { ours: u64, current: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("blocks {blocks:?} fail their checksum on this replica")]
    Corrupt { blocks: Vec<u32> },
    #[error("replica store: {0}")]
    Io(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: Result<Answer, ReplicaError>,
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> Result<(), WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::FrameTooLarge(payload.len()));
    }
    let len = u32::try_from(payload.len()).map_err(|_| WireError::FrameTooLarge(payload.len()))?;
    w.write_all(&len.to_le_bytes()).await?;
    w.write_all(payload).await?;
    Ok(())
}

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

pub async fn send<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
    let bytes = postcard::to_stdvec(msg)?;
    write_frame(w, &bytes).await
}

pub async fn recv<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, WireError> {
    let bytes = read_frame(r).await?;
    Ok(postcard::from_bytes(&bytes)?)
}

fn proof(key: &PoolKey, role: &[u8], client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> Vec<u8> {
    key.mac(&[b"nodeos block handshake v1", role, client_nonce, server_nonce]).to_vec()
}

/// The client half of the handshake. Returns the replica's node id.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &PoolKey,
) -> Result<NodeId, WireError> {
    client_handshake_as(s, key, PROTOCOL_VERSION).await
}

/// [`client_handshake`] claiming any protocol version (tests of old peers).
pub async fn client_handshake_as<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &PoolKey,
    version: u16,
) -> Result<NodeId, WireError> {
    let nonce: [u8; 32] = rand::random();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&version.to_le_bytes());
    hello.extend_from_slice(&nonce);
    s.write_all(&hello).await?;
    let (node, server_nonce) = match recv::<_, ServerHello>(s).await? {
        ServerHello::Refused { reason } => return Err(WireError::Refused(reason)),
        ServerHello::Challenge { node, nonce: sn, mac, .. } => {
            if !key.verify(&[b"nodeos block handshake v1", b"server", &nonce, &sn], &mac) {
                return Err(WireError::BadProof);
            }
            (node, sn)
        }
        ServerHello::Ready => return Err(WireError::Unexpected),
    };
    send(s, &ClientProof { mac: proof(key, b"client", &nonce, &server_nonce) }).await?;
    match recv::<_, ServerHello>(s).await? {
        ServerHello::Ready => Ok(node),
        ServerHello::Refused { reason } => Err(WireError::Refused(reason)),
        ServerHello::Challenge { .. } => Err(WireError::Unexpected),
    }
}

/// The server half of the handshake; on error the connection must be closed.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &PoolKey,
    node: NodeId,
) -> Result<(), WireError> {
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).await?;
    if hello[..8] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16::from_le_bytes([hello[8], hello[9]]);
    if version != PROTOCOL_VERSION {
        let reason = format!(
            "replica protocol version {version} is not supported; this replica speaks version {PROTOCOL_VERSION}"
        );
        send(s, &ServerHello::Refused { reason: reason.clone() }).await?;
        return Err(WireError::Refused(reason));
    }
    let client_nonce: [u8; 32] = hello[10..].try_into().expect("HELLO_LEN leaves 32 nonce bytes");
    let nonce: [u8; 32] = rand::random();
    let mac = proof(key, b"server", &client_nonce, &nonce);
    send(s, &ServerHello::Challenge { version: PROTOCOL_VERSION, node, nonce, mac }).await?;
    let p: ClientProof = recv(s).await?;
    if !key.verify(&[b"nodeos block handshake v1", b"client", &client_nonce, &nonce], &p.mac) {
        send(s, &ServerHello::Refused { reason: "pool key proof failed".into() }).await?;
        return Err(WireError::BadProof);
    }
    send(s, &ServerHello::Ready).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PoolKey {
        PoolKey::from_secret(s.as_bytes()).expect("valid key")
    }

    #[tokio::test]
    async fn handshake_with_the_same_key_succeeds() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let k = key("0123456789abcdef0123");
        let k2 = k.clone();
        let server = tokio::spawn(async move { server_handshake(&mut b, &k2, NodeId(9)).await });
        assert_eq!(client_handshake(&mut a, &k).await.expect("handshake"), NodeId(9));
        server.await.expect("join").expect("server side");
    }

    #[tokio::test]
    async fn handshake_with_another_key_fails_on_both_sides() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server =
            tokio::spawn(
                async move { server_handshake(&mut b, &key("0123456789abcdef0123"), NodeId(9)).await },
            );
        let err = client_handshake(&mut a, &key("another pool key 12345")).await.expect_err("must fail");
        assert!(matches!(err, WireError::BadProof), "{err:?}");
        drop(a);
        assert!(server.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn old_protocol_version_is_refused_with_a_reason() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let k = key("0123456789abcdef0123");
        let k2 = k.clone();
        let server = tokio::spawn(async move { server_handshake(&mut b, &k2, NodeId(9)).await });
        let err = client_handshake_as(&mut a, &k, 0).await.expect_err("must fail");
        match err {
            WireError::Refused(r) => assert!(r.contains("version 0 is not supported"), "{r}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(server.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(u32::MAX).to_le_bytes()).await.expect("write");
        assert!(matches!(read_frame(&mut b).await, Err(WireError::FrameTooLarge(_))));
    }

    #[test]
    fn garbage_does_not_decode_as_a_request() {
        for junk in [&[][..], &[0xff; 3][..], &[7, 200, 200, 200, 200, 200, 200, 200, 200, 200, 1][..]] {
            assert!(postcard::from_bytes::<Request>(junk).is_err());
        }
    }
}
