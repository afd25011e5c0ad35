//! The built-in PXE server, process level: a two-node pool in namespaces on the test's bridge,
//! driven through the CLI. Node 0 has an image bundle (`make image`'s output) to serve, node 1
//! has none. The host plays the booting machine: a PXE DHCPDISCOVER broadcast on the bridge,
//! the ProxyDHCP request on port 4011, the boot script over HTTP and TFTP (busybox), the
//! initramfs checked against the manifest. The real boot through iPXE is in `image.rs`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nodeos_tests::cluster::{Cluster, POOL_NAME};
use nodeos_tests::{BuiltImage, NodeSpec, built_image, require, wait_until};
use sha2::{Digest, Sha256};

const FORM: Duration = Duration::from_secs(60);
const HTTP_PORT: u16 = 7780;

/// A PXE client's DHCP message as iPXE sends it (BIOS, UNDI), `kind` 1 (discover) or 3 (request).
fn pxe_message(kind: u8, xid: u32, mac: [u8; 6]) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1; // ethernet
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[10] = 0x80; // broadcast flag
    m[28..34].copy_from_slice(&mac);
    m.extend_from_slice(&[99, 130, 83, 99]);
    let mut opt = |code: u8, data: &[u8]| {
        m.push(code);
        m.push(u8::try_from(data.len()).expect("short option"));
        m.extend_from_slice(data);
    };
    opt(53, &[kind]);
    opt(60, b"PXEClient:Arch:00000:UNDI:002001");
    opt(77, b"iPXE");
    opt(93, &[0, 0]);
    let mut uuid = [0u8; 17];
    uuid[1..].copy_from_slice(&[0x5a; 16]);
    opt(97, &uuid);
    m.push(255);
    // BOOTP's minimum message; longer ones stay whole.
    let len = m.len().max(300);
    m.resize(len, 0);
    m
}

/// (message type, siaddr, file) of a DHCP reply for `xid`, or None if it is not one.
fn parse_reply(m: &[u8], xid: u32) -> Option<(u8, Ipv4Addr, String)> {
    if m.len() < 240 || m[0] != 2 || m[4..8] != xid.to_be_bytes() || m[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let siaddr = Ipv4Addr::new(m[20], m[21], m[22], m[23]);
    let file = String::from_utf8_lossy(m[108..236].split(|b| *b == 0).next()?).into_owned();
    let mut i = 240;
    let mut kind = 0;
    while i < m.len() && m[i] != 255 {
        if m[i] == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(*m.get(i + 1)?);
        if m[i] == 53 {
            kind = *m.get(i + 2)?;
        }
        i += 2 + len;
    }
    Some((kind, siaddr, file))
}

/// Sends `msg` to `to` from `sock` and waits for the reply to `xid`.
fn exchange(
    sock: &UdpSocket,
    msg: &[u8],
    to: SocketAddr,
    xid: u32,
) -> anyhow::Result<(u8, Ipv4Addr, String)> {
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    for _ in 0..5 {
        sock.send_to(msg, to)?;
        let mut buf = [0u8; 1500];
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Some(r) = parse_reply(&buf[..n], xid) {
                return Ok(r);
            }
        }
    }
    bail!("no reply from {to} for xid {xid:#x}")
}

/// `GET /name` over HTTP/1.1: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: iPXE/1.21\r\n\r\n").as_bytes())
        .await?;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut all)).await??;
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").context("no end of head")?;
    let head = String::from_utf8_lossy(&all[..head_end]).into_owned();
    let code = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((code, all[head_end + 4..].to_vec()))
}

