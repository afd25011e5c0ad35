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

	u64 checksum = 0;
	u64 corrupt_total = 0;
	u64 next_report = deadline_ms(1000);
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
		}
		/* The host's graceful-shutdown request: the ACPI power button (a GED
		 * event at port 0x603, bit 0; reading clears it), or Ctrl-Alt-Del from
		 * the keyboard controller (Del = E0 71 in scancode set 2, E0 53 once
		 * translated to set 1). Power off cleanly. */
		if (inb(0x603) & 1) {
			LOG("dirty pass=%lu checksum=%016lx power button: powering off", pass, checksum);
			LOG("summary ok");
			LOG("done");
			power_off(0);
		}
		for (int n = 0; n < 16 && (inb(0x64) & 1); n++) {
			u8 code = inb(0x60);
			if (kbd_e0 && (code == 0x71 || code == 0x53)) {
				LOG("dirty pass=%lu checksum=%016lx ctrl-alt-del: powering off", pass, checksum);
				LOG("summary ok");
				LOG("done");
				power_off(0);
			}
			kbd_e0 = code == 0xe0;
		}
		if (pass == 1 || expired(next_report)) {
			if (corrupt_total)
				LOG("dirty pass=%lu checksum=%016lx CORRUPT pages_total=%lu", pass, checksum,
				    corrupt_total);
			else
				LOG("dirty pass=%lu checksum=%016lx ok", pass, checksum);
			next_report = deadline_ms(1000);
		}
	}
out:
	LOG("summary FAIL failures=%d", failures);
	LOG("done");
	power_off(1);
}
