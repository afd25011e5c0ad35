/* nodeos test guest: benchmark modes (VMM comparisons, see README.md).
 *
 * mode=exits:    exits_n `outb`s to exits_port (an I/O port no VMM claims), timed
 *                with the TSC: the cost of one port I/O exit to the VMM's userspace.
 * mode=idle:     prints `idle`, then halts with interrupts off forever (the host
 *                measures the VMM at rest, then kills the VM).
 * mode=blkbench: blk_ops random 4 KiB reads or writes on the first virtio-blk disk
 *                with blk_qd requests in flight, timed with the TSC. Polled, no
 *                interrupts, no flush requests. VIRTIO_BLK_F_FLUSH is negotiated
 *                when offered (blk_flush=1, the default, as Linux does): a device
 *                may then cache writes. With blk_flush=0 a driver may expect
 *                write-through (durable on completion), and QEMU does that.
 *
 * Both keep the measured loop as short as possible in guest instructions: under
 * an emulating KVM every guest instruction costs about a microsecond. */
#include "guest.h"

extern char __image_end[];

NORETURN void idle_forever(void)
{
	LOG("idle");
	for (;;)
		__asm__ volatile("cli; hlt");
}

int exits_bench(void)
{
	u64 n = cfg.exits_n;
	u16 port = (u16)cfg.exits_port;
	if (cfg.exits_port > 0xffff || port == 0xf4 || (port >= 0x600 && port <= 0x63f) ||
	    (port >= 0x3f8 && port <= 0x3ff)) {
		FAIL("exits FAIL exits_port=0x%lx is a port the guest or VMM uses", cfg.exits_port);
		return -1;
	}
	LOG("exits start n=%lu port=0x%x", n, port);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < n; i++)
		outb(port, (u8)i);
	u64 t1 = rdtsc();
	LOG("exits n=%lu tsc_cycles=%lu tsc_khz=%lu", n, t1 - t0, tsc_khz);
	return 0;
}

/* ---------------------------------------------------------------- blkbench */
#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define BLOCK 4096UL
#define QUEUE_WANT_MIN 64
#define QUEUE_WANT_MAX 256

/* Layout of the benchmark's RAM, from the first 2 MiB boundary above the image
 * (the same place as the dirty region; the two modes never run together). */
#define OFF_DATA 0x000000UL   /* qd data blocks of 4 KiB */
#define OFF_DESC 0x100000UL   /* descriptor table (<= 256 * 16 bytes) */
#define OFF_AVAIL 0x101000UL  /* avail ring */
#define OFF_USED 0x102000UL   /* used ring (<= 4 + 256 * 8 + 2 bytes) */
#define OFF_HDR 0x103000UL    /* request headers, 16 bytes each */
#define OFF_STATUS 0x104000UL /* status bytes, one each */
#define AREA_LEN 0x105000UL

struct bench_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct virtio_dev bench_dev;

static inline u64 next_block(u64 *x, u64 nblocks)
{
	/* xorshift64* */
	u64 v = *x;
	v ^= v >> 12;
	v ^= v << 25;
	v ^= v >> 27;
	*x = v;
	return ((v * 0x2545F4914F6CDD1DULL) >> 16) % nblocks;
}

