/* Minimal ARM semihosting (bkpt 0xab on M-profile): write a string, exit with a status. */
#ifndef EDGELOOP_SEMIHOST_H
#define EDGELOOP_SEMIHOST_H
#include <stdint.h>

void sh_write0(const char *s);
void sh_exit(int status) __attribute__((noreturn));

#endif
