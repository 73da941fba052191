/* Harness: runs edgeloop_model_invoke on each input vector of vectors.h and reports over
 * semihosting, one line each:
 *   EL:BEGIN n=<vectors> in=<input elements> out=<output elements>
 *   EL:OUT <index> <return code> <output as hex, two digits a byte>
 *   EL:STACK <peak bytes below the caller's SP> <peak bytes from the top of the stack>
 *   EL:END
 * or EL:ERROR <what> and a non-zero exit status. Before each call the free part of the stack is
 * painted with a pattern; afterwards the lowest word no longer holding it marks the peak. */
#include <stdint.h>
#include "semihost.h"
#include "vectors.h"

int edgeloop_model_invoke(const int8_t *input, int8_t *output);

extern uint32_t __stack_bottom, __stack_top;

#define PAINT 0xC5A3E17Bu
#define CANARY_BYTES 16
#define CANARY 0x5A

static int8_t out_buf[EL_OUT_SIZE + CANARY_BYTES] __attribute__((aligned(8)));
static char line[80];

/* The instruction-count plugin records the count each time this function runs: once just
 * before and once just after each call into the library. */
volatile uint32_t el_mark_count;
__attribute__((noinline, noclone, used)) void el_mark(void) { el_mark_count++; }

static char *put_u32(char *p, uint32_t v)
{
    char tmp[10];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) *p++ = tmp[--n];
    return p;
}

static char *put_i32(char *p, int32_t v)
{
    if (v < 0) {
        *p++ = '-';
        return put_u32(p, (uint32_t)0 - (uint32_t)v);
    }
    return put_u32(p, (uint32_t)v);
}

static void put_str(const char *s)
{
    sh_write0(s);
}

static void fail(const char *what, int status)
{
    put_str("EL:ERROR ");
    put_str(what);
    put_str("\n");
    sh_exit(status);
}

static void put_hex_bytes(const int8_t *b, uint32_t n)
{
    static const char digits[] = "0123456789abcdef";
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t v = (uint8_t)b[i];
        line[k++] = digits[v >> 4];
        line[k++] = digits[v & 0xf];
        if (k >= sizeof(line) - 2) {
            line[k] = 0;
            put_str(line);
            k = 0;
        }
    }
    line[k] = 0;
    put_str(line);
}

int main(void)
{
    char *p;
    uint32_t peak_call = 0, peak_top = 0;

    p = line;
    p = put_u32(p, EL_N_VECTORS);
    *p = 0;
    put_str("EL:BEGIN n=");
    put_str(line);
    p = put_u32(line, EL_IN_SIZE);
    *p = 0;
    put_str(" in=");
    put_str(line);
    p = put_u32(line, EL_OUT_SIZE);
    *p = 0;
    put_str(" out=");
    put_str(line);
    put_str("\n");

    for (uint32_t i = 0; i < EL_N_VECTORS; i++) {
        uint32_t sp;
        __asm__ volatile("mov %0, sp" : "=r"(sp));
        /* Paint everything below this frame; main's frame is fixed, so this SP is the SP at
         * the call into the library. */
        for (volatile uint32_t *w = &__stack_bottom; (uint32_t)w < sp; w++) *w = PAINT;
        for (uint32_t j = 0; j < EL_OUT_SIZE + CANARY_BYTES; j++)
            out_buf[j] = (j < EL_OUT_SIZE) ? 0 : CANARY;

        el_mark();
        int rc = edgeloop_model_invoke(el_inputs[i], out_buf);
        el_mark();

        volatile uint32_t *w = &__stack_bottom;
        if (*w != PAINT) fail("stack overflow: the library used the whole stack", 4);
        while ((uint32_t)w < sp && *w == PAINT) w++;
        if (sp - (uint32_t)w > peak_call) peak_call = sp - (uint32_t)w;
        if ((uint32_t)&__stack_top - (uint32_t)w > peak_top)
            peak_top = (uint32_t)&__stack_top - (uint32_t)w;
        for (uint32_t j = EL_OUT_SIZE; j < EL_OUT_SIZE + CANARY_BYTES; j++)
            if (out_buf[j] != CANARY) fail("the library wrote past the end of the output", 5);

        p = put_u32(line, i);
        *p++ = ' ';
        p = put_i32(p, rc);
        *p++ = ' ';
        *p = 0;
        put_str("EL:OUT ");
        put_str(line);
        put_hex_bytes(out_buf, EL_OUT_SIZE);
        put_str("\n");
    }

    p = put_u32(line, peak_call);
    *p++ = ' ';
    p = put_u32(p, peak_top);
    *p = 0;
    put_str("EL:STACK ");
    put_str(line);
    put_str("\nEL:END\n");
    return 0;
}
