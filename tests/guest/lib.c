/* nodeos test guest: tiny libc replacement and the serial console. */
#include "guest.h"

/* Plain byte loops; the Makefile passes -fno-tree-loop-distribute-patterns so
 * gcc does not turn these back into calls to themselves. RAM only. */
void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memmove(void *d, const void *s, usize n)
{
	u8 *dp = d;
	const u8 *sp = s;
	if (dp < sp) {
		while (n--)
			*dp++ = *sp++;
	} else {
		while (n--)
			dp[n] = sp[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *x = a, *y = b;
	for (usize i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, usize n)
{
	for (usize i = 0; i < n; i++) {
		if (a[i] != b[i])
			return (u8)a[i] < (u8)b[i] ? -1 : 1;
		if (!a[i])
			return 0;
	}
	return 0;
}

int startswith(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Decimal or 0x-hex; *ok = 0 on garbage or overflow. */
u64 parse_u64(const char *s, usize len, int *ok)
{
	u64 v = 0;
	usize i = 0;
	int base = 10;
	*ok = 0;
	if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i >= len)
		return 0;
	for (; i < len; i++) {
		char c = s[i];
		u64 d;
		if (c >= '0' && c <= '9')
			d = (u64)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (u64)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (u64)(c - 'A' + 10);
		else
			return 0;
		if (v > (~0ULL - d) / (u64)base)
			return 0;
		v = v * (u64)base + d;
	}
	*ok = 1;
	return v;
}

/* splitmix64 finalizer: the mixing function of the blk pattern and dirty mode. */
u64 mix64(u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* ---------------------------------------------------------------- 8250 UART at 0x3f8 */
#define COM1 0x3f8
#define UART_THR 0
#define UART_IER 1
#define UART_DLL 0
#define UART_DLM 1
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20

void serial_init(void)
{
	outb(COM1 + UART_IER, 0x00); /* no interrupts */
	outb(COM1 + UART_LCR, 0x80); /* DLAB */
	outb(COM1 + UART_DLL, 0x01); /* divisor 1: 115200 baud */
	outb(COM1 + UART_DLM, 0x00);
	outb(COM1 + UART_LCR, 0x03); /* 8N1, DLAB off */
	outb(COM1 + UART_FCR, 0xC7); /* FIFO on, clear, 14-byte threshold */
	outb(COM1 + UART_MCR, 0x03); /* DTR | RTS, OUT2 off (no IRQ) */
}

void serial_putc(char c)
{
	/* Poll THRE before every byte; bounded so a missing UART cannot hang us. */
	for (u32 spins = 0; spins < 100000; spins++) {
		if (inb(COM1 + UART_LSR) & LSR_THRE)
			break;
		cpu_relax();
	}
	if (gap_ticking)
		gap_tick(); /* mode=dirty: sending is progress, see dirty.c */
	outb(COM1 + UART_THR, (u8)c);
}

/* ---------------------------------------------------------------- printf-lite */
struct out {
	char *buf; /* NULL: serial */
	usize size;
	usize n;
};

static void out_c(struct out *o, char c)
{
	if (o->buf) {
		if (o->n + 1 < o->size)
			o->buf[o->n] = c;
	} else {
		serial_putc(c);
	}
	o->n++;
}

static void out_num(struct out *o, u64 v, int base, int width, int zero, int neg, int upper)
{
	char tmp[24];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;
	do {
		tmp[n++] = digits[v % (u64)base];
		v /= (u64)base;
	} while (v);
	int len = n + (neg ? 1 : 0);
	if (neg && zero)
		out_c(o, '-');
	for (; len < width; len++)
		out_c(o, zero ? '0' : ' ');
	if (neg && !zero)
		out_c(o, '-');
	while (n)
		out_c(o, tmp[--n]);
}

static void out_fmt(struct out *o, const char *fmt, __builtin_va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			out_c(o, *fmt);
			continue;
		}
		fmt++;
		int zero = 0, width = 0, lng = 0;
		if (*fmt == '0') {
			zero = 1;
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			lng++;
			fmt++;
		}
		if (*fmt == 'z') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			i64 v = lng ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
			out_num(o, v < 0 ? (u64)(-v) : (u64)v, 10, width, zero, v < 0, 0);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			u64 v = lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32);
			out_num(o, v, *fmt == 'u' ? 10 : 16, width, zero, 0, *fmt == 'X');
			break;
		}
		case 'p':
			out_c(o, '0');
			out_c(o, 'x');
			out_num(o, (u64)__builtin_va_arg(ap, void *), 16, width, zero, 0, 0);
			break;
		case 's': {
			const char *s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			usize len = strlen(s);
			for (; (int)len < width; width--)
				out_c(o, ' ');
			while (*s)
				out_c(o, *s++);
			break;
		}
		case 'c':
			out_c(o, (char)__builtin_va_arg(ap, int));
			break;
		case '%':
			out_c(o, '%');
			break;
		case 0:
			return;
		default:
			out_c(o, '%');
			out_c(o, *fmt);
			break;
		}
	}
}

int printf(const char *fmt, ...)
{
	struct out o = { NULL, 0, 0 };
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	out_fmt(&o, fmt, ap);
	__builtin_va_end(ap);
	return (int)o.n;
}

int snprintf(char *buf, usize size, const char *fmt, ...)
{
	struct out o = { buf, size, 0 };
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	out_fmt(&o, fmt, ap);
	__builtin_va_end(ap);
	if (size)
		buf[o.n < size ? o.n : size - 1] = 0;
	return (int)o.n;
}
