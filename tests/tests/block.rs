//! The distributed block layer end to end: volumes on real node processes in
//! network namespaces, written and read over NBD from the host, with faults
//! injected from outside (kill -9, restart, a corrupted replica file).
//! Invariants checked after each step: every acknowledged write reads back,
//! a fenced writer changes nothing, lost copies come back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_tests::cluster::Cluster;
use nodeos_tests::nbd::NbdClient;
use nodeos_tests::node::NBD_PORT;
use nodeos_tests::{NodeSpec, require, wait_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FORM: Duration = Duration::from_secs(60);
const BS: usize = 4096;

fn nbd_addr(c: &Cluster, i: usize) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(c.node(i)?.addr.ip(), NBD_PORT))
}

/// A 4 KiB block that names its write: block number and write number.
fn block_data(block: u64, write: u64) -> Vec<u8> {
    let mut v = vec![(write % 251) as u8 ^ 0x5a; BS];
    v[..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&write.to_le_bytes());
    v
}

async fn pool(c: &mut Cluster, n: usize, extra: &[&str]) -> anyhow::Result<Vec<String>> {
    let spec = NodeSpec { extra_args: extra.iter().map(|s| s.to_string()).collect(), ..c.spec() };
    let idx = c.add_nodes(n, &spec)?;
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: n, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, FORM).await?;
    let mut out = Vec::new();
    for i in idx {
        out.push(c.id(i).await?);
    }
    Ok(out)
}

/// Waits until the volume has every copy of every extent in sync.
async fn wait_in_sync(
    c: &Cluster,
    via: usize,
    volume: &str,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    wait_until(&format!("volume {volume} fully in sync"), timeout, || async move {
        let v = c.cli(via, &["volume", "show", volume]).await?;
        let extents = v["extents"].as_array().context("no extents in volume show")?;
        for e in extents {
            for copy in e["copies"].as_array().context("no copies")? {
                ensure!(
                    copy["state"] == "in-sync",
                    "extent {}: copy {} is {}",
                    e["index"],
                    copy["node_id"],
                    copy["state"]
                );
            }
        }
        Ok(v)
    })
    .await
}

/// Node ids of each extent's copies, from `volume show` JSON.
fn extent_nodes(v: &serde_json::Value) -> anyhow::Result<Vec<Vec<String>>> {
    let extents = v["volume"]["placement"].as_array().with_context(|| format!("no placement in {v}"))?;
    extents.iter().map(|e| Ok(serde_json::from_value(e["node_ids"].clone())?)).collect()
}

async fn open_retry(addr: SocketAddr, export: &str) -> anyhow::Result<NbdClient> {
    wait_until(&format!("NBD export {export} at {addr}"), Duration::from_secs(30), || {
        NbdClient::connect(addr, export)
    })
    .await
}

