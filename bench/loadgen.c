/* The mixed workload of bench_live.py, in C, so the load generator is not the bottleneck.
 *
 * usage: loadgen ROOT OPS RATE   (RATE 0: as fast as possible)
 * Does the same operations as bench_live._op, then prints {"seconds": S, "end": E, "done": []}
 * with E on the CLOCK_MONOTONIC clock (Python's time.monotonic on Linux).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DIRS 20

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long mod(long a, long m) { return ((a % m) + m) % m; }

static void touch(const char *path, const char *data) {
    int fd = open(path, O_CREAT | O_WRONLY, 0644);
    if (fd < 0) return;
    if (data && write(fd, data, strlen(data)) < 0) { /* the tracker sees what happened */ }
    close(fd);
}

static void op(const char *root, long i) {
    char d[4096], path[4096], earlier[4096], other[4096];
    long kind = i % 10;
    snprintf(d, sizeof d, "%s/d%ld", root, mod(i, DIRS));
    snprintf(earlier, sizeof earlier, "%s/d%ld/f%ld", root, mod(i - 10, DIRS), i - 10);
    if (kind <= 3) {
        snprintf(path, sizeof path, "%s/f%ld", d, i);
        touch(path, "x");
    } else if (kind == 4) {
        int fd = open(earlier, O_WRONLY | O_APPEND);
        if (fd >= 0) {
            if (write(fd, "more", 4) < 0) { /* as above */ }
            close(fd);
        }
    } else if (kind == 5) {
        chmod(earlier, 0600);
    } else if (kind == 6) {
        snprintf(other, sizeof other, "%s/d%ld/r%ld", root, mod(i + 1, DIRS), i);
        rename(earlier, other);
    } else if (kind == 7) {
        unlink(earlier);
    } else if (kind == 8) {
        snprintf(path, sizeof path, "%s/s%ld", d, i);
        mkdir(path, 0755);
        snprintf(other, sizeof other, "%s/s%ld/x", d, i);
        touch(other, NULL);
    } else if ((i / 10) % 2) { /* half of the new trees are removed again */
        snprintf(other, sizeof other, "%s/d%ld/s%ld/x", root, mod(i - 1, DIRS), i - 1);
        unlink(other);
        snprintf(other, sizeof other, "%s/d%ld/s%ld", root, mod(i - 1, DIRS), i - 1);
        rmdir(other);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: loadgen ROOT OPS RATE\n");
        return 2;
    }
    const char *root = argv[1];
    long ops = atol(argv[2]);
    double rate = atof(argv[3]);
    double start = now();
    for (long i = 0; i < ops; i++) {
        if (rate > 0) {
            double delay = start + i / rate - now();
            if (delay > 0) {
                struct timespec ts = {(time_t)delay, (long)((delay - (time_t)delay) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        op(root, i);
    }
    double end = now();
    printf("{\"seconds\": %.6f, \"end\": %.6f, \"done\": []}\n", end - start, end);
    return 0;
}
