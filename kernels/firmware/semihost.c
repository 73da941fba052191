#include "semihost.h"

#define SYS_WRITE0 0x04
#define SYS_EXIT_EXTENDED 0x20
#define ADP_Stopped_ApplicationExit 0x20026

static uint32_t sh_call(uint32_t op, const void *arg)
{
    register uint32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void sh_write0(const char *s) { (void)sh_call(SYS_WRITE0, s); }

void sh_exit(int status)
{
    /* SYS_EXIT_EXTENDED takes {reason, subcode}: QEMU exits with the subcode as its status. */
    uint32_t block[2] = {ADP_Stopped_ApplicationExit, (uint32_t)status};
    (void)sh_call(SYS_EXIT_EXTENDED, block);
    for (;;) {
    }
}
