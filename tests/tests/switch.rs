//! The software switch end to end: tenant networks over VXLAN between node
//! processes in network namespaces, driven through the CLI. Clients are
//! stock tools (busybox udhcpc, ping, nc) in namespaces of their own, each
//! on a tap port the node made and the test moved there; a Linux kernel
//! vxlan device joins a network as a VTEP outside the pool.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nodeos_tests::cluster::Cluster;
use nodeos_tests::netns::ip;
use nodeos_tests::{NodeSpec, require, wait_until};

const FORM: Duration = Duration::from_secs(60);

/// A DHCP client script for busybox udhcpc: configures the lease and
/// prints it on one line the test parses.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "LEASE ip=$ip mask=$mask router=$router mtu=$mtu dns=$dns"
    ;;
esac
exit 0
"#;

/// Runs `sh -c CMD` in namespace `ns` with a deadline; (success, output).
async fn sh(ns: &str, cmd: &str, timeout: Duration) -> anyhow::Result<(bool, String)> {
    let run = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .with_context(|| format!("`{cmd}` in {ns} did not finish within {timeout:?}"))?
        .with_context(|| format!("running `{cmd}` in {ns}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

async fn sh_ok(ns: &str, cmd: &str) -> anyhow::Result<String> {
    let (ok, out) = sh(ns, cmd, Duration::from_secs(30)).await?;
    ensure!(ok, "`{cmd}` in {ns} failed: {}", out.trim());
    Ok(out)
}

async fn two_node_pool(c: &mut Cluster) -> anyhow::Result<Vec<String>> {
    let spec = NodeSpec { bootstrap_expect: Some(2), ..c.spec() };
    let idx = c.add_nodes(2, &spec)?;
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: 2, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, FORM).await?;
    let mut out = Vec::new();
    for i in idx {
        out.push(c.id(i).await?);
    }
    Ok(out)
}

/// A tap port in a client namespace of its own, with the lease it got.
#[derive(Debug, Clone)]
struct Client {
    port: String,
    ns: String,
    tap: String,
    ip: String,
}

/// Makes a tap port on node `node` of `network`, moves its tap into a new
/// namespace, and runs udhcpc there; checks the lease is the port's address.
async fn tap_client(
    c: &mut Cluster,
    node: usize,
    node_id: &str,
    network: &str,
    tap: &str,
    groups: &[&str],
) -> anyhow::Result<Client> {
    let mut args = vec!["port", "create", "--network", network, "--node", node_id, "--tap", tap];
    for g in groups {
        args.extend(["--security-group", g]);
    }
    let p = c.cli(node, &args).await?;
    let port = p["id"].as_str().context("port id")?.to_owned();
    let want_ip = p["ip"].as_str().context("port ip")?.to_owned();
    let mac = p["mac"].as_str().context("port mac")?.to_owned();
    let node_ns = c.node(node)?.ns.clone();
    wait_until(&format!("tap {tap} on node {node}"), Duration::from_secs(15), || {
        let node_ns = node_ns.clone();
        async move { ip(&["-n", &node_ns, "link", "show", tap]).map(|_| ()) }
    })
    .await?;
    let ns = c.net_mut().add_bare_namespace()?;
    ip(&["-n", &node_ns, "link", "set", tap, "netns", &ns])?;
    ip(&["-n", &ns, "link", "set", tap, "up"])?;
    let link = ip(&["-n", &ns, "-j", "link", "show", tap])?;
    ensure!(link.contains(&mac), "tap {tap} does not carry the port's MAC {mac}: {link}");
    let script = std::env::temp_dir().join(format!("nodeos-udhcpc-{}.sh", std::process::id()));
    std::fs::write(&script, UDHCPC_SCRIPT)?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let out =
        sh_ok(&ns, &format!("busybox udhcpc -i {tap} -f -q -n -t 5 -T 1 -O mtu -s {}", script.display()))
            .await
            .context("udhcpc")?;
    let lease = out.lines().find(|l| l.starts_with("LEASE")).with_context(|| format!("no lease: {out}"))?;
    ensure!(
        lease.contains(&format!("ip={want_ip} ")),
        "leased another address than the port's {want_ip}: {lease}"
    );
    ensure!(lease.contains("mtu=1450"), "MTU not reduced for VXLAN: {lease}");
    ensure!(lease.contains("mask=24"), "wrong netmask: {lease}");
    Ok(Client { port, ns, tap: tap.to_owned(), ip: want_ip })
}

async fn port_stats(c: &Cluster, port: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let v = c.cli(0, &["port", "show", port]).await?;
    let s = v["stats"].as_object().with_context(|| format!("no stats in port show: {v}"))?;
    Ok(s.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
}

async fn ping(from: &Client, to: &str) -> anyhow::Result<bool> {
    Ok(sh(&from.ns, &format!("busybox ping -c 2 -W 2 {to}"), Duration::from_secs(20)).await?.0)
}

/// Whether a TCP connection from `from` to `to:port` gets through (a
/// listener runs there).
async fn tcp(from: &Client, to: &Client, port: u16) -> anyhow::Result<bool> {
    let listen = tokio::process::Command::new("ip")
        .args(["netns", "exec", &to.ns, "busybox", "nc", "-l", "-p", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting a listener")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, _) =
        sh(&from.ns, &format!("echo hello | busybox nc -w 3 {} {port}", to.ip), Duration::from_secs(15))
            .await?;
    drop(listen);
    Ok(ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcp_ping_tcp_isolation_and_security_groups_across_two_nodes() -> anyhow::Result<()> {
    let test = "dhcp_ping_tcp_isolation_and_security_groups_across_two_nodes";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = two_node_pool(&mut c).await?;

    c.cli(0, &["security-group", "create", "web", "--rule", "ingress icmp", "--rule", "ingress tcp 5001"])
        .await?;
    // Two tenants with the same address block.
    c.cli(0, &["network", "create", "tenant-a", "--cidr", "10.60.0.0/24"]).await?;
    c.cli(1, &["network", "create", "tenant-b", "--cidr", "10.60.0.0/24"]).await?;
    let a0 = tap_client(&mut c, 0, &ids[0], "tenant-a", "ta0", &["web"]).await?;
    let a1 = tap_client(&mut c, 1, &ids[1], "tenant-a", "ta1", &["web"]).await?;
    let b0 = tap_client(&mut c, 0, &ids[0], "tenant-b", "tb0", &["web"]).await?;
    let b1 = tap_client(&mut c, 1, &ids[1], "tenant-b", "tb1", &["web"]).await?;
    ensure!(
        a1.ip == b1.ip && a0.ip == b0.ip,
        "overlapping blocks hand out the same addresses: {a0:?} {a1:?} {b0:?} {b1:?}"
    );

    // Across nodes, through the tunnel.
    ensure!(ping(&a0, &a1.ip).await?, "ping {} -> {} across nodes failed", a0.ip, a1.ip);
    ensure!(tcp(&a0, &a1, 5001).await?, "TCP to an allowed port across nodes failed");
    ensure!(ping(&b1, &b0.ip).await?, "ping on tenant-b failed");
    // The gateway answers ARP (the switch does).
    let (_, arp) =
        sh(&a0.ns, &format!("busybox arping -c 1 -w 2 -I {} 10.60.0.1", a0.tap), Duration::from_secs(10))
            .await?;
    ensure!(arp.contains("Received 1"), "no ARP answer for the gateway: {arp}");

    // Isolation: tenant-a traffic never reaches tenant-b's ports.
    let before0 = port_stats(&c, &b0.port).await?;
    let before1 = port_stats(&c, &b1.port).await?;
    for _ in 0..3 {
        ensure!(ping(&a0, &a1.ip).await?, "ping on tenant-a failed");
    }
    sh(&a0.ns, &format!("busybox arping -b -c 3 -w 3 -I {} {}", a0.tap, a1.ip), Duration::from_secs(10))
        .await?;
    let after0 = port_stats(&c, &b0.port).await?;
    let after1 = port_stats(&c, &b1.port).await?;
    // Every frame delivered to a tenant-b port came from the other one (the
    // two may refresh their own ARP entries meanwhile); a leak from tenant-a
    // would deliver the pings and ARP requests above without either sending.
    let d = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, k: &str| b[k] - a[k];
    ensure!(
        d(&before1, &after1, "tx") <= d(&before0, &after0, "rx")
            && d(&before0, &after0, "tx") <= d(&before1, &after1, "rx"),
        "tenant-b ports saw frames tenant-b did not send: b0 {before0:?} -> {after0:?}, b1 {before1:?} -> {after1:?}"
    );

    // Security groups: port 5002 is not allowed, until a rule says so.
    let denied_before = port_stats(&c, &a1.port).await?["denied_ingress"];
    ensure!(!tcp(&a0, &a1, 5002).await?, "TCP to port 5002 got through without a rule");
    let denied_after = port_stats(&c, &a1.port).await?["denied_ingress"];
    ensure!(denied_after > denied_before, "refused SYNs not counted: {denied_before} -> {denied_after}");
    c.cli(0, &["security-group", "rule", "add", "web", "ingress tcp 5002 10.60.0.0/24"]).await?;
    wait_until("the new rule applies", Duration::from_secs(10), || async {
        ensure!(tcp(&a0, &a1, 5002).await?, "still refused");
        Ok(())
    })
    .await?;
    c.cli(0, &["security-group", "rule", "delete", "web", "ingress icmp"]).await?;
    wait_until("ICMP is refused once its rule is gone", Duration::from_secs(10), || async {
        ensure!(!ping(&a0, &a1.ip).await?, "ping still answered");
        Ok(())
    })
    .await?;
    // Spoofing: another source address from a0 is dropped and counted.
    let spoofed_before = port_stats(&c, &a0.port).await?["spoofed"];
    ip(&["-n", &a0.ns, "addr", "add", "10.60.0.99/24", "dev", &a0.tap])?;
    sh(&a0.ns, &format!("busybox ping -c 2 -W 1 -I 10.60.0.99 {}", a1.ip), Duration::from_secs(10)).await?;
    let spoofed_after = port_stats(&c, &a0.port).await?["spoofed"];
    ensure!(
        spoofed_after > spoofed_before,
        "spoofed source not counted: {spoofed_before} -> {spoofed_after}"
    );

    // Bad input: clear errors, nothing changed.
    for (args, want) in [
        (vec!["network", "create", "tenant-a", "--cidr", "10.61.0.0/24"], "already exists"),
        (vec!["network", "create", "x", "--cidr", "10.61.0.1/24"], "10.61.0.1/24"),
        (vec!["network", "create", "y", "--cidr", "10.62.0.0/24", "--vni", "16777216"], "vni"),
        (vec!["network", "delete", "tenant-a"], "port"),
        (vec!["port", "show", "00000000000000aa"], "not found"),
        (vec!["network", "show", "nope"], "not found"),
        (vec!["security-group", "rule", "add", "web", "ingress tcp 0"], "port"),
    ] {
        let err =
            c.cli(0, &args).await.err().with_context(|| format!("`{}` was accepted", args.join(" ")))?;
        ensure!(format!("{err:#}").contains(want), "`{}`: {err:#} does not mention {want:?}", args.join(" "));
    }
    let nets = c.cli(0, &["network", "list"]).await?;
    ensure!(nets.as_array().map(Vec::len) == Some(2), "bad requests changed the networks: {nets}");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linux_vxlan_device_joins_a_network_as_a_remote_vtep() -> anyhow::Result<()> {
    let test = "a_linux_vxlan_device_joins_a_network_as_a_remote_vtep";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = two_node_pool(&mut c).await?;
    // A host on the fabric that is not a node: a namespace on the bridge.
    let host = c.net_mut().add_slot()?;
    let slot = c.net().slot(host)?.clone();
    c.cli(0, &["security-group", "create", "ping", "--rule", "ingress icmp"]).await?;
    c.cli(
        0,
        &[
            "network",
            "create",
            "interop",
            "--cidr",
            "10.70.0.0/24",
            "--vni",
            "4242",
            "--vtep",
            &slot.ip.to_string(),
        ],
    )
    .await?;
    let p = tap_client(&mut c, 1, &ids[1], "interop", "ti1", &["ping"]).await?;
    // The kernel's VTEP: flooded frames go to both nodes (head-end replication).
    let (n0, n1) = (c.net().ip_of(0).to_string(), c.net().ip_of(1).to_string());
    ip(&[
        "-n",
        &slot.ns,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "4242",
        "dstport",
        "4789",
        "local",
        &slot.ip.to_string(),
        "nolearning",
    ])?;
    for n in [&n0, &n1] {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &slot.ns,
                "bridge",
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "vx0",
                "dst",
                n,
            ])
            .output()?;
        ensure!(out.status.success(), "bridge fdb append: {}", String::from_utf8_lossy(&out.stderr));
    }
    ip(&["-n", &slot.ns, "addr", "add", "10.70.0.200/24", "dev", "vx0"])?;
    ip(&["-n", &slot.ns, "link", "set", "vx0", "up"])?;
    ensure!(
        sh(&slot.ns, &format!("busybox ping -c 3 -W 2 {}", p.ip), Duration::from_secs(20)).await?.0,
        "the kernel VTEP cannot reach port {} on node 1",
        p.ip
    );
    // And back: the port reaches the kernel's address (its ARP is answered over the tunnel).
    ensure!(ping(&p, "10.70.0.200").await?, "the port cannot reach the kernel VTEP's address");
    let sw = c.cli(1, &["switch", "show"]).await?;
    ensure!(sw.to_string().contains(&slot.ip.to_string()), "switch show does not list the kernel VTEP: {sw}");

    // Uplink: a network bridged to a host bridge on node 0 reaches the
    // router on that bridge from a port on node 1.
    let ns0 = c.node(0)?.ns.clone();
    ip(&["-n", &ns0, "link", "add", "brup", "type", "bridge"])?;
    ip(&["-n", &ns0, "addr", "add", "10.72.0.1/24", "dev", "brup"])?;
    ip(&["-n", &ns0, "link", "set", "brup", "up"])?;
    let uplink = format!("{}:brup", ids[0]);
    c.cli(0, &["network", "create", "outside", "--cidr", "10.72.0.0/24", "--uplink", &uplink]).await?;
    let o = tap_client(&mut c, 1, &ids[1], "outside", "to1", &[]).await?;
    ensure!(ping(&o, "10.72.0.1").await?, "the port cannot reach the router behind the uplink");
    let (_, routes) = sh(&o.ns, "ip route", Duration::from_secs(5)).await?;
    ensure!(routes.contains("default via 10.72.0.1"), "DHCP gave no default route: {routes}");

    // Frames from an unlisted VTEP are dropped and counted: drop the VTEP
    // from the network and ping again.
    c.cli(0, &["network", "set", "interop", "--no-vteps"]).await?;
    wait_until("the unlisted VTEP is refused", Duration::from_secs(10), || async {
        let (ok, _) =
            sh(&slot.ns, &format!("busybox ping -c 1 -W 1 {}", p.ip), Duration::from_secs(10)).await?;
        ensure!(!ok, "still answered");
        let sw = c.cli(1, &["switch", "show"]).await?;
        let unknown = sw["tunnel"]["unknown_vtep"].as_u64().unwrap_or(0);
        if unknown == 0 {
            bail!("no unknown-VTEP drops counted: {sw}");
        }
        Ok(())
    })
    .await?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_guest_net_check_passes_through_the_switch_on_a_vm_port() -> anyhow::Result<()> {
    use nodeos_proto::v1 as pb;
    use nodeos_proto::v1::vm_service_client::VmServiceClient;
    let test = "the_test_guest_net_check_passes_through_the_switch_on_a_vm_port";
    let Some(env) = require(test)? else { return Ok(()) };
    if !std::path::Path::new("/dev/kvm").exists() {
        nodeos_types::testing::skip(test, "no /dev/kvm");
        return Ok(());
    }
    let guest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    ensure!(guest.is_file(), "the test guest is not built ({}): run `make guest`", guest.display());
    let mut c = Cluster::new(&env, test)?;
    let i = c.add_node(&NodeSpec { bootstrap_expect: Some(1), beacons: false, ..c.spec() })?;
    let cref = &c;
    wait_until("a one-node pool", FORM, || async move {
        let s = cref.status(i).await?;
        ensure!(!s.pool_id.is_empty() && !s.leader_id.is_empty(), "not formed yet");
        Ok(())
    })
    .await?;
    let id = c.id(i).await?;
    c.cli(i, &["network", "create", "vmnet", "--cidr", "10.71.0.0/24"]).await?;
    // The host side of the check: a trusted tap port (its peer sends from
    // its own MAC, so port security is off for it).
    let peer_port = c
        .cli(
            i,
            &[
                "port",
                "create",
                "--network",
                "vmnet",
                "--node",
                &id,
                "--tap",
                "vmpeer0",
                "--no-port-security",
            ],
        )
        .await?["id"]
        .as_str()
        .context("port id")?
        .to_owned();
    let ns = c.node(i)?.ns.clone();
    let mut vms = VmServiceClient::new(c.channel(i).await?);
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: guest.display().to_string(),
        cmdline: "mode=net net_frames=2 net_expect=2 net_wait_ms=120000".into(),
        nics: vec![pb::NicSpec {
            mac: "52:54:00:12:34:57".into(),
            network: "vmnet".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let vm = vms
        .create(pb::CreateVmRequest { ha: None, name: "netvm".into(), spec: Some(spec) })
        .await?
        .into_inner();
    let port = vm.spec.as_ref().and_then(|s| s.nics.first()).map(|n| n.port.clone()).unwrap_or_default();
    ensure!(!port.is_empty(), "the VM's NIC got no port: {vm:?}");
    wait_until("tap vmpeer0 on the node", Duration::from_secs(15), || {
        let ns = ns.clone();
        async move { ip(&["-n", &ns, "link", "show", "vmpeer0"]).map(|_| ()) }
    })
    .await?;
    let peer = tokio::spawn(
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tap_peer.py"))
            .args(["vmpeer0", "--frames", "2", "--timeout", "170"])
            .output(),
    );
    // The guest announces itself once, at boot: start it when the peer listens
    // (its first frames reach the switch).
    let cref = &c;
    let pp = peer_port.as_str();
    wait_until("the tap peer is up", Duration::from_secs(30), || async move {
        ensure!(port_stats(cref, pp).await?["rx"] > 0, "no frame from the peer yet");
        Ok(())
    })
    .await?;
    vms.start(pb::VmRef { vm: "netvm".into() }).await?;
    let first = pb::ConsoleInput { vm: "netvm".into(), from_start: true, data: vec![] };
    let mut out = vms.console(futures::stream::iter(vec![first])).await?.into_inner();
    let mut console = String::new();
    let read = async {
        use futures::StreamExt;
        while let Some(chunk) = out.next().await {
            console.push_str(&String::from_utf8_lossy(&chunk?.data));
            if console.contains("NODEOS-GUEST: done") {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(180), read).await.context("guest did not finish")??;
    let peer = peer.await??;
    let peer_out = String::from_utf8_lossy(&peer.stdout).into_owned();
    ensure!(console.contains("NODEOS-GUEST: net ok"), "net check failed:\n{console}\npeer: {peer_out}");
    ensure!(
        peer.status.success() && peer_out.contains("TAP-PEER: ok guest_mac=52:54:00:12:34:57"),
        "tap peer: {peer_out}"
    );
    let stats = port_stats(&c, &port).await?;
    ensure!(stats["rx"] >= 2 && stats["tx"] >= 2, "VM port counters: {stats:?}");
    // The guest powers off when done; deleting the VM deletes its port.
    wait_until("the VM stopped", Duration::from_secs(30), || {
        let mut vms = vms.clone();
        async move {
            let v = vms.get(pb::VmRef { vm: "netvm".into() }).await?.into_inner();
            ensure!(v.state == "stopped", "{}", v.state);
            Ok(())
        }
    })
    .await?;
    vms.delete(pb::VmRef { vm: "netvm".into() }).await?;
    ensure!(c.cli(i, &["port", "show", &port]).await.is_err(), "the VM's port outlived the VM");
    c.finish();
    Ok(())
}
