//! Live-migration benchmark pieces (`make bench-migrate`): the same test guest
//! (`tests/guest`, `mode=dirty`) is moved between two VMMs on 127.0.0.1 at
//! several dirty rates, on nodeos and on QEMU, and each move is summed up as one
//! [`MigrationFigures`].
//!
//! # Layout
//! - `mod.rs`: [`MigrationFigures`], [`print_raw`], the dirty [`Profile`]s and
//!   the command line they give the guest.
//! - [`serial`]: reads a guest serial stream on a thread, timestamping each line
//!   as it arrives, and the sans-IO reading of those lines (stamp gaps, pass
//!   reports, the achieved dirty rate).
//! - [`qemu`]: the peer: two `qemu-system-x86_64` processes (the destination
//!   started with `-incoming`), driven over QMP.
//! - [`nodeos`]: ours: a two-node pool, the guest as a pool image, the move
//!   through `VmService.Migrate`; the console followed through
//!   `VmService.Console` and, for timing, each node's console log file.
//!
//! # How downtime is measured, three ways
//! - `downtime_ms_host`: what the VMM itself reports from pause to resume
//!   (QEMU: `query-migrate` `downtime`, which covers the source's side only;
//!   nodeos: `paused_ms`, the source's pause until the destination restored).
//! - `downtime_ms_serial`: from outside. The guest prints `dirty stamp seq=<n>`
//!   every `dirty_stamp_ms` of its TSC time; the host timestamps every line as
//!   it arrives on either VMM's serial port, merges both sides by arrival
//!   (one line per seq), and takes the largest gap between consecutive stamps
//!   from the migrate request on, minus the stamp interval. Its resolution is
//!   about one interval: a guest whose TSC stops while paused (QEMU saves and
//!   restores the TSC) prints its next stamp one full interval after resuming,
//!   one whose TSC runs on prints it at once.
//! - `downtime_ms_guest_tsc`: from inside: the largest `max_gap_us` in the
//!   destination's `dirty pass=` reports (the longest stretch without guest
//!   code, by the guest's own TSC). `None` when no report after the move had
//!   one. A VMM that hides the pause from the TSC shows only its usual jitter.

pub mod nodeos;
pub mod qemu;
pub mod serial;

/// One live migration, as raw figures (no ratios, no medians).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationFigures {
    /// Pause → resume as the VMM reports it (QEMU: `query-migrate` `downtime`).
    pub downtime_ms_host: f64,
    /// The largest gap between consecutive serial stamp lines (host arrival
    /// times, both sides merged, from the migrate request on), minus the stamp
    /// interval.
    pub downtime_ms_serial: f64,
    /// The largest `max_gap_us` the guest reported after the move, in ms.
    pub downtime_ms_guest_tsc: Option<f64>,
    /// Migrate request → completion as the VMM reports it (QEMU: `total-time`).
    pub total_ms: f64,
    /// Guest memory bytes sent (QEMU: `ram.transferred`).
    pub bytes_sent: u64,
    /// Memory copy rounds (QEMU: `ram.dirty-sync-count`), if the VMM counts them.
    pub passes: Option<u64>,
    /// What the guest achieved before the move: `dirty_mib` × passes completed
    /// per second, from its pass reports timed by the host.
    pub dirty_rate_mib_s: f64,
}

/// Prints one line of raw figures: `raw <label> key=value ...`.
pub fn print_raw(label: &str, f: &MigrationFigures) {
    println!("{}", raw_line(label, f));
}

fn raw_line(label: &str, f: &MigrationFigures) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
    format!(
        "raw {label} downtime_ms_host={:.1} downtime_ms_serial={:.1} downtime_ms_guest_tsc={} total_ms={:.1} \
         bytes_sent={} passes={} dirty_rate_mib_s={:.1}",
        f.downtime_ms_host,
        f.downtime_ms_serial,
        opt(f.downtime_ms_guest_tsc.map(|v| format!("{v:.1}"))),
        f.total_ms,
        f.bytes_sent,
        opt(f.passes.map(|v| v.to_string())),
        f.dirty_rate_mib_s,
    )
}

/// The interval of the guest's `dirty stamp` lines when a command line names
/// none: short enough to resolve downtimes of tens of ms, long enough that
/// printing them (one port exit per byte, ~45 bytes) stays a small share of
/// the guest's time under an emulating KVM.
pub const DEFAULT_STAMP_MS: u64 = 10;

/// A dirty rate the benchmark runs at.
///
/// The guest has no rate limiter: each pass rewrites its whole region as fast
/// as it can, `dirty_words` words per page. So a profile aims at a rate by its
/// region: with `dirty_mib` = the aim in MiB and the cheapest pass
/// (`dirty_words=1`), a guest running at the aimed rate dirties its whole
/// region once a second, every page distinct, and a faster guest (TCG) only
/// re-dirties the same set sooner. Whether the aim is reached depends on the
/// guest's speed (under this host's emulating KVM, ~1M instructions/s, a few
/// tens of MiB/s at most), so the rate actually achieved is measured and
/// reported as [`MigrationFigures::dirty_rate_mib_s`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    /// The rate aimed at, MiB/s (0: idle-ish).
    pub aim_mib_s: u64,
    pub dirty_mib: u64,
    pub dirty_words: u64,
}

/// Idle-ish (1 MiB rewritten, one word a page), then 64 and 256 MiB/s aims.
pub const PROFILES: [Profile; 3] = [
    Profile { name: "idle", aim_mib_s: 0, dirty_mib: 1, dirty_words: 1 },
    Profile { name: "dirty64", aim_mib_s: 64, dirty_mib: 64, dirty_words: 1 },
    Profile { name: "dirty256", aim_mib_s: 256, dirty_mib: 256, dirty_words: 1 },
];

