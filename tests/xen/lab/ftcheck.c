/* ftcheck: the disk workloads of the real-Xen lab test, and their dom0-side checks.
 *
 *   ftcheck MODE[,MODE...] DEV|FILE [SECONDS]   runs the modes in order, one RESULT line.
 *
 *   ftcheck guest DEV    (in the domU, on /dev/xvda served by ferrotap through blkfront)
 *       writes known patterns with O_DIRECT (4 KiB, sub-page, 1 MiB, 8 MiB from one process per
 *       vCPU so that every blk-mq queue carries requests), fsyncs, discards one region, reads
 *       everything back with O_DIRECT and compares; prints "DOMU: RESULT PASS|FAIL".
 *   ftcheck readonly DEV (in the domU, on a read-only VBD holding what `guest` wrote)
 *       the disk is read-only to the guest, every write attempt fails, and the patterns
 *       `guest` wrote read back with O_DIRECT; prints "DOMU: RESULT PASS|FAIL".
 *   ftcheck verify FILE  (in dom0, on the raw image file, or on a raw export of a qcow2)
 *       checks the same patterns at the same offsets in the file, the discarded region reads
 *       as zeros, untouched regions are zeros; prints "VERIFY: RESULT PASS|FAIL".
 *   ftcheck fill-base FILE      (dom0) writes the base region (8 MiB at 128 MiB) into a raw
 *       file that becomes the bottom of a chain; `backing` (guest) and `verify-backing`
 *       (dom0) check that it reads through the layers above it.
 *   ftcheck stream DEV SECONDS  (guest) writes 64 KiB blocks one after the other from
 *       136 MiB on for SECONDS (at most 112 MiB), 20 ms apart so that dom0 has time to act
 *       while the guest writes, fsyncs, reads every block back; prints
 *       "DOMU: stream wrote N blocks". dom0 pauses, unpauses and snapshots the VBD meanwhile.
 *   ftcheck verify-stream FILE N (dom0) the N blocks are in the file.
 *
 * Both modes share one pattern generator, so dom0 checks what the guest meant to write and
 * not what ferrotap reads back. Static build: gcc -O2 -static -o ftcheck ftcheck.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KIB 1024ULL
#define MIB (1024ULL * 1024ULL)

static const char *prefix = "DOMU";
static int failures;

#define say(...) do { printf("%s: ", prefix); printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)
#define fail(...) do { failures++; printf("%s: FAIL ", prefix); printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)

/* The byte the guest writes at absolute disk offset `off` for region seed `seed`. */
static uint8_t pattern_byte(uint64_t off, unsigned seed)
{
    uint64_t sector = off >> 9;
    unsigned i = (unsigned)(off & 511);
    uint32_t h = (uint32_t)sector * 2654435761u + seed * 40503u;
    return (uint8_t)((h >> ((i & 3) * 8)) + (i >> 2) + seed);
}

static void fill(uint8_t *buf, uint64_t off, size_t len, unsigned seed)
{
    for (size_t k = 0; k < len; k++)
        buf[k] = pattern_byte(off + k, seed);
}

/* Index of the first byte of buf that differs from the pattern (seed 0 = zeros), or -1. */
static long long first_mismatch(const uint8_t *buf, uint64_t off, size_t len, unsigned seed)
{
    for (size_t k = 0; k < len; k++) {
        uint8_t want = seed ? pattern_byte(off + k, seed) : 0;
        if (buf[k] != want)
            return (long long)k;
    }
    return -1;
}

struct region {
    const char *name;
    uint64_t off;      /* disk offset */
    size_t len;
    unsigned seed;     /* 0: must read as zeros */
    size_t buf_offset; /* offset of the I/O buffer inside its page: first_sect != 0 */
};

/* Written by the guest (seed != 0), in this order. */
static const struct region written[] = {
    {"4k@1MiB", 1 * MIB, 4 * KIB, 1, 0},
    {"4k@4MiB+12k", 4 * MIB + 12 * KIB, 4 * KIB, 2, 0},
    {"1k@2MiB+1536 (segment sectors 3..4)", 2 * MIB + 1536, 1 * KIB, 3, 1536},
    {"1MiB@16MiB (indirect)", 16 * MIB, 1 * MIB, 4, 0},
};
/* 8 MiB at 32 MiB: 1 MiB chunks, chunk k written by the process pinned to CPU k % ncpu. */
#define PAR_OFF (32 * MIB)
#define PAR_CHUNK (1 * MIB)
#define PAR_CHUNKS 8
#define PAR_SEED 5
/* 1 MiB at 96 MiB: written (seed 6), fsynced, then discarded: reads back as zeros. */
#define DISCARD_OFF (96 * MIB)
#define DISCARD_LEN (1 * MIB)
#define DISCARD_SEED 6
/* Written by dom0 into the bottom layer of a chain (fill-base); never written by the guest. */
#define BASE_OFF (128 * MIB)
#define BASE_LEN (8 * MIB)
#define BASE_SEED 7
/* The stream: 64 KiB blocks from 136 MiB on, at most 64 MiB. */
#define STREAM_OFF (136 * MIB)
#define STREAM_BLOCK (64 * KIB)
#define STREAM_MAX_BLOCKS 1792 /* up to 248 MiB: the disk is 256 MiB */
#define STREAM_SEED 8
/* Never written: zeros. */
static const struct region untouched[] = {
    {"first 1MiB", 0, 1 * MIB, 0, 0},
    {"4k@200MiB", 200 * MIB, 4 * KIB, 0, 0},
};

