/* nodeos test guest: dirty mode. Rewrites dirty_mib MiB forever and verifies the
 * previous pass before overwriting it. See README.md for the exact values.
 *
 * Every pass dirties every 4 KiB page of the region, but only dirty_words
 * 64-bit words per page are written and checked (default 8, max 512 = the whole
 * page): a dirty-page tracker sees the same dirty set either way, and under an
 * emulating hypervisor (like PVM without a PVM-aware guest) a pass stays short. */
#include "guest.h"

extern char __image_end[];

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define DIRTY_SALT 0xD1B54A32D192ED03UL
#define MAX_CORRUPT_LINES 8

static inline u64 page_base(u64 page, u64 pass)
{
	return mix64((pass << 32) ^ page ^ DIRTY_SALT);
}

static inline u64 rotl1(u64 x)
{
	return (x << 1) | (x >> 63);
}

/* Progress stamps (README, mode=dirty): the TSC is read after every page written,
 * between the pieces of work done between passes, and (through gap_tick, while
 * gap_ticking) on every serial byte sent, every poll of a virtqueue and every
 * sector of the dirty_blk pattern computed. The largest
 * difference between two consecutive readings since the last report is that
 * report's max_gap_us: the longest time the vCPU ran no guest code, e.g. a VM paused
 * by a live migration (the host advances the TSC over the pause). Waiting for a
 * device or the UART is not a gap, the vCPU runs meanwhile. With dirty_stamp_ms, a
 * "dirty stamp" line is printed whenever that many ms of TSC time have passed since
 * the previous one (checked at page writes and between passes only). */
int gap_ticking;
static u64 last_tsc, max_gap;
static u64 stamp_cycles, next_stamp, stamp_seq;

static inline u64 tick(void)
{
	u64 t = rdtsc();
	u64 d = t - last_tsc;
	if ((i64)d > (i64)max_gap) /* a TSC going backwards is no gap */
		max_gap = d;
	last_tsc = t;
	return t;
}

void gap_tick(void)
{
	tick();
}

static void __attribute__((noinline)) print_stamp(u64 t)
{
	LOG("dirty stamp seq=%lu tsc=%lx", stamp_seq++, t);
	next_stamp = rdtsc() + stamp_cycles;
}

static inline void progress(void)
{
	u64 t = tick();
	if (stamp_cycles && (i64)(t - next_stamp) >= 0)
		print_stamp(t);
}

static u64 cycles_to_us(u64 c)
{
	return c / tsc_khz * 1000 + (c % tsc_khz) * 1000 / tsc_khz;
}

/* word index k (0 <= k < n) of n per page: spread over the page, first and last included */
static inline u64 word_at(u64 k, u64 n)
{
	return n == 1 ? 0 : (k * (WORDS - 1)) / (n - 1);
}

NORETURN void dirty_loop(void)
{
	u64 base = ((u64)__image_end + 0x1fffffUL) & ~0x1fffffUL; /* 2 MiB above the image */
	u64 len = cfg.dirty_mib << 20;
	u64 pages = len / PAGE;
	u64 nw = cfg.dirty_words;
	if (nw == 0 || nw > WORDS) {
		FAIL("dirty FAIL dirty_words=%lu not in 1..%lu", nw, WORDS);
		goto out;
	}
	if (pages == 0 || base + len > 0x100000000UL || (ram_known() && !ram_contains(base, len))) {
		FAIL("dirty FAIL region base=0x%lx mib=%lu not in RAM", base, cfg.dirty_mib);
		goto out;
	}
	LOG("dirty start base=0x%lx mib=%lu pages=%lu words_per_page=%lu ram_checked=%s", base,
	    cfg.dirty_mib, pages, nw, ram_known() ? "yes" : "no");

	int failures_before = failures;
	if (cfg.dirty_blk)
		dirty_blk_open(cfg.dirty_blk_span ? cfg.dirty_blk_span : 1);
	if (cfg.dirty_net)
		dirty_net_open();

	u64 checksum = 0;
	u64 corrupt_total = 0;
	u64 next_report = deadline_ms(1000);
	if (cfg.dirty_stamp_ms)
		stamp_cycles = (cfg.dirty_stamp_ms < 3600000 ? cfg.dirty_stamp_ms : 3600000) * tsc_khz;
	last_tsc = next_stamp = rdtsc(); /* the first stamp (seq=0) comes with the first page */
	max_gap = 0;
	gap_ticking = 1;
	int kbd_e0 = 0;
	for (u64 pass = 1;; pass++) {
		u32 lines = 0;
		for (u64 i = 0; i < pages; i++) {
			volatile u64 *w = (volatile u64 *)(base + i * PAGE);
			if (pass > 1) {
				u64 prev = page_base(i, pass - 1);
				for (u64 k = 0; k < nw; k++) {
					u64 j = word_at(k, nw);
					u64 got = w[j];
					if (got != (prev ^ j)) {
						corrupt_total++;
						if (lines++ < MAX_CORRUPT_LINES)
							LOG("dirty CORRUPT pass=%lu page=%lu addr=0x%lx expected=%016lx found=%016lx",
							    pass, i, base + i * PAGE + j * 8, prev ^ j, got);
						break;
					}
				}
			}
			u64 v = page_base(i, pass);
			for (u64 k = 0; k < nw; k++) {
				u64 j = word_at(k, nw);
				w[j] = v ^ j;
			}
			checksum = rotl1(checksum) ^ v;
			progress();
		}
		dirty_blk_pass(pass);
		progress();
		dirty_net_poll();
		progress();
		/* The host's graceful-shutdown request: the ACPI power button (a GED
		 * event at port 0x603, bit 0; reading clears it), or Ctrl-Alt-Del from
		 * the keyboard controller (Del = E0 71 in scancode set 2, E0 53 once
		 * translated to set 1). Power off cleanly. */
		if (inb(0x603) & 1) {
			LOG("dirty pass=%lu checksum=%016lx power button: powering off", pass, checksum);
			goto off;
		}
		for (int n = 0; n < 16 && (inb(0x64) & 1); n++) {
			u8 code = inb(0x60);
			if (kbd_e0 && (code == 0x71 || code == 0x53)) {
				LOG("dirty pass=%lu checksum=%016lx ctrl-alt-del: powering off", pass, checksum);
				goto off;
			}
			kbd_e0 = code == 0xe0;
		}
		if (pass == 1 || expired(next_report)) {
			char extra[80];
			u64 rx, tx;
			u64 gap_us = cycles_to_us(max_gap);
			max_gap = 0; /* before printing: a pause while these lines go out counts next time */
			if (dirty_net_counts(&rx, &tx))
				snprintf(extra, sizeof(extra), " max_gap_us=%lu net_rx=%lu net_tx=%lu", gap_us, rx, tx);
			else
				snprintf(extra, sizeof(extra), " max_gap_us=%lu", gap_us);
			if (corrupt_total)
				LOG("dirty pass=%lu checksum=%016lx CORRUPT pages_total=%lu%s", pass, checksum,
				    corrupt_total, extra);
			else
				LOG("dirty pass=%lu checksum=%016lx ok%s", pass, checksum, extra);
			dirty_blk_report(pass);
			next_report = deadline_ms(1000);
			progress();
		}
	}
off:
	/* graceful power-off: FAIL if dirty_blk/dirty_net reported errors */
	if (failures != failures_before) {
		LOG("summary FAIL failures=%d", failures);
		LOG("done");
		power_off(1);
	}
	LOG("summary ok");
	LOG("done");
	power_off(0);
out:
	LOG("summary FAIL failures=%d", failures);
	LOG("done");
	power_off(1);
}
