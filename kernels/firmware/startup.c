/* Cortex-M4 vector table and reset handler for mps2-an386: copy .data from flash, zero .bss,
 * enable the FPU when built for the hard-float ABI, call main, exit qemu with its status.
 * Every exception other than reset reports itself over semihosting and exits with status 3. */
#include <stdint.h>
#include "semihost.h"

extern uint32_t __data_start, __data_end, __data_load, __bss_start, __bss_end, __stack_top;
int main(void);

#define EXIT_FAULT 3

static void put_hex32(char *p, uint32_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    }
}

/* Entered with the exception frame on MSP: r0-r3, r12, lr, pc, xpsr. */
void fault_report(uint32_t *frame, uint32_t ipsr)
{
    static char msg[] = "EL:FAULT exc=xxxxxxxx pc=xxxxxxxx cfsr=xxxxxxxx\n";
    put_hex32(msg + 13, ipsr & 0x1ff);
    put_hex32(msg + 25, frame[6]);
    put_hex32(msg + 39, *(volatile uint32_t *)0xE000ED28u); /* SCB->CFSR */
    sh_write0(msg);
    sh_exit(EXIT_FAULT);
}

__attribute__((naked)) void Default_Handler(void)
{
    __asm__ volatile(
        "mrs r0, msp\n"
        "mrs r1, ipsr\n"
        "b fault_report\n");
}

__attribute__((noreturn)) void Reset_Handler(void)
{
    uint32_t *src = &__data_load, *dst = &__data_start;
    while (dst < &__data_end) *dst++ = *src++;
    for (dst = &__bss_start; dst < &__bss_end; dst++) *dst = 0;
#if defined(__ARM_FP)
    /* CPACR: full access to CP10/CP11 (the FPv4-SP unit) before any floating-point code runs. */
    *(volatile uint32_t *)0xE000ED88u |= (0xFu << 20);
    __asm__ volatile("dsb\n isb" ::: "memory");
#endif
    sh_exit(main());
}

typedef void (*vector_t)(void);

__attribute__((section(".isr_vector"), used)) const vector_t vector_table[16 + 32] = {
    (vector_t)&__stack_top,
    Reset_Handler,
    [2 ... 16 + 32 - 1] = Default_Handler,
};
