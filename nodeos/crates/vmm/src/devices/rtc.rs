//! The PC's CMOS real-time clock and NVRAM (an MC146818A) on ports 0x70/0x71, IRQ 8.
//!
//! The guest selects one of 128 bytes through the index port 0x70 (bit 7 is the
//! NMI mask: remembered, otherwise ignored) and reads or writes it through 0x71.
//! Accesses wider than a byte are taken byte by byte, port by port.
//!
//! # Time
//! There is no oscillator: the guest's time is the host's wall clock (UTC, a
//! [`HostClock`]) plus an offset the guest sets, so a set clock keeps running.
//! Setting follows the datasheet: while SET (register B bit 7) is 1 or the
//! divider is held in reset (register A bits 6..5 = 11) the time registers hold
//! whatever the guest writes; when both are released the written time becomes
//! current half a second before its next second boundary, because the chip rolls
//! over 500 ms after release and Linux (`rtc_cmos` set_offset_nsec) and
//! `hwclock -w` compensate for exactly that. A time register written while the
//! clock runs changes that field and keeps the sub-second phase.
//!
//! Values are BCD or binary (B bit 2) and 24- or 12-hour (B bit 1; bit 7 of the
//! hour is PM), as the mode is at the time of the access. The weekday (1 =
//! Sunday) is always derived from the date; the year is register 0x09 plus 100
//! times the century register 0x32. Values the guest writes out of range are
//! clamped when the time is committed (day 31 of a short month rolls over).
//! Daylight-saving (B bit 0) and the square-wave output are stored and ignored.
//! UIP (A bit 7) reads 1 during the 244 µs before each second boundary.
//!
//! # Interrupts
//! Register C has the update-ended (UF, each second boundary), alarm (AF, at a
//! boundary where seconds, minutes and hours equal the alarm registers
//! 0x01/0x03/0x05, any value 0xC0..=0xFF matching all) and periodic (PF, rate in
//! A bits 3..0) flags. They rise whatever B says; IRQF and the interrupt follow
//! only the ones enabled in B. The flags are brought up to date lazily on every
//! access, and by a timer thread that sleeps until the next enabled event; the
//! periodic rate is delivered at most at [`MAX_PERIODIC_HZ`] (faster rates are
//! slowed to it) so a guest cannot make the host spin. The line is an edge (an
//! irqfd), so it is pulsed for every event with its enable set, even when IRQF is
//! still set: a pulse the guest missed while the pin was masked is recovered at
//! the next event instead of stalling the guest's RTC forever. Reading C clears
//! it; flags that rise in that very read are handed over without a pulse.
//!
//! # Threads and ownership
//! [`Rtc`] is owned by the port I/O bus (and whoever keeps the handle from
//! [`attach`]). It shares its state with one thread, `rtc`, started only when
//! an interrupt line is given; the thread waits on a condition variable without
//! a timeout while no interrupt is enabled, and ends (joined) when the `Rtc` drops.
//! Lock order: the bus's mutex of the device, then the shared state; the thread
//! takes only the latter.
//!
//! # Saved state
//! [`RtcState`] is the 128 CMOS bytes (registers A–D with their flags, the
//! alarm, the time registers the guest may be holding, all NVRAM), the index
//! port, and the time as two instants: the guest's time and the source host's
//! wall clock when it was saved. A restore makes the guest's time the saved
//! one plus the destination's wall clock since `saved_at`, so the clock keeps
//! running through the migration's downtime as a battery-backed RTC would, the
//! sub-second phase included; this assumes the hosts' wall clocks agree (NTP),
//! and a skew between them shows as a step of that size. The seconds and the
//! periodic ticks the downtime covered are then caught up like a late tick of
//! the timer thread: one UF, AF if the alarm second is among the last eight
//! seconds, one PF; the periodic grid is re-derived from the host clock.
//!
//! # NVRAM at creation (the SeaBIOS/QEMU conventions)
//! | byte | meaning |
//! |------|---------|
//! | 0x0F | shutdown status: 0, a normal boot |
//! | 0x10 | floppy drive types: 0, none |
//! | 0x14 | equipment: 0x02, an FPU and nothing else (no floppy, no display adapter) |
//! | 0x15/0x16 | base memory in KiB: 640 |
//! | 0x17/0x18, 0x30/0x31 | memory from 1 MiB to 4 GiB in KiB, at most 0xFFFF |
//! | 0x2E/0x2F | checksum of 0x10..=0x2D, big-endian (Linux's `nvram` driver checks it) |
//! | 0x34/0x35 | memory from 16 MiB to 4 GiB in 64 KiB units, at most 0xFFFF |
//! | 0x5B..=0x5D | memory above 4 GiB in 64 KiB units, 24 bits |
//! | 0x5F | number of vCPUs minus one |
//!
//! Every other byte is general NVRAM the guest may read and write.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::bus::{Bus, BusDevice, BusError};
use super::interrupt::IrqLine;
use crate::state::StateError;

/// The index port; the data port follows it.
pub const RTC_PORT: u64 = 0x70;
/// Number of ports the RTC decodes.
pub const RTC_LEN: u64 = 2;
/// The legacy IRQ line of the RTC (IOAPIC pin / GSI 8).
pub const RTC_IRQ: u32 = 8;
/// Fastest periodic interrupt delivered; higher rates in register A are slowed to it.
pub const MAX_PERIODIC_HZ: u32 = 1024;
/// Most vCPUs the CPU-count byte (0x5F, count minus one) can describe.
pub const MAX_VCPUS: u32 = 256;

const NS: i128 = 1_000_000_000;
/// How long UIP reads 1 before a second boundary (the MC146818A's t_BUC).
const UIP_NS: i128 = 244_000;
/// Bounds on one sleep of the timer thread: never a spin, and a host clock step
/// is noticed within a second.
const MIN_WAIT_NS: i128 = 20_000;
const MAX_WAIT_NS: i128 = NS;
/// Second boundaries a late tick still compares with the alarm.
const ALARM_LOOKBACK: i64 = 8;
const FOUR_GIB: u64 = 1 << 32;
/// Bytes of CMOS RAM, registers included.
const CMOS_SIZE: usize = 128;
/// Range of a saved time: 0000-01-01 to 10100-01-01, what the guest can set
/// (years up to 9999) plus a century of running; any real host clock too.
const MIN_SAVED_SECS: i64 = -62_167_219_200;
const MAX_SAVED_SECS: i64 = 256_558_060_800;

const REG_SEC: u8 = 0x00;
const REG_SEC_ALARM: u8 = 0x01;
const REG_MIN: u8 = 0x02;
const REG_MIN_ALARM: u8 = 0x03;
const REG_HOUR: u8 = 0x04;
const REG_HOUR_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// The registers that hold the time while the clock is held.
const TIME_REGS: [u8; 8] =
    [REG_SEC, REG_MIN, REG_HOUR, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY];

const A_UIP: u8 = 0x80;
/// Divider bits 6..5 both set: the divider chain is in reset and the clock stops.
const A_DIVIDER_RESET: u8 = 0x60;
const A_RATE: u8 = 0x0f;
/// 32.768 kHz time base, 1024 Hz periodic rate: what the chip and Linux use.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// 24-hour BCD, no interrupts: Linux refuses a 12-hour RTC and always assumes BCD on x86.
const B_DEFAULT: u8 = B_24H;
const C_IRQF: u8 = 0x80;
/// PF, AF and UF sit at the bit positions of their enables PIE, AIE and UIE.
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const C_EVENTS: u8 = C_PF | C_AF | C_UF;
/// Valid RAM and time: the battery is fine (bit 6 must read 0 too, Linux checks).
const D_VRT: u8 = 0x80;
const ALARM_DONT_CARE: u8 = 0xc0;
const HOUR_PM: u8 = 0x80;

const NV_SHUTDOWN: usize = 0x0f;
const NV_FLOPPY: usize = 0x10;
const NV_EQUIPMENT: usize = 0x14;
const NV_BASE_MEM: usize = 0x15;
const NV_EXT_MEM: usize = 0x17;
const NV_CHECKSUM: usize = 0x2e;
const NV_CHECKSUM_RANGE: std::ops::RangeInclusive<usize> = 0x10..=0x2d;
const NV_EXT_MEM_COPY: usize = 0x30;
const NV_MEM_ABOVE_16M: usize = 0x34;
const NV_MEM_ABOVE_4G: usize = 0x5b;
const NV_CPUS: usize = 0x5f;
const EQUIPMENT_FPU: u8 = 0x02;
const BASE_MEM_KIB: u16 = 640;