/// Reads every block of `model` through `nbd` and compares.
async fn verify(nbd: &mut NbdClient, model: &HashMap<u64, u64>) -> anyhow::Result<()> {
    for (&block, &write) in model {
        let got = nbd
            .read(block * BS as u64, BS as u32)
            .await?
            .map_err(|e| anyhow::anyhow!("read block {block}: {e}"))?;
        if got != block_data(block, write) {
            let seen = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes"));
            bail!("LOST WRITE: block {block} should hold write {write}, holds write {seen}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_kill_during_writes_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let test = "replica_kill_during_writes_loses_no_acknowledged_write";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    pool(&mut c, 3, &[]).await?;
    c.cli(0, &["volume", "create", "stream", "--size", "64M"]).await?;
    let mut nbd = open_retry(nbd_addr(&c, 0)?, "stream").await?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut refused = 0;
    for write in 1..=400u64 {
        if write == 120 {
            eprintln!("kill -9 node 2 (a replica) mid-stream");
            c.kill9(2)?;
        }
        let block = rng.random_range(0..16384u64);
        match nbd.write(block * BS as u64, &block_data(block, write)).await? {
            Ok(()) => {
                model.insert(block, write);
            }
            Err(e) => {
                refused += 1;
                model.remove(&block);
                eprintln!("write {write} refused: {e}");
            }
        }
        if write % 50 == 0 {
            nbd.flush().await?.map_err(|e| anyhow::anyhow!("flush after write {write}: {e}"))?;
        }
    }
    ensure!(refused == 0, "{refused} writes refused although 2 of 3 copies were up");
    verify(&mut nbd, &model).await?;
    eprintln!("{} blocks verified with node 2 down", model.len());

    c.restart(2)?;
    wait_in_sync(&c, 0, "stream", Duration::from_secs(90)).await?;
    nbd.close().await?;
    // The returning copy alone must now hold everything: read through node 2
    // (its own copy is read first) while node 0's copy is out of reach.
    let mut again = open_retry(nbd_addr(&c, 2)?, "stream").await?;
    verify(&mut again, &model).await?;
    again.close().await?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_is_fenced_and_cannot_change_data() -> anyhow::Result<()> {
    let test = "a_stale_writer_is_fenced_and_cannot_change_data";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    pool(&mut c, 3, &[]).await?;
    c.cli(0, &["volume", "create", "fence", "--size", "16M"]).await?;
    let mut old = open_retry(nbd_addr(&c, 0)?, "fence").await?;
    old.write(0, &block_data(0, 1)).await?.map_err(|e| anyhow::anyhow!("first write: {e}"))?;

    // A second writer is refused while the first holds the volume.
    let second = NbdClient::connect(nbd_addr(&c, 1)?, "fence").await;
    let msg = format!("{:#}", second.err().context("a second writer was admitted")?);
    ensure!(msg.contains("open for writing"), "unexpected refusal: {msg}");

    // The operator breaks the old writer's hold; a new writer on another node.
    let r = c.cli(1, &["volume", "release", "fence"]).await?;
    eprintln!("released: generation {}", r["generation"]);
    let mut new = open_retry(nbd_addr(&c, 1)?, "fence").await?;
    new.write(0, &block_data(0, 2)).await?.map_err(|e| anyhow::anyhow!("new writer: {e}"))?;

    // The old writer is still connected but fenced: every write is refused.
    for (block, write) in [(0u64, 3u64), (1, 4)] {
        let r = old.write(block * BS as u64, &block_data(block, write)).await?;
        ensure!(r.is_err(), "the fenced writer's write to block {block} was acknowledged");
    }
    ensure!(new.read(0, BS as u32).await?.map_err(|e| anyhow::anyhow!("{e}"))? == block_data(0, 2));
    ensure!(new.read(BS as u64, BS as u32).await?.map_err(|e| anyhow::anyhow!("{e}"))? == vec![0; BS]);

    // The writer's node dies: its hold stays until released, then a writer
    // on a third node sees every acknowledged write.
    c.kill9(1)?;
    let held = NbdClient::connect(nbd_addr(&c, 2)?, "fence").await;
    ensure!(held.is_err(), "the dead writer's hold was ignored");
    // The dead node may have led raft: retry while the others elect.
    wait_until("release through a survivor", FORM, || c.cli(2, &["volume", "release", "fence"])).await?;
    let mut third = open_retry(nbd_addr(&c, 2)?, "fence").await?;
    ensure!(third.read(0, BS as u32).await?.map_err(|e| anyhow::anyhow!("{e}"))? == block_data(0, 2));
    third.close().await?;
    drop(old);
    c.restart(1)?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_copies_are_rebuilt_elsewhere() -> anyhow::Result<()> {
    let test = "a_lost_node_copies_are_rebuilt_elsewhere";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let ids = pool(&mut c, 4, &["--rereplicate-after", "3"]).await?;
    c.cli(0, &["volume", "create", "rebuild", "--size", "128M"]).await?;
    let mut nbd = open_retry(nbd_addr(&c, 0)?, "rebuild").await?;
    let mut model = HashMap::new();
    for (n, block) in (0..2048u64).step_by(7).chain((16384..18432u64).step_by(5)).enumerate() {
        nbd.write(block * BS as u64, &block_data(block, n as u64 + 1))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        model.insert(block, n as u64 + 1);
    }
    nbd.flush().await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    nbd.close().await?;
    let v = wait_in_sync(&c, 0, "rebuild", Duration::from_secs(30)).await?;
    let placement = extent_nodes(&v)?;
    // A node holding a copy of extent 0, other than node 0.
    let victim_id = placement[0].iter().find(|n| **n != ids[0]).context("no other copy")?.clone();
    let victim = ids.iter().position(|i| *i == victim_id).context("victim index")?;
    eprintln!("kill -9 node {victim} ({victim_id}), which holds copies of the volume");
    c.kill9(victim)?;
    let v = wait_until("copies rebuilt away from the lost node", Duration::from_secs(120), || async {
        let v = wait_in_sync(&c, 0, "rebuild", Duration::from_secs(5)).await?;
        let placement = extent_nodes(&v)?;
        ensure!(
            placement.iter().all(|set| set.len() == 3 && !set.contains(&victim_id)),
            "placement {placement:?}"
        );
        Ok(v)
    })
    .await?;
    eprintln!("placement after rebuild: {}", v["volume"]["placement"]);
    let reader = (0..4).find(|&i| i != victim && i != 0).context("a reader node")?;
    let mut check = open_retry(nbd_addr(&c, reader)?, "rebuild").await?;
    verify(&mut check, &model).await?;
    check.close().await?;
    c.restart(victim)?;
    c.finish();
    Ok(())
}

fn extent_file(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let layers = data_dir.join("blocks/layers");
    for l in std::fs::read_dir(&layers).with_context(|| format!("reading {}", layers.display()))? {
        let p = l?.path().join("00000000.data");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("no extent 0 file under {}", layers.display())
}

fn flip(path: &Path, offset: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, offset)?;
    for x in &mut b {
        *x ^= 0xff;
    }
    f.write_all_at(&b, offset)?;
    f.sync_all()?;
    Ok(())
}

fn read_block(path: &Path, block: u64) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut b = vec![0u8; BS];
    f.read_exact_at(&mut b, block * BS as u64)?;
    Ok(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_detected_and_repaired_and_images_convert_over_nbd() -> anyhow::Result<()> {
    let test = "corruption_is_detected_and_repaired_and_images_convert_over_nbd";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    pool(&mut c, 3, &[]).await?;
    c.cli(0, &["volume", "create", "rot", "--size", "16M"]).await?;
    let mut nbd = open_retry(nbd_addr(&c, 0)?, "rot").await?;
    let mut model = HashMap::new();
    for b in 0..64u64 {
        nbd.write(b * BS as u64, &block_data(b, b + 100)).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        model.insert(b, b + 100);
    }
    nbd.flush().await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    nbd.close().await?;

    // Bit rot in node 1's copy, found by a scrub and repaired from the others.
    let file = extent_file(&c.node(1)?.data_dir)?;
    flip(&file, 5 * BS as u64 + 100)?;
    let r = c.cli(1, &["volume", "scrub", "rot"]).await?;
    eprintln!("scrub: {r}");
    ensure!(r["corrupt"].as_u64() >= Some(1), "scrub did not find the corrupt block: {r}");
    ensure!(r["repaired_blocks"].as_u64() >= Some(1), "scrub repaired nothing: {r}");
    ensure!(read_block(&file, 5)? == block_data(5, 105), "node 1's copy was not repaired");

    // Bit rot found on read: node 1 reads its own copy first, sees the bad
    // checksum, answers from another copy, and repairs its own.
    flip(&file, 9 * BS as u64)?;
    let mut local = open_retry(nbd_addr(&c, 1)?, "rot").await?;
    verify(&mut local, &model).await?;
    wait_until("the corrupt block is repaired after the read", Duration::from_secs(30), || async {
        ensure!(read_block(&file, 9)? == block_data(9, 109), "block 9 still corrupt");
        Ok(())
    })
    .await?;

    // Bad requests get errors and change nothing.
    ensure!(local.write(16 << 20, &block_data(0, 1)).await?.is_err(), "write past the end accepted");
    ensure!(local.write(512, &block_data(0, 1)).await?.is_err(), "misaligned write accepted");
    verify(&mut local, &model).await?;
    local.close().await?;
    let too_big = c.cli(0, &["volume", "create", "huge", "--size", "200T"]).await;
    let msg = format!("{:#}", too_big.err().context("a volume larger than the pool was created")?);
    ensure!(msg.contains("can hold"), "unexpected refusal: {msg}");
    ensure!(c.cli(0, &["volume", "show", "nope"]).await.is_err(), "unknown volume shown");

    // `nodeos volume import` streams a raw file into a new volume (sized to
    // the file, rounded up to 4 KiB), read back over NBD through another node.
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    let mut content: Vec<u8> =
        (0..(3 << 20) + 1000).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    content[(1 << 20)..(2 << 20)].fill(0); // a hole the import skips
    std::fs::write(&raw, &content)?;
    let r = c.cli(0, &["volume", "import", path(&raw)?, "--name", "imported"]).await?;
    ensure!(r["bytes_written"].as_u64() == Some((2 << 20) + 4096), "import wrote {r}");
    ensure!(r["bytes_skipped"].as_u64() == Some(1 << 20), "import skipped {r}");
    let mut back = open_retry(nbd_addr(&c, 2)?, "imported:ro").await?;
    ensure!(back.size == (3 << 20) + 4096, "imported volume has {} bytes", back.size);
    let got = back.read(0, back.size as u32).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(got[..content.len()] == content[..], "imported bytes differ");
    ensure!(got[content.len()..].iter().all(|b| *b == 0), "padding is not zero");
    back.close().await?;

    // qemu-img writes a qcow2 image into a volume over NBD, and reads it back
    // through another node.
    let have_qemu_img =
        std::process::Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu_img {
        nodeos_types::testing::skip(test, "qemu-img part: qemu-img not installed (apt install qemu-utils)");
    } else {
        c.cli(0, &["volume", "create", "image", "--size", "32M"]).await?;
        let src = dir.path().join("src.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", path(&src)?, "32M"])?;
        run(
            "qemu-io",
            &["-f", "qcow2", path(&src)?, "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x17 20M 512k"],
        )?;
        let uri0 = format!("nbd://{}/image", nbd_addr(&c, 0)?);
        run("qemu-img", &["convert", "-n", "-O", "raw", path(&src)?, &uri0])?;
        // `:ro` reads without taking the writer slot (the converter's slot
        // may still be on its way back).
        let uri2 = format!("nbd://{}/image:ro", nbd_addr(&c, 2)?);
        run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", &uri2, path(&src)?])?;
        // And a difference is seen as one.
        run("qemu-io", &["-f", "qcow2", path(&src)?, "-c", "write -P 0x99 8M 4k"])?;
        ensure!(run("qemu-img", &["compare", "-q", "-f", "raw", "-F", "qcow2", &uri2, path(&src)?]).is_err());
    }
    c.finish();
    Ok(())
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 temp path")
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out =
        std::process::Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn read_model(nbd: &mut NbdClient, blocks: std::ops::Range<u64>, write: u64) -> anyhow::Result<()> {
    let model: HashMap<u64, u64> = blocks.map(|b| (b, write)).collect();
    verify(nbd, &model).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_are_copy_on_write_and_deletes_reclaim_space() -> anyhow::Result<()> {
    let test = "snapshots_and_clones_are_copy_on_write_and_deletes_reclaim_space";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    pool(&mut c, 3, &[]).await?;
    c.cli(0, &["volume", "create", "base", "--size", "16M"]).await?;
    let mut w = open_retry(nbd_addr(&c, 0)?, "base").await?;
    for b in 0..8u64 {
        w.write(b * BS as u64, &block_data(b, 1)).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // Taken while the writer is connected: it carries on after the snapshot.
    c.cli(1, &["volume", "snapshot", "create", "base", "s1"]).await?;
    for b in 0..4u64 {
        w.write(b * BS as u64, &block_data(b, 2))
            .await?
            .map_err(|e| anyhow::anyhow!("write after snapshot: {e}"))?;
    }
    w.flush().await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    w.close().await?;

    let mut snap = open_retry(nbd_addr(&c, 1)?, "base@s1").await?;
    read_model(&mut snap, 0..8, 1).await.context("the snapshot changed after it was taken")?;
    ensure!(snap.write(0, &block_data(0, 9)).await?.is_err(), "a snapshot export accepted a write");
    snap.close().await?;
    let mut cur = open_retry(nbd_addr(&c, 2)?, "base").await?;
    read_model(&mut cur, 0..4, 2).await?;
    read_model(&mut cur, 4..8, 1).await?;
    cur.close().await?;

    c.cli(0, &["volume", "clone", "base", "s1", "child"]).await?;
    let mut child = open_retry(nbd_addr(&c, 2)?, "child").await?;
    read_model(&mut child, 0..8, 1).await.context("a clone starts as its snapshot")?;
    child.write(0, &block_data(0, 3)).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    read_model(&mut child, 0..1, 3).await?;
    child.close().await?;
    let mut cur = open_retry(nbd_addr(&c, 0)?, "base").await?;
    read_model(&mut cur, 0..1, 2).await.context("writing a clone changed its origin")?;
    cur.close().await?;

    // What others depend on cannot go away.
    ensure!(
        c.cli(0, &["volume", "snapshot", "delete", "base", "s1"]).await.is_err(),
        "snapshot with a clone deleted"
    );
    ensure!(c.cli(0, &["volume", "delete", "base"]).await.is_err(), "volume with a clone deleted");
    c.cli(0, &["volume", "delete", "child"]).await?;
    c.cli(0, &["volume", "snapshot", "delete", "base", "s1"]).await?;
    c.cli(0, &["volume", "delete", "base"]).await?;
    let dirs: Vec<PathBuf> =
        (0..3).map(|i| c.node(i).map(|n| n.data_dir.join("blocks/layers"))).collect::<Result<_, _>>()?;
    wait_until("deleted volumes' space reclaimed on every node", Duration::from_secs(60), || async {
        let listed = c.cli(0, &["volume", "list"]).await?;
        ensure!(listed.as_array().is_some_and(|a| a.is_empty()), "volumes left: {listed}");
        for d in &dirs {
            let left: Vec<_> = std::fs::read_dir(d)?.filter_map(Result::ok).map(|e| e.file_name()).collect();
            ensure!(left.is_empty(), "{} still holds {left:?}", d.display());
        }
        Ok(())
    })
    .await?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_copies_on_raw_devices_survive_a_node_restart() -> anyhow::Result<()> {
    let test = "volume_copies_on_raw_devices_survive_a_node_restart";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let devs = tempfile::tempdir()?;
    let mut idx = Vec::new();
    for i in 0..3 {
        let dev = devs.path().join(format!("dev{i}.img"));
        std::fs::File::create(&dev)?.set_len(256 << 20)?;
        let extra = vec!["--block-device".into(), dev.display().to_string(), "--format-block-device".into()];
        let spec = NodeSpec { extra_args: extra, ..c.spec() };
        idx.push(c.add_node(&spec)?);
    }
    let ids = c.ids(&idx).await?;
    let want = nodeos_tests::Expect { members: ids.clone(), voters: 3, healthy: ids, pool_id: None };
    c.wait_pool("pool formed", &idx, &want, FORM).await?;
    c.cli(0, &["volume", "create", "raw", "--size", "32M"]).await?;
    let mut w = open_retry(nbd_addr(&c, 0)?, "raw").await?;
    let mut model = HashMap::new();
    for (n, b) in (0..8192u64).step_by(97).enumerate() {
        w.write(b * BS as u64, &block_data(b, n as u64 + 1)).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        model.insert(b, n as u64 + 1);
    }
    w.flush().await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    w.close().await?;
    // The node restarts over its device (never reformatted) and serves its copy.
    c.kill9(1)?;
    c.restart(1)?;
    wait_in_sync(&c, 1, "raw", Duration::from_secs(60)).await?;
    let mut r = open_retry(nbd_addr(&c, 1)?, "raw:ro").await?;
    verify(&mut r, &model).await?;
    r.close().await?;
    let v = c.cli(1, &["volume", "show", "raw"]).await?;
    let copies = v["extents"][0]["copies"].as_array().context("copies")?;
    ensure!(copies.iter().all(|c| c["written_blocks"].as_u64() == Some(model.len() as u64)), "copies: {v}");
    c.finish();
    Ok(())
}

/// The in-repo test guest, or `None` (after a loud SKIPPED line) without KVM.
fn guest_or_skip(test: &str) -> anyhow::Result<Option<PathBuf>> {
    if !Path::new("/dev/kvm").exists() {
        nodeos_types::testing::skip(test, "no /dev/kvm");
        return Ok(None);
    }
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build/nodeos-test-guest.elf");
    ensure!(guest.is_file(), "the test guest is not built ({}): run `make guest`", guest.display());
    Ok(Some(guest))
}

/// Creates volume `name` of `size` and starts VM `name` on node 0 with the
/// test guest, `cmdline`, and that volume as its disk; its VM API client.
async fn start_guest_on_volume(
    c: &Cluster,
    guest: &Path,
    name: &str,
    size: &str,
    cmdline: &str,
) -> anyhow::Result<VmServiceClient<tonic::transport::Channel>> {
    let v = c.cli(0, &["volume", "create", name, "--size", size]).await?;
    let volume = v["id"].as_str().context("volume id")?.to_owned();
    let mut vms = VmServiceClient::new(c.channel(0).await?);
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: guest.display().to_string(),
        initrd: String::new(),
        cmdline: cmdline.into(),
        disks: vec![pb::DiskSpec { path: String::new(), read_only: false, volume }],
        nics: vec![],
        cloud_init: None,
    };
    vms.create(pb::CreateVmRequest { ha: None, name: name.into(), spec: Some(spec) }).await?;
    vms.start(pb::VmRef { vm: name.into() }).await?;
    Ok(vms)
}

/// The VM's console from the start until the guest is done or fails, or
/// `within` passes (`None` then).
async fn console_until_done(
    vms: &mut VmServiceClient<tonic::transport::Channel>,
    vm: &str,
    within: Duration,
) -> anyhow::Result<(String, bool)> {
    use futures::StreamExt;
    let first = pb::ConsoleInput { vm: vm.to_owned(), from_start: true, data: vec![] };
    let mut console = vms.console(futures::stream::iter(vec![first])).await?.into_inner();
    let mut text = String::new();
    let done = tokio::time::timeout(within, async {
        while let Some(Ok(chunk)) = console.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.data));
            if text.contains("NODEOS-GUEST: done") || text.contains("FAIL") {
                break;
            }
        }
    })
    .await;
    Ok((text, done.is_ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_guest_does_block_io_on_a_replicated_volume() -> anyhow::Result<()> {
    let test = "the_test_guest_does_block_io_on_a_replicated_volume";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    pool(&mut c, 3, &[]).await?;
    let mut vms = start_guest_on_volume(&c, &guest, "vmdisk", "8M", "mode=blk blk_seed=0x77").await?;
    // While the VM runs, it holds the volume: no other writer gets in.
    let held = NbdClient::connect(nbd_addr(&c, 1)?, "vmdisk").await;
    ensure!(held.is_err(), "an NBD writer was admitted while the VM holds the volume");
    let vms = &mut vms;
    let v = wait_until("the guest powers off", Duration::from_secs(180), || {
        let mut vms = vms.clone();
        async move {
            let v = vms.get(pb::VmRef { vm: "vmdisk".into() }).await?.into_inner();
            ensure!(v.state == "stopped" || v.state == "crashed", "VM is {}", v.state);
            Ok(v)
        }
    })
    .await?;
    ensure!(v.reason.contains("powered off"), "VM ended: {}", v.reason);
    let (text, _) = console_until_done(vms, "vmdisk", Duration::from_secs(5)).await?;
    ensure!(text.contains("NODEOS-GUEST: blk ok sectors=64"), "block check failed:\n{text}");

    // The VM released the volume on power-off; what it wrote is on the
    // volume, read back through another node.
    let mut nbd = open_retry(nbd_addr(&c, 2)?, "vmdisk").await?;
    let data = nbd.read(0, 64 * 512).await?.map_err(|e| anyhow::anyhow!("{e}"))?;
    nbd.close().await?;
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("head.img");
    std::fs::write(&img, &data)?;
    let check = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/verify_blk.py"))
        .arg(&img)
        .args(["--sectors", "64", "--seed", "0x77"])
        .output()?;
    ensure!(check.status.success(), "volume content check: {}", String::from_utf8_lossy(&check.stdout));
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_keeps_writing_across_a_snapshot_of_its_volume() -> anyhow::Result<()> {
    let test = "a_running_vm_keeps_writing_across_a_snapshot_of_its_volume";
    let Some(env) = require(test)? else { return Ok(()) };
    let Some(guest) = guest_or_skip(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    pool(&mut c, 3, &[]).await?;
    // Random 4 KiB writes for a while: long enough to span the snapshot.
    let cmdline = "mode=blkbench blk_rw=write blk_ops=3000 blk_qd=4";
    let mut vms = start_guest_on_volume(&c, &guest, "busy", "16M", cmdline).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = vms.get(pb::VmRef { vm: "busy".into() }).await?.into_inner();
    let snap = c.cli(1, &["volume", "snapshot", "create", "busy", "mid"]).await?;
    eprintln!("snapshot while the VM is {}: {snap}", before.state);
    let (text, done) = console_until_done(&mut vms, "busy", Duration::from_secs(240)).await?;
    ensure!(done, "the guest did not finish; console:\n{text}");
    ensure!(before.state == "running", "the snapshot was not taken while the VM ran ({})", before.state);
    ensure!(text.contains("blkbench rw=write"), "the guest's writes failed across the snapshot:\n{text}");
    ensure!(!text.contains("FAIL"), "guest failure:\n{text}");
    c.finish();
    Ok(())
}
