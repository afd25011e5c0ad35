/* nodeos test guest: PCI bus 0 via configuration mechanism #1.
 *
 * Only aligned 32-bit accesses: outl(0xCF8, addr) then inl/outl(0xCFC).
 * 8/16-bit fields are extracted from (or merged into) the dword.
 */
#include "guest.h"

#define PCI_ADDR 0xCF8
#define PCI_DATA 0xCFC

struct pci_dev pci_devs[PCI_MAX_DEVS];
int pci_ndevs;

static u32 cfg_addr(u8 dev, u8 fn, u8 off)
{
	return 0x80000000u | ((u32)dev << 11) | ((u32)fn << 8) | (off & 0xfc);
}

static u32 raw_read32(u8 dev, u8 fn, u8 off)
{
	outl(PCI_ADDR, cfg_addr(dev, fn, off));
	return inl(PCI_DATA);
}

u32 pci_read32(const struct pci_dev *d, u8 off)
{
	return raw_read32(d->dev, d->fn, off);
}

void pci_write32(const struct pci_dev *d, u8 off, u32 v)
{
	outl(PCI_ADDR, cfg_addr(d->dev, d->fn, off));
	outl(PCI_DATA, v);
}

u8 pci_read8(const struct pci_dev *d, u8 off)
{
	return (u8)(pci_read32(d, off) >> ((off & 3) * 8));
}

u16 pci_read16(const struct pci_dev *d, u8 off)
{
	return (u16)(pci_read32(d, off) >> ((off & 2) * 8));
}

void pci_scan(void)
{
	pci_ndevs = 0;
	for (u8 dev = 0; dev < 32; dev++) {
		u8 nfn = 1;
		for (u8 fn = 0; fn < nfn; fn++) {
			u32 id = raw_read32(dev, fn, 0x00);
			u16 vendor = (u16)id;
			if (vendor == 0xffff || vendor == 0x0000)
				continue;
			if (fn == 0 && (raw_read32(dev, 0, 0x0c) & 0x00800000u))
				nfn = 8; /* multi-function */
			u32 cls = raw_read32(dev, fn, 0x08) >> 8;
			LOG("pci 00:%02x.%u vendor=%04x device=%04x class=%06x", dev, fn, vendor,
			    id >> 16, cls);
			if (pci_ndevs < PCI_MAX_DEVS) {
				struct pci_dev *p = &pci_devs[pci_ndevs++];
				p->dev = dev;
				p->fn = fn;
				p->vendor = vendor;
				p->device = (u16)(id >> 16);
				p->class_code = cls;
			}
		}
	}
	LOG("pci scan done devices=%d", pci_ndevs);
}

/* Command register: memory space (bit 1) + bus master (bit 2). The upper half
 * (status) is written as 0, which leaves its RW1C bits alone. */
void pci_enable(const struct pci_dev *d)
{
	u16 cmd = (u16)pci_read32(d, 0x04);
	pci_write32(d, 0x04, (u32)(cmd | 0x0006));
}

/* Window for BARs that nobody assigned (or bar_assign=force). */
static u64 bar_window = 0xC0000000ULL;
#define BAR_WINDOW_END 0xFEC00000ULL /* stay below the IOAPIC / LAPIC / flash area */

/* Returns the physical address of memory BAR `bar` (0 on failure), assigning it
 * from the window if it is 0 (or if force_assign). The caller maps what it uses. */
u64 pci_bar_mem(const struct pci_dev *d, int bar, int force_assign)
{
	if (bar < 0 || bar > 5)
		return 0;
	u8 off = (u8)(0x10 + bar * 4);
	u32 lo = pci_read32(d, off);
	if (lo & 1) {
		LOG("pci 00:%02x.%u bar%d is an I/O BAR, need memory", d->dev, d->fn, bar);
		return 0;
	}
	int is64 = ((lo >> 1) & 3) == 2;
	if (is64 && bar == 5)
		return 0;
	u32 hi = is64 ? pci_read32(d, (u8)(off + 4)) : 0;
	u64 addr = ((u64)hi << 32) | (lo & ~0xfULL);

	if (addr == 0 || force_assign) {
		/* size it with decoding off */
		u32 cmd = pci_read32(d, 0x04) & 0xffff;
		pci_write32(d, 0x04, cmd & ~0x3u);
		pci_write32(d, off, 0xffffffffu);
		u32 szlo = pci_read32(d, off);
		u32 szhi = 0xffffffffu;
		if (is64) {
			pci_write32(d, (u8)(off + 4), 0xffffffffu);
			szhi = pci_read32(d, (u8)(off + 4));
		}
		u64 mask = ((u64)szhi << 32) | (szlo & ~0xfULL);
		if (!is64)
			mask |= 0xffffffff00000000ULL;
		u64 size = ~mask + 1;
		if (mask == 0 || size == 0 || (size & (size - 1))) {
			pci_write32(d, off, lo);
			if (is64)
				pci_write32(d, (u8)(off + 4), hi);
			pci_write32(d, 0x04, cmd);
			LOG("pci 00:%02x.%u bar%d sizing failed mask=0x%lx", d->dev, d->fn, bar, mask);
			return 0;
		}
		u64 a = (bar_window + size - 1) & ~(size - 1);
		if (a + size > BAR_WINDOW_END) {
			pci_write32(d, off, lo);
			if (is64)
				pci_write32(d, (u8)(off + 4), hi);
			pci_write32(d, 0x04, cmd);
			LOG("pci 00:%02x.%u bar%d window exhausted size=0x%lx", d->dev, d->fn, bar, size);
			return 0;
		}
		bar_window = a + size;
		pci_write32(d, off, (u32)a | (lo & 0xf));
		if (is64)
			pci_write32(d, (u8)(off + 4), (u32)(a >> 32));
		pci_write32(d, 0x04, cmd);
		LOG("pci 00:%02x.%u bar%d assigned addr=0x%lx size=0x%lx (was 0x%lx)", d->dev, d->fn,
		    bar, a, size, addr);
		addr = a;
	}
	return addr;
}