#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("vcpus {0} is outside 1..={MAX_VCPUS}")]
    Vcpus(u32),
    #[error("low_ram_bytes {0:#x} is above 4 GiB (RAM above 4 GiB goes in high_ram_bytes)")]
    LowRam(u64),
    #[error("cannot start the RTC timer thread")]
    TimerThread(#[source] std::io::Error),
}

/// What the NVRAM tells the guest about the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcConfig {
    /// Guest RAM below 4 GiB, in bytes (at most 4 GiB).
    pub low_ram_bytes: u64,
    /// Guest RAM from 4 GiB up, in bytes.
    pub high_ram_bytes: u64,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u32,
}

impl RtcConfig {
    /// The split [`crate::memory::ram_ranges`] makes of `memory_mib`: low RAM up
    /// to the 32-bit MMIO window, the rest above 4 GiB.
    pub fn from_memory_mib(memory_mib: u64, vcpus: u32) -> Self {
        let bytes = memory_mib.saturating_mul(1 << 20);
        let low = bytes.min(crate::memory::MMIO32_START);
        Self { low_ram_bytes: low, high_ram_bytes: bytes - low, vcpus }
    }

    /// The 128 bytes the guest finds at power-on, time registers aside.
    fn nvram(&self) -> Result<[u8; CMOS_SIZE], RtcError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(RtcError::Vcpus(self.vcpus));
        }
        if self.low_ram_bytes > FOUR_GIB {
            return Err(RtcError::LowRam(self.low_ram_bytes));
        }
        let mut nv = [0u8; CMOS_SIZE];
        nv[NV_SHUTDOWN] = 0;
        nv[NV_FLOPPY] = 0;
        nv[NV_EQUIPMENT] = EQUIPMENT_FPU;
        nv[NV_BASE_MEM..NV_BASE_MEM + 2].copy_from_slice(&BASE_MEM_KIB.to_le_bytes());
        let ext_kib = (self.low_ram_bytes / 1024).saturating_sub(1024).min(0xffff) as u16;
        nv[NV_EXT_MEM..NV_EXT_MEM + 2].copy_from_slice(&ext_kib.to_le_bytes());
        nv[NV_EXT_MEM_COPY..NV_EXT_MEM_COPY + 2].copy_from_slice(&ext_kib.to_le_bytes());
        let above_16m = (self.low_ram_bytes.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        nv[NV_MEM_ABOVE_16M..NV_MEM_ABOVE_16M + 2].copy_from_slice(&above_16m.to_le_bytes());
        let above_4g = (self.high_ram_bytes >> 16).min(0xff_ffff) as u32;
        nv[NV_MEM_ABOVE_4G..NV_MEM_ABOVE_4G + 3].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        nv[NV_CPUS] = (self.vcpus - 1) as u8;
        let sum = nv[NV_CHECKSUM_RANGE].iter().map(|&b| u16::from(b)).sum::<u16>();
        nv[NV_CHECKSUM..NV_CHECKSUM + 2].copy_from_slice(&sum.to_be_bytes());
        Ok(nv)
    }
}

/// Where the RTC reads the host's time of day.
///
/// Contract: UTC, nanoseconds since the Unix epoch, cheap to call (once per
/// guest access). It may step either way (the host's NTP): the RTC then skips
/// the events in between rather than replaying them.
pub trait HostClock: Send + Sync {
    fn now_ns(&self) -> i128;
}

/// The host's wall clock, [`SystemTime`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl HostClock for SystemClock {
    fn now_ns(&self) -> i128 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
            Err(before) => -i128::try_from(before.duration().as_nanos()).unwrap_or(i128::MAX),
        }
    }
}

