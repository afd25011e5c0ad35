/* nodeos test guest: boot info, command line, exceptions, dispatch, power off. */
#include "guest.h"

#define HVM_START_MAGIC 0x336ec578u

/* Xen public/arch-x86/hvm/start_info.h */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	/* version >= 1 */
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
} PACKED;

struct hvm_memmap_table_entry {
	u64 addr;
	u64 size;
	u32 type; /* 1 = RAM (E820 numbering) */
	u32 reserved;
} PACKED;

int failures;
struct guest_config cfg;

#define CMDLINE_MAX 512
static char cmdline[CMDLINE_MAX];

#define MEMMAP_MAX 32
static struct hvm_memmap_table_entry memmap[MEMMAP_MAX];
static u32 memmap_n;
static int memmap_valid;

/* ---------------------------------------------------------------- power off */
NORETURN void power_off(int failed)
{
	/* isa-debug-exit at 0xf4 first: QEMU exits at once with status (value << 1) | 1,
	 * so 1 = success, 3 = failure. (The ACPI write below is handled asynchronously
	 * by QEMU and would race with it, turning a failure into status 0.) */
	outb(0xf4, failed ? 1 : 0);
	/* ACPI PM1a_CNT at 0x604 (PM base 0x600 as SeaBIOS sets it up): SLP_EN | SLP_TYP=0 = S5 */
	outw(0x604, 0x2000);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---------------------------------------------------------------- exceptions */
struct idt_entry {
	u16 off_lo;
	u16 sel;
	u8 ist;
	u8 type;
	u16 off_mid;
	u32 off_hi;
	u32 zero;
} PACKED;

static struct idt_entry idt[32] ALIGNED(16);
extern const u64 isr_table[32];

void idt_init(void)
{
	for (int i = 0; i < 32; i++) {
		u64 a = isr_table[i];
		idt[i].off_lo = (u16)a;
		idt[i].sel = 0x08;
		idt[i].ist = 0;
		idt[i].type = 0x8e; /* present, DPL0, 64-bit interrupt gate */
		idt[i].off_mid = (u16)(a >> 16);
		idt[i].off_hi = (u32)(a >> 32);
		idt[i].zero = 0;
	}
	struct {
		u16 limit;
		u64 base;
	} PACKED d = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(d));
}

void exception_handler(u64 *frame);
void exception_handler(u64 *frame)
{
	static int nested;
	u64 cr2;
	if (nested++)
		for (;;)
			__asm__ volatile("cli; hlt");
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	LOG("FAIL exception vector=%lu error=0x%lx rip=0x%lx rsp=0x%lx cr2=0x%lx",
	    frame[0], frame[1], frame[2], frame[5], cr2);
	power_off(1);
}

/* ---------------------------------------------------------------- paging for MMIO above 4 GiB */
extern u64 pml4[512];
extern u64 pdpt[512];
static u64 extra_pd[4][512] ALIGNED(4096);
static int extra_pd_used;

int map_mmio(u64 phys, u64 len)
{
	if (phys + len <= 0x100000000ULL)
		return 0; /* identity-mapped by boot.S */
	if (phys + len > (512ULL << 30))
		return -1; /* beyond PML4[0]; not supported */
	for (u64 a = phys & ~0x1fffffULL; a < phys + len; a += 0x200000ULL) {
		u32 pi = (u32)(a >> 30) & 511;
		if (!(pdpt[pi] & 1)) {
			if (extra_pd_used >= 4)
				return -1;
			u64 *pd = extra_pd[extra_pd_used++];
			memset(pd, 0, 4096);
			pdpt[pi] = (u64)pd | 0x3;
		}
		u64 *pd = (u64 *)(pdpt[pi] & ~0xfffULL);
		/* present | writable | PWT | PCD | PS */
		pd[(a >> 21) & 511] = a | 0x9b;
	}
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
	return 0;
}

/* ---------------------------------------------------------------- RAM map */
int ram_known(void)
{
	return memmap_valid;
}

int ram_contains(u64 base, u64 len)
{
	for (u32 i = 0; i < memmap_n; i++) {
		if (memmap[i].type != 1)
			continue;
		if (base >= memmap[i].addr && base + len <= memmap[i].addr + memmap[i].size)
			return 1;
	}
	return 0;
}

/* ---------------------------------------------------------------- command line */
static const char *bad_key; /* reported after the boot line */

