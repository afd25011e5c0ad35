//! End to end on this host's KVM: the test guest, dirtying its memory and
//! checking every page it wrote, moves from one VM to another mid-run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeos_types::auth::PoolKey;

use super::send::{SendParams, send};
use super::{Budget, MigrationError, receive};
use crate::config::WorkerConfig;
use crate::vm::Vm;

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the guest has reported at least `n` dirty passes (or the timeout).
    fn wait_passes(&self, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.text();
            if passes(&t).len() >= n || t.contains("CORRUPT") || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn guest() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../tests/guest/build/nodeos-test-guest.elf");
    p.is_file().then_some(p)
}

fn config(kernel: &Path, cmdline: &str) -> WorkerConfig {
    WorkerConfig {
        vm_id: "mig-test".into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: kernel.to_owned(),
        initrd: None,
        cmdline: cmdline.into(),
        disks: vec![],
        nics: vec![],
        console_log: PathBuf::from("/dev/null"),
        cpu_baseline: None,
    }
}

/// Pass numbers of `dirty pass=N checksum=C ok` lines, with their checksums.
fn passes(console: &str) -> Vec<(u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("NODEOS-GUEST: dirty pass=")?;
            let mut it = rest.split_whitespace();
            let pass = it.next()?.parse().ok()?;
            let sum = it.next()?.strip_prefix("checksum=")?.to_string();
            (it.next()? == "ok").then_some((pass, sum))
        })
        .collect()
}

/// The checksum the guest reports after `pass` passes over `pages` pages (README).
fn expected_checksum(pass: u64, pages: u64) -> String {
    fn mix64(mut x: u64) -> u64 {
        x ^= x >> 30;
        x = x.wrapping_mul(0xbf58476d1ce4e5b9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94d049bb133111eb);
        x ^ (x >> 31)
    }
    let mut c = 0u64;
    for p in 1..=pass {
        for i in 0..pages {
            c = c.rotate_left(1) ^ mix64((p << 32) ^ i ^ 0xD1B54A32D192ED03);
        }
    }
    format!("{c:016x}")
}

fn key() -> PoolKey {
    PoolKey::from_secret(b"migration test pool key").unwrap()
}

#[test]
fn a_dirtying_guest_moves_and_keeps_every_page() {
    let test = "a_dirtying_guest_moves_and_keeps_every_page";
    let Some(_hv) = nodeos_hv::testing::hypervisor_or_skip(test) else { return };
    let Some(elf) = guest() else {
        nodeos_types::testing::skip(test, "test guest not built (make -C tests/guest)");
        return;
    };
    let cfg = config(&elf, "mode=dirty dirty_mib=2");
    let src_console = Console::default();
    let src = Arc::new(Mutex::new(Vm::build(&cfg, vec![], Box::new(src_console.clone())).unwrap()));
    let seen = src_console.wait_passes(2, Duration::from_secs(60));
    assert!(passes(&seen).len() >= 2, "the source guest never got going: {seen}");

    let dst_console = Console::default();
    let dst = Arc::new(Mutex::new(Vm::build_incoming(&cfg, vec![], Box::new(dst_console.clone())).unwrap()));
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let params =
        SendParams { vm_id: cfg.vm_id.clone(), pool_key: key(), budget: Budget::default(), bandwidth: None };
    let sender_vm = src.clone();
    let sender = std::thread::spawn(move || {
        let cancel = AtomicBool::new(false);
        send(&sender_vm, a, &params, &cancel, &mut |_| {})
    });
    let (_chan, got) = receive::receive(&dst, b, &cfg.vm_id, &key(), &mut |_| {}).unwrap();
    let summary = sender.join().unwrap().unwrap();
    assert!(got.pages > 0 && summary.passes >= 1, "{got:?} {summary:?}");
    assert!(summary.zero_pages > 10_000, "untouched memory went as zero ranges: {summary:?}");
    assert!(summary.bytes_sent < 32 << 20, "a 64 MiB guest with 2 MiB dirty sent {summary:?}");

    let before = passes(&src_console.text());
    let last_src = before.last().unwrap().0;
    dst.lock().unwrap().start_incoming().unwrap();
    let after_text = dst_console.wait_passes(3, Duration::from_secs(60));
    assert!(!after_text.contains("CORRUPT"), "pages lost in the move: {after_text}");
    let after = passes(&after_text);
    assert!(
        after.len() >= 3 && after[0].0 > last_src,
        "the guest did not go on on the destination: {after_text}"
    );
    // 2 MiB = 512 pages; the running checksum continues exactly.
    for (p, sum) in after.iter().take(3) {
        assert!(*p > last_src, "pass {p} reported again after the move");
        assert_eq!(*sum, expected_checksum(*p, 512), "checksum of pass {p} after the move");
    }
    // The source stays frozen: it printed nothing more.
    let src_after = src_console.text();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src_after, src_console.text(), "the source must not run after the hand-over");
}

