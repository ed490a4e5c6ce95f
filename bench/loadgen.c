/* The mixed workload of bench_live.py, in C, so the load generator is not the bottleneck.
 *
 * usage: loadgen ROOT OPS RATE   (RATE 0: as fast as possible)
 * Does the same operations as bench_live._op, then prints {"seconds": S, "end": E, "done": []}
 * with E on the CLOCK_MONOTONIC clock (Python's time.monotonic on Linux).
 *
 * usage: loadgen soak SEED RATE ROOT [ROOT...]   (bench/soak.py's load)
 * Runs until SIGTERM or SIGINT, spreading operations round-robin over the ROOTs (merged views
 * whose lower layer holds d0..d19, each with files l0..l9 and a directory ld with a, b, c).
 * Each ROOT gets its own seeded pseudo-random stream of operations over a bounded set of names
 * (so its change list stays bounded): create, write, append, truncate, chmod, touch, unlink,
 * rename across directories, mkdir with a file in it, rm -r, delete and re-create lower files
 * (whiteouts, copy-ups), symlinks, names that are not UTF-8, and rm -r + mkdir of a lower
 * directory (opaque). RATE is operations per second over all ROOTs (0: flat out). A stall
 * (SIGSTOP) is not caught up afterwards: the schedule restarts from where it is. On exit it
 * prints {"ops": N, "seconds": S, "stalled": T} (T: seconds lost in stalls over 0.25 s).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
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

/* -- soak mode -------------------------------------------------------------------------------- */

#define NAMES 300

static volatile sig_atomic_t stop_requested = 0;

static void on_stop(int sig) {
    (void)sig;
    stop_requested = 1;
}

static uint64_t next_random(uint64_t *state) { /* splitmix64 */
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void soak_op(const char *root, uint64_t *rng) {
    char d[4096], path[4096], other[4096];
    uint64_t r = next_random(rng);
    long what = (long)(r % 1000), k = (long)((r >> 10) % NAMES);
    long dir = (long)((r >> 20) % DIRS), dir2 = (long)((r >> 30) % DIRS);
    snprintf(d, sizeof d, "%s/d%ld", root, dir);
    snprintf(path, sizeof path, "%s/f%ld", d, k);
    if (what < 300) {
        int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
        if (fd >= 0) {
            if (write(fd, "soak", 1 + (size_t)(r >> 40) % 4) < 0) { /* seen by the tracker */ }
            close(fd);
        }
    } else if (what < 380) {
        int fd = open(path, O_WRONLY | O_APPEND);
        if (fd >= 0) {
            if (write(fd, "more", 4) < 0) { /* as above */ }
            close(fd);
        }
    } else if (what < 450) {
        chmod(path, (r >> 40) % 2 ? 0600 : 0644);
    } else if (what < 600) {
        unlink(path);
    } else if (what < 660) {
        snprintf(other, sizeof other, "%s/d%ld/f%ld", root, dir2, (long)((r >> 40) % NAMES));
        rename(path, other);
    } else if (what < 710) {
        snprintf(other, sizeof other, "%s/s%ld", d, k);
        mkdir(other, 0755);
        snprintf(other, sizeof other, "%s/s%ld/x", d, k);
        touch(other, "x");
    } else if (what < 760) {
        snprintf(other, sizeof other, "%s/s%ld/x", d, k);
        unlink(other);
        snprintf(other, sizeof other, "%s/s%ld", d, k);
        rmdir(other);
    } else if (what < 810) {
        snprintf(other, sizeof other, "%s/l%ld", d, k % 10);
        unlink(other); /* a lower file: a whiteout */
    } else if (what < 860) {
        snprintf(other, sizeof other, "%s/l%ld", d, k % 10);
        touch(other, "lower"); /* copy-up, or back after a whiteout */
    } else if (what < 875) {
        snprintf(other, sizeof other, "%s/y%ld", d, k);
        if (symlink("f0", other) < 0) { /* exists already */ }
    } else if (what < 890) {
        snprintf(other, sizeof other, "%s/y%ld", d, k);
        unlink(other);
    } else if (what < 895) {
        snprintf(other, sizeof other, "%s/\xff\xfe%ld", d, k % 20); /* not UTF-8 */
        touch(other, NULL);
    } else if (what < 900) {
        snprintf(other, sizeof other, "%s/\xff\xfe%ld", d, k % 20);
        unlink(other);
    } else if (what < 910) { /* rm -r of a lower directory, then mkdir: opaque */
        static const char *const names[] = {"a", "b", "c", "n"};
        for (int n = 0; n < 4; n++) {
            snprintf(other, sizeof other, "%s/ld/%s", d, names[n]);
            unlink(other);
        }
        snprintf(other, sizeof other, "%s/ld", d);
        if (rmdir(other) == 0) mkdir(other, 0755);
    } else if (what < 920) {
        snprintf(other, sizeof other, "%s/ld/n", d);
        touch(other, "n");
    } else {
        struct timespec times[2] = {{0, UTIME_NOW}, {0, UTIME_NOW}};
        utimensat(AT_FDCWD, path, times, 0);
    }
}

static int soak(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: loadgen soak SEED RATE ROOT [ROOT...]\n");
        return 2;
    }
    uint64_t seed = strtoull(argv[2], NULL, 10);
    double rate = atof(argv[3]);
    int roots = argc - 4;
    uint64_t *rngs = calloc((size_t)roots, sizeof *rngs);
    if (!rngs) return 1;
    for (int r = 0; r < roots; r++) rngs[r] = seed * 1000003ULL + (uint64_t)r * 7919ULL;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    double start = now(), base = start, stalled = 0;
    long done = 0, paced = 0;
    while (!stop_requested) {
        if (rate > 0) {
            double t = now(), due = base + paced / rate;
            if (t - due > 0.25) { /* stopped or starved: do not burst to catch up */
                stalled += t - due;
                base = due = t;
                paced = 0;
            }
            double delay = due - t;
            if (delay > 0) {
                struct timespec ts = {(time_t)delay, (long)((delay - (time_t)delay) * 1e9)};
                nanosleep(&ts, NULL);
                if (stop_requested) break;
            }
        }
        int r = (int)(done % roots);
        soak_op(argv[4 + r], &rngs[r]);
        done++;
        paced++;
    }
    printf("{\"ops\": %ld, \"seconds\": %.6f, \"stalled\": %.6f}\n", done, now() - start,
           stalled);
    free(rngs);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "soak") == 0) return soak(argc, argv);
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
