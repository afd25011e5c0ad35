//! Credentials, roles and the audit trail, black box: a one-node pool speaking
//! mutual TLS, called with credentials of every role, of another pool, revoked
//! and expired, and with none.
//!
//! The role each RPC needs is read from README.md's role table, and the RPCs
//! from the API's descriptors: the test fails when the two disagree with each
//! other or with what the node does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Buf, BufMut, Bytes};
use nodeos_tests::client::Credentials;
use nodeos_tests::cluster::Cluster;
use nodeos_tests::{NodeSpec, require, wait_until};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

const ROLES: [&str; 3] = ["reader", "operator", "admin"];

/// The role table of README.md: `Service/Method` → (role, audited).
fn documented_roles() -> anyhow::Result<BTreeMap<String, (String, bool)>> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).with_context(|| format!("reading {}", readme.display()))?;
    let mut table = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| `Service/Method` | role | yes |` splits into 5 cells, the outer two empty.
        if cells.len() != 5 || !cells[1].starts_with('`') || !cells[1].contains("Service/") {
            continue;
        }
        let rpc = cells[1].trim_matches('`').to_owned();
        ensure!(
            ["reader", "operator", "admin", "node"].contains(&cells[2]),
            "README role table: {rpc} has role {:?}",
            cells[2]
        );
        table.insert(rpc, (cells[2].to_owned(), cells[3] == "yes"));
    }
    ensure!(!table.is_empty(), "no role table in README.md");
    Ok(table)
}

/// Every RPC of the API, `Service/Method`, from the descriptors.
fn api_rpcs() -> anyhow::Result<BTreeSet<String>> {
    let fds = prost_types::FileDescriptorSet::decode(nodeos_proto::FILE_DESCRIPTOR_SET)?;
    let mut out = BTreeSet::new();
    for f in &fds.file {
        for s in &f.service {
            for m in &s.method {
                out.insert(format!("{}/{}", s.name(), m.name()));
            }
        }
    }
    Ok(out)
}

fn rank(role: &str) -> usize {
    ["reader", "operator", "admin", "node"].iter().position(|r| *r == role).unwrap_or(usize::MAX)
}

/// Messages as raw bytes: every RPC called with one empty message.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls `Service/Method` with one empty message: `Ok` when the node took the
/// call (whatever its answer), `Err(message)` when the guard denied it.
async fn call(ch: &Channel, rpc: &str) -> anyhow::Result<Result<(), String>> {
    call_path(ch, &format!("/nodeos.v1.{rpc}")).await
}

/// [`call`] of an RPC by its full path.
async fn call_path(ch: &Channel, rpc: &str) -> anyhow::Result<Result<(), String>> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.context("the channel is not ready")?;
    let path: http::uri::PathAndQuery = rpc.parse()?;
    let req = tonic::Request::new(futures::stream::iter([Bytes::new()]));
    let r = tokio::time::timeout(Duration::from_secs(10), grpc.streaming(req, path, Raw)).await;
    Ok(match r {
        Err(_) => Ok(()), // a stream held open: the call was taken
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied && s.message().contains("may not call") => {
            Err(s.message().to_owned())
        }
        Ok(Err(s))
            if s.code() == tonic::Code::PermissionDenied && s.message().contains("only handing over") =>
        {
            Err(s.message().to_owned())
        }
        Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => {
            bail!("{rpc}: not authenticated: {}", s.message())
        }
        Ok(Err(s)) if s.code() == tonic::Code::Unknown || s.message().contains("transport error") => {
            bail!("{rpc}: the call did not reach the node: {s:?}")
        }
        Ok(Err(_)) => Ok(()),
    })
}

/// Whether a pool status call over `ch` is answered.
async fn served(ch: Channel) -> bool {
    let mut p = nodeos_proto::v1::pool_service_client::PoolServiceClient::new(ch);
    p.status(nodeos_proto::v1::StatusRequest {}).await.is_ok()
}

/// Whether the node serves a caller holding `creds` (`None`: plaintext).
async fn serves(c: &Cluster, creds: Option<&Credentials>) -> anyhow::Result<bool> {
    let addr = c.node(0)?.addr;
    Ok(match nodeos_tests::client::endpoint(addr, creds)?.connect().await {
        Err(_) => false,
        Ok(ch) => served(ch).await,
    })
}

/// The services server reflection `version` lists (its raw answer as text).
async fn reflect(ch: &Channel, version: &str) -> anyhow::Result<String> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.context("the channel is not ready")?;
    let path: http::uri::PathAndQuery =
        format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo").parse()?;
    // ServerReflectionRequest { list_services: "" } (field 7), the same in both versions.
    let req = tonic::Request::new(futures::stream::iter([Bytes::from_static(&[0x3a, 0x00])]));
    let mut answers = grpc.streaming(req, path, Raw).await?.into_inner();
    let first =
        tokio::time::timeout(Duration::from_secs(10), answers.message()).await??.context("no answer")?;
    Ok(String::from_utf8_lossy(&first).into_owned())
}