int blk_bench(void)
{
	const char *who = "blkbench";
	const char *rw = cfg.blk_write ? "write" : "read";
	int idx = virtio_find(0x1042, 0x1001);
	if (idx < 0) {
		FAIL("blkbench FAIL no virtio-blk device");
		return -1;
	}
	u64 ops = cfg.blk_ops;
	u64 qd = cfg.blk_qd;
	if (ops == 0 || qd == 0 || qd > QUEUE_WANT_MAX / 3) {
		FAIL("blkbench FAIL blk_ops=%lu blk_qd=%lu (need ops >= 1, 1 <= qd <= %u)", ops, qd,
		     QUEUE_WANT_MAX / 3);
		return -1;
	}
	u64 base = ((u64)__image_end + 0x1fffffUL) & ~0x1fffffUL;
	if (base + AREA_LEN > 0x100000000UL || (ram_known() && !ram_contains(base, AREA_LEN))) {
		FAIL("blkbench FAIL work area base=0x%lx not in RAM", base);
		return -1;
	}
	struct virtio_dev *vd = &bench_dev;
	u64 wanted = VIRTIO_BLK_F_RO | (cfg.blk_flush ? VIRTIO_BLK_F_FLUSH : 0);
	if (virtio_init(vd, &pci_devs[idx], wanted, who) != 0)
		return -1;
	if (!vd->device) {
		FAIL("blkbench FAIL no device config capability");
		return -1;
	}
	if (cfg.blk_write && (vd->features & VIRTIO_BLK_F_RO)) {
		FAIL("blkbench FAIL blk_rw=write on a read-only disk");
		virtio_reset(vd);
		return -1;
	}

	/* Each request is a 3-descriptor chain: the ring must hold qd of them. */
	u16 want = QUEUE_WANT_MIN;
	while (want < 3 * qd && want < QUEUE_WANT_MAX)
		want = (u16)(want * 2);
	memset((void *)(base + OFF_DESC), 0, OFF_HDR - OFF_DESC);
	u64 notify = 0;
	u16 max = 0;
	u16 size = virtio_setup_queue_raw(vd, 0, want, base + OFF_DESC, base + OFF_AVAIL, base + OFF_USED,
					  &notify, &max, who);
	if (size == 0) {
		virtio_reset(vd);
		return -1;
	}
	if (3 * qd > size) {
		FAIL("blkbench FAIL blk_qd=%lu needs %lu descriptors; queue size=%u (device max %u)", qd,
		     3 * qd, size, max);
		virtio_reset(vd);
		return -1;
	}
	if (virtio_driver_ok(vd, who) != 0) {
		virtio_reset(vd);
		return -1;
	}
	u64 capacity = virtio_cfg_read64(vd, 0);
	u64 nblocks = capacity / (BLOCK / 512);
	LOG("blkbench start rw=%s qd=%lu ops=%lu capacity=%lu queue_size=%u max=%u flush=%s base=0x%lx", rw,
	    qd, ops, capacity, size, max, (vd->features & VIRTIO_BLK_F_FLUSH) ? "yes" : "no", base);
	if (nblocks == 0) {
		FAIL("blkbench FAIL capacity=%lu is below one 4 KiB block", capacity);
		virtio_reset(vd);
		return -1;
	}

	/* Fixed chains: slot i = descriptors 3i (header), 3i+1 (data), 3i+2 (status). */
	struct vring_desc *desc = (struct vring_desc *)(base + OFF_DESC);
	struct bench_hdr *hdr = (struct bench_hdr *)(base + OFF_HDR);
	volatile u8 *status = (volatile u8 *)(base + OFF_STATUS);
	u32 type = cfg.blk_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
	for (u64 i = 0; i < qd; i++) {
		hdr[i].type = type;
		hdr[i].reserved = 0;
		hdr[i].sector = 0;
		desc[3 * i] = (struct vring_desc){ base + OFF_HDR + i * sizeof(struct bench_hdr),
						   sizeof(struct bench_hdr), VRING_DESC_F_NEXT, (u16)(3 * i + 1) };
		desc[3 * i + 1] = (struct vring_desc){ base + OFF_DATA + i * BLOCK, BLOCK,
						       (u16)(VRING_DESC_F_NEXT | (cfg.blk_write ? 0 : VRING_DESC_F_WRITE)),
						       (u16)(3 * i + 2) };
		desc[3 * i + 2] = (struct vring_desc){ base + OFF_STATUS + i, 1, VRING_DESC_F_WRITE, 0 };
		status[i] = 0xff;
	}
	volatile u16 *avail_idx = (volatile u16 *)(base + OFF_AVAIL + 2);
	volatile u16 *avail_ring = (volatile u16 *)(base + OFF_AVAIL + 4);
	volatile u16 *used_idx = (volatile u16 *)(base + OFF_USED + 2);
	volatile struct vring_used_elem *used_ring = (volatile struct vring_used_elem *)(base + OFF_USED + 4);

	u64 rng = mix64(cfg.blk_seed) | 1;
	u16 aidx = 0, uidx = 0;
	u64 submitted = 0, done = 0, errors = 0, bad_ids = 0;
	u64 first = qd < ops ? qd : ops;

	u64 t0 = rdtsc();
	for (u64 i = 0; i < first; i++) {
		hdr[i].sector = next_block(&rng, nblocks) * (BLOCK / 512);
		avail_ring[aidx % size] = (u16)(3 * i);
		aidx++;
	}
	submitted = first;
	barrier();
	*avail_idx = aidx;
	mb();
	mmio_write16(notify, 0);
	u64 dl = deadline_ms(10000);
	u32 spins = 0;
	while (done < ops) {
		u16 ui = *used_idx;
		if (ui == uidx) {
			if ((++spins & 0xfff) == 0 && expired(dl))
				break;
			continue;
		}
		barrier();
		int pushed = 0;
		while (uidx != ui) {
			u32 id = used_ring[uidx % size].id;
			uidx++;
			done++;
			u32 slot = id / 3;
			if (id % 3 != 0 || slot >= qd) {
				bad_ids++;
				continue;
			}
			if (status[slot] != 0)
				errors++;
			if (submitted < ops) {
				status[slot] = 0xff;
				hdr[slot].sector = next_block(&rng, nblocks) * (BLOCK / 512);
				avail_ring[aidx % size] = (u16)id;
				aidx++;
				submitted++;
				pushed = 1;
			}
		}
		if (pushed) {
			barrier();
			*avail_idx = aidx;
			mb();
			mmio_write16(notify, 0);
		}
		dl = deadline_ms(10000);
	}
	u64 t1 = rdtsc();
	virtio_reset(vd);
	if (done < ops) {
		FAIL("blkbench FAIL timeout after %lu of %lu requests (10 s without a completion)", done, ops);
		return -1;
	}
	if (errors || bad_ids) {
		FAIL("blkbench FAIL requests failed=%lu bad_ids=%lu", errors, bad_ids);
		return -1;
	}
	LOG("blkbench rw=%s qd=%lu ops=%lu tsc_cycles=%lu tsc_khz=%lu", rw, qd, ops, t1 - t0, tsc_khz);
	return 0;
}
