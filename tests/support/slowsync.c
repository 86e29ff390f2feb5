#define _GNU_SOURCE
#include <dlfcn.h>
#include <unistd.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/uio.h>
/* While the file named by $SLOW_SYNC_FLAG exists, fsync/fdatasync/pwrite sleep $SLOW_SYNC_MS first. */
static void maybe_sleep(void) {
    const char *flag = getenv("SLOW_SYNC_FLAG");
    const char *ms = getenv("SLOW_SYNC_MS");
    if (flag && ms && access(flag, F_OK) == 0) usleep(atoi(ms) * 1000);
}
#define WRAP(ret, name, params, args) \
  ret name params { static ret (*real) params; if (!real) real = dlsym(RTLD_NEXT, #name); maybe_sleep(); return real args; }
WRAP(int, fsync, (int fd), (fd))
WRAP(int, fdatasync, (int fd), (fd))
WRAP(ssize_t, pwrite, (int fd, const void *b, size_t n, off_t o), (fd, b, n, o))
WRAP(ssize_t, pwrite64, (int fd, const void *b, size_t n, off64_t o), (fd, b, n, o))
WRAP(ssize_t, pwritev, (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o))
