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

/* One synchronous request. type IN/OUT with len bytes at buf, or FLUSH (len 0). */
static int blk_rw(u32 type, u64 sector, void *buf, u32 len, const char *what)
{
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
	u32 id, ulen;
	if (vq_wait(&blk_vq, &id, &ulen, 10000) != 0) {
		FAIL("blk FAIL timeout %s sector=%lu", what, sector);
		return -1;
	}
	barrier();
	if (id != 0 || blk_status != 0) {
		FAIL("blk FAIL %s sector=%lu status=%u id=%u", what, sector, blk_status, id);
		return -1;
	}
	return 0;
}

int blk_test(int required)
{
	const char *who = "blk";
	int idx = virtio_find(0x1042, 0x1001);
	if (idx < 0) {
		if (required)
			FAIL("blk FAIL no virtio-blk device");
		else
			LOG("blk skip no virtio-blk device");
		return -1;
	}
	struct virtio_dev *vd = &blk_dev;
	if (virtio_init(vd, &pci_devs[idx], VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, who) != 0)
		return -1;
	if (!vd->device) {
		FAIL("blk FAIL no device config capability");
		return -1;
	}
	if (virtio_setup_queue(vd, &blk_vq, 0, &blk_vq_mem, who) != 0)
		return -1;
	if (virtio_driver_ok(vd, who) != 0)
		return -1;

	u64 capacity = virtio_cfg_read64(vd, 0);
	int ro = (vd->features & VIRTIO_BLK_F_RO) != 0;
	int flush = (vd->features & VIRTIO_BLK_F_FLUSH) != 0;
	LOG("blk capacity=%lu readonly=%s flush=%s", capacity, ro ? "yes" : "no", flush ? "yes" : "no");
	if (capacity == 0) {
		FAIL("blk FAIL capacity=0");
		virtio_reset(vd);
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
