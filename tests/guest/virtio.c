/* nodeos test guest: virtio 1.0 over PCI, modern interface only, polled split queues. */
#include "guest.h"

/* virtio_pci_cap cfg_type */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4

/* common configuration layout */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_CFGGEN 0x15
#define C_Q_SELECT 0x16
#define C_Q_SIZE 0x18
#define C_Q_MSIX 0x1a
#define C_Q_ENABLE 0x1c
#define C_Q_NOFF 0x1e
#define C_Q_DESC 0x20
#define C_Q_AVAIL 0x28
#define C_Q_USED 0x30

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

int virtio_find(u16 modern_id, u16 transitional_id)
{
	for (int i = 0; i < pci_ndevs; i++) {
		const struct pci_dev *d = &pci_devs[i];
		if (d->vendor == 0x1af4 && (d->device == modern_id || d->device == transitional_id))
			return i;
	}
	return -1;
}

static void w64(u64 a, u64 v)
{
	mmio_write32(a, (u32)v);
	mmio_write32(a + 4, (u32)(v >> 32));
}

void virtio_reset(struct virtio_dev *vd)
{
	mmio_write8(vd->common + C_STATUS, 0);
	u64 dl = deadline_ms(1000);
	while (mmio_read8(vd->common + C_STATUS) != 0 && !expired(dl))
		cpu_relax();
}

static void set_status(struct virtio_dev *vd, u8 bits)
{
	u8 s = mmio_read8(vd->common + C_STATUS);
	mmio_write8(vd->common + C_STATUS, (u8)(s | bits));
}

int virtio_init(struct virtio_dev *vd, const struct pci_dev *pci, u64 wanted, const char *who)
{
	memset(vd, 0, sizeof(*vd));
	vd->pci = pci;

	u16 status = (u16)(pci_read32(pci, 0x04) >> 16);
	if (!(status & 0x10)) {
		FAIL("%s FAIL no capability list", who);
		return -1;
	}
	u64 bar_addr[6] = { 0 };
	int bar_done[6] = { 0 };
	u8 ptr = pci_read8(pci, 0x34) & 0xfc;
	for (int guard = 0; ptr && guard < 48; guard++) {
		u8 id = pci_read8(pci, ptr);
		u8 next = pci_read8(pci, (u8)(ptr + 1)) & 0xfc;
		if (id == 0x09) {
			u8 type = pci_read8(pci, (u8)(ptr + 3));
			u8 bar = pci_read8(pci, (u8)(ptr + 4));
			u32 off = pci_read32(pci, (u8)(ptr + 8));
			u32 len = pci_read32(pci, (u8)(ptr + 12));
			u64 *slot = NULL;
			switch (type) {
			case CAP_COMMON: slot = &vd->common; break;
			case CAP_NOTIFY: slot = &vd->notify; break;
			case CAP_ISR: slot = &vd->isr; break;
			case CAP_DEVICE: slot = &vd->device; break;
			default: break;
			}
			/* first capability of each type wins; BARs 0-5 only */
			if (slot && !*slot && bar <= 5) {
				if (!bar_done[bar]) {
					bar_addr[bar] = pci_bar_mem(pci, bar, cfg.bar_force_assign);
					bar_done[bar] = 1;
					if (bar_addr[bar])
						LOG("%s bar%u=0x%lx", who, bar, bar_addr[bar]);
				}
				if (bar_addr[bar] && map_mmio(bar_addr[bar] + off, len ? len : 1) == 0) {
					*slot = bar_addr[bar] + off;
					if (type == CAP_NOTIFY)
						vd->notify_mult = pci_read32(pci, (u8)(ptr + 16));
				}
			}
		}
		ptr = next;
	}
	if (!vd->common || !vd->notify || !vd->isr) {
		FAIL("%s FAIL missing virtio capability common=0x%lx notify=0x%lx isr=0x%lx", who,
		     vd->common, vd->notify, vd->isr);
		return -1;
	}
	pci_enable(pci);

	virtio_reset(vd);
	if (mmio_read8(vd->common + C_STATUS) != 0) {
		FAIL("%s FAIL reset did not complete", who);
		return -1;
	}
	set_status(vd, S_ACK);
	set_status(vd, S_DRIVER);

	mmio_write32(vd->common + C_DFSELECT, 0);
	u64 f = mmio_read32(vd->common + C_DF);
	mmio_write32(vd->common + C_DFSELECT, 1);
	f |= (u64)mmio_read32(vd->common + C_DF) << 32;
	vd->offered = f;
	if (!(f & VIRTIO_F_VERSION_1)) {
		set_status(vd, S_FAILED);
		FAIL("%s FAIL device does not offer VIRTIO_F_VERSION_1 features=0x%lx", who, f);
		return -1;
	}
	u64 want = (wanted | VIRTIO_F_VERSION_1) & f;
	mmio_write32(vd->common + C_GFSELECT, 0);
	mmio_write32(vd->common + C_GF, (u32)want);
	mmio_write32(vd->common + C_GFSELECT, 1);
	mmio_write32(vd->common + C_GF, (u32)(want >> 32));
	set_status(vd, S_FEATURES_OK);
	if (!(mmio_read8(vd->common + C_STATUS) & S_FEATURES_OK)) {
		set_status(vd, S_FAILED);
		FAIL("%s FAIL FEATURES_OK not accepted offered=0x%lx wanted=0x%lx", who, f, want);
		return -1;
	}
	vd->features = want;
	LOG("%s virtio 00:%02x.%u device=%04x offered=0x%lx negotiated=0x%lx", who, pci->dev,
	    pci->fn, pci->device, f, want);
	return 0;
}