impl Profile {
    /// The guest's command line, with stamps every `stamp_ms`.
    pub fn cmdline(&self, stamp_ms: u64) -> String {
        format!(
            "mode=dirty dirty_mib={} dirty_words={} dirty_stamp_ms={stamp_ms}",
            self.dirty_mib, self.dirty_words
        )
    }

    /// Guest RAM for this profile: the region, the 2 MiB below it (image, page
    /// tables) and headroom, rounded up to a multiple of 32 MiB, at least 64.
    pub fn memory_mib(&self) -> u64 {
        (self.dirty_mib + 2 + 16).div_ceil(32).max(2) * 32
    }
}

/// The guest's `mode=dirty` settings that the measurement needs, read from a
/// command line (defaults as the guest's own: `dirty_mib=16`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyCmdline {
    /// The command line to boot, with `dirty_stamp_ms` added if it had none.
    pub cmdline: String,
    pub dirty_mib: u64,
    pub stamp_ms: u64,
}

impl DirtyCmdline {
    /// Fails unless the command line selects `mode=dirty`, its numbers parse,
    /// and the region fits in `memory_mib` (it starts at 2 MiB).
    pub fn parse(cmdline: &str, memory_mib: u64) -> anyhow::Result<Self> {
        let get = |key: &str| {
            cmdline.split_whitespace().filter_map(|t| t.split_once('=')).rfind(|(k, _)| *k == key)
        };
        let num = |key: &str, default: u64| -> anyhow::Result<u64> {
            match get(key) {
                None => Ok(default),
                Some((_, v)) => parse_guest_number(v)
                    .ok_or_else(|| anyhow::anyhow!("{key}={v:?} is not a decimal or 0x number")),
            }
        };
        if get("mode").map(|(_, v)| v) != Some("dirty") {
            anyhow::bail!("the guest command line {cmdline:?} must select mode=dirty");
        }
        let dirty_mib = num("dirty_mib", 16)?;
        if dirty_mib == 0 || dirty_mib + 2 > memory_mib {
            anyhow::bail!(
                "dirty_mib={dirty_mib} must be in 1..={} for memory_mib={memory_mib} (the region starts at 2 MiB)",
                memory_mib.saturating_sub(2)
            );
        }
        let stamp_ms = num("dirty_stamp_ms", 0)?;
        let (cmdline, stamp_ms) = if stamp_ms == 0 {
            let base = cmdline.split_whitespace().filter(|t| !t.starts_with("dirty_stamp_ms="));
            let mut c: Vec<&str> = base.collect();
            let stamp = format!("dirty_stamp_ms={DEFAULT_STAMP_MS}");
            c.push(&stamp);
            (c.join(" "), DEFAULT_STAMP_MS)
        } else {
            (cmdline.to_owned(), stamp_ms)
        };
        Ok(Self { cmdline, dirty_mib, stamp_ms })
    }
}

/// A number as the guest reads it: decimal or `0x` hex.
fn parse_guest_number(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gets_a_stamp_interval() {
        let c = DirtyCmdline::parse("mode=dirty dirty_mib=0x10 dirty_words=1", 64).unwrap();
        assert_eq!(c.dirty_mib, 16);
        assert_eq!(c.stamp_ms, DEFAULT_STAMP_MS);
        assert_eq!(
            c.cmdline,
            format!("mode=dirty dirty_mib=0x10 dirty_words=1 dirty_stamp_ms={DEFAULT_STAMP_MS}")
        );
        let c = DirtyCmdline::parse("mode=dirty dirty_stamp_ms=25", 64).unwrap();
        assert_eq!((c.dirty_mib, c.stamp_ms), (16, 25));
        assert_eq!(c.cmdline, "mode=dirty dirty_stamp_ms=25");
    }

    #[test]
    fn cmdline_refuses_what_cannot_run() {
        assert!(DirtyCmdline::parse("mode=boot", 64).is_err());
        assert!(DirtyCmdline::parse("dirty_mib=4", 64).is_err());
        let e = DirtyCmdline::parse("mode=dirty dirty_mib=63", 64).unwrap_err().to_string();
        assert!(e.contains("dirty_mib=63") && e.contains("1..=62"), "{e}");
        assert!(DirtyCmdline::parse("mode=dirty dirty_mib=x", 64).is_err());
    }

    #[test]
    fn profiles_fit_their_memory() {
        for p in PROFILES {
            let c = DirtyCmdline::parse(&p.cmdline(DEFAULT_STAMP_MS), p.memory_mib()).unwrap();
            assert_eq!(c.dirty_mib, p.dirty_mib);
            assert!(p.memory_mib() >= 64 && p.memory_mib() % 32 == 0);
        }
    }

    #[test]
    fn raw_line_has_every_figure() {
        let f = MigrationFigures {
            downtime_ms_host: 12.0,
            downtime_ms_serial: 15.5,
            downtime_ms_guest_tsc: None,
            total_ms: 300.0,
            bytes_sent: 1 << 20,
            passes: Some(3),
            dirty_rate_mib_s: 40.0,
        };
        assert_eq!(
            raw_line("qemu idle", &f),
            "raw qemu idle downtime_ms_host=12.0 downtime_ms_serial=15.5 downtime_ms_guest_tsc=n/a \
             total_ms=300.0 bytes_sent=1048576 passes=3 dirty_rate_mib_s=40.0"
        );
    }
}