#[test]
fn a_refused_state_leaves_the_source_running() {
    let test = "a_refused_state_leaves_the_source_running";
    let Some(_hv) = nodeos_hv::testing::hypervisor_or_skip(test) else { return };
    let Some(elf) = guest() else {
        nodeos_types::testing::skip(test, "test guest not built (make -C tests/guest)");
        return;
    };
    let cfg = config(&elf, "mode=dirty dirty_mib=1");
    let src_console = Console::default();
    let src = Arc::new(Mutex::new(Vm::build(&cfg, vec![], Box::new(src_console.clone())).unwrap()));
    src_console.wait_passes(1, Duration::from_secs(60));
    // A destination with another memory size refuses the layout.
    let other = WorkerConfig { memory_mib: 32, ..cfg.clone() };
    let dst = Arc::new(Mutex::new(Vm::build_incoming(&other, vec![], Box::new(Console::default())).unwrap()));
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let params =
        SendParams { vm_id: cfg.vm_id.clone(), pool_key: key(), budget: Budget::default(), bandwidth: None };
    let sender_vm = src.clone();
    let sender = std::thread::spawn(move || {
        let cancel = AtomicBool::new(false);
        send(&sender_vm, a, &params, &cancel, &mut |_| {})
    });
    let refused = receive::receive(&dst, b, &cfg.vm_id, &key(), &mut |_| {});
    assert!(matches!(refused, Err(MigrationError::Layout { .. })), "{refused:?}");
    let sent = sender.join().unwrap();
    assert!(sent.is_err(), "the source learns of the refusal");
    let n = passes(&src_console.text()).len();
    let t = src_console.wait_passes(n + 2, Duration::from_secs(60));
    assert!(passes(&t).len() >= n + 2, "the source kept running: {t}");
}

/// A source that sends `frames` after a proper handshake and layout, then
/// reads what the destination answers (an Abort, or nothing).
fn hostile_source(
    stream: std::os::unix::net::UnixStream,
    layout: crate::vm::Layout,
    frames: Vec<(super::wire::Kind, Vec<u8>)>,
) -> std::thread::JoinHandle<Option<super::wire::Kind>> {
    std::thread::spawn(move || {
        let mut chan = super::wire::Channel::connect(stream, &key(), "mig-test").ok()?;
        let encoded = postcard::to_allocvec(&layout).ok()?;
        chan.send(super::wire::Kind::Layout, &[&encoded]).ok()?;
        for (kind, payload) in frames {
            chan.send(kind, &[&payload]).ok()?;
        }
        chan.flush().ok()?;
        let mut buf = Vec::new();
        chan.recv(&mut buf).ok()
    })
}

#[test]
fn a_hostile_or_truncated_stream_is_refused_and_nothing_runs() {
    let test = "a_hostile_or_truncated_stream_is_refused_and_nothing_runs";
    let Some(_hv) = nodeos_hv::testing::hypervisor_or_skip(test) else { return };
    // The incoming VM loads no kernel: the path is never read.
    let cfg = config(Path::new("/nonexistent-kernel"), "");
    let build =
        || Arc::new(Mutex::new(Vm::build_incoming(&cfg, vec![], Box::new(Console::default())).unwrap()));

    // A page outside guest RAM.
    let dst = build();
    let layout = dst.lock().unwrap().layout().clone();
    let mut page = super::wire::pages_header(&[0xffff_0000_0000]);
    page.extend_from_slice(&[0u8; 4096]);
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let src = hostile_source(a, layout.clone(), vec![(super::wire::Kind::Pages, page)]);
    let got = receive::receive(&dst, b, &cfg.vm_id, &key(), &mut |_| {});
    assert!(matches!(got, Err(MigrationError::Address { addr: 0xffff_0000_0000 })), "{got:?}");
    assert_eq!(src.join().unwrap(), Some(super::wire::Kind::Abort), "the source is told");

    // A state that does not decode.
    let dst = build();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let src = hostile_source(a, layout.clone(), vec![(super::wire::Kind::State, vec![0xff; 64])]);
    let got = receive::receive(&dst, b, &cfg.vm_id, &key(), &mut |_| {});
    assert!(matches!(got, Err(MigrationError::StateDecode(_))), "{got:?}");
    src.join().unwrap();

    // The stream ends before the state.
    let dst = build();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let src = std::thread::spawn(move || {
        let mut chan = super::wire::Channel::connect(a, &key(), "mig-test").unwrap();
        let encoded = postcard::to_allocvec(&layout).unwrap();
        chan.send(super::wire::Kind::Layout, &[&encoded]).unwrap();
        // Dropped here: the stream ends without the memory or the state.
    });
    let got = receive::receive(&dst, b, &cfg.vm_id, &key(), &mut |_| {});
    src.join().unwrap();
    assert!(matches!(got, Err(MigrationError::Wire(super::wire::WireError::Io(_)))), "{got:?}");
    // Nothing was restored: the VM cannot be started.
    assert!(dst.lock().unwrap().start_incoming().is_err());
}
