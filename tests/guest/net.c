/* nodeos test guest: virtio-net test (broadcast announce frames, echo host frames). */
#include "guest.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)
#define NET_HDR_LEN 12 /* struct virtio_net_hdr_v1 (VERSION_1: num_buffers always present) */
#define ETH_HLEN 14
#define ETH_MIN 60	/* without FCS */
#define ETH_MAX 1514
#define ETHERTYPE 0x88b5
#define BUF_SIZE 2048

static struct vq_mem rx_mem, tx_mem;
static struct virtq rxq, txq;
static struct virtio_dev net_dev;
static u8 rx_bufs[VQ_MAX][BUF_SIZE] ALIGNED(4096);
static u8 tx_buf[BUF_SIZE] ALIGNED(4096);
static u8 mac[6];
static u64 tx_count, rx_count;
static const char *net_who = "net"; /* prefix of FAIL lines: "net" or "dirty net" */

static int net_send(const u8 *dst, const char *payload, usize plen)
{
	u32 id, len;
	/* tx_buf is shared: a frame that timed out earlier must complete before it is reused */
	while (txq.avail_idx != txq.last_used) {
		if (vq_wait(&txq, &id, &len, 5000) != 0) {
			FAIL("%s FAIL tx timeout (an earlier frame never completed)", net_who);
			return -1;
		}
	}
	u8 *h = tx_buf;
	memset(h, 0, NET_HDR_LEN); /* flags=0, gso_type=NONE, num_buffers=0 */
	u8 *f = tx_buf + NET_HDR_LEN;
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	f[12] = (u8)(ETHERTYPE >> 8);
	f[13] = (u8)(ETHERTYPE & 0xff);
	if (plen > ETH_MAX - ETH_HLEN)
		plen = ETH_MAX - ETH_HLEN;
	memcpy(f + ETH_HLEN, payload, plen);
	usize flen = ETH_HLEN + plen;
	if (flen < ETH_MIN) {
		memset(f + flen, 0, ETH_MIN - flen);
		flen = ETH_MIN;
	}
	struct vring_desc *d = txq.mem->desc;
	d[0].addr = (u64)tx_buf;
	d[0].len = (u32)(NET_HDR_LEN + flen);
	d[0].flags = 0;
	d[0].next = 0;
	vq_push(&txq, 0);
	vq_kick(&txq);
	if (vq_wait(&txq, &id, &len, 5000) != 0) {
		FAIL("%s FAIL tx timeout", net_who);
		return -1;
	}
	tx_count++;
	return 0;
}

static void rx_post(u16 i)
{
	struct vring_desc *d = &rxq.mem->desc[i];
	d->addr = (u64)rx_bufs[i];
	d->len = BUF_SIZE;
	d->flags = VRING_DESC_F_WRITE;
	d->next = 0;
	vq_push(&rxq, i);
}

/* Returns 1 if the frame was a NODEOS-HOST frame (and was echoed), 2 if it was "NODEOS-HOST done".
 * quiet: no "net rx" line (dirty mode). */
static int handle_rx(const u8 *f, u32 flen, int quiet)
{
	if (flen < ETH_HLEN)
		return 0;
	if (f[12] != (u8)(ETHERTYPE >> 8) || f[13] != (u8)(ETHERTYPE & 0xff))
		return 0;
	const u8 *p = f + ETH_HLEN;
	u32 plen = flen - ETH_HLEN;
	if (plen < 11 || memcmp(p, "NODEOS-HOST", 11) != 0)
		return 0;
	/* payload text: up to the first NUL or the end of the frame, printable ASCII only */
	char text[256];
	u32 n = 0;
	while (n < plen && n < sizeof(text) - 1 && p[n]) {
		text[n] = (p[n] >= 0x20 && p[n] < 0x7f) ? (char)p[n] : '?';
		n++;
	}
	text[n] = 0;
	rx_count++;
	if (!quiet)
		LOG("net rx %s", text);
	char echo[300];
	int elen = snprintf(echo, sizeof(echo), "NODEOS-GUEST echo %s", text);
	net_send(f + 6, echo, (usize)elen);
	return strncmp(text, "NODEOS-HOST done", 17) == 0 ? 2 : 1;
}

/* Find, initialise and start the first virtio-net device: RX queue 0 with every
 * buffer posted before DRIVER_OK, TX queue 1, the MAC (device or default), printed
 * as "<who> mac=... source=...". Returns 0, or -1 (a FAIL line printed; *missing
 * set if there is simply no device, nothing printed). */
