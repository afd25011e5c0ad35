//! Black-box tests of a running `PxeServer` on loopback: real sockets, a
//! hand-written DHCP, TFTP and HTTP client, and busybox's TFTP client when
//! it is installed.

#![allow(clippy::unwrap_used)] // a test: a failed step should stop it

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nodeos_pxe::{Bundle, PxeConfig, PxeServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
const WAIT: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const SCRIPT: &[u8] = b"#!ipxe\nkernel vmlinuz\ninitrd initramfs.img\nboot\n";

/// Deterministic, non-repeating-looking file contents.
fn contents(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn bundle() -> Bundle {
    let mut b = Bundle::new();
    b.insert("boot.ipxe", Bytes::from_static(SCRIPT)).unwrap();
    b.insert("vmlinuz", contents(200_000, 1)).unwrap();
    b.insert("initramfs.img", contents(512 * 3 + 77, 2)).unwrap();
    b.insert("exact.bin", contents(1024, 3)).unwrap();
    b.insert("undionly.kpxe", contents(70_001, 4)).unwrap();
    b
}

/// A server on loopback with system-picked ports; DHCP port replies go to
/// 127.0.0.1:`client_port`.
async fn server(client_port: u16) -> PxeServer {
    let mut cfg = PxeConfig::new(String::new(), LOCAL);
    cfg.dhcp_port = 0;
    cfg.proxy_port = 0;
    cfg.tftp_port = 0;
    cfg.http_port = 0;
    cfg.client_port = client_port;
    cfg.reply_broadcast = LOCAL;
    PxeServer::start(cfg, Arc::new(bundle())).await.unwrap()
}

// ---- HTTP ----

struct HttpReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

async fn http(port: u16, request: &[u8]) -> HttpReply {
    let mut s = TcpStream::connect((LOCAL, port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, s.read_to_end(&mut raw)).await.expect("the server closes the connection").unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_owned(), v.trim().to_owned())
        })
        .collect();
    HttpReply { status, headers, body: raw[end + 4..].to_vec() }
}

