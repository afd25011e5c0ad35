//! A small NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies), enough
//! for tests to write, read and flush a node's volume exports and to see
//! each request's error code. One request at a time.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// Longest a test waits for one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An open export.
#[derive(Debug)]
pub struct NbdClient {
    s: TcpStream,
    pub size: u64,
    handle: u64,
}

/// A request the server answered with an error (errno).
#[derive(Debug, thiserror::Error)]
#[error("NBD error {0}")]
pub struct NbdErrno(pub u32);

impl NbdClient {
    /// Connects and opens `export` with `NBD_OPT_GO`; fails with the
    /// server's message if it refuses.
    pub async fn connect(addr: SocketAddr, export: &str) -> anyhow::Result<Self> {
        let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .context("NBD connect timed out")?
            .with_context(|| format!("NBD connect to {addr}"))?;
        s.set_nodelay(true)?;
        ensure!(s.read_u64().await? == NBDMAGIC, "not an NBD server");
        ensure!(s.read_u64().await? == IHAVEOPT, "not a newstyle NBD server");
        let _flags = s.read_u16().await?;
        s.write_u32(1 | 2).await?; // FIXED_NEWSTYLE | NO_ZEROES
        let name = export.as_bytes();
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        s.write_u64(IHAVEOPT).await?;
        s.write_u32(OPT_GO).await?;
        s.write_u32(data.len() as u32).await?;
        s.write_all(&data).await?;
        let mut size = None;
        loop {
            ensure!(s.read_u64().await? == REPLY_MAGIC, "bad option reply magic");
            let _opt = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await? as usize;
            ensure!(len <= 1 << 20, "option reply of {len} bytes");
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await?;
            match kind {
                REP_INFO if body.len() >= 12 && body[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(body[2..10].try_into().expect("8 bytes")));
                }
                REP_INFO => {}
                REP_ACK => break,
                k if k & (1 << 31) != 0 => {
                    bail!("export {export:?} refused: {}", String::from_utf8_lossy(&body))
                }
                k => bail!("unexpected option reply {k}"),
            }
        }
        let size = size.context("server sent no export size")?;
        Ok(NbdClient { s, size, handle: 0 })
    }

    async fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> anyhow::Result<Result<Vec<u8>, NbdErrno>> {
        self.handle += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        let handle = self.handle;
        let s = &mut self.s;
        tokio::time::timeout(REQUEST_TIMEOUT, async move {
            s.write_all(&h).await?;
            ensure!(s.read_u32().await? == SIMPLE_REPLY_MAGIC, "bad reply magic");
            let err = s.read_u32().await?;
            ensure!(s.read_u64().await? == handle, "reply for another request");
            if err != 0 {
                return Ok(Err(NbdErrno(err)));
            }
            let mut buf = vec![0u8; if cmd == CMD_READ { len as usize } else { 0 }];
            s.read_exact(&mut buf).await?;
            Ok(Ok(buf))
        })
        .await
        .context("NBD request timed out")?
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<Result<(), NbdErrno>> {
        Ok(self.request(CMD_WRITE, offset, data.len() as u32, data).await?.map(|_| ()))
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> anyhow::Result<Result<Vec<u8>, NbdErrno>> {
        self.request(CMD_READ, offset, len, &[]).await
    }

    pub async fn flush(&mut self) -> anyhow::Result<Result<(), NbdErrno>> {
        Ok(self.request(CMD_FLUSH, 0, 0, &[]).await?.map(|_| ()))
    }

    /// Disconnects politely (the server releases the export).
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.handle += 1;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&CMD_DISC.to_be_bytes());
        h.extend_from_slice(&self.handle.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        self.s.write_all(&h).await?;
        let _ = self.s.shutdown().await;
        Ok(())
    }
}
