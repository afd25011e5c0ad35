/* nodeos test guest: time. TSC, calibrated once against PIT channel 2.
 *
 * Calibration (ports 0x61, 0x42, 0x43): gate channel 2 on, speaker off,
 * mode 0 with a 50 ms count, count TSC ticks until OUT2 (port 0x61 bit 5)
 * rises. If the PIT is absent or implausible (reads of 0xff, no edge within a
 * bounded number of polls), assume a 2 GHz TSC and say so (tsc_source=default).
 */
#include "guest.h"

#define PIT_HZ 1193182ULL
#define CAL_MS 50ULL
#define DEFAULT_TSC_KHZ 2000000ULL

u64 tsc_khz = DEFAULT_TSC_KHZ;
const char *tsc_source = "default";

void timer_init(void)
{
	u8 p61 = inb(0x61);
	if (p61 == 0xff)
		return; /* nothing there */
	outb(0x61, (u8)((p61 & ~0x02) | 0x01)); /* gate2 on, speaker data off */
	outb(0x43, 0xb0);			/* ch2, lobyte/hibyte, mode 0, binary */
	u32 latch = (u32)(PIT_HZ * CAL_MS / 1000);
	outb(0x42, (u8)(latch & 0xff));
	outb(0x42, (u8)(latch >> 8));

	u64 t0 = rdtsc();
	u32 polls = 0;
	int seen_low = 0, done = 0;
	/* Bounded: ~a few seconds worst case even with slow VM exits. */
	for (polls = 0; polls < 20000000; polls++) {
		u8 v = inb(0x61);
		if (!(v & 0x20))
			seen_low = 1;
		else if (seen_low) {
			done = 1;
			break;
		}
		if (!seen_low && polls > 1000)
			break; /* OUT2 never went low after programming: no usable PIT */
	}
	u64 t1 = rdtsc();
	outb(0x61, p61);
	if (!done)
		return;
	u64 khz = (t1 - t0) / CAL_MS;
	/* plausibility: 100 MHz .. 20 GHz */
	if (khz < 100000ULL || khz > 20000000ULL)
		return;
	tsc_khz = khz;
	tsc_source = "pit";
}

u64 deadline_ms(u64 ms)
{
	return rdtsc() + ms * tsc_khz;
}

int expired(u64 deadline)
{
	return (i64)(rdtsc() - deadline) >= 0;
}

void delay_ms(u64 ms)
{
	u64 d = deadline_ms(ms);
	while (!expired(d))
		cpu_relax();
}
