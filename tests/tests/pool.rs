//! Process-level pool tests: real `nodeos` nodes in network namespaces,
//! driven only through the public gRPC API, with faults injected from outside.
//! Each test is independent (its own bridge, subnet and temporary dir) and
//! checks the invariants after every step: at most one leader per term, every
//! acknowledged write readable. Without root they print `SKIPPED: ...`.
//!
//! Run: `NODEOS_BIN=target/debug/nodeos cargo test -p nodeos-tests -- --test-threads=2`
//! (`make test` does this). `NODEOS_TESTS_SEED=<n>` replays a random schedule;
//! `NODEOS_TESTS_KEEP=1` keeps a failed test's data dirs and logs (`=all`: every test's).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nodeos_proto::v1 as pb;
use nodeos_tests::cluster::Cluster;
use nodeos_tests::{Expect, require, wait_until};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Generous: the machine is small and shared; no test asserts speed.
const FORM: Duration = Duration::from_secs(60);
const ELECT: Duration = Duration::from_secs(60);

fn all_healthy(members: &BTreeSet<String>, voters: usize) -> Expect {
    Expect { members: members.clone(), voters, healthy: members.clone(), pool_id: None }
}

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("NODEOS_TESTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("nodeos-tests: {test}: seed {seed} (NODEOS_TESTS_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// Starts `n` nodes with beacons only and waits for them to form a pool of
/// `n` healthy voters; the pool's status and the node ids.
async fn formed_pool(c: &mut Cluster, n: usize) -> anyhow::Result<(pb::PoolStatus, BTreeSet<String>)> {
    let spec = c.spec();
    let idx = c.add_nodes(n, &spec)?;
    let ids = c.ids(&idx).await?;
    let s = c.wait_pool("pool formed", &idx, &all_healthy(&ids, n), FORM).await?;
    c.check_invariants(&idx).await?;
    Ok((s, ids))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_pool_and_more_join_as_voters() -> anyhow::Result<()> {
    let test = "three_nodes_form_a_pool_and_more_join_as_voters";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;

    // Three nodes, beacons only, no seeds, no manual step.
    let (s, ids) = formed_pool(&mut c, 3).await?;
    let pool_id = s.pool_id.clone();
    eprintln!("formed: {}", nodeos_tests::client::describe(&s));
    c.put(0, "t/1", b"one").await?;
    c.check_invariants(&[0, 1, 2]).await?;

    // A fourth and a fifth node join and become voters.
    let spec = c.spec();
    let more = c.add_nodes(2, &spec)?;
    let all: Vec<usize> = (0..5).collect();
    let ids5 = c.ids(&all).await?;
    ensure!(ids5.is_superset(&ids) && ids5.len() == 5, "node ids are not 5 distinct ids: {ids5:?}");
    let want = Expect { pool_id: Some(pool_id.clone()), ..all_healthy(&ids5, 5) };
    let s = c.wait_pool("nodes 4 and 5 are voters", &all, &want, FORM).await?;
    eprintln!("grown: {}", nodeos_tests::client::describe(&s));
    for &i in &more {
        let own = c.local_status(i).await?;
        ensure!(own.pool_id == pool_id, "node {i} knows pool {:?}, not {pool_id}", own.pool_id);
    }
    c.put(4, "t/2", b"two").await?;
    c.check_invariants(&all).await?;

    // The CLI, asked through the newest node, tells the same story.
    let j = c.cli(4, &["pool", "status"]).await?;
    ensure!(j["pool_id"] == pool_id.as_str(), "CLI pool status: {j}");
    let members = j["members"].as_array().context("CLI pool status has no members")?;
    let cli_ids: BTreeSet<String> =
        members.iter().filter_map(|m| m["id"].as_str().map(str::to_owned)).collect();
    ensure!(cli_ids == ids5, "CLI members {cli_ids:?}, want {ids5:?}");
    let leaders = members.iter().filter(|m| m["role"] == "leader").count();
    ensure!(leaders == 1, "CLI shows {leaders} leaders: {j}");
    ensure!(members.iter().all(|m| m["health"] == "healthy"), "CLI shows unhealthy members: {j}");
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_keeps_acknowledged_writes() -> anyhow::Result<()> {
    let test = "leader_kill_keeps_acknowledged_writes";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let (_, ids) = formed_pool(&mut c, 3).await?;

    // A writer through every node in turn, recording each acknowledged write.
    let writer = c.writer(&[0, 1, 2], "w/")?;
    writer.wait_acked(30, FORM).await?;

    // kill -9 the leader as of right now, mid-stream.
    let s = c.status(0).await?;
    nodeos_tests::client::check_shape(&s)?;
    let old_leader = c.index_of(&s.leader_id)?;
    let old_term = s.term;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old_leader).collect();
    let before_kill = writer.acked();
    c.kill9(old_leader)?;

    // The survivors elect a new leader in a later term.
    let (this, asked) = (&c, survivors[0]);
    let s = wait_until("a new leader after the kill", ELECT, || async move {
        let s = this.status(asked).await?;
        nodeos_tests::client::check_shape(&s)?;
        if s.leader_id == ids_of(this, old_leader)? || s.term <= old_term {
            bail!("still leader {} in term {}", s.leader_id, s.term);
        }
        Ok(s)
    })
    .await?;
    let new_leader = c.index_of(&s.leader_id)?;
    ensure!(survivors.contains(&new_leader), "new leader {new_leader} is not a survivor");
    eprintln!("new leader node {new_leader} in term {} (was node {old_leader} in term {old_term})", s.term);

    // Writes succeed again, and the writer keeps getting acknowledgements.
    writer.wait_acked(before_kill + 30, FORM).await?;
    let report = writer.stop().await?;
    eprintln!("writer: {report:?}");
    for &i in &survivors {
        c.put_retry(&[i], &format!("after-kill/{i}"), b"ok", ELECT).await?;
    }

    // The dead node is still a voter, reported unreachable; the survivors are healthy.
    let healthy: BTreeSet<String> = survivors
        .iter()
        .map(|&i| c.node(i).map(|n| n.known_id().unwrap_or_default().to_owned()))
        .collect::<anyhow::Result<_>>()?;
    let want = Expect { members: ids.clone(), voters: 3, healthy, pool_id: Some(s.pool_id.clone()) };
    c.wait_pool("survivors healthy", &survivors, &want, ELECT).await?;
    let (this, dead) = (&c, ids_of(&c, old_leader)?);
    let dead = &dead;
    wait_until("the killed node is reported unreachable", ELECT, || async move {
        let s = this.status(asked).await?;
        match s.members.iter().find(|m| &m.id == dead).map(|m| m.health()) {
            Some(pb::NodeHealth::Unreachable) => Ok(()),
            other => bail!("killed node {dead} is {other:?}: {}", nodeos_tests::client::describe(&s)),
        }
    })
    .await?;
    let n = c.verify_acked(&survivors).await?;
    ensure!(n >= before_kill + 30, "only {n} acknowledged writes");
    c.check_invariants(&survivors).await?;
    c.finish();
    Ok(())
}

fn ids_of(c: &Cluster, i: usize) -> anyhow::Result<String> {
    c.node(i)?.known_id().map(str::to_owned).context("node id not read yet")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_in_random_order_keeps_pool_and_data() -> anyhow::Result<()> {
    let test = "restart_in_random_order_keeps_pool_and_data";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut rng = rng(test);
    let mut c = Cluster::new(&env, test)?;

    // This pool forms through seeds only (no beacons).
    let seeds: Vec<_> = (0..3).map(|i| c.planned_addr(i)).collect();
    let spec = nodeos_tests::NodeSpec { seeds, beacons: false, ..c.spec() };
    let all = c.add_nodes(3, &spec)?;
    let ids = c.ids(&all).await?;
    let s = c.wait_pool("pool formed through seeds", &all, &all_healthy(&ids, 3), FORM).await?;
    let pool_id = s.pool_id.clone();
    const N: usize = 40;
    for k in 0..N {
        c.put_retry(&all, &format!("r/{k:03}"), format!("v{k}").as_bytes(), FORM).await?;
    }
    c.check_invariants(&all).await?;

    for round in 1..=2 {
        // Stop all: at least one kill -9 and one SIGTERM, the third either way.
        let mut order = all.clone();
        order.shuffle(&mut rng);
        let mut hard = [true, false, rng.random_bool(0.5)];
        hard.shuffle(&mut rng);
        for (&i, &kill) in order.iter().zip(&hard) {
            if kill {
                c.kill9(i)?;
            } else {
                c.stop(i).await?;
            }
        }
        // Restart in random order, with random delays.
        order.shuffle(&mut rng);
        for &i in &order {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..2500))).await;
            c.restart(i)?;
        }
        eprintln!("round {round}: stopped (kill -9: {hard:?}) and restarted in order {order:?}");
        let want = Expect { pool_id: Some(pool_id.clone()), ..all_healthy(&ids, 3) };
        let s = c.wait_pool(&format!("round {round}: pool back"), &all, &want, FORM).await?;
        eprintln!("round {round}: {}", nodeos_tests::client::describe(&s));
        c.check_invariants(&all).await?;
        c.put_retry(&all, &format!("r/after-{round}"), b"ok", FORM).await?;
    }
    c.check_invariants(&all).await?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_leader_link_majority_serves_then_heals() -> anyhow::Result<()> {
    let test = "cut_leader_link_majority_serves_then_heals";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let (_, ids) = formed_pool(&mut c, 3).await?;
    let all = [0, 1, 2];
    for k in 0..10 {
        c.put(k % 3, &format!("before/{k}"), b"b").await?;
    }
    c.check_invariants(&all).await?;

    // The leader as of right now (a slow machine may have moved it since formation).
    let s = c.status(0).await?;
    nodeos_tests::client::check_shape(&s)?;
    let old = c.index_of(&s.leader_id)?;
    let old_id = s.leader_id.clone();
    let old_term = s.term;
    let majority: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    c.cut(old)?;
    let (this, asked, old_id) = (&c, majority[0], &old_id);
    let s = wait_until("the majority elects a new leader", ELECT, || async move {
        let s = this.status(asked).await?;
        nodeos_tests::client::check_shape(&s)?;
        if &s.leader_id == old_id || s.term <= old_term {
            bail!("still leader {} term {}", s.leader_id, s.term);
        }
        Ok(s)
    })
    .await?;
    let new_leader = c.index_of(&s.leader_id)?;
    ensure!(majority.contains(&new_leader), "new leader {new_leader} is not in the majority {majority:?}");
    eprintln!("majority leader node {new_leader} term {} (old leader node {old} term {old_term})", s.term);
    let during: Vec<String> = (0..20).map(|k| format!("during/{k:02}")).collect();
    for (k, key) in during.iter().enumerate() {
        c.put_retry(&[majority[k % 2], majority[(k + 1) % 2]], key, b"d", ELECT).await?;
    }
    c.check_invariants(&majority).await?;

    c.heal(old)?;
    let s = c.wait_pool("one pool after the heal", &all, &all_healthy(&ids, 3), ELECT).await?;
    ensure!(s.term > old_term, "term went back to {} after the heal", s.term);
    let this = &c;
    let revs = wait_until("every node at the same revision", ELECT, || async move {
        let r = this.revisions(&all).await?;
        if r.iter().all(|&x| x == r[0]) { Ok(r) } else { bail!("revisions {r:?}") }
    })
    .await?;
    eprintln!("converged at revision {}", revs[0]);
    // The writes made during the cut, read through the old leader.
    for key in &during {
        let got = c.read(old, key).await?;
        ensure!(got.as_deref() == Some(&b"d"[..]), "{key} reads {got:?} via the old leader");
    }
    c.check_invariants(&all).await?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pool_key_is_refused() -> anyhow::Result<()> {
    let test = "wrong_pool_key_is_refused";
    let Some(env) = require(test)? else { return Ok(()) };
    let mut c = Cluster::new(&env, test)?;
    let (s, ids) = formed_pool(&mut c, 3).await?;
    let pool_id = s.pool_id.clone();
    let all = [0, 1, 2];

    // Same pool name, another key; it hears the beacons and probes the seeds.
    let seeds: Vec<_> = all.iter().map(|&i| c.planned_addr(i)).collect();
    let wrong = c.other_key_file("wrong.key")?;
    let wrong_creds = c.credentials_for(&wrong, "wrong")?;
    let spec = nodeos_tests::NodeSpec { key_file: wrong, seeds, ..c.spec() };
    let bad = c.add_node(&spec)?;
    let bad_id = c.id(bad).await?;

    let this = &c;
    wait_until("the intruder logs a pool key mismatch", FORM, || async move {
        let log = this.log(bad)?;
        match log.lines().find(|l| l.contains("pool key mismatch")) {
            Some(l) if l.contains("ERROR") => Ok(()),
            Some(l) => bail!("mismatch logged, but not as an error: {l}"),
            None => bail!("no mismatch logged yet"),
        }
    })
    .await?;
    let refusal = wait_until("a pool node logs the refusal", FORM, || async move {
        for i in all {
            // Another key is another CA: the TLS handshake fails before any
            // envelope is read (a node without TLS refuses the envelope).
            if let Some(l) = this.log(i)?.lines().find(|l| {
                l.contains("TLS handshake refused")
                    || (l.contains("refused a peer request")
                        && l.contains("does not verify with this pool key"))
            }) {
                return Ok(l.to_owned());
            }
        }
        bail!("no refusal logged yet")
    })
    .await?;
    eprintln!("refusal: {refusal}");

    // Several formation rounds later: membership unchanged, the intruder in no pool.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let want = Expect { pool_id: Some(pool_id.clone()), ..all_healthy(&ids, 3) };
    let s = c.wait_pool("membership unchanged", &all, &want, FORM).await?;
    ensure!(!s.members.iter().any(|m| m.id == bad_id), "the intruder is a member: {s:?}");
    let own = c.local_status_as(bad, &wrong_creds).await?;
    ensure!(own.pool_id.is_empty(), "the intruder knows a pool: {own:?}");
    ensure!(own.leader_id.is_empty() && own.members.is_empty(), "the intruder is in a raft group: {own:?}");
    c.check_running(&[bad])?;
    c.check_invariants(&all).await?;
    c.finish();
    Ok(())
}