static int net_open(const char *who, int *missing)
{
	*missing = 0;
	net_who = who;
	int idx = virtio_find(0x1041, 0x1000);
	if (idx < 0) {
		*missing = 1;
		return -1;
	}
	struct virtio_dev *vd = &net_dev;
	tx_count = rx_count = 0;
	if (virtio_init(vd, &pci_devs[idx], VIRTIO_NET_F_MAC, who) != 0)
		return -1;
	if (virtio_setup_queue(vd, &rxq, 0, &rx_mem, who) != 0 ||
	    virtio_setup_queue(vd, &txq, 1, &tx_mem, who) != 0)
		goto fail;
	if ((vd->features & VIRTIO_NET_F_MAC) && vd->device) {
		for (u32 i = 0; i < 6; i++)
			mac[i] = virtio_cfg_read8(vd, i);
	} else {
		static const u8 dflt[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };
		memcpy(mac, dflt, 6);
	}
	LOG("%s mac=%02x:%02x:%02x:%02x:%02x:%02x source=%s", who, mac[0], mac[1], mac[2], mac[3],
	    mac[4], mac[5], (vd->features & VIRTIO_NET_F_MAC) ? "device" : "default");

	/* Post every RX buffer before DRIVER_OK so no frame finds an empty ring. */
	for (u16 i = 0; i < rxq.size; i++)
		rx_post(i);
	if (virtio_driver_ok(vd, who) != 0)
		goto fail;
	vq_kick(&rxq);
	return 0;
fail:
	virtio_reset(vd);
	return -1;
}

static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

int net_test(int required)
{
	struct virtio_dev *vd = &net_dev;
	int missing;
	if (net_open("net", &missing) != 0) {
		if (!missing)
			return -1;
		if (required)
			FAIL("net FAIL no virtio-net device");
		else
			LOG("net skip no virtio-net device");
		return -1;
	}

	for (u64 i = 0; i < cfg.net_frames; i++) {
		char msg[64];
		int n = snprintf(msg, sizeof(msg), "NODEOS-GUEST frame %lu", i);
		if (net_send(bcast, msg, (usize)n) != 0)
			goto fail;
	}
	LOG("net sent frames=%lu, listening wait_ms=%lu expect=%lu", cfg.net_frames, cfg.net_wait_ms,
	    cfg.net_expect);

	u64 dl = deadline_ms(cfg.net_wait_ms);
	int finished = 0;
	while (!expired(dl) && !finished) {
		u32 id, len;
		if (!vq_pop(&rxq, &id, &len)) {
			cpu_relax();
			continue;
		}
		if (id >= rxq.size) {
			FAIL("net FAIL bad rx id=%u", id);
			goto fail;
		}
		if (len > NET_HDR_LEN) {
			int r = handle_rx(rx_bufs[id] + NET_HDR_LEN, len - NET_HDR_LEN, 0);
			if (r == 2 || (cfg.net_expect && rx_count >= cfg.net_expect))
				finished = 1;
		}
		rx_post((u16)id);
		vq_kick(&rxq);
	}
	virtio_reset(vd);
	if (cfg.net_expect && rx_count < cfg.net_expect) {
		FAIL("net FAIL tx=%lu rx=%lu expected=%lu", tx_count, rx_count, cfg.net_expect);
		return -1;
	}
	LOG("net ok tx=%lu rx=%lu", tx_count, rx_count);
	return 0;
fail:
	virtio_reset(vd);
	return -1;
}

/* ---------------------------------------------------------------- dirty mode (dirty_net=1)
 * Set up as net_test does, announce once ("NODEOS-GUEST frame 0"), then
 * dirty_net_poll() (once per pass) echoes the host frames that have arrived,
 * without blocking and without a line per frame. */
static int dnet_active;

int dirty_net_open(void)
{
	int missing;
	dnet_active = 0;
	if (net_open("dirty net", &missing) != 0) {
		if (missing)
			LOG("dirty net skip no virtio-net device");
		return -1;
	}
	static const char announce[] = "NODEOS-GUEST frame 0";
	net_send(bcast, announce, sizeof(announce) - 1); /* a timeout is a FAIL line; go on */
	dnet_active = 1;
	LOG("dirty net start mac=%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3],
	    mac[4], mac[5]);
	return 0;
}

void dirty_net_poll(void)
{
	if (!dnet_active)
		return;
	int got = 0;
	u32 id, len;
	/* at most one ring's worth per pass: a flood cannot stall the dirty loop */
	while (got < rxq.size && vq_pop(&rxq, &id, &len)) {
		got++;
		if (id >= rxq.size) {
			FAIL("dirty net FAIL bad rx id=%u: net stopped", id);
			virtio_reset(&net_dev);
			dnet_active = 0;
			return;
		}
		if (len > NET_HDR_LEN)
			handle_rx(rx_bufs[id] + NET_HDR_LEN, len - NET_HDR_LEN, 1);
		rx_post((u16)id);
	}
	if (got)
		vq_kick(&rxq);
}

/* 1 and the counters (host frames received, frames sent) if dirty net is running. */
int dirty_net_counts(u64 *rx, u64 *tx)
{
	*rx = rx_count;
	*tx = tx_count;
	return dnet_active;
}