/* open(2), or a FAIL line naming the path and flags. */
static int open_or_fail(const char *path, int flags)
{
    int fd = open(path, flags);
    if (fd < 0)
        fail("open %s (flags 0x%x): %s", path, flags, strerror(errno));
    return fd;
}

static uint8_t *alloc_buf(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len + 4096) != 0) {
        fail("posix_memalign %zu", len);
        exit(1);
    }
    return p;
}

static int pwrite_all(int fd, const uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (n <= 0) {
            fail("pwrite %zu bytes at %llu: %s", len - done, (unsigned long long)(off + done),
                 n < 0 ? strerror(errno) : "short write");
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static int pread_all(int fd, uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n <= 0) {
            fail("pread %zu bytes at %llu: %s", len - done, (unsigned long long)(off + done),
                 n < 0 ? strerror(errno) : "end of file");
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static void check(int fd, const char *name, uint64_t off, size_t len, unsigned seed,
                  size_t buf_offset)
{
    uint8_t *page = alloc_buf(len + buf_offset);
    uint8_t *buf = page + buf_offset;
    memset(buf, 0xA5, len);
    if (pread_all(fd, buf, len, off) == 0) {
        long long bad = first_mismatch(buf, off, len, seed);
        if (bad < 0)
            say("ok %s: %zu bytes at %llu match %s", name, len, (unsigned long long)off,
                seed ? "the pattern" : "zeros");
        else
            fail("%s: byte %llu (disk offset %llu) is 0x%02x, expected 0x%02x", name, bad,
                 (unsigned long long)(off + bad), buf[bad],
                 seed ? pattern_byte(off + bad, seed) : 0);
    }
    free(page);
}

static void write_region(int fd, const struct region *r)
{
    uint8_t *page = alloc_buf(r->len + r->buf_offset);
    uint8_t *buf = page + r->buf_offset;
    fill(buf, r->off, r->len, r->seed);
    if (pwrite_all(fd, buf, r->len, r->off) == 0)
        say("wrote %s", r->name);
    free(page);
}

static void show_sysfs(const char *attr)
{
    char path[256], value[128] = "";
    snprintf(path, sizeof path, "/sys/block/xvda/%s", attr);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fgets(value, sizeof value, f))
            value[strcspn(value, "\n")] = 0;
        fclose(f);
    }
    say("sysfs %s = %s", attr, f ? value : "(absent)");
}

static int guest(const char *dev)
{
    static const char *attrs[] = {
        "size", "queue/logical_block_size", "queue/physical_block_size", "queue/max_segments",
        "queue/max_hw_sectors_kb", "queue/nr_requests", "queue/write_cache", "queue/fua",
        "queue/discard_granularity", "queue/discard_max_bytes", "ro",
    };
    for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++)
        show_sysfs(attrs[i]);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1)
        ncpu = 1;
    say("%ld online CPUs", ncpu);

    int fd = open_or_fail(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        return 1;
    unsigned long long bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0 || bytes < 256 * MIB)
        fail("disk size %llu bytes (want >= 256 MiB)", bytes);

    for (size_t i = 0; i < sizeof written / sizeof written[0]; i++)
        write_region(fd, &written[i]);

    /* One process per CPU, each pinned, so that blk-mq sends its chunks down that CPU's
     * hardware queue (one ring per queue). */
    for (long cpu = 0; cpu < ncpu; cpu++) {
        pid_t pid = fork();
        if (pid == 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET((int)cpu, &set);
            if (sched_setaffinity(0, sizeof set, &set) != 0)
                say("sched_setaffinity cpu %ld: %s", cpu, strerror(errno));
            uint8_t *buf = alloc_buf(PAR_CHUNK);
            int rc = 0;
            for (int k = (int)cpu; k < PAR_CHUNKS; k += (int)ncpu) {
                uint64_t off = PAR_OFF + (uint64_t)k * PAR_CHUNK;
                fill(buf, off, PAR_CHUNK, PAR_SEED);
                if (pwrite_all(fd, buf, PAR_CHUNK, off) != 0)
                    rc = 1;
            }
            _exit(rc);
        }
        if (pid < 0)
            fail("fork: %s", strerror(errno));
    }
    int status;
    while (wait(&status) > 0)
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("a writer process failed (status 0x%x)", status);
    say("wrote 8MiB@32MiB from %ld pinned processes", ncpu);

    {
        struct region r = {"1MiB@96MiB (to discard)", DISCARD_OFF, DISCARD_LEN, DISCARD_SEED, 0};
        write_region(fd, &r);
    }
    if (fsync(fd) != 0)
        fail("fsync: %s", strerror(errno));
    else
        say("fsync ok");
    /* blkfront answers a failed empty flush by switching the disk to write through
     * ("empty flush diskcache op failed"), and fsync still succeeds: look at the cache mode. */
    {
        char mode[32] = "";
        FILE *f = fopen("/sys/block/xvda/queue/write_cache", "r");
        if (f) {
            if (fgets(mode, sizeof mode, f))
                mode[strcspn(mode, "\n")] = 0;
            fclose(f);
        }
        if (strcmp(mode, "write back") != 0)
            fail("after fsync the write cache is \"%s\": blkfront gave up flushing", mode);
        else
            say("after fsync the write cache is still \"write back\" (the flush succeeded)");
    }
    check(fd, "1MiB@96MiB before discard", DISCARD_OFF, DISCARD_LEN, DISCARD_SEED, 0);
    uint64_t range[2] = {DISCARD_OFF, DISCARD_LEN};
    if (ioctl(fd, BLKDISCARD, range) != 0)
        fail("BLKDISCARD %llu+%llu: %s", (unsigned long long)range[0],
             (unsigned long long)range[1], strerror(errno));
    else
        say("BLKDISCARD 1MiB@96MiB ok");
    if (fsync(fd) != 0)
        fail("fsync after discard: %s", strerror(errno));

    for (size_t i = 0; i < sizeof written / sizeof written[0]; i++)
        check(fd, written[i].name, written[i].off, written[i].len, written[i].seed,
              written[i].buf_offset);
    check(fd, "8MiB@32MiB (one 8 MiB read)", PAR_OFF, PAR_CHUNKS * PAR_CHUNK, PAR_SEED, 0);
    check(fd, "1MiB@96MiB after discard", DISCARD_OFF, DISCARD_LEN, 0, 0);
    for (size_t i = 0; i < sizeof untouched / sizeof untouched[0]; i++)
        check(fd, untouched[i].name, untouched[i].off, untouched[i].len, 0, 0);
    close(fd);
    return failures != 0;
}