#[tokio::test]
async fn http_serves_the_bundle() {
    let srv = server(68).await;
    let port = srv.config().http_port;
    let b = bundle();

    let r =
        http(port, b"GET /boot.ipxe HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: iPXE/1.21.1\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("content-length"), Some(SCRIPT.len().to_string().as_str()));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body, SCRIPT);

    let r = http(port, b"GET /vmlinuz?mac=52-54-00 HTTP/1.1\r\nHost: x\r\nRange: bytes=100-\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.body, b.get("vmlinuz").unwrap().as_ref());

    let r = http(port, b"HEAD /initramfs.img HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some((512 * 3 + 77).to_string().as_str()));
    assert!(r.body.is_empty());

    let r = http(port, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 404);

    let r = http(port, b"POST /vmlinuz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    let r = http(port, b"GET\r\n\r\n").await;
    assert_eq!(r.status, 400);
    let r = http(port, b"GET /vmlinuz HTTP/1.1\r\n\r\n").await;
    assert_eq!(r.status, 400, "HTTP/1.1 without Host");

    let mut huge = b"GET /vmlinuz HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    huge.resize(9000, b'a');
    let r = http(port, &huge).await;
    assert_eq!(r.status, 431);

    let stats = srv.stats();
    assert_eq!(stats.http_requests, 8);
    assert_eq!(stats.http_errors, 5);
    assert_eq!(stats.bytes_sent, (SCRIPT.len() + 200_000) as u64);
    srv.stop().await;
}

// ---- TFTP ----

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    for s in [name, "octet"].into_iter().chain(options.iter().flat_map(|(n, v)| [*n, *v])) {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// Downloads `name` with the given options; returns the file, the options
/// of the OACK (if any) and the sizes of the DATA packets.
async fn tftp_get(
    port: u16,
    name: &str,
    options: &[(&str, &str)],
) -> (Vec<u8>, Vec<(String, String)>, Vec<usize>) {
    let sock = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    sock.send_to(&rrq(name, options), (LOCAL, port)).await.unwrap();
    let mut buf = vec![0u8; 70_000];
    let mut blksize = 512;
    let mut oack = Vec::new();
    let mut file = Vec::new();
    let mut sizes = Vec::new();
    let mut expect: u16 = 1;
    let mut tid: Option<SocketAddr> = None;
    loop {
        let (n, from) = timeout(WAIT, sock.recv_from(&mut buf)).await.expect("the server answers").unwrap();
        assert_ne!(from.port(), port, "transfers come from their own port");
        assert_eq!(*tid.get_or_insert(from), from, "one transfer ID per transfer");
        let p = &buf[..n];
        match u16::from_be_bytes([p[0], p[1]]) {
            6 => {
                assert!(oack.is_empty() && file.is_empty(), "OACK comes first, once");
                let fields: Vec<String> = p[2..]
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8(s.to_vec()).unwrap())
                    .collect();
                oack = fields.chunks(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect();
                if let Some((_, v)) = oack.iter().find(|(k, _)| k == "blksize") {
                    blksize = v.parse().unwrap();
                }
                sock.send_to(&ack(0), from).await.unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([p[2], p[3]]);
                assert_eq!(block, expect);
                let data = &p[4..];
                assert!(data.len() <= blksize);
                file.extend_from_slice(data);
                sizes.push(data.len());
                sock.send_to(&ack(block), from).await.unwrap();
                if data.len() < blksize {
                    return (file, oack, sizes);
                }
                expect = expect.wrapping_add(1);
            }
            5 => panic!(
                "TFTP error {}: {}",
                u16::from_be_bytes([p[2], p[3]]),
                String::from_utf8_lossy(&p[4..])
            ),
            op => panic!("unexpected opcode {op}"),
        }
    }
}

/// Sends `packet` to the TFTP port and returns the error (code, text).
async fn tftp_error(port: u16, packet: &[u8]) -> (u16, String) {
    let sock = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    sock.send_to(packet, (LOCAL, port)).await.unwrap();
    let mut buf = [0u8; 600];
    let (n, _) = timeout(WAIT, sock.recv_from(&mut buf)).await.expect("an error reply").unwrap();
    assert_eq!(&buf[..2], &[0, 5], "an ERROR packet");
    let text = String::from_utf8_lossy(&buf[4..n]).trim_end_matches('\0').to_owned();
    (u16::from_be_bytes([buf[2], buf[3]]), text)
}

#[tokio::test]
async fn tftp_downloads() {
    let srv = server(68).await;
    let port = srv.config().tftp_port;
    let b = bundle();

    // Options as busybox and iPXE send them.
    let (file, oack, sizes) = tftp_get(port, "undionly.kpxe", &[("blksize", "1428"), ("tsize", "0")]).await;
    assert_eq!(file, b.get("undionly.kpxe").unwrap().as_ref());
    assert_eq!(oack, vec![("blksize".into(), "1428".into()), ("tsize".into(), "70001".into())]);
    assert_eq!(sizes.len(), 70_001 / 1428 + 1);

    // A block size beyond the MTU is clamped.
    let (file, oack, _) = tftp_get(port, "/vmlinuz", &[("blksize", "65464")]).await;
    assert_eq!(file, b.get("vmlinuz").unwrap().as_ref());
    assert_eq!(oack, vec![("blksize".into(), "1468".into())]);

    // No options: no OACK, 512-byte blocks.
    let (file, oack, sizes) = tftp_get(port, "initramfs.img", &[]).await;
    assert_eq!(file, b.get("initramfs.img").unwrap().as_ref());
    assert!(oack.is_empty());
    assert_eq!(sizes, vec![512, 512, 512, 77]);

    // A multiple of the block size ends with an empty block.
    let (file, _, sizes) = tftp_get(port, "exact.bin", &[]).await;
    assert_eq!(file, b.get("exact.bin").unwrap().as_ref());
    assert_eq!(sizes, vec![512, 512, 0]);

    // Unknown options alone: no OACK.
    let (_, oack, _) = tftp_get(port, "boot.ipxe", &[("windowsize", "16")]).await;
    assert!(oack.is_empty());

    assert_eq!(tftp_error(port, &rrq("missing.efi", &[])).await.0, 1);
    let mut wrq = rrq("vmlinuz", &[]);
    wrq[1] = 2;
    assert_eq!(tftp_error(port, &wrq).await, (2, "read-only server".into()));
    let mut netascii = vec![0, 1];
    netascii.extend_from_slice(b"vmlinuz\0netascii\0");
    let (code, text) = tftp_error(port, &netascii).await;
    assert_eq!(code, 0);
    assert!(text.contains("octet"), "{text}");

    // Counters settle once the last ACK reached the server.
    let want = 70_001 + 200_000 + (512 * 3 + 77) + 1024 + SCRIPT.len() as u64;
    for _ in 0..100 {
        if srv.stats().tftp_transfers == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = srv.stats();
    assert_eq!((stats.tftp_transfers, stats.tftp_errors, stats.bytes_sent), (5, 3, want));
    srv.stop().await;
}

#[tokio::test]
async fn tftp_retransmits_and_ignores_strangers() {
    let srv = server(68).await;
    let port = srv.config().tftp_port;
    let sock = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    sock.send_to(&rrq("exact.bin", &[("timeout", "1")]), (LOCAL, port)).await.unwrap();
    let mut buf = [0u8; 1600];
    let (n, tid) = timeout(WAIT, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    let oack = buf[..n].to_vec();
    assert_eq!(&oack[..2], &[0, 6]);

    // Not acknowledged: the OACK comes again after the 1 s timeout.
    let started = std::time::Instant::now();
    let (n, from) = timeout(WAIT, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!((from, &buf[..n]), (tid, &oack[..]));
    assert!(started.elapsed() >= Duration::from_millis(800), "{:?}", started.elapsed());

    // Another port writing to the transfer gets error 5; the transfer goes on.
    let stranger = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    stranger.send_to(&ack(0), tid).await.unwrap();
    let (n, _) = timeout(WAIT, stranger.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..4], &[0, 5, 0, 5], "{:?}", &buf[..n]);

    sock.send_to(&ack(0), tid).await.unwrap();
    let (_, _) = timeout(WAIT, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..4], &[0, 3, 0, 1]);
    // A duplicate ACK 0 must not bring a second DATA 1 before the timeout.
    sock.send_to(&ack(0), tid).await.unwrap();
    assert!(timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await.is_err());
    for block in 1..=3 {
        sock.send_to(&ack(block), tid).await.unwrap();
        if block < 3 {
            let (_, _) = timeout(WAIT, sock.recv_from(&mut buf)).await.unwrap().unwrap();
            assert_eq!(&buf[..4], &[0, 3, 0, block as u8 + 1]);
        }
    }
    for _ in 0..100 {
        if srv.stats().tftp_transfers == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.stats().tftp_transfers, 1);
    srv.stop().await;
}

#[tokio::test]
async fn tftp_with_busybox() {
    let busybox = std::path::Path::new("/usr/bin/busybox");
    if !busybox.exists() {
        nodeos_types::testing::skip("tftp_with_busybox", "busybox not installed");
        return;
    }
    let srv = server(68).await;
    let port = srv.config().tftp_port;
    let dir = std::env::temp_dir().join(format!("nodeos-pxe-busybox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["undionly.kpxe", "exact.bin"] {
        let out = dir.join(name);
        let status = tokio::process::Command::new(busybox)
            .args(["tftp", "-g", "-r", name, "-l"])
            .arg(&out)
            .args(["-b", "1428", "127.0.0.1", &port.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "busybox tftp {name}: {status}");
        assert_eq!(std::fs::read(&out).unwrap(), bundle().get(name).unwrap().as_ref(), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    srv.stop().await;
}

// ---- proxy DHCP ----

const OPT_END: u8 = 255;

fn dhcp_message(message_type: u8, options: &[(u8, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; 240];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&[1, 2, 3, 4]);
    m[10] = 0x80;
    m[28..34].copy_from_slice(&MAC);
    m[236..240].copy_from_slice(&[99, 130, 83, 99]);
    m.extend_from_slice(&[53, 1, message_type]);
    for (code, value) in options {
        m.push(*code);
        m.push(value.len() as u8);
        m.extend_from_slice(value);
    }
    m.push(OPT_END);
    m
}

struct DhcpReply {
    message_type: u8,
    siaddr: [u8; 4],
    file: String,
    options: Vec<(u8, Vec<u8>)>,
}

fn read_reply(m: &[u8]) -> DhcpReply {
    assert!(m.len() >= 300);
    assert_eq!(m[0], 2, "BOOTREPLY");
    assert_eq!(&m[4..8], &[1, 2, 3, 4], "xid");
    assert_eq!(&m[16..20], &[0, 0, 0, 0], "yiaddr");
    assert_eq!(&m[28..34], &MAC, "chaddr");
    let file = &m[108..236];
    let file = String::from_utf8(file[..file.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap();
    let mut options = Vec::new();
    let mut at = 240;
    while m[at] != OPT_END {
        let (code, len) = (m[at], usize::from(m[at + 1]));
        options.push((code, m[at + 2..at + 2 + len].to_vec()));
        at += 2 + len;
    }
    let message_type = options.iter().find(|(c, _)| *c == 53).unwrap().1[0];
    DhcpReply { message_type, siaddr: m[20..24].try_into().unwrap(), file, options }
}

#[tokio::test]
async fn proxy_dhcp_offer_and_ack() {
    let client = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    let srv = server(client.local_addr().unwrap().port()).await;
    let cfg = srv.config().clone();
    let mut buf = vec![0u8; 1500];
    let uuid = [0u8, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6];

    // A BIOS PXE ROM's DISCOVER on the DHCP port: an offer, "broadcast".
    let discover = dhcp_message(
        1,
        &[(60, b"PXEClient:Arch:00000:UNDI:002001"), (93, &[0, 0]), (94, &[1, 2, 1]), (97, &uuid)],
    );
    client.send_to(&discover, (LOCAL, cfg.dhcp_port)).await.unwrap();
    let (n, from) = timeout(WAIT, client.recv_from(&mut buf)).await.expect("an offer").unwrap();
    assert_eq!(from.port(), cfg.dhcp_port, "offers come from the DHCP port");
    let offer = read_reply(&buf[..n]);
    assert_eq!(offer.message_type, 2);
    assert_eq!(offer.siaddr, [127, 0, 0, 1]);
    assert_eq!(offer.file, "undionly.kpxe");
    assert!(offer.options.contains(&(54, vec![127, 0, 0, 1])));
    assert!(offer.options.contains(&(60, b"PXEClient".to_vec())));
    assert!(offer.options.contains(&(97, uuid.to_vec())));
    assert!(offer.options.contains(&(43, vec![6, 1, 8, 255])));

    // iPXE's DISCOVER: the HTTP script.
    let ipxe = dhcp_message(
        1,
        &[(60, b"PXEClient:Arch:00000:UNDI:002001"), (93, &[0, 0]), (77, b"iPXE"), (175, &[19, 1, 1])],
    );
    client.send_to(&ipxe, (LOCAL, cfg.dhcp_port)).await.unwrap();
    let (n, _) = timeout(WAIT, client.recv_from(&mut buf)).await.expect("an offer").unwrap();
    assert_eq!(read_reply(&buf[..n]).file, format!("http://127.0.0.1:{}/boot.ipxe", cfg.http_port));

    // A REQUEST on the DHCP port for the real DHCP server: no answer.
    let request =
        dhcp_message(3, &[(60, b"PXEClient"), (93, &[0, 0]), (54, &[10, 0, 0, 1]), (50, &[10, 0, 0, 99])]);
    client.send_to(&request, (LOCAL, cfg.dhcp_port)).await.unwrap();
    // Not PXE at all: no answer either.
    client.send_to(&dhcp_message(1, &[(60, b"MSFT 5.0")]), (LOCAL, cfg.dhcp_port)).await.unwrap();
    client.send_to(b"garbage", (LOCAL, cfg.dhcp_port)).await.unwrap();

    // A UEFI ROM: the bundle has no UEFI chainloader, so no answer.
    let efi = dhcp_message(1, &[(60, b"PXEClient:Arch:00007:UNDI:003016"), (93, &[0, 7])]);
    client.send_to(&efi, (LOCAL, cfg.dhcp_port)).await.unwrap();

    // The ProxyDHCPREQUEST to port 4011: an ACK back to the sender.
    let proxy_request = dhcp_message(
        3,
        &[(60, b"PXEClient:Arch:00000:UNDI:002001"), (93, &[0, 0]), (54, &[127, 0, 0, 1]), (97, &uuid)],
    );
    let other = UdpSocket::bind((LOCAL, 0)).await.unwrap();
    other.send_to(&proxy_request, (LOCAL, cfg.proxy_port)).await.unwrap();
    let (n, from) = timeout(WAIT, other.recv_from(&mut buf)).await.expect("an ACK").unwrap();
    assert_eq!(from.port(), cfg.proxy_port, "the ACK comes from the proxy port");
    let ack = read_reply(&buf[..n]);
    assert_eq!(ack.message_type, 5);
    assert_eq!(ack.siaddr, [127, 0, 0, 1]);
    assert_eq!(ack.file, "undionly.kpxe");
    assert!(ack.options.contains(&(97, uuid.to_vec())));

    // Nothing else arrived on the client socket: the request for the real
    // server, the non-PXE client, the garbage and the UEFI ROM got nothing.
    assert!(timeout(Duration::from_millis(200), client.recv_from(&mut buf)).await.is_err());

    let stats = srv.stats();
    assert_eq!(
        (stats.offers, stats.acks, stats.ignored, stats.malformed, stats.unsupported_clients),
        (2, 1, 2, 1, 1)
    );
    srv.stop().await;
}
