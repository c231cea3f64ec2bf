/* Test-only preload library (tests/test_durable_commit_seq_adversary.py):
 * with ENG_TEST_SYNC_LOG set in the environment, every fsync and fdatasync
 * that succeeds appends the path of its descriptor (one line) to that file,
 * so a test can tell which files a process made durable.  While the file
 * named by $ENG_TEST_SYNC_FAIL exists, fdatasync fails with EIO (logged as
 * "EIO <path>"): a disk that dropped what it was given. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void note(int fd, const char *what)
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
    if (what) {   /* prefixed: "EIO /the/path" */
        size_t k = strlen(what);
        if ((size_t)n + k + 1 >= sizeof path)
            return;
        memmove(path + k + 1, path, (size_t)n);
        memcpy(path, what, k);
        path[k] = ' ';
        n += (ssize_t)k + 1;
    }
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
        note(fd, NULL);
    return rc;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *fail = getenv("ENG_TEST_SYNC_FAIL");
    if (fail && access(fail, F_OK) == 0) {
        note(fd, "EIO");
        errno = EIO;
        return -1;
    }
    int rc = real(fd);
    if (rc == 0)
        note(fd, NULL);
    return rc;
}