/* Everything `guest` leaves on the disk, read through fd (a file or the block device). */
static void check_all(int fd)
{
    for (size_t i = 0; i < sizeof written / sizeof written[0]; i++)
        check(fd, written[i].name, written[i].off, written[i].len, written[i].seed,
              written[i].buf_offset);
    check(fd, "8MiB@32MiB", PAR_OFF, PAR_CHUNKS * PAR_CHUNK, PAR_SEED, 0);
    check(fd, "1MiB@96MiB after discard", DISCARD_OFF, DISCARD_LEN, 0, 0);
    for (size_t i = 0; i < sizeof untouched / sizeof untouched[0]; i++)
        check(fd, untouched[i].name, untouched[i].off, untouched[i].len, 0, 0);
}

static int readonly(const char *dev)
{
    show_sysfs("ro");
    show_sysfs("size");
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd >= 0) {
        /* Some kernels let the open through; the write itself must fail then. */
        uint8_t *buf = alloc_buf(4096);
        fill(buf, 1 * MIB, 4096, 99);
        ssize_t n = pwrite(fd, buf, 4096, (off_t)(1 * MIB));
        if (n >= 0)
            fail("a 4 KiB write to the read-only disk returned %zd", n);
        else
            say("write to the read-only disk refused: %s", strerror(errno));
        free(buf);
        close(fd);
    } else {
        say("open for writing refused: %s", strerror(errno));
    }
    fd = open_or_fail(dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        return 1;
    check_all(fd);
    close(fd);
    return failures != 0;
}

static int verify(const char *path)
{
    int fd = open_or_fail(path, O_RDONLY);
    if (fd < 0)
        return 1;
    check_all(fd);
    /* A discard on a raw file punches a hole: no data in the discarded range. */
    off_t data = lseek(fd, (off_t)DISCARD_OFF, SEEK_DATA);
    if (data < 0 && errno != ENXIO)
        say("SEEK_DATA: %s", strerror(errno));
    else if (data < 0 || (uint64_t)data >= DISCARD_OFF + DISCARD_LEN)
        say("discarded range 1MiB@96MiB is a hole in %s", path);
    else
        say("discarded range 1MiB@96MiB holds data from %lld on (not punched)", (long long)data);
    close(fd);
    return failures != 0;
}

