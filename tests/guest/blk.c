/* nodeos test guest: virtio-blk test (write pattern, flush, read back, read last sector). */
#include "guest.h"

#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4

#define CHUNK_SECTORS 8
#define SECTOR 512

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct vq_mem blk_vq_mem;
static struct virtq blk_vq;
static struct virtio_dev blk_dev;
static struct blk_req_hdr blk_hdr ALIGNED(64);
static volatile u8 blk_status ALIGNED(64);
static u8 wbuf[CHUNK_SECTORS * SECTOR] ALIGNED(4096);
static u8 rbuf[CHUNK_SECTORS * SECTOR] ALIGNED(4096);

/* The on-disk pattern (see README.md): 64 little-endian u64 words per sector. */
#define BLK_MAGIC 0x4B42534F45444F4EULL /* "NODEOSBK" */
static void blk_pattern(u64 *w, u64 sector, u64 seed)
{
	w[0] = BLK_MAGIC;
	w[1] = sector;
	w[2] = seed;
	for (u64 j = 3; j < SECTOR / 8; j++)
		w[j] = mix64(((sector << 6) | j) ^ (seed << 32));
}

/* One synchronous request. type IN/OUT with len bytes at buf, or FLUSH (len 0).
 * On failure returns -1 and describes it in err ("timeout write sector=8",
 * "write sector=8 status=1 id=0"); does not print. A request that timed out
 * stays in flight (header, status and buffer are shared), so the next call
 * first waits for it and fails ("busy ...") if it still has not completed. */
static int blk_req(u32 type, u64 sector, void *buf, u32 len, const char *what, char *err,
		   usize errlen)
{
	u32 id, ulen;
	while (blk_vq.avail_idx != blk_vq.last_used) {
		if (vq_wait(&blk_vq, &id, &ulen, 10000) != 0) {
			snprintf(err, errlen, "busy %s sector=%lu: an earlier request never completed",
				 what, sector);
			return -1;
		}
	}
	struct vring_desc *d = blk_vq.mem->desc;
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	blk_status = 0xff;
	int n = 0;
	d[n].addr = (u64)&blk_hdr;
	d[n].len = sizeof(blk_hdr);
	d[n].flags = VRING_DESC_F_NEXT;
	d[n].next = (u16)(n + 1);
	n++;
	if (len) {
		d[n].addr = (u64)buf;
		d[n].len = len;
		d[n].flags = VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0);
		d[n].next = (u16)(n + 1);
		n++;
	}
	d[n].addr = (u64)&blk_status;
	d[n].len = 1;
	d[n].flags = VRING_DESC_F_WRITE;
	d[n].next = 0;
	vq_push(&blk_vq, 0);
	vq_kick(&blk_vq);
	if (vq_wait(&blk_vq, &id, &ulen, 10000) != 0) {
		snprintf(err, errlen, "timeout %s sector=%lu", what, sector);
		return -1;
	}
	barrier();
	if (id != 0 || blk_status != 0) {
		snprintf(err, errlen, "%s sector=%lu status=%u id=%u", what, sector, blk_status, id);
		return -1;
	}
	return 0;
}

static int blk_rw(u32 type, u64 sector, void *buf, u32 len, const char *what)
{
	char err[128];
	if (blk_req(type, sector, buf, len, what, err, sizeof(err)) != 0) {
		FAIL("blk FAIL %s", err);
		return -1;
	}
	return 0;
}

/* Find, initialise and start the first virtio-blk device (one queue of up to 16).
 * Prints "<who> capacity=<C> readonly=yes|no flush=yes|no". Returns 0, or -1 (a
 * FAIL line printed; *missing set if there is simply no device, nothing printed). */
static int blk_open(const char *who, u64 *capacity, int *ro, int *flush, int *missing)
{
	*missing = 0;
	int idx = virtio_find(0x1042, 0x1001);
	if (idx < 0) {
		*missing = 1;
		return -1;
	}
	struct virtio_dev *vd = &blk_dev;
	if (virtio_init(vd, &pci_devs[idx], VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, who) != 0)
		return -1;
	if (!vd->device) {
		FAIL("%s FAIL no device config capability", who);
		return -1;
	}
	if (virtio_setup_queue(vd, &blk_vq, 0, &blk_vq_mem, who) != 0)
		return -1;
	if (virtio_driver_ok(vd, who) != 0)
		return -1;

	*capacity = virtio_cfg_read64(vd, 0);
	*ro = (vd->features & VIRTIO_BLK_F_RO) != 0;
	*flush = (vd->features & VIRTIO_BLK_F_FLUSH) != 0;
	LOG("%s capacity=%lu readonly=%s flush=%s", who, *capacity, *ro ? "yes" : "no",
	    *flush ? "yes" : "no");
	if (*capacity == 0) {
		FAIL("%s FAIL capacity=0", who);
		virtio_reset(vd);
		return -1;
	}
	return 0;
}

