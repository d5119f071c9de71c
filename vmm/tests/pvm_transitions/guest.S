/*
 * Tiny guest of the privilege-transition experiment (vmm/tests/pvm_transitions.rs).
 *
 * Linked at 0x10000 and loaded there; identity-mapped by page tables the host builds.
 * Page 0x10000: user code (U=1). Pages 0x11000-0x12fff: kernel code (U=0, also
 * aliased in the high half at 0xffffffff81000000 like Linux's text). Page 0x13000:
 * user data (U=1). The host starts the vCPU at CPL 3 at one of the u_* entries.
 *
 * Reports: a qword write to the doorbell (VA 0x1ff000 for user code, 0x1fe000 for
 * kernel code; one guest-physical page outside RAM) is a
 * KVM_EXIT_MMIO whose data is the event code. Kernel-side records go to the
 * supervisor-only results page at 0x40000, user-side records to 0x13000.
 */
    .intel_syntax noprefix
    .code64

    .equ DOORBELL, 0x1ff000     /* user-accessible alias of the doorbell */
    .equ KDOORBELL, 0x1fe000    /* supervisor-only alias (usable under SMAP) */
    .equ RESULTS, 0x40000
    .equ R_SYSCALL, RESULTS + 0x000
    .equ R_INT80, RESULTS + 0x080
    .equ R_PF, RESULTS + 0x100
    .equ R_FAULT, RESULTS + 0x180
    .equ R_GS, RESULTS + 0x200
    .equ USER_DATA, 0x13000
    .equ NOT_PRESENT, 0x180000
    .equ KSTACK_TOP, 0x21000

    .macro bell code
    mov qword ptr [DOORBELL], \code
    .endm

    .macro kbell code
    mov qword ptr [KDOORBELL], \code
    .endm

    .text
    .globl _start
/* ---------------- user code (page 0x10000) ---------------- */
_start:
u_syscall:                      /* 0x10000 */
    bell 0x01
    lea r15, [rip + u_back]
    mov rax, 0x5151
    mov rcx, 0x1111
    mov r11, 0x2222
    syscall
    jmp u_back
    .org 0x40
u_int80:                        /* 0x10040 */
    bell 0x01
    lea r15, [rip + u_back]
    int 0x80
    jmp u_back
    .org 0x80
u_pf:                           /* 0x10080 */
    bell 0x01
    lea r15, [rip + u_back]
    mov rax, [NOT_PRESENT]
    jmp u_back
    .org 0xc0
u_jump_lstar:                   /* 0x100c0: user code jumping to the syscall entry itself */
    bell 0x01
    lea r15, [rip + u_back]
    mov r11, 0x46               /* what a masked RFLAGS would look like */
    mov rax, 0x11000            /* LSTAR of the plain low handler */
    jmp rax
    .org 0x100
u_back:
    mov [USER_DATA + 0x00], rcx
    mov [USER_DATA + 0x08], r11
    mov [USER_DATA + 0x10], rsp
    mov [USER_DATA + 0x18], rax
    mov ax, cs
    movzx eax, ax
    mov [USER_DATA + 0x20], rax
    pushfq
    pop rax
    mov [USER_DATA + 0x28], rax
    bell 0x02
    bell 0xff
1:  jmp 1b

/* ---------------- kernel code (page 0x11000, no U bit) ---------------- */
    .org 0x1000
k_syscall_plain:                /* 0x11000: the simplest handler: no swapgs, user stack */
    kbell 0x10
    mov [R_SYSCALL + 0x08], rsp
    mov [R_SYSCALL + 0x10], rcx
    mov [R_SYSCALL + 0x18], r11
    mov [R_SYSCALL + 0x20], rax
    mov ax, cs
    movzx eax, ax
    mov [R_SYSCALL + 0x28], rax
    mov ax, ss
    movzx eax, ax
    mov [R_SYSCALL + 0x30], rax
    pushfq
    pop rax
    mov [R_SYSCALL + 0x38], rax
    mov rax, cr3
    mov [R_SYSCALL + 0x40], rax
    mov qword ptr [R_SYSCALL], 1
    kbell 0x11
    mov rax, 0x600d
    sysretq

    .org 0x1100