static void set_u64(const char *key, const char *v, usize vlen, u64 *dst)
{
	int ok;
	u64 x = parse_u64(v, vlen, &ok);
	if (ok)
		*dst = x;
	else if (!bad_key)
		bad_key = key;
}

static void parse_cmdline(void)
{
	memcpy(cfg.mode, "all", 4);
	cfg.dirty_mib = 16;
	cfg.dirty_words = 8;
	cfg.dirty_stamp_ms = 0;
	cfg.dirty_blk = 0;
	cfg.dirty_blk_span = 64;
	cfg.dirty_net = 0;
	cfg.net_frames = 4;
	cfg.net_wait_ms = 10000;
	cfg.net_expect = 0;
	cfg.blk_sectors = 64;
	cfg.blk_seed = 1;
	cfg.bar_force_assign = 0;
	cfg.exits_n = 20000;
	cfg.exits_port = 0x520;
	cfg.blk_ops = 2000;
	cfg.blk_qd = 1;
	cfg.blk_write = 0;
	cfg.blk_flush = 1;

	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		if (!*p)
			break;
		const char *tok = p;
		while (*p && *p != ' ')
			p++;
		usize tlen = (usize)(p - tok);
		const char *eq = tok;
		while (eq < p && *eq != '=')
			eq++;
		if (eq == p)
			continue; /* bare word: ignore */
		usize klen = (usize)(eq - tok);
		const char *v = eq + 1;
		usize vlen = tlen - klen - 1;
#define KEY(k) (klen == sizeof(k) - 1 && strncmp(tok, k, klen) == 0)
		if (KEY("mode")) {
			if (vlen >= sizeof(cfg.mode))
				vlen = sizeof(cfg.mode) - 1;
			memcpy(cfg.mode, v, vlen);
			cfg.mode[vlen] = 0;
		} else if (KEY("dirty_mib"))
			set_u64("dirty_mib", v, vlen, &cfg.dirty_mib);
		else if (KEY("dirty_words"))
			set_u64("dirty_words", v, vlen, &cfg.dirty_words);
		else if (KEY("dirty_stamp_ms"))
			set_u64("dirty_stamp_ms", v, vlen, &cfg.dirty_stamp_ms);
		else if (KEY("dirty_blk"))
			set_u64("dirty_blk", v, vlen, &cfg.dirty_blk);
		else if (KEY("dirty_blk_span"))
			set_u64("dirty_blk_span", v, vlen, &cfg.dirty_blk_span);
		else if (KEY("dirty_net"))
			set_u64("dirty_net", v, vlen, &cfg.dirty_net);
		else if (KEY("net_frames"))
			set_u64("net_frames", v, vlen, &cfg.net_frames);
		else if (KEY("net_wait_ms"))
			set_u64("net_wait_ms", v, vlen, &cfg.net_wait_ms);
		else if (KEY("net_expect"))
			set_u64("net_expect", v, vlen, &cfg.net_expect);
		else if (KEY("blk_sectors"))
			set_u64("blk_sectors", v, vlen, &cfg.blk_sectors);
		else if (KEY("blk_seed"))
			set_u64("blk_seed", v, vlen, &cfg.blk_seed);
		else if (KEY("bar_assign"))
			cfg.bar_force_assign = vlen == 5 && strncmp(v, "force", 5) == 0;
		else if (KEY("exits_n"))
			set_u64("exits_n", v, vlen, &cfg.exits_n);
		else if (KEY("exits_port"))
			set_u64("exits_port", v, vlen, &cfg.exits_port);
		else if (KEY("blk_ops"))
			set_u64("blk_ops", v, vlen, &cfg.blk_ops);
		else if (KEY("blk_flush"))
			set_u64("blk_flush", v, vlen, &cfg.blk_flush);
		else if (KEY("blk_qd"))
			set_u64("blk_qd", v, vlen, &cfg.blk_qd);
		else if (KEY("blk_rw")) {
			if (vlen == 5 && strncmp(v, "write", 5) == 0)
				cfg.blk_write = 1;
			else if (vlen == 4 && strncmp(v, "read", 4) == 0)
				cfg.blk_write = 0;
			else if (!bad_key)
				bad_key = "blk_rw";
		}
#undef KEY
		/* unknown keys are ignored (the VMM may add its own) */
	}
}