async fn audit_len(c: &Cluster) -> anyhow::Result<usize> {
    let a = c.cli(0, &["audit", "list", "--limit", "100000"]).await?;
    Ok(a.as_array().map_or(0, Vec::len))
}

/// `nodeos auth issue` of a credential file for `role`, and its channel.
async fn credential(
    c: &Cluster,
    dir: &Path,
    name: &str,
    role: &str,
    ttl: &str,
) -> anyhow::Result<Credentials> {
    let out = dir.join(format!("{name}.json"));
    c.cli(
        0,
        &[
            "auth",
            "issue",
            "--name",
            name,
            "--role",
            role,
            "--ttl",
            ttl,
            "--out",
            out.to_str().context("path")?,
        ],
    )
    .await?;
    Credentials::from_file(&out)
}

/// Starts the test's one node and waits for it to lead its pool.
async fn one_node(c: &mut Cluster, spec: &NodeSpec) -> anyhow::Result<()> {
    c.add_node(spec)?;
    let c = &*c;
    wait_until("a one-node pool", Duration::from_secs(60), || async {
        let s = c.status(0).await?;
        ensure!(!s.leader_id.is_empty(), "no leader yet");
        Ok(())
    })
    .await?;
    Ok(())
}

async fn channel(c: &Cluster, creds: &Credentials) -> anyhow::Result<Channel> {
    let addr = c.node(0)?.addr;
    Ok(nodeos_tests::client::endpoint(addr, Some(creds))?.connect().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_each_role_as_the_role_table_says_and_the_audit_trail_counts_every_change()
-> anyhow::Result<()> {
    let test = "every_rpc_answers_each_role_as_the_role_table_says_and_the_audit_trail_counts_every_change";
    let Some(env) = require(test)? else { return Ok(()) };
    let table = documented_roles()?;
    let api = api_rpcs()?;
    let undocumented: Vec<_> = api.iter().filter(|r| !table.contains_key(*r)).collect();
    ensure!(undocumented.is_empty(), "RPCs missing from README's role table: {undocumented:?}");
    let stale: Vec<_> = table.keys().filter(|r| !api.contains(*r)).collect();
    ensure!(stale.is_empty(), "README's role table lists RPCs that do not exist: {stale:?}");

    let mut c = Cluster::new(&env, test)?;
    let spec = NodeSpec { bootstrap_expect: Some(1), beacons: false, ..c.spec() };
    one_node(&mut c, &spec).await?;
    let dir = tempfile::tempdir()?;
    // Made first: it has expired by the end of the test.
    let expiring = credential(&c, dir.path(), "short", "admin", "60s").await?;
    let expiring_made = Instant::now();

    let addr = c.node(0)?.addr;
    let before = audit_len(&c).await?;
    let mut audited_calls = 0usize;
    for role in ROLES {
        let creds = credential(&c, dir.path(), &format!("as-{role}"), role, "1h").await?;
        audited_calls += 1; // the issue itself
        let ch = channel(&c, &creds).await?;
        for rpc in &api {
            let (needed, audited) = &table[rpc];
            let expect_allowed = rank(role) >= rank(needed);
            let got = call(&ch, rpc).await?;
            ensure!(
                got.is_ok() == expect_allowed,
                "{rpc} as {role}: the table says {needed} is needed, the node {}",
                match &got {
                    Ok(()) => "took the call".to_owned(),
                    Err(m) => format!("denied it: {m}"),
                }
            );
            if *audited {
                audited_calls += 1;
            }
        }
        // Server reflection, both versions (older clients speak only v1alpha), to every role.
        for v in ["v1", "v1alpha"] {
            let listed = reflect(&ch, v).await.with_context(|| format!("reflection {v} as {role}"))?;
            ensure!(listed.contains("nodeos.v1.VmService"), "reflection {v} as {role} listed: {listed}");
        }
    }
    // Every call that changes the pool, taken or denied, is in the trail once.
    let after = audit_len(&c).await?;
    ensure!(
        after - before == audited_calls,
        "{audited_calls} audited calls made, the trail grew by {}",
        after - before
    );
    let trail = c.cli(0, &["audit", "list", "--limit", "5"]).await?;
    let last = trail.as_array().and_then(|a| a.last()).context("an audit entry")?;
    ensure!(last["subject"] == "as-admin" && last["role"] == "admin", "{last}");

    // A credential of another pool's CA: the handshake fails, nothing answers.
    let other_key = c.other_key_file("other.key")?;
    let other = Credentials::bootstrap(&env.bin, &other_key, &dir.path().join("other.json"))?;
    ensure!(!serves(&c, Some(&other)).await?, "a credential of another pool's CA was served");
    // No credential at all (plaintext to the TLS port): refused.
    ensure!(!serves(&c, None).await?, "a plaintext call was served");
    // Revoked: refused on its next call, saying so.
    let victim = credential(&c, dir.path(), "victim", "operator", "1h").await?;
    ensure!(serves(&c, Some(&victim)).await?, "a fresh operator was refused");
    let ch = channel(&c, &victim).await?;
    c.cli(0, &["auth", "revoke", "victim"]).await?;
    let mut grpc = nodeos_proto::v1::pool_service_client::PoolServiceClient::new(ch);
    let e =
        grpc.status(nodeos_proto::v1::StatusRequest {}).await.expect_err("a revoked credential was served");
    ensure!(e.code() == tonic::Code::Unauthenticated && e.message().contains("revoked"), "{e:?}");
    let listed = c.cli(0, &["auth", "list"]).await?;
    let v =
        listed.as_array().and_then(|a| a.iter().find(|x| x["name"] == "victim")).context("victim listed")?;
    ensure!(v["revoked"] == true, "{v}");
    // The replica protocol takes only nodes and VM workers of the pool: plain
    // TCP (even with the pool's own handshake bytes) is closed unanswered.
    let block = std::net::SocketAddr::new(addr.ip(), 7800);
    let mut tcp = tokio::net::TcpStream::connect(block).await.context("connecting to the replica port")?;
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"NODEOSBK\x01\x00\x00\x00 not a TLS client hello").await?;
    let mut answer = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer);
    ensure!(
        tokio::time::timeout(Duration::from_secs(15), read).await.is_ok(),
        "the replica port kept a plain TCP connection open"
    );
    // Nothing, or a TLS alert record (content type 21): never the protocol's answer.
    ensure!(answer.first().is_none_or(|b| *b == 21), "the replica port answered plain TCP: {answer:?}");
    wait_until("the refused replica connection logged", Duration::from_secs(10), || async {
        ensure!(c.log(0)?.contains("replica connection refused"), "not yet");
        Ok(())
    })
    .await?;
    // Expired: refused.
    let left = Duration::from_secs(62).saturating_sub(expiring_made.elapsed());
    tokio::time::sleep(left).await;
    ensure!(!serves(&c, Some(&expiring)).await?, "an expired credential was served");
    c.finish();
    Ok(())
}