k_syscall_linux:                /* 0x11100: Linux's entry_SYSCALL_64 prologue */
    swapgs
    mov gs:[0x10], rsp          /* user RSP to per-cpu scratch */
    mov rsp, gs:[0x08]          /* kernel stack from per-cpu data */
    push 0x2b                   /* pt_regs-like frame: ss, sp, flags, cs, ip */
    push qword ptr gs:[0x10]
    push r11
    push 0x33
    push rcx
    kbell 0x10
    mov [R_SYSCALL + 0x08], rsp
    mov [R_SYSCALL + 0x10], rcx
    mov [R_SYSCALL + 0x18], r11
    mov [R_SYSCALL + 0x20], rax
    mov ax, cs
    movzx eax, ax
    mov [R_SYSCALL + 0x28], rax
    mov ax, ss
    movzx eax, ax
    mov [R_SYSCALL + 0x30], rax
    pushfq
    pop rax
    mov [R_SYSCALL + 0x38], rax
    mov rax, gs:[0]             /* per-cpu self pointer: proves GS is the kernel's */
    mov [R_SYSCALL + 0x48], rax
    mov qword ptr [R_SYSCALL], 2
    kbell 0x11
    pop rcx
    add rsp, 8
    pop r11
    pop rsp                     /* back to the user stack */
    swapgs
    mov rax, 0x600d
    sysretq

    .org 0x1200
k_int80:                        /* 0x11200: IDT gate 0x80, DPL 3 */
    kbell 0x20
    mov rax, [rsp + 0x00]
    mov [R_INT80 + 0x08], rax   /* RIP */
    mov rax, [rsp + 0x08]
    mov [R_INT80 + 0x10], rax   /* CS */
    mov rax, [rsp + 0x10]
    mov [R_INT80 + 0x18], rax   /* RFLAGS */
    mov rax, [rsp + 0x18]
    mov [R_INT80 + 0x20], rax   /* RSP */
    mov rax, [rsp + 0x20]
    mov [R_INT80 + 0x28], rax   /* SS */
    mov ax, cs
    movzx eax, ax
    mov [R_INT80 + 0x30], rax
    mov [R_INT80 + 0x38], rsp
    mov qword ptr [R_INT80], 1
    kbell 0x21
    mov rax, 0x600d
    iretq

    .org 0x1300
k_pf:                           /* 0x11300: #PF (vector 14); records the first one */
    kbell 0x30
    inc qword ptr [R_PF + 0x48]
    cmp qword ptr [R_PF], 0
    jne 2f
    mov rax, [rsp + 0x00]
    mov [R_PF + 0x08], rax      /* error code */
    mov rax, [rsp + 0x08]
    mov [R_PF + 0x10], rax      /* RIP */
    mov rax, [rsp + 0x10]
    mov [R_PF + 0x18], rax      /* CS */
    mov rax, [rsp + 0x20]
    mov [R_PF + 0x20], rax      /* RSP */
    mov rax, cr2
    mov [R_PF + 0x28], rax
    mov ax, cs
    movzx eax, ax
    mov [R_PF + 0x30], rax
    mov [R_PF + 0x38], rsp
    mov rax, [rsp + 0x18]
    mov [R_PF + 0x40], rax      /* RFLAGS */
    mov qword ptr [R_PF], 1
2:  kbell 0x31
    add rsp, 8                  /* drop the error code */
    mov [rsp], r15              /* resume at the recovery address */
    mov rax, 0x600d
    iretq

    .org 0x1400
k_fault_common:                 /* any other exception: record, report, stop */
    mov [R_FAULT + 0x08], rax
    pop rax
    mov [R_FAULT + 0x10], rax   /* vector */
    mov rax, [rsp + 0x00]
    mov [R_FAULT + 0x18], rax   /* error code or RIP */
    mov rax, [rsp + 0x08]
    mov [R_FAULT + 0x20], rax
    mov rax, [rsp + 0x10]
    mov [R_FAULT + 0x28], rax
    mov rax, [rsp + 0x18]
    mov [R_FAULT + 0x30], rax
    mov rax, cr2
    mov [R_FAULT + 0x38], rax
    mov qword ptr [R_FAULT], 1
    kbell 0xee
1:  hlt
    jmp 1b

    /* 32 stubs of 16 bytes: push vector; jmp common */
    .org 0x1800
k_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    push \v
    jmp k_fault_common
    .endr

/* ---------------- user data (page 0x13000) ---------------- */
    .org 0x3000
    .fill 512, 8, 0
