/* Entry point: densevm starts the guest here in 64-bit mode at CPL 3 with RSP set. */
    .section .text.start, "ax"
    .globl _start
_start:
    and $-16, %rsp
    call workload_main
1:  jmp 1b