fn node_state<'a>(status: &'a serde_json::Value, id: &str) -> anyhow::Result<&'a serde_json::Value> {
    status["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .find(|n| n["node_id"] == id)
        .with_context(|| format!("node {id} missing from {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_its_image_over_proxy_dhcp_tftp_and_http() -> anyhow::Result<()> {
    let test = "a_node_serves_its_image_over_proxy_dhcp_tftp_and_http";
    let Some(env) = require(test)? else { return Ok(()) };
    let BuiltImage { dir: image, manifest, hash: image_hash } = built_image()?;

    let mut c = Cluster::new(&env, test)?;
    let base = NodeSpec { bootstrap_expect: Some(2), ..c.spec() };
    let with_bundle =
        NodeSpec { extra_args: vec!["--pxe-bundle".into(), image.display().to_string()], ..base.clone() };
    let n0 = c.add_node(&with_bundle)?;
    let n1 = c.add_node(&base)?;
    let ids = c.ids(&[n0, n1]).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: 2, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &[n0, n1], &want, FORM).await?;
    let id0 = c.id(n0).await?;
    let id1 = c.id(n1).await?;
    let addr0 = c.node(n0)?.addr;
    let ip0 = match addr0.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => bail!("node 0 has {other}"),
    };

    let status = c.cli(n1, &["pxe", "status"]).await?;
    ensure!(status["settings"]["enabled"] == false, "{status}");
    for id in [&id0, &id1] {
        ensure!(node_state(&status, id)?["state"] == "off", "{status}");
    }

    // Bad settings are refused and change nothing.
    for (args, why) in [
        (vec!["pxe", "enable", "--append", "nodeos.key=stolen"], "append word"),
        (vec!["pxe", "enable", "--append", "a=${x}"], "without `$`"),
        (vec!["pxe", "enable", "--interface", "eth0/1"], "not an interface name"),
        (vec!["pxe", "enable", "--nodes", "00000000000000ff"], "not a pool member"),
        (vec!["pxe", "enable", "--nodes", "xyz"], "node_ids[0]"),
        (vec!["pxe", "enable", "--http-port", "22"], "reserved"),
    ] {
        let err = c.cli(n0, &args).await.err().with_context(|| format!("{args:?} was accepted"))?;
        ensure!(format!("{err:#}").contains(why), "{args:?}: {err:#}");
    }
    ensure!(c.cli(n0, &["pxe", "status"]).await?["settings"]["enabled"] == false, "a refused change stuck");

    c.cli(n1, &["pxe", "enable", "--append", "nodeos.dns=10.0.0.53"]).await?;
    let status = wait_until("node 0 serving, node 1 failed with the reason", FORM, || async {
        let s = c.cli(n1, &["pxe", "status"]).await?;
        let (a, b) = (node_state(&s, &id0)?, node_state(&s, &id1)?);
        ensure!(a["state"] == "serving" && b["state"] == "failed", "{s}");
        Ok(s)
    })
    .await?;
    let a = node_state(&status, &id0)?;
    ensure!(a["interface"] == "eth0" && a["address"] == ip0.to_string(), "{a}");
    ensure!(a["image_hash"] == image_hash.as_str(), "node 0 serves another image: {a}");
    let b = node_state(&status, &id1)?;
    ensure!(b["detail"].as_str().unwrap_or_default().contains("does not run the node image"), "{b}");

    // The booting machine: ProxyDHCP offer on port 67 (broadcast on the bridge), ACK on 4011.
    let sock = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.bind_device(Some(c.net().bridge().as_bytes()))?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())?;
        UdpSocket::from(s)
    };
    let mac = [0x52, 0x54, 0x00, 0x99, 0x00, 0x01];
    let boot_url = format!("http://{ip0}:{HTTP_PORT}/boot.ipxe");
    let offer = tokio::task::block_in_place(|| {
        exchange(
            &sock,
            &pxe_message(1, 0x1234_5678, mac),
            SocketAddr::from((Ipv4Addr::BROADCAST, 67)),
            0x1234_5678,
        )
    })?;
    ensure!(offer == (2, ip0, boot_url.clone()), "offer: {offer:?}");
    let ack = tokio::task::block_in_place(|| {
        exchange(
            &sock,
            &pxe_message(3, 0x1234_5679, mac),
            SocketAddr::V4(SocketAddrV4::new(ip0, 4011)),
            0x1234_5679,
        )
    })?;
    ensure!(ack == (5, ip0, boot_url), "ack: {ack:?}");

    // The boot script makes the machine join this pool, through node 0.
    let http = SocketAddr::from((ip0, HTTP_PORT));
    let (code, script) = http_get(http, "/boot.ipxe").await?;
    let script = String::from_utf8(script)?;
    ensure!(code == 200, "boot.ipxe: HTTP {code}");
    let key = std::fs::read_to_string(&base.key_file)?.trim().to_owned();
    for want in [
        "#!ipxe".to_owned(),
        format!("nodeos.image={image_hash}"),
        format!("nodeos.pool={POOL_NAME}"),
        format!("nodeos.key={key}"),
        format!("nodeos.seeds={addr0}"),
        "nodeos.dns=10.0.0.53".to_owned(),
        "initrd initramfs.img".to_owned(),
    ] {
        ensure!(script.contains(&want), "boot.ipxe lacks {want:?}:\n{script}");
    }
    let (code, initramfs) = http_get(http, "/initramfs.img").await?;
    ensure!(code == 200, "initramfs.img: HTTP {code}");
    let files = manifest["files"].as_array().context("files")?;
    let want_sha =
        files.iter().find(|f| f["name"] == "initramfs.img").context("initramfs in manifest")?["sha256"]
            .as_str()
            .context("sha256")?;
    ensure!(
        hex::encode(Sha256::digest(&initramfs)) == want_sha,
        "the served initramfs is not the manifest's"
    );
    ensure!(http_get(http, "/nothing-here").await?.0 == 404, "unknown files must be 404");

    // TFTP, as a vendor PXE ROM would fetch (busybox's client, 1428-byte blocks).
    let out = tempfile::tempdir()?;
    let local = out.path().join("boot.ipxe");
    let tftp = tokio::process::Command::new("busybox")
        .args(["tftp", "-g", "-r", "boot.ipxe", "-b", "1428", "-l"])
        .arg(&local)
        .arg(ip0.to_string())
        .output()
        .await
        .context("busybox tftp (busybox-static)")?;
    ensure!(tftp.status.success(), "busybox tftp: {}", String::from_utf8_lossy(&tftp.stderr));
    ensure!(std::fs::read_to_string(&local)? == script, "TFTP and HTTP serve different boot scripts");

    let s = c.cli(n0, &["pxe", "status", "--node", &id0]).await?;
    let a = &node_state(&s, &id0)?["counters"];
    ensure!(a["offers"].as_u64() >= Some(1) && a["acks"].as_u64() >= Some(1), "{a}");
    ensure!(a["http_requests"].as_u64() >= Some(3) && a["tftp_transfers"].as_u64() >= Some(1), "{a}");
    ensure!(a["bytes_sent"].as_u64() > Some(initramfs.len() as u64), "{a}");

    // Disabled: node 0 stops serving.
    c.cli(n0, &["pxe", "disable"]).await?;
    wait_until("node 0 off", FORM, || async {
        let s = c.cli(n0, &["pxe", "status"]).await?;
        ensure!(node_state(&s, &id0)?["state"] == "off", "{s}");
        Ok(())
    })
    .await?;
    ensure!(tokio::net::TcpStream::connect(http).await.is_err(), "HTTP still served after disable");
    c.finish();
    Ok(())
}
