//! The migration stream's wire format: a handshake that proves both ends
//! hold the pool key and agrees per-direction session keys, then frames,
//! each authenticated.
//!
//! ```text
//! handshake (each side sends one, source first; 96 bytes):
//!   magic   "NODEOSMG"      8 bytes
//!   version u32 LE           (PROTOCOL_VERSION)
//!   role    u32 LE           (1 source, 2 destination)
//!   vm      [u8; 16]         (the VM id, zero padded: both ends must name the same VM)
//!   nonce   [u8; 32]         (random, fresh per migration)
//!   mac     [u8; 32]         keyed BLAKE3 under the pool key over the 64 bytes before it
//!                            and, for the destination, the source's nonce
//! frame:
//!   kind    u8
//!   _       [u8; 3]          zero
//!   len     u32 LE           payload bytes (at most MAX_PAYLOAD)
//!   seq     u64 LE           0, 1, 2 ... per direction (replay and reordering fail the MAC)
//!   payload [u8; len]
//!   tag     [u8; 32]         keyed BLAKE3 under the direction's session key over header and payload
//! ```
//!
//! Session keys are derived from the pool key and both nonces, one per
//! direction, so a frame cannot be reflected back to its sender. Frames are
//! authenticated, not encrypted: guest memory crosses the fabric in clear
//! until the pool has its own CA and TLS (see the security ADR).
//!
//! Everything read is checked before it is used: magic, version, role,
//! lengths (a length beyond [`MAX_PAYLOAD`] ends the stream before any
//! allocation), tags (in constant time).

use std::io::{Read, Write};

use nodeos_types::auth::PoolKey;

/// Version of the migration protocol; both ends must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"NODEOSMG";
const HELLO_LEN: usize = 96;
const HEADER_LEN: usize = 16;
const TAG_LEN: usize = 32;
/// Largest frame payload: a batch of [`MAX_PAGES_PER_FRAME`] pages and their addresses.
pub const MAX_PAYLOAD: usize = 4 + MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE) + 64;
/// Pages sent in one frame.
pub const MAX_PAGES_PER_FRAME: usize = 256;
pub const PAGE_SIZE: usize = 4096;
const SESSION_CONTEXT: &str = "nodeos migration session key v1 2026-12";

/// Who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source = 1,
    Destination = 2,
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: the VM's shape (memory, vCPUs, devices), checked by the destination.
    Layout = 1,
    /// Source: guest pages (`u32` count, that many `u64` addresses, then the pages).
    Pages = 2,
    /// Source: ranges of pages that are all zero (`(u64 address, u32 pages)`, repeated).
    Zero = 3,
    /// Source: one pre-copy pass is over (`u32` iteration, `u64` pages sent).
    PassDone = 4,
    /// Source: the paused VM's vCPU and device state; the memory is complete.
    State = 5,
    /// Destination: the state is restored; the VM waits for the commit.
    Restored = 6,
    /// Either side: the migration is over without a hand-over (UTF-8 reason).
    Abort = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Layout,
            2 => Kind::Pages,
            3 => Kind::Zero,
            4 => Kind::PassDone,
            5 => Kind::State,
            6 => Kind::Restored,
            7 => Kind::Abort,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("migration stream I/O")]
    Io(#[from] std::io::Error),
    #[error("the peer is not a nodeos migration endpoint (bad magic)")]
    Magic,
    #[error("the peer speaks migration protocol {peer}, this node {PROTOCOL_VERSION}")]
    Version { peer: u32 },
    #[error("the peer's handshake is not authentic (another pool key?)")]
    HelloMac,
    #[error("the peer announced role {0}, expected the other end")]
    Role(u32),
    #[error("the peer migrates VM {peer:?}, this end expects {ours:?}")]
    Vm { peer: String, ours: String },
    #[error("frame {seq} fails authentication")]
    Tag { seq: u64 },
    #[error("frame of {len} bytes exceeds {MAX_PAYLOAD}")]
    TooLarge { len: usize },
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("malformed {kind:?} frame: {why}")]
    Malformed { kind: Kind, why: String },
}

/// The VM name field: the first 16 bytes of the id, zero padded.
fn vm_field(vm: &str) -> [u8; 16] {
    let mut f = [0u8; 16];
    let b = vm.as_bytes();
    let n = b.len().min(16);
    f[..n].copy_from_slice(&b[..n]);
    f
}

fn hello_bytes(role: Role, vm: &str, nonce: &[u8; 32]) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(role as u32).to_le_bytes());
    h[16..32].copy_from_slice(&vm_field(vm));
    h[32..64].copy_from_slice(nonce);
    h
}

