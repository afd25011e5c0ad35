//! Volume records, writer slots and imports against a real metadata store
//! and in-memory replicas: every refusal names what was wrong and changes
//! nothing; every slot taken is given back; fenced writers change nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Bed, block, check_blocks};
use nodeos_block::device::{BlockDevice, DeviceError};
use nodeos_types::NodeId;
use nodeos_volumes::import::{IMPORT_HOLDER, Import, ImportError, ImportStart};
use nodeos_volumes::{NewVolume, Takeover, VolumeError, WriterSlot};

async fn writer_of(bed: &Bed, name: &str) -> Option<String> {
    bed.record(name).await.writer.map(|w| w.holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let bed = Bed::new(3).await;
    bed.create("a", 64 << 20).await;
    let create = |name: &str, size: u64, replicas: Option<u32>| {
        bed.volumes.create(NewVolume { name: name.into(), size_bytes: size, replicas })
    };
    assert!(matches!(create("a", 64 << 20, None).await, Err(VolumeError::NameTaken(_))));
    assert!(matches!(create("Bad Name", 4096, None).await, Err(VolumeError::Name(_))));
    assert!(matches!(create("b", 0, None).await, Err(VolumeError::Size { .. })));
    assert!(matches!(create("b", 4097, None).await, Err(VolumeError::Size { .. })));
    assert!(matches!(create("b", 4096, Some(4)).await, Err(VolumeError::Replicas(4))));
    assert!(matches!(create("b", 4096, Some(0)).await, Err(VolumeError::Replicas(0))));
    assert!(matches!(bed.volumes.resize("a", 4096).await, Err(VolumeError::Shrink { .. })));
    assert!(matches!(bed.volumes.get("nope").await, Err(VolumeError::NotFound(_))));
    bed.volumes.snapshot("a", "s1").await.unwrap();
    assert!(matches!(bed.volumes.snapshot("a", "s1").await, Err(VolumeError::SnapshotTaken { .. })));
    bed.volumes.clone_snapshot("a", "s1", "c").await.unwrap();
    assert!(matches!(bed.volumes.delete_snapshot("a", "s1").await, Err(VolumeError::HasClones { .. })));
    assert!(matches!(bed.volumes.delete("a", false).await, Err(VolumeError::HasClones { .. })));
    let names: Vec<String> = bed.volumes.list().await.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Growing places the new extents too.
    let r = bed.volumes.resize("a", 200 << 20).await.unwrap();
    assert_eq!(r.placement.len(), 4);
    assert!(r.placement.iter().all(|s| s.len() == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_at_a_time_and_takeovers_fence_the_old_one() {
    let bed = Bed::new(3).await;
    bed.create("disk", 64 << 20).await;
    let (old, old_slot) = WriterSlot::open(&bed.volumes, "disk", "vm a", Takeover::Refuse).await.unwrap();
    old.write(0, block(0), false).await.unwrap();
    assert_eq!(writer_of(&bed, "disk").await.as_deref(), Some("vm a"));

    // Anyone else is refused, with the holder named, and nothing changes.
    let gen_before = bed.record("disk").await.generation;
    let refused = WriterSlot::open(&bed.volumes, "disk", "nbd", Takeover::Refuse).await.unwrap_err();
    assert!(refused.to_string().contains("vm a"), "{refused}");
    let refused = WriterSlot::open(&bed.volumes, "disk", "nbd", Takeover::OwnHolder).await.unwrap_err();
    assert!(matches!(refused, VolumeError::InUse { .. }));
    assert_eq!(bed.record("disk").await.generation, gen_before);

    // The same holder (its crashed worker's successor) takes over; the old client is fenced.
    let (new, new_slot) = WriterSlot::open(&bed.volumes, "disk", "vm a", Takeover::OwnHolder).await.unwrap();
    assert!(new_slot.generation() > old_slot.generation());
    let fenced = old.write(4096, block(4096), false).await.unwrap_err();
    assert!(matches!(fenced, DeviceError::Fenced { .. }), "{fenced:?}");
    new.write(8192, block(8192), false).await.unwrap();
    new.flush().await.unwrap();
    // The old slot's release leaves the new owner in place.
    assert!(!old_slot.held().await.unwrap());
    old_slot.release().await.unwrap();
    assert_eq!(writer_of(&bed, "disk").await.as_deref(), Some("vm a"));
    assert!(new_slot.held().await.unwrap());

    // Dropping a slot gives it back (in the background).
    drop(new);
    drop(new_slot);
    let deadline = Instant::now() + Duration::from_secs(5);
    while writer_of(&bed, "disk").await.is_some() {
        assert!(Instant::now() < deadline, "the dropped slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check_blocks(&bed.volumes, "disk", &[0, 8192]).await;

    // An operator's release fences whoever held it.
    let (c, _slot) = WriterSlot::open(&bed.volumes, "disk", "nbd", Takeover::Refuse).await.unwrap();
    bed.volumes.release("disk").await.unwrap();
    assert!(writer_of(&bed, "disk").await.is_none());
    assert!(matches!(c.write(0, block(0), false).await, Err(DeviceError::Fenced { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_writes_what_it_announced_and_always_gives_the_slot_back() {
    let bed = Bed::new(3).await;
    bed.create("img", 64 << 20).await;
    let start = |total: u64, sparse: bool| ImportStart {
        volume: "img".into(),
        total_bytes: total,
        sparse,
        takeover: false,
    };

    let mut job = Import::start(&bed.volumes, start(3 * 4096, true)).await.unwrap();
    assert_eq!(writer_of(&bed, "img").await.as_deref(), Some(IMPORT_HOLDER));
    let mut data = block(0);
    data.extend(vec![0u8; 4096]);
    data.extend(block(8192));
    job.chunk(0, data).await.unwrap();
    let s = job.finish().await.unwrap();
    assert_eq!((s.written, s.skipped), (2 * 4096, 4096));
    assert!(writer_of(&bed, "img").await.is_none());
    check_blocks(&bed.volumes, "img", &[0, 8192]).await;

    // A stream that ends early is refused and the slot comes back.
    let mut job = Import::start(&bed.volumes, start(8192, false)).await.unwrap();
    job.chunk(0, block(0)).await.unwrap();
    let e = job.finish().await.unwrap_err();
    assert!(matches!(e, ImportError::Invalid(ref m) if m.contains("ended after")), "{e}");
    assert!(writer_of(&bed, "img").await.is_none());

    // A bad chunk aborts the import.
    let mut job = Import::start(&bed.volumes, start(8192, false)).await.unwrap();
    let e = job.chunk(100, block(0)).await.unwrap_err();
    let e = job.abort(e).await;
    assert!(e.to_string().contains("chunk.offset"), "{e}");
    assert!(writer_of(&bed, "img").await.is_none());

    // An announcement larger than the volume never takes the slot.
    let (_c, _slot) = WriterSlot::open(&bed.volumes, "img", "vm z", Takeover::Refuse).await.unwrap();
    let gen_before = bed.record("img").await.generation;
    let e = Import::start(&bed.volumes, ImportStart { takeover: true, ..start(1 << 40, false) })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("start.total_bytes"), "{e}");
    assert_eq!(bed.record("img").await.generation, gen_before, "the refused import fenced nobody");
    assert_eq!(writer_of(&bed, "img").await.as_deref(), Some("vm z"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_pool_keeps_one_copy_and_says_so() {
    let bed = Bed::new(1).await;
    let v = bed.create("solo", 64 << 20).await;
    assert_eq!(v.placement, vec![vec![NodeId(1)]]);
    assert_eq!(v.warning, "only 1 of 3 copies: the pool has 1 node(s)");
    let v = bed
        .volumes
        .create(NewVolume { name: "one".into(), size_bytes: 4096, replicas: Some(1) })
        .await
        .unwrap();
    assert_eq!(v.warning, "", "one copy asked, one copy kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleting_volume_gains_nothing_and_opens_for_no_one() {
    let bed = Bed::new(3).await;
    let v = bed.create("doomed", 64 << 20).await;
    bed.volumes.snapshot("doomed", "s").await.unwrap();
    bed.volumes.delete("doomed", false).await.unwrap();
    let id = v.id.to_string();
    let before = bed.volumes.get(&id).await.unwrap();
    let gone = |e: VolumeError| assert!(matches!(e, VolumeError::NotFound(_)), "{e:?}");
    gone(bed.volumes.snapshot(&id, "late").await.unwrap_err());
    gone(bed.volumes.clone_snapshot(&id, "s", "orphan").await.unwrap_err());
    gone(bed.volumes.resize(&id, 128 << 20).await.unwrap_err());
    gone(bed.volumes.open_reader(&id).await.map(|_| ()).unwrap_err());
    gone(WriterSlot::open(&bed.volumes, &id, "vm q", Takeover::Force).await.map(|_| ()).unwrap_err());
    assert_eq!(bed.volumes.get(&id).await.unwrap(), before, "nothing changed");
    assert!(bed.volumes.get("orphan").await.is_err());
}
