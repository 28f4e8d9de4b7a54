/*
 * dboot-unrunnable-init: an init that exists, is executable, and still cannot be executed.
 *
 * Built dynamically against glibc and put in a busybox image that has no glibc loader, so the
 * kernel's execve() fails with ENOENT on the missing ELF interpreter (/lib64/ld-linux-x86-64.so.2)
 * although the file itself is there: a preflight that checks "exists and has the x bit" passes,
 * and the failure surfaces only in the init stage, past the point of no return. The VM recovery
 * scenario uses it to prove the stage opens a recovery shell instead of letting PID 1 die.
 */
#include <stdio.h>

int main(void)
{
	puts("DBOOT-TEST: unrunnable init ran: the recovery scenario is broken");
	return 1;
}