/// Both directions of an authenticated stream.
pub struct Channel<S> {
    stream: S,
    send_key: [u8; 32],
    recv_key: [u8; 32],
    send_seq: u64,
    recv_seq: u64,
    /// Bytes written so far, frames and handshake included.
    pub bytes_sent: u64,
}

impl<S> std::fmt::Debug for Channel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("send_seq", &self.send_seq).field("recv_seq", &self.recv_seq).finish()
    }
}

fn session_key(pool: &PoolKey, from: Role, source_nonce: &[u8; 32], dest_nonce: &[u8; 32]) -> [u8; 32] {
    let mut material = Vec::with_capacity(32 * 3 + 1);
    material.extend_from_slice(&pool.derived_bytes());
    material.extend_from_slice(source_nonce);
    material.extend_from_slice(dest_nonce);
    material.push(from as u8);
    blake3::derive_key(SESSION_CONTEXT, &material)
}

fn read_hello<S: Read>(
    stream: &mut S,
    pool: &PoolKey,
    expect: Role,
    vm: &str,
    bound_to: Option<&[u8; 32]>,
) -> Result<[u8; 32], WireError> {
    let mut h = [0u8; HELLO_LEN];
    stream.read_exact(&mut h)?;
    if &h[..8] != MAGIC {
        return Err(WireError::Magic);
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version { peer: version });
    }
    let mut fields: Vec<&[u8]> = vec![&h[..64]];
    if let Some(n) = bound_to {
        fields.push(n);
    }
    if !pool.verify(&fields, &h[64..]) {
        return Err(WireError::HelloMac);
    }
    let role = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if role != expect as u32 {
        return Err(WireError::Role(role));
    }
    if h[16..32] != vm_field(vm) {
        let peer = String::from_utf8_lossy(&h[16..32]).trim_end_matches('\0').to_string();
        return Err(WireError::Vm { peer, ours: vm.to_string() });
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&h[32..64]);
    Ok(nonce)
}

fn write_hello<S: Write>(
    stream: &mut S,
    pool: &PoolKey,
    role: Role,
    vm: &str,
    nonce: &[u8; 32],
    bound_to: Option<&[u8; 32]>,
) -> Result<(), WireError> {
    let body = hello_bytes(role, vm, nonce);
    let mut fields: Vec<&[u8]> = vec![&body];
    if let Some(n) = bound_to {
        fields.push(n);
    }
    let mac = pool.mac(&fields);
    let mut h = [0u8; HELLO_LEN];
    h[..64].copy_from_slice(&body);
    h[64..].copy_from_slice(&mac);
    stream.write_all(&h)?;
    stream.flush()?;
    Ok(())
}

/// A fresh random nonce from getrandom(2) (the worker's seccomp filter
/// allows it; a userspace RNG that opens /dev/urandom would be refused).
fn fresh_nonce() -> Result<[u8; 32], WireError> {
    let mut n = [0u8; 32];
    let mut filled = 0;
    while filled < n.len() {
        let rest = &mut n[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, a
        // valid, exclusively borrowed buffer of that length.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(WireError::Io(e));
        }
        filled += got as usize;
    }
    Ok(n)
}

impl<S: Read + Write> Channel<S> {
    /// The source's side of the handshake.
    pub fn connect(mut stream: S, pool: &PoolKey, vm: &str) -> Result<Self, WireError> {
        let ours = fresh_nonce()?;
        write_hello(&mut stream, pool, Role::Source, vm, &ours, None)?;
        let theirs = read_hello(&mut stream, pool, Role::Destination, vm, Some(&ours))?;
        Ok(Self::keyed(stream, pool, Role::Source, &ours, &theirs))
    }

    /// The destination's side of the handshake.
    pub fn accept(mut stream: S, pool: &PoolKey, vm: &str) -> Result<Self, WireError> {
        let theirs = read_hello(&mut stream, pool, Role::Source, vm, None)?;
        let ours = fresh_nonce()?;
        write_hello(&mut stream, pool, Role::Destination, vm, &ours, Some(&theirs))?;
        Ok(Self::keyed(stream, pool, Role::Destination, &theirs, &ours))
    }

    fn keyed(stream: S, pool: &PoolKey, me: Role, source_nonce: &[u8; 32], dest_nonce: &[u8; 32]) -> Self {
        let other = if me == Role::Source { Role::Destination } else { Role::Source };
        Self {
            stream,
            send_key: session_key(pool, me, source_nonce, dest_nonce),
            recv_key: session_key(pool, other, source_nonce, dest_nonce),
            send_seq: 0,
            recv_seq: 0,
            bytes_sent: HELLO_LEN as u64,
        }
    }

