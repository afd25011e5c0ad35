/* nodeos test guest: shared declarations. Freestanding, no libc. */
#ifndef NODEOS_GUEST_H
#define NODEOS_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define ALIGNED(n) __attribute__((aligned(n)))
#define PACKED __attribute__((packed))
#define NORETURN __attribute__((noreturn))

/* ---- port I/O ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* ---- MMIO: always a single plain mov of the access width (easy to emulate). ---- */
static inline u8 mmio_read8(u64 a) { u8 v; __asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(a) : "memory"); return v; }
static inline u16 mmio_read16(u64 a) { u16 v; __asm__ volatile("movw (%1), %0" : "=r"(v) : "r"(a) : "memory"); return v; }
static inline u32 mmio_read32(u64 a) { u32 v; __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory"); return v; }
static inline void mmio_write8(u64 a, u8 v) { __asm__ volatile("movb %0, (%1)" : : "q"(v), "r"(a) : "memory"); }
static inline void mmio_write16(u64 a, u16 v) { __asm__ volatile("movw %0, (%1)" : : "r"(v), "r"(a) : "memory"); }
static inline void mmio_write32(u64 a, u32 v) { __asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(a) : "memory"); }

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
/* Full barrier without SSE2's mfence. */
static inline void mb(void) { __asm__ volatile("lock; addl $0, 0(%%rsp)" : : : "memory", "cc"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* ---- lib.c ---- */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
void *memmove(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int strncmp(const char *a, const char *b, usize n);
int startswith(const char *s, const char *prefix);
u64 parse_u64(const char *s, usize len, int *ok);
u64 mix64(u64 x);

void serial_init(void);
void serial_putc(char c);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int snprintf(char *buf, usize size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Every machine-readable line starts with this prefix. */
#define LOG(fmt, ...) printf("NODEOS-GUEST: " fmt "\n", ##__VA_ARGS__)

/* ---- timer.c (TSC, calibrated against PIT channel 2) ---- */
extern u64 tsc_khz;
extern const char *tsc_source;
void timer_init(void);
u64 deadline_ms(u64 ms);
int expired(u64 deadline);
void delay_ms(u64 ms);

/* ---- main.c ---- */
extern int failures;
#define FAIL(fmt, ...) do { failures++; LOG(fmt, ##__VA_ARGS__); } while (0)
NORETURN void power_off(int failed);
void idt_init(void);

struct guest_config {
	char mode[16];
	u64 dirty_mib;
	u64 dirty_words;
	u64 dirty_stamp_ms; /* dirty: a "dirty stamp" line every this many ms (0 = off) */
	u64 dirty_blk;	    /* dirty: one 4 KiB virtio-blk write + read-back check per pass */
	u64 dirty_blk_span; /* dirty: blocks of 4 KiB cycled through */
	u64 dirty_net;	    /* dirty: echo host frames on virtio-net, polled once per pass */
	u64 net_frames;
	u64 net_wait_ms;
	u64 net_expect;
	u64 blk_sectors;
	u64 blk_seed;
	int bar_force_assign;
	/* benchmark modes (bench.c) */
	u64 exits_n;
	u64 exits_port;
	u64 blk_ops;
	u64 blk_qd;
	int blk_write; /* blk_rw=write */
	u64 blk_flush; /* negotiate VIRTIO_BLK_F_FLUSH in blkbench (when offered) */
};
extern struct guest_config cfg;

/* RAM map (from hvm_start_info memmap, if any) */
int ram_known(void);
int ram_contains(u64 base, u64 len);

/* ---- paging (boot.S builds the identity map of 0..4 GiB) ---- */
int map_mmio(u64 phys, u64 len);

/* ---- pci.c ---- */
struct pci_dev {
	u8 dev, fn;
	u16 vendor, device;
	u32 class_code; /* class << 16 | subclass << 8 | prog-if */
};
#define PCI_MAX_DEVS 64
extern struct pci_dev pci_devs[PCI_MAX_DEVS];
extern int pci_ndevs;
void pci_scan(void);
u32 pci_read32(const struct pci_dev *d, u8 off);
void pci_write32(const struct pci_dev *d, u8 off, u32 v);
u8 pci_read8(const struct pci_dev *d, u8 off);
u16 pci_read16(const struct pci_dev *d, u8 off);
u64 pci_bar_mem(const struct pci_dev *d, int bar, int force_assign);
void pci_enable(const struct pci_dev *d);

/* ---- virtio.c ---- */
#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define VQ_MAX 16

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[VQ_MAX];
	u16 used_event;
};
struct vring_used_elem {
	u32 id;
	u32 len;
};
struct vring_used {
	u16 flags;
	u16 idx;
	struct vring_used_elem ring[VQ_MAX];
	u16 avail_event;
};

struct vq_mem {
	struct vring_desc desc[VQ_MAX] ALIGNED(4096);
	struct vring_avail avail ALIGNED(4096);
	struct vring_used used ALIGNED(4096);
} ALIGNED(4096);

struct virtq {
	u16 index;
	u16 size;
	u16 avail_idx;
	u16 last_used;
	u64 notify_addr;
	struct vq_mem *mem;
};

struct virtio_dev {
	const struct pci_dev *pci;
	u64 common;
	u64 notify;
	u64 isr;
	u64 device;
	u32 notify_mult;
	u64 features; /* negotiated */
	u64 offered;
};

int virtio_find(u16 modern_id, u16 transitional_id);
int virtio_init(struct virtio_dev *vd, const struct pci_dev *pci, u64 wanted, const char *who);
int virtio_setup_queue(struct virtio_dev *vd, struct virtq *q, u16 index, struct vq_mem *mem, const char *who);
u16 virtio_setup_queue_raw(struct virtio_dev *vd, u16 index, u16 want, u64 desc, u64 avail, u64 used,
			   u64 *notify, u16 *max_out, const char *who);
int virtio_driver_ok(struct virtio_dev *vd, const char *who);
void virtio_reset(struct virtio_dev *vd);
u8 virtio_cfg_read8(struct virtio_dev *vd, u32 off);
u32 virtio_cfg_read32(struct virtio_dev *vd, u32 off);
u64 virtio_cfg_read64(struct virtio_dev *vd, u32 off);
void vq_push(struct virtq *q, u16 head);
void vq_kick(struct virtq *q);
int vq_pop(struct virtq *q, u32 *id, u32 *len);
int vq_wait(struct virtq *q, u32 *id, u32 *len, u64 timeout_ms);

/* ---- tests ---- */
int blk_test(int required);
int net_test(int required);
NORETURN void dirty_loop(void);
/* dirty.c: while gap_ticking, serial output and virtqueue polling call gap_tick()
 * (a TSC reading for max_gap_us: time spent waiting on a device is not a gap) */
extern int gap_ticking;
void gap_tick(void);
/* dirty mode I/O (blk.c, net.c), see README.md */
int dirty_blk_open(u64 span);
void dirty_blk_pass(u64 pass);
void dirty_blk_report(u64 pass);
int dirty_net_open(void);
void dirty_net_poll(void);
int dirty_net_counts(u64 *rx, u64 *tx);
int exits_bench(void);
NORETURN void idle_forever(void);
int blk_bench(void);

#endif