/* Checks of a device or file through fd; `guest`'s regions are not touched. */
static void check_base(int fd)
{
    check(fd, "8MiB@128MiB from the bottom of the chain", BASE_OFF, BASE_LEN, BASE_SEED, 0);
}

static int backing(const char *dev)
{
    int fd = open_or_fail(dev, O_RDONLY | O_DIRECT);
    if (fd < 0)
        return 1;
    check_base(fd);
    close(fd);
    return failures != 0;
}

static int fill_base(const char *path)
{
    int fd = open_or_fail(path, O_WRONLY);
    if (fd < 0)
        return 1;
    struct region r = {"8MiB@128MiB (base)", BASE_OFF, BASE_LEN, BASE_SEED, 0};
    write_region(fd, &r);
    if (fsync(fd) != 0)
        fail("fsync %s: %s", path, strerror(errno));
    close(fd);
    return failures != 0;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int stream(const char *dev, double seconds)
{
    int fd = open_or_fail(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        return 1;
    uint8_t *buf = alloc_buf(STREAM_BLOCK);
    double start = now_seconds(), slowest = 0;
    unsigned blocks = 0;
    while (blocks < STREAM_MAX_BLOCKS && now_seconds() - start < seconds) {
        uint64_t off = STREAM_OFF + (uint64_t)blocks * STREAM_BLOCK;
        fill(buf, off, STREAM_BLOCK, STREAM_SEED);
        double t = now_seconds();
        if (pwrite_all(fd, buf, STREAM_BLOCK, off) != 0)
            break;
        if (now_seconds() - t > slowest)
            slowest = now_seconds() - t;
        blocks++;
        usleep(20000);
        if (blocks % 64 == 0)
            say("stream: %u blocks after %.1f s", blocks, now_seconds() - start);
    }
    say("stream wrote %u blocks (slowest write %.2f s, a pause shows here)", blocks, slowest);
    if (fsync(fd) != 0)
        fail("fsync: %s", strerror(errno));
    else
        say("fsync ok");
    if (blocks == 0)
        fail("no block written");
    else
        check(fd, "the stream", STREAM_OFF, (size_t)blocks * STREAM_BLOCK, STREAM_SEED, 0);
    free(buf);
    close(fd);
    return failures != 0;
}

static int verify_stream(const char *path, unsigned blocks)
{
    int fd = open_or_fail(path, O_RDONLY);
    if (fd < 0)
        return 1;
    if (blocks == 0 || blocks > STREAM_MAX_BLOCKS)
        fail("%u stream blocks to verify", blocks);
    else
        check(fd, "the stream", STREAM_OFF, (size_t)blocks * STREAM_BLOCK, STREAM_SEED, 0);
    close(fd);
    return failures != 0;
}

static int verify_backing(const char *path)
{
    int fd = open_or_fail(path, O_RDONLY);
    if (fd < 0)
        return 1;
    check_all(fd);
    check_base(fd);
    close(fd);
    return failures != 0;
}

static int run_mode(const char *mode, const char *target, const char *arg)
{
    if (strcmp(mode, "guest") == 0)
        return guest(target);
    if (strcmp(mode, "readonly") == 0)
        return readonly(target);
    if (strcmp(mode, "backing") == 0)
        return backing(target);
    if (strcmp(mode, "stream") == 0 && arg)
        return stream(target, atof(arg));
    prefix = "VERIFY";
    if (strcmp(mode, "verify") == 0)
        return verify(target);
    if (strcmp(mode, "verify-backing") == 0)
        return verify_backing(target);
    if (strcmp(mode, "verify-stream") == 0 && arg)
        return verify_stream(target, (unsigned)strtoul(arg, NULL, 10));
    if (strcmp(mode, "fill-base") == 0)
        return fill_base(target);
    fail("unknown mode %s (or its argument is missing)", mode);
    return 2;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: ftcheck MODE[,MODE...] DEV|FILE [SECONDS|BLOCKS]\n"
                        "  modes: guest readonly backing stream (guest); verify verify-backing"
                        " verify-stream fill-base (dom0)\n");
        return 2;
    }
    int rc = 0;
    char *modes = strdup(argv[1]), *save = NULL;
    for (char *m = strtok_r(modes, ",", &save); m; m = strtok_r(NULL, ",", &save))
        rc |= run_mode(m, argv[2], argc == 4 ? argv[3] : NULL);
    free(modes);
    say("RESULT %s (%d failures)", rc || failures ? "FAIL" : "PASS", failures);
    return rc || failures;
}