    /// Sends one frame whose payload is the concatenation of `parts`.
    pub fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge { len });
        }
        let header = header(kind as u8, len as u32, self.send_seq);
        let mut mac = blake3::Hasher::new_keyed(&self.send_key);
        mac.update(&header);
        self.stream.write_all(&header)?;
        for p in parts {
            mac.update(p);
            self.stream.write_all(p)?;
        }
        self.stream.write_all(mac.finalize().as_bytes())?;
        self.send_seq += 1;
        self.bytes_sent += (HEADER_LEN + len + TAG_LEN) as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.stream.flush()?)
    }

    /// Receives the next frame into `buf` (resized to the payload); returns its kind.
    pub fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Kind, WireError> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge { len });
        }
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        buf.resize(len, 0);
        self.stream.read_exact(buf)?;
        let mut tag = [0u8; TAG_LEN];
        self.stream.read_exact(&mut tag)?;
        let mut mac = blake3::Hasher::new_keyed(&self.recv_key);
        mac.update(&header);
        mac.update(buf);
        // blake3::Hash compares in constant time.
        if mac.finalize() != blake3::Hash::from_bytes(tag)
            || seq != self.recv_seq
            || header[1..4] != [0, 0, 0]
        {
            return Err(WireError::Tag { seq });
        }
        self.recv_seq += 1;
        Kind::from_u8(header[0]).ok_or(WireError::Kind(header[0]))
    }

    /// The underlying stream (to set timeouts or shut it down).
    pub fn stream(&self) -> &S {
        &self.stream
    }
}

fn header(kind: u8, len: u32, seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h
}

/// Encodes a page batch's addresses (the pages follow as separate parts).
pub fn pages_header(addrs: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + addrs.len() * 8);
    v.extend_from_slice(&(addrs.len() as u32).to_le_bytes());
    for a in addrs {
        v.extend_from_slice(&a.to_le_bytes());
    }
    v
}

/// Splits a `Pages` payload into its addresses and page bytes, checking
/// every length (addresses are checked against guest memory by the caller).
pub fn parse_pages(payload: &[u8]) -> Result<(Vec<u64>, &[u8]), WireError> {
    let bad = |why: String| WireError::Malformed { kind: Kind::Pages, why };
    let count = payload.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let count = count.ok_or_else(|| bad("shorter than its count".into()))?;
    if count == 0 || count > MAX_PAGES_PER_FRAME {
        return Err(bad(format!("{count} pages; 1..={MAX_PAGES_PER_FRAME} allowed")));
    }
    let want = 4 + count * (8 + PAGE_SIZE);
    if payload.len() != want {
        return Err(bad(format!("{} bytes for {count} pages, expected {want}", payload.len())));
    }
    let addrs = payload[4..4 + count * 8]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok((addrs, &payload[4 + count * 8..]))
}

/// Encodes zero-page ranges.
pub fn zero_ranges(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ranges.len() * 12);
    for (a, n) in ranges {
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v
}

