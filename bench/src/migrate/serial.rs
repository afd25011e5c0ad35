//! A guest's serial output, each line timestamped by the host as it arrives, and
//! what the migration figures read from those lines.
//!
//! [`SerialSocket`] owns a listening unix socket that the VMM's serial port
//! connects to, and a thread that accepts that one connection and reads it;
//! lines are stamped with the time since a shared epoch when the read that
//! completed them returned (lines arriving in one read share a time). The
//! thread stops when the VMM closes the connection or the socket is dropped.
//! The rest of the file is sans-IO: it reads `tests/guest` `mode=dirty` lines
//! (see tests/guest/README.md, "mode=dirty").

use std::collections::HashSet;
use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::vmm::GUEST_PREFIX;

/// How often the reader thread looks at its stop flag while nothing arrives.
const STOP_POLL: Duration = Duration::from_millis(20);

/// One line of serial output (without its `\n`, a trailing `\r` dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedLine {
    /// When the host read it, since the run's epoch.
    pub at: Duration,
    pub text: String,
}

/// A serial port as a unix socket: the VMM connects (QEMU:
/// `-chardev socket,path=...` without `server=on`), this side listens.
#[derive(Debug)]
pub struct SerialSocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<TimedLine>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl SerialSocket {
    /// Listens on `path` and starts the reader thread; lines are timed from `epoch`.
    pub fn listen(path: &Path, epoch: Instant) -> anyhow::Result<Self> {
        let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        listener.set_nonblocking(true).context("making the serial listener non-blocking")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (lines.clone(), stop.clone());
        let reader = std::thread::Builder::new()
            .name("serial-reader".into())
            .spawn(move || read_serial(&listener, epoch, &l, &s))
            .context("spawning the serial reader")?;
        Ok(Self { path: path.to_owned(), lines, stop, reader: Some(reader) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every complete line so far.
    pub fn lines(&self) -> Vec<TimedLine> {
        lock(&self.lines).clone()
    }

    /// The lines so far, as text (for error messages).
    pub fn text(&self) -> String {
        lock(&self.lines).iter().map(|l| format!("{}\n", l.text)).collect()
    }
}

impl Drop for SerialSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn lock(lines: &Mutex<Vec<TimedLine>>) -> MutexGuard<'_, Vec<TimedLine>> {
    // A panicking reader leaves whole lines behind: still worth reading.
    lines.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_serial(listener: &UnixListener, epoch: Instant, lines: &Mutex<Vec<TimedLine>>, stop: &AtomicBool) {
    let Some(mut stream) = accept(listener, stop) else { return };
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(STOP_POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut partial = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let at = epoch.elapsed();
                let mut done = Vec::new();
                for &b in &buf[..n] {
                    if b == b'\n' {
                        done.push(line_of(&partial, at));
                        partial.clear();
                    } else {
                        partial.push(b);
                    }
                }
                lock(lines).extend(done);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

fn accept(listener: &UnixListener, stop: &AtomicBool) -> Option<UnixStream> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => return None,
        }
    }
    None
}

fn line_of(bytes: &[u8], at: Duration) -> TimedLine {
    let text = String::from_utf8_lossy(bytes);
    TimedLine { at, text: text.strip_suffix('\r').unwrap_or(&text).to_owned() }
}

/// `seq` of a `dirty stamp seq=<n> tsc=<hex>` line.
pub fn stamp_seq(text: &str) -> Option<u64> {
    let rest = text.strip_prefix(GUEST_PREFIX)?.strip_prefix(" dirty stamp seq=")?;
    let (seq, tsc) = rest.split_once(" tsc=")?;
    if tsc.is_empty() || !tsc.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None; // cut short, e.g. by the switch-over
    }
    seq.parse().ok()
}

/// A `dirty pass=<p> checksum=<c> ok|CORRUPT ... max_gap_us=<g>` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub pass: u64,
    pub ok: bool,
    /// Absent from guests built before the field existed.
    pub max_gap_us: Option<u64>,
}

/// The report on a line, if it is one (not the CORRUPT detail lines, not the
/// power-off lines).
pub fn pass_report(text: &str) -> Option<PassReport> {
    let rest = text.strip_prefix(GUEST_PREFIX)?.strip_prefix(" dirty pass=")?;
    let mut tokens = rest.split_whitespace();
    let pass = tokens.next()?.parse().ok()?;
    tokens.next()?.strip_prefix("checksum=")?;
    let ok = match tokens.next()? {
        "ok" => true,
        "CORRUPT" => false,
        _ => return None,
    };
    let max_gap_us = tokens.find_map(|t| t.strip_prefix("max_gap_us=")).and_then(|v| v.parse().ok());
    Some(PassReport { pass, ok, max_gap_us })
}

/// A guest line saying something went wrong (corrupt memory, a failure).
pub fn is_problem(text: &str) -> bool {
    text.starts_with(GUEST_PREFIX) && (text.contains("CORRUPT") || text.contains("FAIL"))
}

/// The largest gap, ms, between consecutive stamps (by seq, the first arrival
/// of each) of all `sides` merged by arrival time, over pairs whose later
/// stamp arrived at or after `from`. `None` without such a pair.
pub fn largest_stamp_gap_ms(sides: &[&[TimedLine]], from: Duration) -> Option<f64> {
    let mut stamps: Vec<(Duration, u64)> =
        sides.iter().flat_map(|s| s.iter()).filter_map(|l| Some((l.at, stamp_seq(&l.text)?))).collect();
    stamps.sort_by_key(|&(at, _)| at); // stable: ties keep the side order
    let mut seen = HashSet::new();
    stamps.retain(|&(_, seq)| seen.insert(seq));
    stamps
        .windows(2)
        .filter(|w| w[1].0 >= from)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3)
        .max_by(f64::total_cmp)
}

