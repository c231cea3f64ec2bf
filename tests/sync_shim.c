/* Test-only preload library (tests/test_durable_commit_seq_adversary.py):
 * with ENG_TEST_SYNC_LOG set in the environment, every fsync and fdatasync
 * that succeeds appends the path of its descriptor (one line) to that file,
 * so a test can tell which files a process made durable. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void note(int fd)
{
    const char *log = getenv("ENG_TEST_SYNC_LOG");
    if (!log)
        return;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 2);
    if (n <= 0)
        return;
    path[n++] = '\n';
    int out = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (out < 0)
        return;
    ssize_t w = write(out, path, (size_t)n);   /* one write: lines stay whole (O_APPEND) */
    (void)w;
    close(out);
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    if (rc == 0)
        note(fd);
    return rc;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    if (rc == 0)
        note(fd);
    return rc;
}