int blk_test(int required)
{
	struct virtio_dev *vd = &blk_dev;
	u64 capacity;
	int ro, flush, missing;
	if (blk_open("blk", &capacity, &ro, &flush, &missing) != 0) {
		if (!missing)
			return -1;
		if (required)
			FAIL("blk FAIL no virtio-blk device");
		else
			LOG("blk skip no virtio-blk device");
		return -1;
	}
	u64 nsec = cfg.blk_sectors < capacity ? cfg.blk_sectors : capacity;
	u64 seed = cfg.blk_seed;

	if (!ro) {
		for (u64 s = 0; s < nsec; s += CHUNK_SECTORS) {
			u64 n = nsec - s < CHUNK_SECTORS ? nsec - s : CHUNK_SECTORS;
			for (u64 k = 0; k < n; k++)
				blk_pattern((u64 *)(wbuf + k * SECTOR), s + k, seed);
			if (blk_rw(VIRTIO_BLK_T_OUT, s, wbuf, (u32)(n * SECTOR), "write") != 0)
				goto fail;
		}
		if (flush && blk_rw(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, "flush") != 0)
			goto fail;
	}
	for (u64 s = 0; s < nsec; s += CHUNK_SECTORS) {
		u64 n = nsec - s < CHUNK_SECTORS ? nsec - s : CHUNK_SECTORS;
		memset(rbuf, 0xa5, sizeof(rbuf));
		if (blk_rw(VIRTIO_BLK_T_IN, s, rbuf, (u32)(n * SECTOR), "read") != 0)
			goto fail;
		if (ro)
			continue;
		for (u64 k = 0; k < n; k++) {
			blk_pattern((u64 *)wbuf, s + k, seed);
			const u64 *want = (const u64 *)wbuf;
			const u64 *got = (const u64 *)(rbuf + k * SECTOR);
			for (u32 j = 0; j < SECTOR / 8; j++) {
				if (want[j] != got[j]) {
					FAIL("blk FAIL mismatch sector=%lu word=%u expected=%016lx found=%016lx",
					     s + k, j, want[j], got[j]);
					goto fail;
				}
			}
		}
	}
	memset(rbuf, 0xa5, SECTOR);
	if (blk_rw(VIRTIO_BLK_T_IN, capacity - 1, rbuf, SECTOR, "read-last") != 0)
		goto fail;

	virtio_reset(vd);
	if (ro)
		LOG("blk ok readonly sectors=%lu capacity=%lu", nsec, capacity);
	else
		LOG("blk ok sectors=%lu capacity=%lu seed=%lu flush=%s", nsec, capacity, seed,
		    flush ? "yes" : "no");
	return 0;
fail:
	virtio_reset(vd);
	return -1;
}

/* ---------------------------------------------------------------- dirty mode (dirty_blk=1)
 * One 4 KiB block per pass p: the README's pattern with seed p at sectors
 * (p % span) * 8 .. + 7, FLUSH (if negotiated), then the block of pass p-1 is read
 * back and checked for seed p-1. Errors are counted; at most DBLK_LINES FAIL lines
 * are printed between two reports (dirty_blk_report). */
#define DBLK_LINES 4

static struct {
	int active;
	int flush;
	u64 span;	  /* blocks of 8 sectors used, from sector 0 */
	u64 last_written; /* pass whose block was last written (and flushed) fully, 0 = none */
	u64 writes;	  /* successful 4 KiB writes */
	u64 verified;	  /* blocks read back and found intact */
	u64 errors;	  /* errors since the last report */
	u32 lines;	  /* FAIL lines printed since the last report */
} dblk;

static void dblk_error(const char *err)
{
	failures++;
	dblk.errors++;
	if (dblk.lines++ < DBLK_LINES)
		LOG("dirty blk FAIL %s", err);
}

/* 0: the word matches; else 1 with the first bad word's index and expected value. */
static int blk_check_sector(const u64 *got, u64 sector, u64 seed, u32 *word, u64 *want)
{
	for (u32 j = 0; j < SECTOR / 8; j++) {
		u64 w = j == 0 ? BLK_MAGIC : j == 1 ? sector : j == 2 ? seed
			: mix64(((sector << 6) | j) ^ (seed << 32));
		if (got[j] != w) {
			*word = j;
			*want = w;
			return 1;
		}
	}
	return 0;
}

/* What an earlier life of this guest left on the disk, before pass 1 writes: each
 * sector of the span is zero or the pattern of a seed that maps to its block.
 * Reports the largest seed found (the last pass whose write survived). */