/// Whole seconds of a nanosecond time, saturating far outside any real clock.
fn secs_of(ns: i128) -> i64 {
    let s = ns.div_euclid(NS);
    i64::try_from(s).unwrap_or(if s < 0 { i64::MIN } else { i64::MAX })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` after 1970-01-01: (year, month 1..=12, day 1..=31).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let rem = secs.rem_euclid(86_400);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)
    }

    /// 1 = Sunday .. 7 = Saturday; 1970-01-01 was a Thursday.
    fn weekday(self) -> u8 {
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u8 + 1
    }
}

fn bin_to_bcd(v: u8) -> u8 {
    let v = v % 100;
    ((v / 10) << 4) | (v % 10)
}

/// Any byte decodes: invalid BCD digits give values above 99, clamped by the caller.
fn bcd_to_bin(r: u8) -> u8 {
    (r >> 4) * 10 + (r & 0x0f)
}

/// The chip's registers and the clock's offset: everything but I/O, driven by
/// the host time passed in, so the tests can step time.
struct State {
    cmos: [u8; CMOS_SIZE],
    index: u8,
    nmi_disabled: bool,
    /// Guest time = host time + offset, in nanoseconds.
    offset_ns: i128,
    /// SET or divider reset: the time registers in `cmos` are the guest's time.
    held: bool,
    /// Host time of the last tick, for the periodic grid.
    last_host_ns: i128,
    /// Guest time of the last tick, for second boundaries.
    last_guest_ns: i128,
    /// Asks the timer thread to end.
    stop: bool,
}

impl State {
    fn new(nvram: [u8; CMOS_SIZE], now: i128) -> Self {
        let mut cmos = nvram;
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_DEFAULT;
        cmos[usize::from(REG_C)] = 0;
        cmos[usize::from(REG_D)] = D_VRT;
        Self {
            cmos,
            index: 0,
            nmi_disabled: false,
            offset_ns: 0,
            held: false,
            last_host_ns: now,
            last_guest_ns: now,
            stop: false,
        }
    }

    fn reg(&self, r: u8) -> u8 {
        self.cmos[usize::from(r & 0x7f)]
    }

    fn set_reg(&mut self, r: u8, v: u8) {
        self.cmos[usize::from(r & 0x7f)] = v;
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_BINARY != 0
    }

    fn bin_or_bcd(&self, v: u8) -> u8 {
        if self.binary() { v } else { bin_to_bcd(v) }
    }

    fn value_of(&self, r: u8) -> u8 {
        if self.binary() { r } else { bcd_to_bin(r) }
    }

    /// Register `reg` of time `t` in the current mode.
    fn encode(&self, t: &DateTime, reg: u8) -> u8 {
        match reg {
            REG_SEC => self.bin_or_bcd(t.second),
            REG_MIN => self.bin_or_bcd(t.minute),
            REG_HOUR if self.reg(REG_B) & B_24H != 0 => self.bin_or_bcd(t.hour),
            REG_HOUR => {
                let h12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
                self.bin_or_bcd(h12) | if t.hour >= 12 { HOUR_PM } else { 0 }
            }
            REG_WEEKDAY => self.bin_or_bcd(t.weekday()),
            REG_DAY => self.bin_or_bcd(t.day),
            REG_MONTH => self.bin_or_bcd(t.month),
            REG_YEAR => self.bin_or_bcd(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.bin_or_bcd(t.year.div_euclid(100).rem_euclid(100) as u8),
            _ => 0,
        }
    }

    /// The time the time registers hold, clamped into range (the weekday is ignored).
    fn time_from_regs(&self) -> DateTime {
        let raw_hour = self.reg(REG_HOUR);
        let hour = if self.reg(REG_B) & B_24H != 0 {
            self.value_of(raw_hour).min(23)
        } else {
            let h12 = self.value_of(raw_hour & !HOUR_PM).clamp(1, 12);
            h12 % 12 + if raw_hour & HOUR_PM != 0 { 12 } else { 0 }
        };
        let century = i64::from(self.value_of(self.reg(REG_CENTURY)).min(99));
        let year = i64::from(self.value_of(self.reg(REG_YEAR)).min(99));
        DateTime {
            year: century * 100 + year,
            month: self.value_of(self.reg(REG_MONTH)).clamp(1, 12),
            day: self.value_of(self.reg(REG_DAY)).clamp(1, 31),
            hour,
            minute: self.value_of(self.reg(REG_MIN)).min(59),
            second: self.value_of(self.reg(REG_SEC)).min(59),
        }
    }

    fn guest_ns(&self, now: i128) -> i128 {
        now.saturating_add(self.offset_ns)
    }

    /// The guest's time as it reads it.
    fn time(&self, now: i128) -> DateTime {
        if self.held { self.time_from_regs() } else { DateTime::from_unix(secs_of(self.guest_ns(now))) }
    }

    /// Makes `guest_ns` the guest's time now, without an update event for the jump.
    fn set_guest(&mut self, now: i128, guest_ns: i128) {
        self.offset_ns = guest_ns.saturating_sub(now);
        self.last_guest_ns = guest_ns;
    }

    fn uip(&self, now: i128) -> bool {
        !self.held && self.guest_ns(now).rem_euclid(NS) >= NS - UIP_NS
    }

    /// The delivered periodic interval, if the rate and divider make one.
    fn period_ns(&self) -> Option<i128> {
        let a = self.reg(REG_A);
        if a & A_DIVIDER_RESET == A_DIVIDER_RESET {
            return None;
        }
        let hz: u32 = match a & A_RATE {
            0 => return None,
            // Rates 1 and 2 do not follow the formula (datasheet table 4).
            1 => 256,
            2 => 128,
            rate => 32_768 >> (rate - 1),
        };
        Some(NS / i128::from(hz.min(MAX_PERIODIC_HZ)))
    }

    /// SET or the divider reset asks the clock to stand still.
    fn wants_hold(&self) -> bool {
        self.reg(REG_B) & B_SET != 0 || self.reg(REG_A) & A_DIVIDER_RESET == A_DIVIDER_RESET
    }

    /// Freezes or commits the clock when SET or the divider reset changed.
    fn update_hold(&mut self, now: i128) {
        let want = self.wants_hold();
        if want && !self.held {
            let t = self.time(now);
            for r in TIME_REGS {
                self.set_reg(r, self.encode(&t, r));
            }
            self.held = true;
        } else if !want && self.held {
            self.held = false;
            let t = self.time_from_regs();
            // The first update comes 500 ms after release.
            self.set_guest(now, i128::from(t.to_unix()) * NS + NS / 2);
        }
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = DateTime::from_unix(secs);
        [(REG_SEC_ALARM, REG_SEC), (REG_MIN_ALARM, REG_MIN), (REG_HOUR_ALARM, REG_HOUR)].into_iter().all(
            |(alarm, reg)| {
                let want = self.reg(alarm);
                want >= ALARM_DONT_CARE || want == self.encode(&t, reg)
            },
        )
    }

    /// Raises the flags of the events between the last tick and `now`.
    /// True when one of them is enabled: the line should be pulsed.
    fn tick(&mut self, now: i128) -> bool {
        let mut events = 0;
        if now > self.last_host_ns
            && let Some(p) = self.period_ns()
            && now.div_euclid(p) > self.last_host_ns.div_euclid(p)
        {
            events |= C_PF;
        }
        self.last_host_ns = now;
        if !self.held {
            let guest = self.guest_ns(now);
            let (from, to) = (secs_of(self.last_guest_ns), secs_of(guest));
            if to > from {
                events |= C_UF;
                let first = from.saturating_add(1).max(to.saturating_sub(ALARM_LOOKBACK - 1));
                if (first..=to).any(|s| self.alarm_matches(s)) {
                    events |= C_AF;
                }
            }
            self.last_guest_ns = guest;
        }
        let c = self.reg(REG_C) | events;
        let enabled = events & self.reg(REG_B) & C_EVENTS;
        self.set_reg(REG_C, if enabled != 0 { c | C_IRQF } else { c });
        enabled != 0
    }

    /// Host time of the next event the guest enabled, if any.
    fn next_event(&self, now: i128) -> Option<i128> {
        let b = self.reg(REG_B);
        let second = (b & (B_UIE | B_AIE) != 0 && !self.held).then(|| {
            let boundary = (self.guest_ns(now).div_euclid(NS) + 1) * NS;
            boundary - self.offset_ns
        });
        let periodic =
            if b & B_PIE != 0 { self.period_ns().map(|p| (now.div_euclid(p) + 1) * p) } else { None };
        match (second, periodic) {
            (Some(s), Some(p)) => Some(s.min(p)),
            (s, p) => s.or(p),
        }
    }

    fn select(&mut self, v: u8) {
        self.index = v & 0x7f;
        self.nmi_disabled = v & 0x80 != 0;
    }

    /// A read of the data port; the bool asks for a pulse.
    fn read_data(&mut self, now: i128) -> (u8, bool) {
        // Flags rising in a read of C are handed over by the read itself.
        let pulse = self.tick(now) && self.index != REG_C;
        let v = match self.index {
            REG_A => self.reg(REG_A) & !A_UIP | if self.uip(now) { A_UIP } else { 0 },
            REG_C => {
                let c = self.reg(REG_C);
                self.set_reg(REG_C, 0);
                c
            }
            REG_D => D_VRT,
            r if TIME_REGS.contains(&r) && !self.held => self.encode(&self.time(now), r),
            r => self.reg(r),
        };
        (v, pulse)
    }

    /// A write to the data port; true asks for a pulse.
    fn write_data(&mut self, now: i128, v: u8) -> bool {
        let mut pulse = self.tick(now);
        match self.index {
            REG_A => {
                self.set_reg(REG_A, v & !A_UIP);
                self.update_hold(now);
            }
            REG_B => {
                // The chip clears UIE when SET goes high.
                let v = if v & B_SET != 0 { v & !B_UIE } else { v };
                self.set_reg(REG_B, v);
                self.update_hold(now);
                let c = self.reg(REG_C);
                let pending = c & v & C_EVENTS != 0;
                pulse |= pending && c & C_IRQF == 0;
                self.set_reg(REG_C, if pending { c | C_IRQF } else { c & !C_IRQF });
            }
            REG_C | REG_D => {}
            r if TIME_REGS.contains(&r) && self.held => self.set_reg(r, v),
            r if TIME_REGS.contains(&r) => {
                let t = self.time(now);
                for tr in TIME_REGS {
                    self.set_reg(tr, self.encode(&t, tr));
                }
                self.set_reg(r, v);
                let phase = self.guest_ns(now).rem_euclid(NS);
                let t = self.time_from_regs();
                self.set_guest(now, i128::from(t.to_unix()) * NS + phase);
            }
            r => self.set_reg(r, v),
        }
        pulse
    }
}

/// What the device and its timer thread share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when a register write may change the next event, and on stop.
    wake: Condvar,
    clock: Arc<dyn HostClock>,
    irq: Option<Arc<dyn IrqLine>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pulse(&self) {
        if let Some(irq) = &self.irq
            && let Err(e) = irq.trigger()
        {
            // A lost tick is not the guest's fault and must not stop it.
            tracing::debug!(error = %e, "cannot raise the RTC interrupt");
        }
    }

    /// Brings the flags up to the clock, pulsing the line for enabled events.
    #[cfg(test)]
    fn tick(&self) {
        let now = self.clock.now_ns();
        if self.lock().tick(now) {
            self.pulse();
        }
    }
}

/// The timer thread: delivers enabled events on time, idles while none is enabled.
fn run_timer(shared: &Shared) {
    let mut st = shared.lock();
    while !st.stop {
        let now = shared.clock.now_ns();
        if st.tick(now) {
            shared.pulse();
        }
        st = match st.next_event(now) {
            None => shared.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            Some(at) => {
                let ns = (at - now).clamp(MIN_WAIT_NS, MAX_WAIT_NS) as u64;
                match shared.wake.wait_timeout(st, Duration::from_nanos(ns)) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                }
            }
        };
    }
}

/// An instant as seconds and nanoseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnixTime {
    pub secs: i64,
    /// 0..1_000_000_000.
    pub nanos: u32,
}

impl UnixTime {
    fn from_ns(ns: i128) -> Self {
        Self { secs: secs_of(ns), nanos: ns.rem_euclid(NS) as u32 }
    }

    fn ns(self) -> i128 {
        i128::from(self.secs) * NS + i128::from(self.nanos)
    }

    fn check(self, field: &str) -> Result<(), StateError> {
        if i128::from(self.nanos) >= NS {
            return Err(StateError::new("rtc", format!("{field}.nanos {} is outside 0..1e9", self.nanos)));
        }
        if !(MIN_SAVED_SECS..=MAX_SAVED_SECS).contains(&self.secs) {
            return Err(StateError::new(
                "rtc",
                format!("{field}.secs {} is outside {MIN_SAVED_SECS}..={MAX_SAVED_SECS}", self.secs),
            ));
        }
        Ok(())
    }
}

/// The RTC as saved by [`Rtc::save`]. The host clock, the interrupt line and
/// the timer thread are the destination's own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    /// All 128 CMOS bytes: the time registers (the guest's time while it holds
    /// the clock with SET or a divider reset, stale otherwise), the alarm,
    /// registers A (UIP never stored), B, C (the pending flags and IRQF) and
    /// D, and the NVRAM.
    pub cmos: Vec<u8>,
    /// The register the index port selects, 0..=0x7F.
    pub index: u8,
    /// Bit 7 of the last index write.
    pub nmi_disabled: bool,
    /// The guest's time at `saved_at` (while the clock is held, the time it
    /// would have had; the registers rule).
    pub guest_time: UnixTime,
    /// The source host's wall clock when the state was saved; the flags in
    /// C are up to date to that instant.
    pub saved_at: UnixTime,
}

impl RtcState {
    /// Refuses what this chip could never have been in. Checked in full
    /// before a restore touches anything.
    fn check(&self) -> Result<(), StateError> {
        let err = |reason: String| Err(StateError::new("rtc", reason));
        if self.cmos.len() != CMOS_SIZE {
            return err(format!("cmos holds {} bytes, the chip has {CMOS_SIZE}", self.cmos.len()));
        }
        if self.index > 0x7f {
            return err(format!("index {:#04x} is outside 0..=0x7f", self.index));
        }
        let reg = |r: u8| self.cmos[usize::from(r)];
        let (a, b, c, d) = (reg(REG_A), reg(REG_B), reg(REG_C), reg(REG_D));
        if a & A_UIP != 0 {
            return err(format!("register A {a:#04x} stores UIP, which is only ever computed"));
        }
        if b & B_SET != 0 && b & B_UIE != 0 {
            return err(format!("register B {b:#04x} has UIE with SET, which clears it"));
        }
        if c & !(C_IRQF | C_EVENTS) != 0 {
            return err(format!("register C {c:#04x} has bits outside {:#04x}", C_IRQF | C_EVENTS));
        }
        // IRQF is exactly "a flag is up and enabled".
        if (c & C_IRQF != 0) != (c & b & C_EVENTS != 0) {
            return err(format!("register C {c:#04x} IRQF disagrees with its flags enabled in B {b:#04x}"));
        }
        if d != D_VRT {
            return err(format!("register D {d:#04x}, the chip has {D_VRT:#04x}"));
        }
        self.guest_time.check("guest_time")?;
        self.saved_at.check("saved_at")
    }
}

/// The RTC as the worker builds it: put it on the port I/O bus at [`RTC_PORT`]
/// (see [`attach`]).
pub struct Rtc {
    shared: Arc<Shared>,
    /// The timer thread, when there is an interrupt line; joined on drop.
    timer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Rtc")
            .field("offset_ns", &st.offset_ns)
            .field("held", &st.held)
            .field("timer", &self.timer.is_some())
            .finish()
    }
}

impl Rtc {
    /// An RTC on the host's wall clock; `irq` is GSI [`RTC_IRQ`] (without it the
    /// flags still work, polled, and no thread is started).
    pub fn new(cfg: RtcConfig, irq: Option<Arc<dyn IrqLine>>) -> Result<Self, RtcError> {
        Self::with_clock(cfg, irq, Arc::new(SystemClock))
    }

    /// An RTC reading the host's time from `clock`.
    pub fn with_clock(
        cfg: RtcConfig,
        irq: Option<Arc<dyn IrqLine>>,
        clock: Arc<dyn HostClock>,
    ) -> Result<Self, RtcError> {
        let mut rtc = Self::without_timer(cfg, irq, clock)?;
        if rtc.shared.irq.is_some() {
            let shared = rtc.shared.clone();
            let thread = std::thread::Builder::new()
                .name("rtc".into())
                .spawn(move || run_timer(&shared))
                .map_err(RtcError::TimerThread)?;
            rtc.timer = Some(thread);
        }
        Ok(rtc)
    }

    /// The device with no timer thread: events are only noticed on access (or
    /// by the tests' explicit ticks).
    fn without_timer(
        cfg: RtcConfig,
        irq: Option<Arc<dyn IrqLine>>,
        clock: Arc<dyn HostClock>,
    ) -> Result<Self, RtcError> {
        let state = State::new(cfg.nvram()?, clock.now_ns());
        let shared = Arc::new(Shared { state: Mutex::new(state), wake: Condvar::new(), clock, irq });
        Ok(Self { shared, timer: None })
    }

    /// The guest's time now as (year, month, day, hour, minute, second); while
    /// the guest holds the clock, what it has written so far.
    pub fn guest_time(&self) -> (i64, u8, u8, u8, u8, u8) {
        let now = self.shared.clock.now_ns();
        let t = self.shared.lock().time(now);
        (t.year, t.month, t.day, t.hour, t.minute, t.second)
    }

    /// The chip's state. Brings the flags up to date first, as any access does
    /// (which pulses the line for events enabled and due, as the timer thread
    /// would).
    pub fn save(&self) -> RtcState {
        let now = self.shared.clock.now_ns();
        let (state, pulse) = {
            let mut st = self.shared.lock();
            let pulse = st.tick(now);
            let state = RtcState {
                cmos: st.cmos.to_vec(),
                index: st.index,
                nmi_disabled: st.nmi_disabled,
                guest_time: UnixTime::from_ns(st.guest_ns(now)),
                saved_at: UnixTime::from_ns(now),
            };
            (state, pulse)
        };
        if pulse {
            self.shared.pulse();
        }
        state
    }

    /// Loads `state`, keeping this RTC's host clock, interrupt line and timer
    /// thread. The guest's time continues from the saved one by the host wall
    /// clock (see the module's "Saved state"). A pending enabled flag (IRQF)
    /// pulses the line: on the chip IRQ stays asserted until C is read, and
    /// our edge line would otherwise never tell the guest. On error the RTC
    /// is unchanged.
    pub fn restore(&mut self, state: RtcState) -> Result<(), StateError> {
        state.check()?;
        let cmos = <[u8; CMOS_SIZE]>::try_from(state.cmos.as_slice())
            .map_err(|_| StateError::new("rtc", "cmos: wrong length"))?;
        let pulse = {
            let mut st = self.shared.lock();
            st.cmos = cmos;
            st.index = state.index;
            st.nmi_disabled = state.nmi_disabled;
            st.held = st.wants_hold();
            let (guest, saved_at) = (state.guest_time.ns(), state.saved_at.ns());
            st.offset_ns = guest - saved_at;
            // The next tick sees the time since `saved_at` as one late tick.
            st.last_guest_ns = guest;
            st.last_host_ns = saved_at;
            st.reg(REG_C) & C_IRQF != 0
        };
        // The enables and the time moved: the timer thread recomputes its wait.
        self.shared.wake.notify_all();
        if pulse {
            self.shared.pulse();
        }
        Ok(())
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI disable) set.
    pub fn nmi_disabled(&self) -> bool {
        self.shared.lock().nmi_disabled
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.shared.clock.now_ns();
        let mut pulse = false;
        {
            let mut st = self.shared.lock();
            for (i, b) in data.iter_mut().enumerate() {
                *b = match offset.saturating_add(i as u64) {
                    // The index port is write-only; an empty bus reads all ones.
                    1 => {
                        let (v, p) = st.read_data(now);
                        pulse |= p;
                        v
                    }
                    _ => 0xff,
                };
            }
        }
        if pulse {
            self.shared.pulse();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.shared.clock.now_ns();
        let (mut pulse, mut wrote) = (false, false);
        {
            let mut st = self.shared.lock();
            for (i, &b) in data.iter().enumerate() {
                match offset.saturating_add(i as u64) {
                    0 => st.select(b),
                    1 => {
                        pulse |= st.write_data(now, b);
                        wrote = true;
                    }
                    _ => {}
                }
            }
        }
        if wrote {
            // The enables, the rate or the time may have moved the next event.
            self.shared.wake.notify_all();
        }
        if pulse {
            self.shared.pulse();
        }
    }
}

impl Drop for Rtc {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.timer.take()
            && thread.join().is_err()
        {
            tracing::warn!("the RTC timer thread panicked");
        }
    }
}

/// Puts `rtc` on the port I/O bus at [`RTC_PORT`]. The returned handle keeps
/// the device (and its thread) alive as long as the bus does.
pub fn attach(pio: &Bus, rtc: Rtc) -> Result<Arc<Mutex<Rtc>>, BusError> {
    let rtc = Arc::new(Mutex::new(rtc));
    pio.insert(rtc.clone(), RTC_PORT, RTC_LEN)?;
    Ok(rtc)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::interrupt::InterruptError;
    use super::super::testing::wait_until;
    use super::*;

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);

    impl CountingIrq {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl IrqLine for CountingIrq {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A host clock the test steps by hand.
    struct FakeClock(Mutex<i128>);

    impl FakeClock {
        fn at(secs: i64, nanos: i128) -> Arc<Self> {
            Arc::new(Self(Mutex::new(i128::from(secs) * NS + nanos)))
        }
        fn set(&self, secs: i64, nanos: i128) {
            *self.0.lock().unwrap() = i128::from(secs) * NS + nanos;
        }
        fn advance_ns(&self, ns: i128) {
            *self.0.lock().unwrap() += ns;
        }
    }

    impl HostClock for FakeClock {
        fn now_ns(&self) -> i128 {
            *self.0.lock().unwrap()
        }
    }

    /// 2023-11-14 22:13:20 UTC, a Tuesday.
    const T0: i64 = 1_700_000_000;
    const SMALL: RtcConfig = RtcConfig { low_ram_bytes: 256 << 20, high_ram_bytes: 0, vcpus: 1 };

    fn rtc_at(secs: i64, nanos: i128) -> (Rtc, Arc<FakeClock>, Arc<CountingIrq>) {
        let clock = FakeClock::at(secs, nanos);
        let irq = Arc::new(CountingIrq::default());
        let rtc = Rtc::without_timer(SMALL, Some(irq.clone()), clock.clone()).unwrap();
        (rtc, clock, irq)
    }

    fn rd(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    fn wr(rtc: &mut Rtc, reg: u8, v: u8) {
        rtc.write(0, &[reg]);
        rtc.write(1, &[v]);
    }

    /// (sec, min, hour, weekday, day, month, year, century) as the guest reads them.
    fn regs(rtc: &mut Rtc) -> [u8; 8] {
        TIME_REGS.map(|r| rd(rtc, r))
    }

    #[test]
    fn reads_the_host_time_in_bcd_by_default() {
        let (mut rtc, _, _) = rtc_at(T0, 0);
        assert_eq!(rd(&mut rtc, REG_A), 0x26);
        assert_eq!(rd(&mut rtc, REG_B), 0x02);
        assert_eq!(rd(&mut rtc, REG_D), 0x80);
        assert_eq!(regs(&mut rtc), [0x20, 0x13, 0x22, 3, 0x14, 0x11, 0x23, 0x20]);
        assert_eq!(rtc.guest_time(), (2023, 11, 14, 22, 13, 20));
    }

    #[test]
    fn binary_mode_reads_binary() {
        let (mut rtc, _, _) = rtc_at(T0, 0);
        wr(&mut rtc, REG_B, B_24H | B_BINARY);
        assert_eq!(regs(&mut rtc), [20, 13, 22, 3, 14, 11, 23, 20]);
    }

    #[test]
    fn twelve_hour_mode_marks_pm_in_bit_7() {
        // 2000-02-29 00:00:00 is 12 AM; then noon, then 23:00 (11 PM).
        let (mut rtc, clock, _) = rtc_at(951_782_400, 0);
        wr(&mut rtc, REG_B, 0);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x12);
        clock.set(951_782_400 + 12 * 3600, 0);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x92);
        clock.set(951_782_400 + 23 * 3600, 0);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x91);
        wr(&mut rtc, REG_B, B_BINARY);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x8b);
        // Writing 7 PM in 12-hour binary sets 19:00.
        wr(&mut rtc, REG_HOUR, 0x87);
        assert_eq!(rtc.guest_time().3, 19);
        wr(&mut rtc, REG_B, B_24H);
        assert_eq!(rd(&mut rtc, REG_HOUR), 0x19);
    }

    #[test]
    fn weekday_follows_the_date() {
        for (secs, weekday) in [(0, 5), (951_782_400, 3), (1_000_000_000, 1), (4_102_444_799, 5)] {
            let (mut rtc, _, _) = rtc_at(secs, 0);
            assert_eq!(rd(&mut rtc, REG_WEEKDAY), weekday, "at {secs}");
        }
    }

    #[test]
    fn civil_date_conversion_round_trips() {
        // Every day across four centuries, with leap years and 2000/2100.
        let start = days_from_civil(1900, 1, 1);
        let mut prev = civil_from_days(start - 1);
        assert_eq!(prev, (1899, 12, 31));
        for days in start..start + 146_097 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            let next_day = (y, m, d) == (prev.0, prev.1, prev.2 + 1);
            let next_month = d == 1 && (y, m) == (prev.0, prev.1 + 1);
            let next_year = (m, d) == (1, 1) && y == prev.0 + 1;
            assert!(next_day || next_month || next_year, "{prev:?} -> {:?}", (y, m, d));
            prev = (y, m, d);
        }
        assert_eq!(civil_from_days(days_from_civil(2100, 2, 28) + 1), (2100, 3, 1));
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 28) + 1), (2000, 2, 29));
    }

    /// What Linux's mc146818_set_time does (Intel flavour, with divider reset).
    fn linux_set_time(rtc: &mut Rtc, t: [u8; 6]) {
        let b = rd(rtc, REG_B);
        wr(rtc, REG_B, b | B_SET);
        let a = rd(rtc, REG_A);
        wr(rtc, REG_A, a | 0x70);
        for (reg, v) in [REG_YEAR, REG_MONTH, REG_DAY, REG_HOUR, REG_MIN, REG_SEC].into_iter().zip(t) {
            wr(rtc, reg, v);
        }
        wr(rtc, REG_B, b);
        wr(rtc, REG_A, a);
    }

    #[test]
    fn a_set_time_becomes_current_half_a_second_before_its_next_second() {
        let (mut rtc, clock, _) = rtc_at(T0, 123_000_000);
        // 2031-05-17 13:45:10.
        linux_set_time(&mut rtc, [0x31, 0x05, 0x17, 0x13, 0x45, 0x10]);
        assert_eq!(rtc.guest_time(), (2031, 5, 17, 13, 45, 10));
        assert_eq!(rd(&mut rtc, REG_WEEKDAY), 7, "a Saturday");
        clock.advance_ns(499_000_000);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x10);
        clock.advance_ns(2_000_000);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x11);
        // It keeps running with the host clock.
        clock.advance_ns(3600 * NS);
        assert_eq!(rtc.guest_time(), (2031, 5, 17, 14, 45, 11));
    }

    #[test]
    fn the_clock_stands_still_while_held() {
        let (mut rtc, clock, _) = rtc_at(T0, 0);
        wr(&mut rtc, REG_B, B_24H | B_SET);
        clock.advance_ns(5 * NS);
        assert_eq!(rd(&mut rtc, REG_SEC), 0x20, "frozen at the time SET rose");
        wr(&mut rtc, REG_MIN, 0x59);
        assert_eq!(rd(&mut rtc, REG_MIN), 0x59);
        // SET alone (AMD flavour) is enough; releasing SET keeps a divider reset holding.
        wr(&mut rtc, REG_A, 0x76);
        wr(&mut rtc, REG_B, B_24H);
        clock.advance_ns(5 * NS);
        assert_eq!(rtc.guest_time(), (2023, 11, 14, 22, 59, 20));
        wr(&mut rtc, REG_A, 0x26);
        clock.advance_ns(NS);
        assert_eq!(rtc.guest_time(), (2023, 11, 14, 22, 59, 21));
    }

    #[test]
    fn a_time_register_written_while_running_keeps_the_phase() {
        let (mut rtc, clock, _) = rtc_at(T0, 900_000_000);
        wr(&mut rtc, REG_MIN, 0x42);
        assert_eq!(rtc.guest_time(), (2023, 11, 14, 22, 42, 20));
        clock.advance_ns(150_000_000);
        assert_eq!(rtc.guest_time(), (2023, 11, 14, 22, 42, 21));
    }

    #[test]
    fn century_register_rolls_over_and_is_honoured_when_written() {
        let (mut rtc, clock, _) = rtc_at(4_102_444_799, 600_000_000);
        assert_eq!(rd(&mut rtc, REG_CENTURY), 0x20);
        clock.advance_ns(500_000_000);
        assert_eq!(rtc.guest_time(), (2100, 1, 1, 0, 0, 0));
        assert_eq!((rd(&mut rtc, REG_YEAR), rd(&mut rtc, REG_CENTURY)), (0x00, 0x21));
        wr(&mut rtc, REG_B, B_24H | B_SET);
        wr(&mut rtc, REG_CENTURY, 0x19);
        wr(&mut rtc, REG_YEAR, 0x99);
        wr(&mut rtc, REG_B, B_24H);
        assert_eq!(rtc.guest_time(), (1999, 1, 1, 0, 0, 0));
    }

    #[test]
    fn nvram_describes_memory_and_cpus() {
        let nv = SMALL.nvram().unwrap();
        assert_eq!(nv[0x0f], 0);
        assert_eq!(nv[0x10], 0);
        assert_eq!(nv[0x14], 0x02);
        assert_eq!(nv[0x15..=0x18], [0x80, 0x02, 0xff, 0xff]);
        assert_eq!(nv[0x30..=0x31], [0xff, 0xff]);
        // (256 - 16) MiB in 64 KiB units = 3840.
        assert_eq!(nv[0x34..=0x35], [0x00, 0x0f]);
        assert_eq!(nv[0x5b..=0x5d], [0, 0, 0]);
        assert_eq!(nv[0x5f], 0);
        let sum: u16 = nv[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
        assert_eq!(u16::from_be_bytes([nv[0x2e], nv[0x2f]]), sum);
        assert_eq!(sum, 0x02 + 0x80 + 0x02 + 0xff + 0xff);

        let big = RtcConfig::from_memory_mib(6 * 1024, 4);
        assert_eq!((big.low_ram_bytes, big.high_ram_bytes), (3 << 30, 3 << 30));
        let nv = big.nvram().unwrap();
        // (3072 - 16) MiB = 48896 units; 3 GiB above 4 GiB = 49152 units.
        assert_eq!(nv[0x34..=0x35], 48_896u16.to_le_bytes());
        assert_eq!(nv[0x5b..=0x5d], [0x00, 0xc0, 0x00]);
        assert_eq!(nv[0x5f], 3);

        let tiny = RtcConfig::from_memory_mib(16, 1).nvram().unwrap();
        assert_eq!(tiny[0x17..=0x18], 15_360u16.to_le_bytes());
        assert_eq!(tiny[0x34..=0x35], [0, 0]);

        assert!(matches!(RtcConfig { vcpus: 0, ..SMALL }.nvram(), Err(RtcError::Vcpus(0))));
        assert!(matches!(RtcConfig { vcpus: 257, ..SMALL }.nvram(), Err(RtcError::Vcpus(257))));
        assert!(RtcConfig { vcpus: 256, ..SMALL }.nvram().is_ok());
        let low = 5 << 30;
        assert!(matches!(RtcConfig { low_ram_bytes: low, ..SMALL }.nvram(), Err(RtcError::LowRam(_))));
    }

    #[test]
    fn nvram_is_readable_through_the_ports_and_writable() {
        let (mut rtc, _, _) = rtc_at(T0, 0);
        assert_eq!(rd(&mut rtc, 0x5f), 0);
        assert_eq!(rd(&mut rtc, 0x15), 0x80);
        wr(&mut rtc, 0x40, 0xab);
        wr(&mut rtc, 0x7f, 0xcd);
        assert_eq!((rd(&mut rtc, 0x40), rd(&mut rtc, 0x7f)), (0xab, 0xcd));
    }

    #[test]
    fn register_c_reports_updates_and_clears_on_read() {
        let (mut rtc, clock, irq) = rtc_at(T0, 500_000_000);
        assert_eq!(rd(&mut rtc, REG_C), 0);
        clock.advance_ns(600_000_000);
        // Update and periodic flags rise without their enables, but neither IRQF nor the line do.
        assert_eq!(rd(&mut rtc, REG_C), C_PF | C_UF);
        assert_eq!(rd(&mut rtc, REG_C), 0);
        assert_eq!(irq.count(), 0);
        wr(&mut rtc, REG_C, 0xff);
        assert_eq!(rd(&mut rtc, REG_C), 0, "C is read-only");
        wr(&mut rtc, REG_D, 0);
        assert_eq!(rd(&mut rtc, REG_D), D_VRT, "D is read-only");
    }

    #[test]
    fn update_interrupt_fires_once_per_second_boundary() {
        let (mut rtc, clock, irq) = rtc_at(T0, 100_000_000);
        wr(&mut rtc, REG_B, B_24H | B_UIE);
        rtc.shared.tick();
        assert_eq!(irq.count(), 0);
        let next = rtc.shared.lock().next_event(clock.now_ns());
        assert_eq!(next, Some(i128::from(T0 + 1) * NS));
        clock.advance_ns(899_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 0);
        clock.advance_ns(2_000_000);
        rtc.shared.tick();
        rtc.shared.tick();
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut rtc, REG_C), C_IRQF | C_PF | C_UF);
        clock.advance_ns(NS);
        rtc.shared.tick();
        assert_eq!(irq.count(), 2);
        // SET clears UIE and stops updates.
        wr(&mut rtc, REG_B, B_24H | B_UIE | B_SET);
        assert_eq!(rd(&mut rtc, REG_B), B_24H | B_SET);
        assert_eq!(rtc.shared.lock().next_event(clock.now_ns()), None);
    }

    #[test]
    fn an_update_seen_by_reading_c_is_not_also_pulsed() {
        let (mut rtc, clock, irq) = rtc_at(T0, 900_000_000);
        wr(&mut rtc, REG_B, B_24H | B_UIE);
        clock.advance_ns(200_000_000);
        assert_eq!(rd(&mut rtc, REG_C), C_IRQF | C_PF | C_UF);
        rtc.shared.tick();
        assert_eq!(irq.count(), 0);
    }

    #[test]
    fn enabling_with_a_pending_flag_raises_the_line() {
        let (mut rtc, clock, irq) = rtc_at(T0, 900_000_000);
        clock.advance_ns(200_000_000);
        wr(&mut rtc, REG_B, B_24H | B_UIE);
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut rtc, REG_C), C_IRQF | C_PF | C_UF);
    }

    #[test]
    fn alarm_matches_with_dont_care_fields() {
        // 22:13:20.5; the alarm wants second 30 of any minute of any hour.
        let (mut rtc, clock, irq) = rtc_at(T0, 500_000_000);
        wr(&mut rtc, REG_SEC_ALARM, 0x30);
        wr(&mut rtc, REG_MIN_ALARM, 0xff);
        wr(&mut rtc, REG_HOUR_ALARM, 0xc0);
        wr(&mut rtc, REG_B, B_24H | B_AIE);
        assert_eq!(rd(&mut rtc, REG_C), 0);
        clock.set(T0 + 9, 600_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 0);
        assert_eq!(rd(&mut rtc, REG_C), C_PF | C_UF, "flags without enables raise no IRQF");
        clock.set(T0 + 10, 1_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut rtc, REG_C), C_IRQF | C_AF | C_PF | C_UF);
        clock.set(T0 + 11, 1_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 1);
        clock.set(T0 + 70, 1_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 2, "the next minute matches too");
        // A specific minute that is not now does not match.
        wr(&mut rtc, REG_MIN_ALARM, 0x05);
        rd(&mut rtc, REG_C);
        clock.set(T0 + 130, 1_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 2);
        assert_eq!(rd(&mut rtc, REG_C) & C_AF, 0);
        // A tick that comes late still sees the alarm second it slept through.
        wr(&mut rtc, REG_MIN_ALARM, 0x16);
        clock.set(T0 + 190 + 3, 0);
        rtc.shared.tick();
        assert_eq!(irq.count(), 3);
    }

    #[test]
    fn periodic_interrupt_rate_is_capped() {
        let (mut rtc, clock, irq) = rtc_at(T0, 0);
        let period = |rtc: &Rtc| rtc.shared.lock().period_ns();
        assert_eq!(period(&rtc), Some(NS / 1024), "0x26 is 1024 Hz");
        wr(&mut rtc, REG_A, 0x23);
        assert_eq!(period(&rtc), Some(NS / 1024), "8192 Hz is slowed to 1024 Hz");
        wr(&mut rtc, REG_A, 0x2f);
        assert_eq!(period(&rtc), Some(NS / 2));
        wr(&mut rtc, REG_A, 0x21);
        assert_eq!(period(&rtc), Some(NS / 256));
        wr(&mut rtc, REG_A, 0x20);
        assert_eq!(period(&rtc), None);
        wr(&mut rtc, REG_A, 0x2f);
        wr(&mut rtc, REG_B, B_24H | B_PIE);
        clock.advance_ns(400_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 0);
        clock.advance_ns(200_000_000);
        rtc.shared.tick();
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut rtc, REG_C), C_IRQF | C_PF);
        assert_eq!(rtc.shared.lock().next_event(clock.now_ns()), Some(i128::from(T0 + 1) * NS));
    }

    #[test]
    fn uip_is_set_only_just_before_a_boundary() {
        let (mut rtc, clock, _) = rtc_at(T0, 0);
        let uip = |rtc: &mut Rtc| rd(rtc, REG_A) & A_UIP != 0;
        clock.set(T0, 999_800_000);
        assert!(uip(&mut rtc));
        clock.set(T0, 999_700_000);
        assert!(!uip(&mut rtc));
        clock.set(T0 + 1, 100_000);
        assert!(!uip(&mut rtc));
        let mut set = 0;
        for step in 0..100_000 {
            clock.set(T0, step * 10_000);
            set += usize::from(uip(&mut rtc));
        }
        assert!((20..=30).contains(&set), "{set} of 100000 samples");
        // Never while the clock is held; and the guest cannot write it.
        wr(&mut rtc, REG_A, 0xa6);
        clock.set(T0, 100_000);
        assert!(!uip(&mut rtc));
        wr(&mut rtc, REG_B, B_24H | B_SET);
        clock.set(T0, 999_900_000);
        assert!(!uip(&mut rtc));
    }

    #[test]
    fn linux_probe_sequence_sees_a_working_clock() {
        // mc146818_avoid_UIP: seconds, UIP clear, seconds again, all stable.
        let (mut rtc, _, _) = rtc_at(T0, 0);
        let s1 = rd(&mut rtc, REG_SEC);
        assert_eq!(rd(&mut rtc, REG_A) & A_UIP, 0);
        assert_eq!(rd(&mut rtc, REG_SEC), s1);
        assert_eq!(rd(&mut rtc, REG_D) & 0x40, 0);
        assert_ne!(rd(&mut rtc, REG_B) & B_24H, 0);
    }

    #[test]
    fn nmi_bit_does_not_select_a_register() {
        let (mut rtc, _, _) = rtc_at(T0, 0);
        rtc.write(0, &[0x80 | REG_B]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        assert_eq!(b[0], B_DEFAULT);
        assert!(rtc.nmi_disabled());
        wr(&mut rtc, 0x80 | 0x40, 0x5a);
        assert_eq!(rd(&mut rtc, 0x40), 0x5a);
        assert!(!rtc.nmi_disabled());
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut rtc, _, _) = rtc_at(T0, 0);
        let mut b = [0u8; 2];
        rtc.read(0, &mut b[..1]);
        assert_eq!(b[0], 0xff, "the index port is write-only");
        // A word write is index then data.
        rtc.write(0, &[0x41, 0x77]);
        assert_eq!(rd(&mut rtc, 0x41), 0x77);
        rtc.write(0, &[0x41]);
        rtc.read(0, &mut b);
        assert_eq!(b, [0xff, 0x77]);
        rtc.write(5, &[1, 2, 3]);
        rtc.read(u64::MAX, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        rtc.write(0, &[]);
        rtc.read(1, &mut []);
        // Garbage written while held commits to a clamped, running time.
        wr(&mut rtc, REG_B, B_24H | B_SET);
        for r in TIME_REGS {
            wr(&mut rtc, r, 0xff);
        }
        wr(&mut rtc, REG_B, B_24H);
        assert_eq!(rtc.guest_time(), (9999, 12, 31, 23, 59, 59));
        for v in 0..=255u8 {
            wr(&mut rtc, REG_B, v);
            wr(&mut rtc, REG_A, v);
            wr(&mut rtc, REG_HOUR, v);
            for r in 0..=0x7f {
                rd(&mut rtc, r);
            }
        }
    }

    #[test]
    fn the_timer_thread_delivers_updates_and_ends_on_drop() {
        let irq = Arc::new(CountingIrq::default());
        let mut rtc = Rtc::new(SMALL, Some(irq.clone())).unwrap();
        assert!(rtc.timer.is_some());
        wr(&mut rtc, REG_B, B_24H | B_UIE);
        assert!(wait_until(|| irq.count() >= 1));
        assert_ne!(rd(&mut rtc, REG_C) & C_UF, 0);
        drop(rtc);
        assert_eq!(Arc::strong_count(&irq), 1, "the thread is gone with its line");
    }

    #[test]
    fn attach_claims_both_ports() {
        let bus = Bus::new();
        let rtc = attach(&bus, Rtc::new(SMALL, None).unwrap()).unwrap();
        assert!(rtc.lock().unwrap().timer.is_none());
        assert!(bus.write(0x70, &[0x5f]));
        let mut b = [0u8];
        assert!(bus.read(0x71, &mut b));
        assert_eq!(b, [0]);
        assert!(!bus.read(0x72, &mut b));
    }

    #[test]
    fn saved_time_bounds_are_the_dates_they_name() {
        assert_eq!(MIN_SAVED_SECS, days_from_civil(0, 1, 1) * 86_400);
        assert_eq!(MAX_SAVED_SECS, days_from_civil(10_100, 1, 1) * 86_400);
    }

    fn rtc_on(clock: &Arc<FakeClock>) -> (Rtc, Arc<CountingIrq>) {
        let irq = Arc::new(CountingIrq::default());
        let rtc = Rtc::without_timer(SMALL, Some(irq.clone()), clock.clone()).unwrap();
        (rtc, irq)
    }

    /// A guest that set the clock to 2031-05-17 13:45:10.5, armed an alarm for
    /// second 12 of minute 45 of any hour, wrote NVRAM, enabled 2 Hz periodic,
    /// alarm and update interrupts, left an update and a periodic flag pending
    /// (13:45:11.1 now) and selected NVRAM byte 0x40 with NMIs masked.
    fn busy_rtc() -> (Rtc, Arc<FakeClock>, Arc<CountingIrq>) {
        let (mut rtc, clock, irq) = rtc_at(T0, 250_000_000);
        linux_set_time(&mut rtc, [0x31, 0x05, 0x17, 0x13, 0x45, 0x10]);
        wr(&mut rtc, REG_SEC_ALARM, 0x12);
        wr(&mut rtc, REG_MIN_ALARM, 0x45);
        wr(&mut rtc, REG_HOUR_ALARM, 0xff);
        wr(&mut rtc, 0x40, 0xab);
        wr(&mut rtc, 0x7f, 0xcd);
        wr(&mut rtc, 0x5f, 0x07);
        wr(&mut rtc, REG_A, 0x2f);
        wr(&mut rtc, REG_B, B_24H | B_PIE | B_AIE | B_UIE);
        clock.advance_ns(600_000_000);
        rtc.write(0, &[0x80 | 0x40]);
        (rtc, clock, irq)
    }

    /// What the guest reads: the selected byte first (no index write), then
    /// the time, the control registers, the alarm, NVRAM, and C last.
    fn guest_view(rtc: &mut Rtc) -> Vec<u8> {
        let mut b = [0u8];
        rtc.read(1, &mut b);
        let mut v = vec![b[0], u8::from(rtc.nmi_disabled())];
        v.extend(regs(rtc));
        for r in [REG_A, REG_B, REG_D, REG_SEC_ALARM, REG_MIN_ALARM, REG_HOUR_ALARM, 0x5f, 0x7f, REG_C, REG_C]
        {
            v.push(rd(rtc, r));
        }
        v
    }

    #[test]
    fn save_and_restore_keep_registers_nvram_flags_and_a_running_clock() {
        let (mut original, clock, _) = busy_rtc();
        let state = original.save();
        assert_eq!(state.cmos[usize::from(REG_C)], C_IRQF | C_PF | C_UF);
        let at = DateTime { year: 2031, month: 5, day: 17, hour: 13, minute: 45, second: 11 };
        assert_eq!(state.guest_time, UnixTime { secs: at.to_unix(), nanos: 100_000_000 });
        assert_eq!(state.saved_at, UnixTime { secs: T0, nanos: 850_000_000 });
        assert_eq!((state.index, state.nmi_disabled, state.cmos[0x40]), (0x40, true, 0xab));
        let state: RtcState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        // Three seconds of downtime on hosts whose clocks agree.
        clock.advance_ns(3 * NS);
        let (mut restored, irq) = rtc_on(&clock);
        restored.restore(state).unwrap();
        assert_eq!(irq.count(), 1, "the pending flags interrupt again");
        assert_eq!(restored.guest_time(), (2031, 5, 17, 13, 45, 14));
        assert_eq!(restored.save(), original.save());

        let view = guest_view(&mut original);
        assert_eq!(view[..2], [0xab, 1]);
        assert_eq!(view[2..10], [0x14, 0x45, 0x13, 0x07, 0x17, 0x05, 0x31, 0x20]);
        assert_eq!(view[10..17], [0x2f, B_24H | B_PIE | B_AIE | B_UIE, D_VRT, 0x12, 0x45, 0xff, 0x07]);
        // The downtime crossed the alarm second: caught up like a late tick.
        assert_eq!(view[18..], [C_IRQF | C_PF | C_AF | C_UF, 0]);
        assert_eq!(guest_view(&mut restored), view);

        // Both keep running, and on the same second boundaries.
        clock.advance_ns(3600 * NS + 890_000_000);
        assert_eq!(regs(&mut restored), regs(&mut original));
        assert_eq!(restored.guest_time(), (2031, 5, 17, 14, 45, 14));
        clock.advance_ns(20_000_000);
        assert_eq!(restored.guest_time(), (2031, 5, 17, 14, 45, 15));
        assert_eq!(restored.save(), original.save());
    }

    #[test]
    fn a_restored_clock_runs_on_from_the_saved_time_by_the_destination_clock() {
        let (original, _, _) = busy_rtc();
        let state = original.save();
        // The destination reads 5 s later than the save: the guest lost nothing.
        let dest = FakeClock::at(T0 + 5, 850_000_000);
        let (mut restored, _) = rtc_on(&dest);
        restored.restore(state).unwrap();
        assert_eq!(restored.guest_time(), (2031, 5, 17, 13, 45, 16));
        // The sub-second phase survives: 16.1 s, so the second turns in 0.9 s.
        dest.advance_ns(890_000_000);
        assert_eq!(rd(&mut restored, REG_SEC), 0x16);
        dest.advance_ns(20_000_000);
        assert_eq!(rd(&mut restored, REG_SEC), 0x17);
        // A destination clock behind the source's steps the guest back, and
        // the clock then runs normally.
        let behind = FakeClock::at(T0 - 10, 850_000_000);
        let (mut restored, irq) = rtc_on(&behind);
        restored.restore(original.save()).unwrap();
        assert_eq!(restored.guest_time(), (2031, 5, 17, 13, 45, 1));
        rd(&mut restored, REG_C);
        behind.advance_ns(NS);
        restored.shared.tick();
        assert_eq!(rd(&mut restored, REG_C) & C_UF, C_UF);
        assert!(irq.count() >= 2);
    }

    #[test]
    fn a_held_clock_stays_held_with_what_the_guest_wrote() {
        let (mut original, clock, _) = rtc_at(T0, 0);
        wr(&mut original, REG_B, B_24H | B_SET);
        wr(&mut original, REG_HOUR, 0x07);
        wr(&mut original, REG_WEEKDAY, 0x06);
        let state = original.save();
        clock.advance_ns(10 * NS);
        let (mut restored, irq) = rtc_on(&clock);
        restored.restore(state).unwrap();
        assert_eq!(irq.count(), 0);
        assert_eq!(regs(&mut restored), [0x20, 0x13, 0x07, 0x06, 0x14, 0x11, 0x23, 0x20]);
        assert_eq!(regs(&mut restored), regs(&mut original));
        wr(&mut original, REG_B, B_24H);
        wr(&mut restored, REG_B, B_24H);
        assert_eq!(restored.guest_time(), (2023, 11, 14, 7, 13, 20));
        clock.advance_ns(NS);
        assert_eq!(regs(&mut restored), regs(&mut original));
        assert_eq!(restored.guest_time(), (2023, 11, 14, 7, 13, 21));
    }

    #[test]
    fn the_timer_thread_delivers_after_a_restore() {
        let mut source = Rtc::new(SMALL, None).unwrap();
        wr(&mut source, REG_B, B_24H | B_UIE);
        let state = source.save();
        let irq = Arc::new(CountingIrq::default());
        let mut rtc = Rtc::new(SMALL, Some(irq.clone())).unwrap();
        rtc.restore(state).unwrap();
        assert!(wait_until(|| irq.count() >= 2));
        assert_ne!(rd(&mut rtc, REG_C) & C_UF, 0);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let (mut rtc, _, irq) = busy_rtc();
        let good = rtc.save();
        let irqs = irq.count();
        let c = usize::from(REG_C);
        let bad: [fn(&mut RtcState); 15] = [
            |st| st.cmos.push(0),
            |st| {
                st.cmos.pop();
            },
            |st| st.cmos.clear(),
            |st| st.index = 0x80,
            |st| st.cmos[usize::from(REG_A)] |= A_UIP,
            |st| st.cmos[usize::from(REG_B)] |= B_SET,
            |st| st.cmos[usize::from(REG_C)] |= 0x01,
            |st| st.cmos[usize::from(REG_C)] &= !C_IRQF,
            |st| st.cmos[usize::from(REG_C)] = C_IRQF,
            |st| st.cmos[usize::from(REG_D)] = 0,
            |st| st.guest_time.nanos = 1_000_000_000,
            |st| st.saved_at.nanos = u32::MAX,
            |st| st.guest_time.secs = i64::MAX,
            |st| st.guest_time.secs = MIN_SAVED_SECS - 1,
            |st| st.saved_at.secs = MAX_SAVED_SECS + 1,
        ];
        for (i, spoil) in bad.iter().enumerate() {
            let mut state = good.clone();
            spoil(&mut state);
            let e = rtc.restore(state).expect_err(&format!("case {i} accepted"));
            assert_eq!(e.device, "rtc");
            assert_eq!(rtc.save(), good, "case {i}");
        }
        assert_eq!(irq.count(), irqs);
        // Flags without their enables and no IRQF are fine.
        let mut quiet = good.clone();
        quiet.cmos[usize::from(REG_B)] = B_24H;
        quiet.cmos[c] = C_PF | C_UF;
        rtc.restore(quiet).unwrap();
        assert_eq!(irq.count(), irqs);
    }

    mod reachable {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(100))]

            /// Every state a guest can reach is accepted by a restore and
            /// saved again unchanged: the checks refuse only the unreachable.
            #[test]
            fn every_reachable_state_round_trips(
                ops in proptest::collection::vec(
                    (prop_oneof![0u8..=0x0d, Just(REG_CENTURY), any::<u8>()], any::<u8>(), 0i128..1_500_000_000, any::<bool>()),
                    0..100,
                ),
            ) {
                let (mut rtc, clock, _) = rtc_at(T0, 0);
                for (reg, value, step, write) in ops {
                    if write {
                        wr(&mut rtc, reg, value);
                    } else {
                        rd(&mut rtc, reg);
                    }
                    clock.advance_ns(step);
                    let state = rtc.save();
                    let (mut fresh, _) = rtc_on(&clock);
                    prop_assert!(fresh.restore(state.clone()).is_ok(), "refused {state:?}");
                    prop_assert_eq!(fresh.save(), state);
                }
            }
        }
    }
}
