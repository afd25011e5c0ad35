/*
 * nodeos test guest: PVH entry.
 *
 * The loader (QEMU, or the nodeos VMM via linux-loader) finds the
 * XEN_ELFNOTE_PHYS32_ENTRY note below and enters pvh_start32 in 32-bit
 * protected mode, paging off, flat 4 GiB CS/DS/ES/SS, interrupts off, with
 * %ebx = guest-physical address of struct hvm_start_info (magic 0x336ec578).
 * Nothing else (no stack) is assumed.
 *
 * We zero .bss (the loader need not: linux-loader copies only p_filesz),
 * identity-map 0..4 GiB with 2 MiB pages, enter long mode and call
 * guest_main(start_info_paddr).
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xC0000080
#define EFER_LME (1 << 8)
#define CR0_PE 0x00000001
#define CR0_MP 0x00000002
#define CR0_ET 0x00000010
#define CR0_NE 0x00000020
#define CR0_WP 0x00010000
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020

/* ---------------------------------------------------------------- note */
	.section .note.Xen, "a", @note
	.p2align 2
	.long 4				/* namesz: "Xen\0" */
	.long 8				/* descsz: 64-bit field, like Linux's vmlinux */
	.long XEN_ELFNOTE_PHYS32_ENTRY	/* type 18 */
	.asciz "Xen"
	.p2align 2
	.long pvh_start32		/* low 32 bits: the entry point (linux-loader reads these 4 bytes) */
	.long 0				/* high 32 bits: zero (QEMU reads 8 bytes for an ELF64) */

/* ---------------------------------------------------------------- 32-bit entry */
	.section .text.boot, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl %ebx, pvh_start_info	/* .data, survives the .bss clear below */

	/* zero .bss (page tables, stack, virtqueues live there) */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl

	/* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3; PDn: 2 MiB pages, identity 0..4 GiB */
	movl $pdpt, %eax
	orl $0x3, %eax			/* present | writable */
	movl %eax, pml4

	movl $pd, %eax
	orl $0x3, %eax
	movl %eax, pdpt + 0
	addl $0x1000, %eax
	movl %eax, pdpt + 8
	addl $0x1000, %eax
	movl %eax, pdpt + 16
	addl $0x1000, %eax
	movl %eax, pdpt + 24

	movl $pd, %edi
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax			/* present | writable | PS (2 MiB) */
	movl %eax, (%edi, %ecx, 8)
	movl $0, 4(%edi, %ecx, 8)
	incl %ecx
	cmpl $2048, %ecx
	jb 1b

	lgdt gdt_desc

	movl $CR4_PAE, %eax
	movl %eax, %cr4

	movl $pml4, %eax
	movl %eax, %cr3

	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr

	movl $(CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG), %eax
	movl %eax, %cr0

	ljmpl $0x08, $long_entry

/* ---------------------------------------------------------------- 64-bit */
	.code64
long_entry:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	leaq stack_top(%rip), %rsp
	xorl %ebp, %ebp
	movl pvh_start_info(%rip), %edi	/* zero-extends into %rdi */
	call guest_main
2:	cli
	hlt
	jmp 2b

/* ---------------------------------------------------------------- exceptions */
/* vectors that push an error code: 8, 10-14, 17, 21, 29, 30 */
.macro ISR_NOERR n
isr\n:
	pushq $0
	pushq $\n
	jmp isr_common
.endm
.macro ISR_ERR n
isr\n:
	pushq $\n
	jmp isr_common
.endm

	ISR_NOERR 0
	ISR_NOERR 1
	ISR_NOERR 2
	ISR_NOERR 3
	ISR_NOERR 4
	ISR_NOERR 5
	ISR_NOERR 6
	ISR_NOERR 7
	ISR_ERR   8
	ISR_NOERR 9
	ISR_ERR   10
	ISR_ERR   11
	ISR_ERR   12
	ISR_ERR   13
	ISR_ERR   14
	ISR_NOERR 15
	ISR_NOERR 16
	ISR_ERR   17
	ISR_NOERR 18
	ISR_NOERR 19
	ISR_NOERR 20
	ISR_ERR   21
	ISR_NOERR 22
	ISR_NOERR 23
	ISR_NOERR 24
	ISR_NOERR 25
	ISR_NOERR 26
	ISR_NOERR 27
	ISR_NOERR 28
	ISR_ERR   29
	ISR_ERR   30
	ISR_NOERR 31

isr_common:
	movq %rsp, %rdi			/* frame: vector, error, rip, cs, rflags, rsp, ss */
	andq $-16, %rsp
	call exception_handler		/* does not return */
3:	cli
	hlt
	jmp 3b

	.section .rodata
	.p2align 3
	.globl isr_table
isr_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\n
	.endr

/* ---------------------------------------------------------------- data */
	.section .data
	.p2align 3
	.globl pvh_start_info
pvh_start_info:
	.long 0
	.long 0

	.p2align 3
gdt:
	.quad 0				/* null */
	.quad 0x00AF9A000000FFFF	/* 0x08: 64-bit code, DPL0 */
	.quad 0x00CF92000000FFFF	/* 0x10: flat data */
gdt_end:
	.p2align 1
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.section .bss
	.p2align 12
	.globl pml4, pdpt
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
	.p2align 4
stack_bottom:
	.skip 65536
stack_top:

	.section .note.GNU-stack, "", @progbits