/* Queue setup at any guest-physical ring addresses: size = min(device max, want).
 * Returns the size used (0 on failure) and the notify address in *notify. */
u16 virtio_setup_queue_raw(struct virtio_dev *vd, u16 index, u16 want, u64 desc, u64 avail, u64 used,
			   u64 *notify, u16 *max_out, const char *who)
{
	mmio_write16(vd->common + C_Q_SELECT, index);
	u16 max = mmio_read16(vd->common + C_Q_SIZE);
	if (max_out)
		*max_out = max;
	if (max == 0) {
		FAIL("%s FAIL queue %u not available", who, index);
		return 0;
	}
	u16 size = max < want ? max : want;
	mmio_write16(vd->common + C_Q_SIZE, size);
	mmio_write16(vd->common + C_Q_MSIX, 0xffff); /* VIRTIO_MSI_NO_VECTOR: we poll */
	w64(vd->common + C_Q_DESC, desc);
	w64(vd->common + C_Q_AVAIL, avail);
	w64(vd->common + C_Q_USED, used);
	u16 noff = mmio_read16(vd->common + C_Q_NOFF);
	*notify = vd->notify + (u64)noff * vd->notify_mult;
	*(volatile u16 *)avail = 1; /* avail.flags = VRING_AVAIL_F_NO_INTERRUPT: we poll (a hint only) */
	mmio_write16(vd->common + C_Q_ENABLE, 1);
	return size;
}

int virtio_setup_queue(struct virtio_dev *vd, struct virtq *q, u16 index, struct vq_mem *mem,
		       const char *who)
{
	memset(mem, 0, sizeof(*mem));
	u16 max = 0;
	u64 notify = 0;
	u16 size = virtio_setup_queue_raw(vd, index, VQ_MAX, (u64)&mem->desc[0], (u64)&mem->avail,
					  (u64)&mem->used, &notify, &max, who);
	if (size == 0)
		return -1;
	q->index = index;
	q->size = size;
	q->avail_idx = 0;
	q->last_used = 0;
	q->mem = mem;
	q->notify_addr = notify;
	LOG("%s queue %u size=%u max=%u notify=0x%lx", who, index, size, max, q->notify_addr);
	return 0;
}

int virtio_driver_ok(struct virtio_dev *vd, const char *who)
{
	set_status(vd, S_DRIVER_OK);
	u8 s = mmio_read8(vd->common + C_STATUS);
	if (s & (S_NEEDS_RESET | S_FAILED) || !(s & S_DRIVER_OK)) {
		FAIL("%s FAIL device status 0x%x after DRIVER_OK", who, s);
		return -1;
	}
	return 0;
}

/* Device-specific config, read with config_generation retry. */
u8 virtio_cfg_read8(struct virtio_dev *vd, u32 off)
{
	return mmio_read8(vd->device + off);
}

u32 virtio_cfg_read32(struct virtio_dev *vd, u32 off)
{
	return mmio_read32(vd->device + off);
}

u64 virtio_cfg_read64(struct virtio_dev *vd, u32 off)
{
	u8 g0, g1;
	u32 lo, hi;
	int tries = 0;
	do {
		g0 = mmio_read8(vd->common + C_CFGGEN);
		lo = mmio_read32(vd->device + off);
		hi = mmio_read32(vd->device + off + 4);
		g1 = mmio_read8(vd->common + C_CFGGEN);
	} while (g0 != g1 && ++tries < 100);
	return ((u64)hi << 32) | lo;
}

/* ---------------------------------------------------------------- split virtqueue */
void vq_push(struct virtq *q, u16 head)
{
	volatile struct vring_avail *av = &q->mem->avail;
	av->ring[q->avail_idx % q->size] = head;
	barrier(); /* descriptors and ring entry before idx (x86: stores are ordered) */
	q->avail_idx++;
	av->idx = q->avail_idx;
}

void vq_kick(struct virtq *q)
{
	mb(); /* avail idx visible before the notify */
	mmio_write16(q->notify_addr, q->index);
}

int vq_pop(struct virtq *q, u32 *id, u32 *len)
{
	volatile struct vring_used *u = &q->mem->used;
	if (u->idx == q->last_used)
		return 0;
	barrier(); /* idx before ring contents */
	volatile struct vring_used_elem *e = &u->ring[q->last_used % q->size];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return 1;
}

int vq_wait(struct virtq *q, u32 *id, u32 *len, u64 timeout_ms)
{
	u64 dl = deadline_ms(timeout_ms);
	for (;;) {
		if (vq_pop(q, id, len))
			return 0;
		if (expired(dl))
			return -1;
		if (gap_ticking)
			gap_tick();
		cpu_relax();
	}
}