pub fn parse_zero_ranges(payload: &[u8]) -> Result<Vec<(u64, u32)>, WireError> {
    if !payload.len().is_multiple_of(12) {
        return Err(WireError::Malformed { kind: Kind::Zero, why: format!("{} bytes", payload.len()) });
    }
    Ok(payload
        .chunks_exact(12)
        .map(|c| {
            let a = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
            let n = u32::from_le_bytes(c[8..].try_into().unwrap_or([0; 4]));
            (a, n)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn key(s: &[u8]) -> PoolKey {
        PoolKey::from_secret(s).unwrap()
    }

    fn pair(
        a: &PoolKey,
        b: &PoolKey,
        vm_a: &str,
        vm_b: &str,
    ) -> (Result<Channel<UnixStream>, WireError>, Result<Channel<UnixStream>, WireError>) {
        let (s, d) = UnixStream::pair().unwrap();
        let (a, vm_a) = (a.clone(), vm_a.to_string());
        let t = std::thread::spawn(move || Channel::connect(s, &a, &vm_a));
        let dest = Channel::accept(d, b, vm_b);
        (t.join().unwrap(), dest)
    }

    #[test]
    fn frames_round_trip_and_tampering_is_caught() {
        let k = key(b"0123456789abcdef-pool");
        let (src, dst) = pair(&k, &k, "vm-a", "vm-a");
        let (mut src, mut dst) = (src.unwrap(), dst.unwrap());
        src.send(Kind::Layout, &[b"hello", b" world"]).unwrap();
        src.send(Kind::Zero, &[&zero_ranges(&[(0x1000, 3)])]).unwrap();
        let mut buf = Vec::new();
        assert_eq!(dst.recv(&mut buf).unwrap(), Kind::Layout);
        assert_eq!(buf, b"hello world");
        assert_eq!(dst.recv(&mut buf).unwrap(), Kind::Zero);
        assert_eq!(parse_zero_ranges(&buf).unwrap(), vec![(0x1000, 3)]);
        dst.send(Kind::Restored, &[]).unwrap();
        assert_eq!(src.recv(&mut buf).unwrap(), Kind::Restored);
    }

    type Memory = Channel<std::io::Cursor<Vec<u8>>>;

    fn cursor_pair(k: &PoolKey) -> (Memory, Memory) {
        let (s, d) = ([1u8; 32], [2u8; 32]);
        let tx = Channel::keyed(std::io::Cursor::new(Vec::new()), k, Role::Source, &s, &d);
        let rx = Channel::keyed(std::io::Cursor::new(Vec::new()), k, Role::Destination, &s, &d);
        (tx, rx)
    }

    #[test]
    fn flipped_replayed_or_reflected_frames_fail() {
        let k = key(b"0123456789abcdef-pool");
        let (mut tx, mut rx) = cursor_pair(&k);
        tx.send(Kind::Pages, &[b"abc"]).unwrap();
        tx.send(Kind::Pages, &[b"def"]).unwrap();
        let good = tx.stream.get_ref().clone();
        let mut buf = Vec::new();

        let mut flipped = good.clone();
        flipped[HEADER_LEN] ^= 1;
        rx.stream = std::io::Cursor::new(flipped);
        assert!(matches!(rx.recv(&mut buf), Err(WireError::Tag { seq: 0 })));

        // The second frame alone (the first dropped) is out of sequence.
        let (_, mut rx) = cursor_pair(&k);
        rx.stream = std::io::Cursor::new(good[HEADER_LEN + 3 + TAG_LEN..].to_vec());
        assert!(matches!(rx.recv(&mut buf), Err(WireError::Tag { seq: 1 })));

        // A frame sent back to its sender (reflection) fails: other direction's key.
        let (mut tx2, _) = cursor_pair(&k);
        tx2.stream = std::io::Cursor::new(good.clone());
        assert!(matches!(tx2.recv(&mut buf), Err(WireError::Tag { .. })));

        let (_, mut rx) = cursor_pair(&k);
        rx.stream = std::io::Cursor::new(good);
        assert_eq!(rx.recv(&mut buf).unwrap(), Kind::Pages);
        assert_eq!(buf, b"abc");
    }

    #[test]
    fn wrong_key_or_vm_is_refused_at_the_handshake() {
        let a = key(b"0123456789abcdef-pool");
        let b = key(b"0123456789abcdef-other");
        let (_, dst) = pair(&a, &b, "vm-a", "vm-a");
        assert!(matches!(dst, Err(WireError::HelloMac)), "{dst:?}");
        let (_, dst) = pair(&a, &a, "vm-a", "vm-b");
        assert!(matches!(dst, Err(WireError::Vm { .. })), "{dst:?}");
    }

    #[test]
    fn a_peer_of_another_protocol_version_is_refused_by_name() {
        let k = key(b"0123456789abcdef-pool");
        let mut body = hello_bytes(Role::Source, "vm-a", &[3u8; 32]);
        body[8..12].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let mac = k.mac(&[&body]);
        let mut raw = body.to_vec();
        raw.extend_from_slice(&mac);
        let mut stream = std::io::Cursor::new(raw);
        let got = read_hello(&mut stream, &k, Role::Source, "vm-a", None);
        assert!(matches!(got, Err(WireError::Version { peer }) if peer == PROTOCOL_VERSION + 1), "{got:?}");
        let mut garbage = std::io::Cursor::new(vec![0u8; HELLO_LEN]);
        assert!(matches!(read_hello(&mut garbage, &k, Role::Source, "vm-a", None), Err(WireError::Magic)));
        let mut short = std::io::Cursor::new(vec![0u8; 10]);
        assert!(matches!(read_hello(&mut short, &k, Role::Source, "vm-a", None), Err(WireError::Io(_))));
    }

    #[test]
    fn oversized_and_malformed_payloads_are_errors() {
        let k = key(b"0123456789abcdef-pool");
        let (src, dst) = pair(&k, &k, "v", "v");
        let (mut src, _dst) = (src.unwrap(), dst.unwrap());
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(src.send(Kind::Pages, &[&big]), Err(WireError::TooLarge { .. })));
        assert!(parse_pages(&[0, 0, 0, 0]).is_err(), "zero pages");
        assert!(parse_pages(&[1, 0, 0, 0, 1, 2]).is_err(), "short");
        let mut ok = pages_header(&[0x2000]);
        ok.extend_from_slice(&[7u8; PAGE_SIZE]);
        let (addrs, pages) = parse_pages(&ok).unwrap();
        assert_eq!((addrs, pages.len()), (vec![0x2000], PAGE_SIZE));
        assert!(parse_zero_ranges(&[0; 13]).is_err());
    }
}