static void dblk_found(void)
{
	char err[160];
	u64 max_seed = 0, written = 0, zero = 0, bad = 0;
	for (u64 b = 0; b < dblk.span; b++) {
		if (blk_req(VIRTIO_BLK_T_IN, b * CHUNK_SECTORS, rbuf, sizeof(rbuf), "read", err, sizeof(err)) != 0) {
			dblk_error(err);
			return;
		}
		for (u64 k = 0; k < CHUNK_SECTORS; k++) {
			const u64 *got = (const u64 *)(rbuf + k * SECTOR);
			u64 sector = b * CHUNK_SECTORS + k;
			int all_zero = 1;
			for (u32 j = 0; j < SECTOR / 8 && all_zero; j++)
				all_zero = got[j] == 0;
			u32 word;
			u64 want;
			if (all_zero) {
				zero++;
			} else if (got[2] % dblk.span == b && !blk_check_sector(got, sector, got[2], &word, &want)) {
				written++;
				if (got[2] > max_seed)
					max_seed = got[2];
			} else {
				if (bad++ == 0) {
					snprintf(err, sizeof(err), "found sector=%lu holds no pass's pattern (word 2 = %016lx)",
						 sector, got[2]);
					dblk_error(err);
				}
			}
		}
	}
	LOG("dirty blk found max_seed=%lu written=%lu zero=%lu bad=%lu", max_seed, written, zero, bad);
}

int dirty_blk_open(u64 span)
{
	u64 capacity;
	int ro, flush, missing;
	memset(&dblk, 0, sizeof(dblk));
	if (blk_open("dirty blk", &capacity, &ro, &flush, &missing) != 0) {
		if (missing)
			LOG("dirty blk skip no virtio-blk device");
		return -1;
	}
	if (ro) {
		FAIL("dirty blk FAIL read-only device");
		virtio_reset(&blk_dev);
		return -1;
	}
	if (span > capacity / CHUNK_SECTORS)
		span = capacity / CHUNK_SECTORS;
	if (span == 0) {
		FAIL("dirty blk FAIL capacity=%lu below one 4 KiB block", capacity);
		virtio_reset(&blk_dev);
		return -1;
	}
	dblk.active = 1;
	dblk.flush = flush;
	dblk.span = span;
	LOG("dirty blk start capacity=%lu span=%lu flush=%s", capacity, span, flush ? "yes" : "no");
	dblk_found();
	return 0;
}

static void dblk_verify(u64 pass)
{
	char err[160];
	u64 seed = pass - 1;
	u64 s0 = (seed % dblk.span) * CHUNK_SECTORS;
	u64 *r = (u64 *)rbuf;
	for (u32 j = 0; j < sizeof(rbuf) / 8; j++)
		r[j] = 0xa5a5a5a5a5a5a5a5ULL;
	if (blk_req(VIRTIO_BLK_T_IN, s0, rbuf, sizeof(rbuf), "read", err, sizeof(err)) != 0) {
		dblk_error(err);
		return;
	}
	for (u64 k = 0; k < CHUNK_SECTORS; k++) {
		u32 word;
		u64 want;
		const u64 *got = (const u64 *)(rbuf + k * SECTOR);
		gap_tick(); /* computing is progress: only a stopped vCPU is a gap (dirty.c) */
		if (blk_check_sector(got, s0 + k, seed, &word, &want)) {
			snprintf(err, sizeof(err),
				 "mismatch pass=%lu sector=%lu word=%u expected=%016lx found=%016lx", pass,
				 s0 + k, word, want, got[word]);
			dblk_error(err);
			return;
		}
	}
	dblk.verified++;
}

void dirty_blk_pass(u64 pass)
{
	char err[160];
	if (!dblk.active)
		return;
	u64 s0 = (pass % dblk.span) * CHUNK_SECTORS;
	int check_prev = pass > 1 && dblk.last_written == pass - 1;
	if (check_prev && ((pass - 1) % dblk.span) * CHUNK_SECTORS == s0) {
		dblk_verify(pass); /* span 1: the previous block is the one about to be overwritten */
		check_prev = 0;
	}
	for (u64 k = 0; k < CHUNK_SECTORS; k++) {
		gap_tick();
		blk_pattern((u64 *)(wbuf + k * SECTOR), s0 + k, pass);
	}
	if (blk_req(VIRTIO_BLK_T_OUT, s0, wbuf, sizeof(wbuf), "write", err, sizeof(err)) != 0) {
		dblk_error(err);
	} else {
		dblk.writes++;
		if (dblk.flush && blk_req(VIRTIO_BLK_T_FLUSH, 0, NULL, 0, "flush", err, sizeof(err)) != 0)
			dblk_error(err);
		else
			dblk.last_written = pass;
	}
	if (check_prev)
		dblk_verify(pass);
}

void dirty_blk_report(u64 pass)
{
	if (!dblk.active)
		return;
	if (dblk.errors)
		LOG("dirty blk FAIL pass=%lu errors=%lu blk_writes=%lu blk_verified=%lu", pass,
		    dblk.errors, dblk.writes, dblk.verified);
	else
		LOG("dirty blk pass=%lu ok blk_writes=%lu blk_verified=%lu", pass, dblk.writes,
		    dblk.verified);
	dblk.errors = 0;
	dblk.lines = 0;
}