/// Region MiB × passes completed per second between the first and the last
/// pass report that arrived before `until`. `None` with fewer than two.
pub fn dirty_rate_mib_s(lines: &[TimedLine], until: Duration, dirty_mib: u64) -> Option<f64> {
    let reports: Vec<(Duration, u64)> = lines
        .iter()
        .filter(|l| l.at < until)
        .filter_map(|l| Some((l.at, pass_report(&l.text)?.pass)))
        .collect();
    let (&(t0, p0), &(t1, p1)) = (reports.first()?, reports.last()?);
    if t1 <= t0 || p1 <= p0 {
        return None;
    }
    Some((p1 - p0) as f64 * dirty_mib as f64 / (t1 - t0).as_secs_f64())
}

/// The largest `max_gap_us` among `lines`' pass reports, in ms.
pub fn largest_reported_gap_ms(lines: &[TimedLine]) -> Option<f64> {
    lines.iter().filter_map(|l| pass_report(&l.text)?.max_gap_us).max().map(|us| us as f64 / 1e3)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn line(ms: u64, text: &str) -> TimedLine {
        TimedLine { at: Duration::from_millis(ms), text: text.into() }
    }

    fn stamp(ms: u64, seq: u64) -> TimedLine {
        line(ms, &format!("NODEOS-GUEST: dirty stamp seq={seq} tsc=1a2b{seq:x}"))
    }

    #[test]
    fn reads_the_guest_lines() {
        assert_eq!(stamp_seq("NODEOS-GUEST: dirty stamp seq=17 tsc=00ff"), Some(17));
        assert_eq!(stamp_seq("NODEOS-GUEST: dirty stamp seq=17 tsc="), None);
        assert_eq!(stamp_seq("NODEOS-GUEST: dirty stamp seq=17"), None);
        assert_eq!(
            pass_report("NODEOS-GUEST: dirty pass=12 checksum=3dc94c5cc5fe41b7 ok max_gap_us=21394"),
            Some(PassReport { pass: 12, ok: true, max_gap_us: Some(21394) })
        );
        assert_eq!(
            pass_report(
                "NODEOS-GUEST: dirty pass=3 checksum=0000000000000001 CORRUPT pages_total=2 max_gap_us=5 \
                 net_rx=1 net_tx=2"
            ),
            Some(PassReport { pass: 3, ok: false, max_gap_us: Some(5) })
        );
        assert_eq!(
            pass_report("NODEOS-GUEST: dirty pass=1 checksum=309c1d09e7926803 ok"),
            Some(PassReport { pass: 1, ok: true, max_gap_us: None })
        );
        assert_eq!(pass_report("NODEOS-GUEST: dirty pass=4 checksum=00 ctrl-alt-del: powering off"), None);
        assert!(is_problem("NODEOS-GUEST: dirty CORRUPT pass=3 page=1 addr=0x201000 expected=1 found=2"));
        assert!(!is_problem("NODEOS-GUEST: dirty pass=3 checksum=00 ok max_gap_us=1"));
    }

    #[test]
    fn stamp_gap_merges_sides_and_ignores_duplicates() {
        let src = [stamp(0, 0), stamp(10, 1), stamp(20, 2), stamp(30, 3)];
        // The destination repeats seq 3 (cut off on the source mid-line) and goes on.
        let dst = [stamp(95, 3), stamp(96, 4), stamp(106, 5)];
        assert_eq!(largest_stamp_gap_ms(&[&src, &dst], Duration::from_millis(25)), Some(66.0));
        // Pairs ending before `from` are not counted.
        let src = [stamp(0, 0), stamp(500, 1), stamp(510, 2)];
        assert_eq!(largest_stamp_gap_ms(&[&src], Duration::from_millis(505)), Some(10.0));
        assert_eq!(largest_stamp_gap_ms(&[&src], Duration::from_secs(1)), None);
    }

    #[test]
    fn dirty_rate_from_reports() {
        let r = |ms, p| {
            line(ms, &format!("NODEOS-GUEST: dirty pass={p} checksum=0123456789abcdef ok max_gap_us=9"))
        };
        let lines = [r(1000, 1), stamp(1100, 0), r(2000, 4), r(3000, 7), r(4000, 10)];
        // 16 MiB × 6 passes in 2 s; the report at 4 s came too late
        assert_eq!(dirty_rate_mib_s(&lines, Duration::from_millis(3500), 16), Some(48.0));
        assert_eq!(dirty_rate_mib_s(&lines, Duration::from_millis(1500), 16), None);
        assert_eq!(largest_reported_gap_ms(&lines), Some(0.009));
    }

    #[test]
    fn socket_lines_are_timed_on_arrival() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.sock");
        let epoch = Instant::now();
        let serial = SerialSocket::listen(&path, epoch).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"\nNODEOS-GUEST: a\r\nNODEOS-GUEST: b").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let t = epoch.elapsed();
        c.write_all(b"c\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while serial.lines().len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let lines = serial.lines();
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["", "NODEOS-GUEST: a", "NODEOS-GUEST: bc"]);
        assert!(lines[1].at < t && lines[2].at >= t, "{lines:?}");
    }
}
