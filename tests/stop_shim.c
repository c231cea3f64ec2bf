/* Test-only preload library (tests/journal_audit.py: stop_shim): with
 * ENG_TEST_STOP_NOT_KILL set in the environment, a fault site's
 * kill(getpid(), SIGKILL) stops the process instead (SIGSTOP) and returns
 * after SIGCONT, so the process goes on from exactly that step. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

int kill(pid_t pid, int sig)
{
    static int (*real)(pid_t, int);
    if (!real)
        real = (int (*)(pid_t, int))dlsym(RTLD_NEXT, "kill");
    if (sig == SIGKILL && pid == getpid() && getenv("ENG_TEST_STOP_NOT_KILL"))
        sig = SIGSTOP;
    return real(pid, sig);
}