/* ---------------------------------------------------------------- main */
void guest_main(u32 start_info_pa);
void guest_main(u32 start_info_pa)
{
	serial_init();
	serial_putc('\n'); /* firmware output may not end with a newline */
	idt_init();

	const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)start_info_pa;
	int si_ok = start_info_pa != 0 && si->magic == HVM_START_MAGIC;
	u32 version = si_ok ? si->version : 0;
	if (si_ok && si->cmdline_paddr && si->cmdline_paddr < 0x100000000ULL) {
		const char *c = (const char *)si->cmdline_paddr;
		usize n = 0;
		while (n < CMDLINE_MAX - 1 && c[n]) {
			char ch = c[n];
			cmdline[n] = (ch == '\t' || ch == '\n' || ch == '\r') ? ' ' : ch;
			n++;
		}
		cmdline[n] = 0;
	}
	u64 ram_total = 0;
	if (si_ok && version >= 1 && si->memmap_paddr && si->memmap_entries &&
	    si->memmap_paddr < 0x100000000ULL) {
		const struct hvm_memmap_table_entry *m =
			(const struct hvm_memmap_table_entry *)si->memmap_paddr;
		memmap_n = si->memmap_entries < MEMMAP_MAX ? si->memmap_entries : MEMMAP_MAX;
		for (u32 i = 0; i < memmap_n; i++) {
			memmap[i] = m[i];
			if (memmap[i].type == 1)
				ram_total += memmap[i].size;
		}
		memmap_valid = 1;
	}
	parse_cmdline();

	/* printable copy of the command line for the boot line */
	char shown[CMDLINE_MAX];
	usize i;
	for (i = 0; cmdline[i]; i++)
		shown[i] = (cmdline[i] < 0x20 || cmdline[i] > 0x7e || cmdline[i] == '"') ? '?' : cmdline[i];
	shown[i] = 0;
	char memhint[32];
	if (memmap_valid)
		snprintf(memhint, sizeof(memhint), "%luMiB", ram_total >> 20);
	else
		snprintf(memhint, sizeof(memhint), "unknown");
	LOG("boot ok cmdline=\"%s\" mem_hint=%s", shown, memhint);

	timer_init();
	LOG("info start_info=0x%x magic=%s version=%u memmap_entries=%u tsc_khz=%lu tsc_source=%s",
	    start_info_pa, si_ok ? "ok" : "bad", version, memmap_n, tsc_khz, tsc_source);
	for (u32 k = 0; k < memmap_n; k++)
		LOG("mem base=0x%lx size=0x%lx type=%u", memmap[k].addr, memmap[k].size, memmap[k].type);
	LOG("config mode=%s dirty_mib=%lu dirty_words=%lu net_frames=%lu net_wait_ms=%lu net_expect=%lu blk_sectors=%lu blk_seed=%lu bar_assign=%s",
	    cfg.mode, cfg.dirty_mib, cfg.dirty_words, cfg.net_frames, cfg.net_wait_ms, cfg.net_expect,
	    cfg.blk_sectors, cfg.blk_seed, cfg.bar_force_assign ? "force" : "auto");

	if (bad_key)
		FAIL("FAIL cmdline bad value for %s", bad_key);

	pci_scan();

	if (strncmp(cfg.mode, "boot", 5) == 0) {
		/* nothing more */
	} else if (strncmp(cfg.mode, "blk", 4) == 0) {
		blk_test(1);
	} else if (strncmp(cfg.mode, "net", 4) == 0) {
		net_test(1);
	} else if (strncmp(cfg.mode, "all", 4) == 0) {
		blk_test(0);
		net_test(0);
	} else if (strncmp(cfg.mode, "idle", 5) == 0) {
		idle_forever();
	} else if (strncmp(cfg.mode, "exits", 6) == 0) {
		exits_bench();
	} else if (strncmp(cfg.mode, "blkbench", 9) == 0) {
		blk_bench();
	} else if (strncmp(cfg.mode, "dirty", 6) == 0) {
		dirty_loop();
	} else if (strncmp(cfg.mode, "crash", 6) == 0) {
		/* for VMM tests of a failing guest: #UD -> exception line, failure exit */
		LOG("crash executing ud2");
		__asm__ volatile("ud2");
	} else {
		FAIL("FAIL unknown mode=%s", cfg.mode);
	}

	if (failures)
		LOG("summary FAIL failures=%d", failures);
	else
		LOG("summary ok");
	LOG("done");
	power_off(failures != 0);
}