/// Files of the node's disk are for admins only, and never devices or files
/// outside --host-images-dir, whoever asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_are_refused_to_operators_and_devices_to_everyone() -> anyhow::Result<()> {
    let test = "host_files_are_refused_to_operators_and_devices_to_everyone";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let images = tempfile::tempdir()?;
    let kernel = images.path().join("kernel");
    std::fs::write(&kernel, b"not really a kernel")?;
    let spec = NodeSpec {
        bootstrap_expect: Some(1),
        beacons: false,
        host_images_dir: Some(images.path().to_owned()),
        ..c.spec()
    };
    one_node(&mut c, &spec).await?;
    let dir = tempfile::tempdir()?;
    let op = credential(&c, dir.path(), "op", "operator", "1h").await?;
    let mut as_op = nodeos_proto::v1::vm_service_client::VmServiceClient::new(channel(&c, &op).await?);
    let k = kernel.display().to_string();
    let create = |kernel: &str, disk: Option<&str>| nodeos_proto::v1::CreateVmRequest {
        name: "x".into(),
        spec: Some(nodeos_proto::v1::VmSpec {
            vcpus: 1,
            memory_mib: 64,
            kernel: kernel.to_owned(),
            disks: disk
                .map(|d| vec![nodeos_proto::v1::DiskSpec { path: d.to_owned(), ..Default::default() }])
                .unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = as_op.create(create(&k, None)).await.expect_err("an operator made a VM of a host file");
    ensure!(e.code() == tonic::Code::PermissionDenied && e.message().contains("only an admin"), "{e:?}");
    // Whoever asks: /etc/shadow and /dev/sda are refused, nothing created.
    let mut as_admin = nodeos_proto::v1::vm_service_client::VmServiceClient::new(c.channel(0).await?);
    for (kernel, disk) in [("/etc/shadow", None), (k.as_str(), Some("/dev/sda"))] {
        for client in [&mut as_op, &mut as_admin] {
            let e = client
                .create(create(kernel, disk))
                .await
                .expect_err("a host path outside the directory was taken");
            ensure!(
                matches!(e.code(), tonic::Code::PermissionDenied | tonic::Code::InvalidArgument),
                "{kernel} {disk:?}: {e:?}"
            );
        }
    }
    let vms = c.cli(0, &["vm", "list"]).await?;
    ensure!(vms.as_array().is_some_and(Vec::is_empty), "a refused create left a VM: {vms}");
    c.finish();
    Ok(())
}
