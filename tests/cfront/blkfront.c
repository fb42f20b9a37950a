/*
 * cfront: a simulated Xen blkfront on xensim, written from the xensim contract
 * (shared/xensim.md) and Xen's own public headers (io/ring.h, io/blkif.h,
 * grant_table.h) only. It is the independent check of ferrotap's backend: it creates the
 * guest's memory and grant table files, binds its event channels, connects to
 * `ferrotap serve` over the control socket, and drives a random workload whose data it
 * verifies against an in-memory model of the disk.
 *
 *   blkfront --dir DIR --control SOCK [options]            verified random workload
 *   blkfront --dir DIR --control SOCK --expect-error ...   hostile requests, then workload
 *   blkfront --dir DIR --control SOCK --overflow ...       workload, then req_prod past the ring
 *   blkfront --dir DIR --control SOCK --vanish ...         fill the ring and die mid-I/O
 *   blkfront --dir DIR --probe                             grant/event-channel probe (no serve)
 *
 * It prints one summary line (`cfront: ops=N reads=.. errors=0`) and exits 0, or prints
 * `cfront: FAIL: <the request and what was wrong>` and exits 1. CFRONT_TRACE=1 logs every
 * request and response on stderr.
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -Werror -o blkfront blkfront.c
 */
#define _GNU_SOURCE

/* A modern interface version: io/ring.h then leaves its barriers to us (below). */
#define __XEN_INTERFACE_VERSION__ 0x00040600

/* io/ring.h's barriers: the guest side of shared memory, on one host, in C11 fences. */
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/ring.h>

#include "blkif_x86_32.h"

#define PAGE_SIZE 4096u
#define SECTOR_SIZE 512u
#define SECTORS_PER_PAGE (PAGE_SIZE / SECTOR_SIZE)
/* Segments an indirect page holds. */
#define SEGS_PER_INDIRECT_PAGE ((unsigned)(PAGE_SIZE / sizeof(struct blkif_request_segment)))
/* The largest indirect request this frontend builds (blkif.h's recommended maximum). */
#define MAX_INDIRECT_SEGS 256u
#define MAX_QUEUES 4u
#define MAX_RING_ORDER 4u
/* Grant references below this are reserved, as on Xen. */
#define FIRST_GREF 8u
/* A backend never owns these bits of a request id: every id has them set, so a backend
 * that truncates the id to 32 bits is caught. */
#define ID_TAG 0xfeed000000000000ull
#define BACKEND_DOMID 0

/* The native (x86_64-abi) layouts of xensim.md section 5, checked at compile time. */
_Static_assert(sizeof(struct blkif_request) == 112, "x86_64 request is 112 bytes");
_Static_assert(offsetof(struct blkif_request, id) == 8, "x86_64 id@8");
_Static_assert(offsetof(struct blkif_request, sector_number) == 16, "x86_64 sector@16");
_Static_assert(offsetof(struct blkif_request, seg) == 24, "x86_64 seg@24");
_Static_assert(offsetof(struct blkif_request_discard, nr_sectors) == 24,
               "x86_64 discard nr_sectors@24");
_Static_assert(offsetof(struct blkif_request_indirect, handle) == 24, "x86_64 indirect handle@24");
_Static_assert(offsetof(struct blkif_request_indirect, indirect_grefs) == 28,
               "x86_64 indirect grefs@28");
_Static_assert(offsetof(struct blkif_response, operation) == 8, "response op@8");
_Static_assert(offsetof(struct blkif_response, status) == 10, "response status@10");
_Static_assert(sizeof(struct blkif_request_segment) == 8, "segment is 8 bytes");
_Static_assert(sizeof(grant_entry_v1_t) == 8, "v1 grant entry is 8 bytes");

/* ------------------------------------------------------------------------------------ */
/* Failure reporting and randomness                                                      */

static void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void cleanup(void);

static void fail(const char *fmt, ...)
{
    va_list ap;
    fputs("cfront: FAIL: ", stdout);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
    cleanup();
    exit(1);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        fail("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

static uint64_t rng_state;

/* splitmix64: small, seedable, good enough for workloads and data. */
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, n); n > 0. */
static uint64_t rng_below(uint64_t n)
{
    return rng_next() % n;
}

static void rng_fill(uint8_t *buf, size_t len)
{
    while (len >= 8) {
        uint64_t v = rng_next();
        memcpy(buf, &v, 8);
        buf += 8;
        len -= 8;
    }
    if (len) {
        uint64_t v = rng_next();
        memcpy(buf, &v, len);
    }
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ------------------------------------------------------------------------------------ */
/* Options                                                                               */

struct options {
    const char *dir;
    const char *control;
    const char *model_out;
    unsigned domid;
    bool proto32;
    unsigned ring_order;
    bool ring_order_key; /* send ring_page_order even for order 0 */
    uint64_t ops;
    uint64_t seed;
    unsigned iodepth;
    bool indirect;
    unsigned max_segs;
    unsigned queues;
    bool persistent;
    uint64_t span;
    bool expect_error;
    bool probe;
    bool vanish;
    bool overflow;
    bool grow;
    unsigned timeout_ms;
};

static struct options opt = {
    .domid = 1,
    .ops = 1000,
    .seed = 1,
    .iodepth = 8,
    .max_segs = MAX_INDIRECT_SEGS,
    .queues = 1,
    .span = 8192,
    .timeout_ms = 20000,
};

static void usage(void)
{
    fputs("usage: blkfront --dir DIR (--control SOCK [--domid D] [--protocol x86_64-abi|x86_32-abi]\n"
          "         [--ring-page-order N] [--ops N] [--seed S] [--iodepth N] [--indirect]\n"
          "         [--max-segs N] [--queues N] [--persistent] [--span SECTORS]\n"
          "         [--model-out FILE] [--expect-error] [--vanish | --overflow] [--grow]\n"
          "         [--timeout-ms MS] | --probe)\n",
          stderr);
    exit(2);
}

static uint64_t parse_u64(const char *name, const char *s, uint64_t max)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *s == '\0' || *end != '\0' || *s == '-' || v > max) {
        fprintf(stderr, "blkfront: bad --%s %s (0..%" PRIu64 ")\n", name, s, max);
        exit(2);
    }
    return v;
}

static void parse_options(int argc, char **argv)
{
    enum {
        O_DIR = 256, O_CONTROL, O_DOMID, O_PROTOCOL, O_ORDER, O_OPS, O_SEED, O_IODEPTH,
        O_INDIRECT, O_MAX_SEGS, O_QUEUES, O_PERSISTENT, O_SPAN, O_MODEL_OUT, O_EXPECT_ERROR,
        O_PROBE, O_TIMEOUT, O_VANISH, O_OVERFLOW, O_GROW,
    };
    static const struct option longopts[] = {
        {"dir", required_argument, NULL, O_DIR},
        {"control", required_argument, NULL, O_CONTROL},
        {"domid", required_argument, NULL, O_DOMID},
        {"protocol", required_argument, NULL, O_PROTOCOL},
        {"ring-page-order", required_argument, NULL, O_ORDER},
        {"ops", required_argument, NULL, O_OPS},
        {"seed", required_argument, NULL, O_SEED},
        {"iodepth", required_argument, NULL, O_IODEPTH},
        {"indirect", no_argument, NULL, O_INDIRECT},
        {"max-segs", required_argument, NULL, O_MAX_SEGS},
        {"queues", required_argument, NULL, O_QUEUES},
        {"persistent", no_argument, NULL, O_PERSISTENT},
        {"span", required_argument, NULL, O_SPAN},
        {"model-out", required_argument, NULL, O_MODEL_OUT},
        {"expect-error", no_argument, NULL, O_EXPECT_ERROR},
        {"probe", no_argument, NULL, O_PROBE},
        {"timeout-ms", required_argument, NULL, O_TIMEOUT},
        {"vanish", no_argument, NULL, O_VANISH},
        {"overflow", no_argument, NULL, O_OVERFLOW},
        {"grow", no_argument, NULL, O_GROW},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case O_DIR: opt.dir = optarg; break;
        case O_CONTROL: opt.control = optarg; break;
        case O_DOMID: opt.domid = (unsigned)parse_u64("domid", optarg, 0x7fef); break;
        case O_PROTOCOL:
            if (strcmp(optarg, "x86_64-abi") == 0)
                opt.proto32 = false;
            else if (strcmp(optarg, "x86_32-abi") == 0)
                opt.proto32 = true;
            else
                usage();
            break;
        case O_ORDER:
            opt.ring_order = (unsigned)parse_u64("ring-page-order", optarg, MAX_RING_ORDER);
            opt.ring_order_key = true;
            break;
        case O_OPS: opt.ops = parse_u64("ops", optarg, UINT32_MAX); break;
        case O_SEED: opt.seed = parse_u64("seed", optarg, UINT64_MAX); break;
        case O_IODEPTH: opt.iodepth = (unsigned)parse_u64("iodepth", optarg, 4096); break;
        case O_INDIRECT: opt.indirect = true; break;
        case O_MAX_SEGS:
            opt.max_segs = (unsigned)parse_u64("max-segs", optarg, MAX_INDIRECT_SEGS);
            break;
        case O_QUEUES: opt.queues = (unsigned)parse_u64("queues", optarg, MAX_QUEUES); break;
        case O_PERSISTENT: opt.persistent = true; break;
        case O_SPAN: opt.span = parse_u64("span", optarg, UINT64_MAX / SECTOR_SIZE); break;
        case O_MODEL_OUT: opt.model_out = optarg; break;
        case O_EXPECT_ERROR: opt.expect_error = true; break;
        case O_PROBE: opt.probe = true; break;
        case O_VANISH: opt.vanish = true; break;
        case O_OVERFLOW: opt.overflow = true; break;
        case O_GROW: opt.grow = true; break;
        case O_TIMEOUT: opt.timeout_ms = (unsigned)parse_u64("timeout-ms", optarg, 600000); break;
        default: usage();
        }
    }
    if (optind != argc || !opt.dir || (!opt.probe && !opt.control))
        usage();
    if (opt.iodepth == 0 || opt.queues == 0 || opt.max_segs == 0 || opt.span == 0)
        usage();
}

/* ------------------------------------------------------------------------------------ */
/* Guest memory and grant table (xensim.md sections 1 and 2)                             */

struct guest {
    int mem_fd;
    uint8_t *mem; /* the whole of dom<D>.mem, MAP_SHARED */
    uint32_t nr_frames;
    uint32_t next_frame;
    int gnttab_fd;
    grant_entry_v1_t *gnttab;
    uint32_t nr_grefs;
    uint32_t next_gref;
    char mem_path[108];
    char gnttab_path[108];
};

static struct guest guest;

static void path_in_dir(char *out, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void path_in_dir(char *out, size_t size, const char *fmt, ...)
{
    char name[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    int n = snprintf(out, size, "%s/%s", opt.dir, name);
    if (n < 0 || (size_t)n >= size)
        fail("path %s/%s does not fit in %zu bytes (sun_path)", opt.dir, name, size);
}

/* Create dom<D>.mem for `frames` frames and dom<D>.gnttab for `grefs` entries, both zeroed
 * (so every entry starts revoked), and map them shared. The files start with `size_frames`
 * and `size_grefs` (all of them, unless --grow): the rest is only used after guest_grow. */
static void guest_create(uint32_t frames, uint32_t grefs, uint32_t size_frames,
                         uint32_t size_grefs)
{
    path_in_dir(guest.mem_path, sizeof(guest.mem_path), "dom%u.mem", opt.domid);
    path_in_dir(guest.gnttab_path, sizeof(guest.gnttab_path), "dom%u.gnttab", opt.domid);

    guest.mem_fd = open(guest.mem_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (guest.mem_fd < 0)
        fail("create %s: %s", guest.mem_path, strerror(errno));
    if (ftruncate(guest.mem_fd, (off_t)size_frames * PAGE_SIZE) != 0)
        fail("size %s: %s", guest.mem_path, strerror(errno));
    guest.mem = mmap(NULL, (size_t)frames * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                     guest.mem_fd, 0);
    if (guest.mem == MAP_FAILED)
        fail("mmap %s: %s", guest.mem_path, strerror(errno));
    guest.nr_frames = frames;
    guest.next_frame = 1; /* frame 0 stays unused: a backend reading gfn 0 reads zeros */

    int fd = open(guest.gnttab_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        fail("create %s: %s", guest.gnttab_path, strerror(errno));
    if (ftruncate(fd, (off_t)size_grefs * (off_t)sizeof(grant_entry_v1_t)) != 0)
        fail("size %s: %s", guest.gnttab_path, strerror(errno));
    guest.gnttab = mmap(NULL, (size_t)grefs * sizeof(grant_entry_v1_t), PROT_READ | PROT_WRITE,
                        MAP_SHARED, fd, 0);
    if (guest.gnttab == MAP_FAILED)
        fail("mmap %s: %s", guest.gnttab_path, strerror(errno));
    guest.gnttab_fd = fd;
    guest.nr_grefs = grefs;
    guest.next_gref = FIRST_GREF;
}

/* Grow both files to their full size (xensim: they may grow while a backend is connected). */
static void guest_grow(void)
{
    if (ftruncate(guest.mem_fd, (off_t)guest.nr_frames * PAGE_SIZE) != 0)
        fail("grow %s: %s", guest.mem_path, strerror(errno));
    if (ftruncate(guest.gnttab_fd, (off_t)guest.nr_grefs * (off_t)sizeof(grant_entry_v1_t)) != 0)
        fail("grow %s: %s", guest.gnttab_path, strerror(errno));
}

static uint32_t alloc_frame(void)
{
    if (guest.next_frame >= guest.nr_frames)
        fail("internal: out of guest frames (%u)", guest.nr_frames);
    return guest.next_frame++;
}

static uint32_t alloc_gref(void)
{
    if (guest.next_gref >= guest.nr_grefs)
        fail("internal: out of grant references (%u)", guest.nr_grefs);
    return guest.next_gref++;
}

static uint8_t *frame_ptr(uint32_t frame)
{
    return guest.mem + (size_t)frame * PAGE_SIZE;
}

/* Grant `frame` to `domid` under `gref`: domid and frame first, then the flags after a
 * release fence, so a backend that reads the flags with acquire sees the rest. */
static void grant_raw(uint32_t gref, uint16_t domid, uint32_t frame, uint16_t flags)
{
    grant_entry_v1_t *e = &guest.gnttab[gref];
    e->domid = domid;
    e->frame = frame;
    __atomic_store_n(&e->flags, flags, __ATOMIC_RELEASE);
}

static void grant(uint32_t gref, uint32_t frame, bool readonly)
{
    grant_raw(gref, BACKEND_DOMID, frame,
              (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)));
}

static void grant_revoke(uint32_t gref)
{
    __atomic_store_n(&guest.gnttab[gref].flags, 0, __ATOMIC_RELEASE);
}

/* A page of guest memory with the grant reference that names it. */
struct page {
    uint32_t gref;
    uint32_t frame;
};

/* ------------------------------------------------------------------------------------ */
/* Event channels (xensim.md section 3)                                                  */

struct evtchn {
    int fd;
    unsigned port;
    struct sockaddr_un back;
    char front_path[108];
};

static void evtchn_bind(struct evtchn *ev)
{
    ev->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (ev->fd < 0)
        fail("socket: %s", strerror(errno));
    for (unsigned port = 1; port < 4096; port++) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        path_in_dir(addr.sun_path, sizeof(addr.sun_path), "evtchn.%u.%u.front", opt.domid, port);
        if (bind(ev->fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
            ev->port = port;
            memcpy(ev->front_path, addr.sun_path, sizeof(ev->front_path));
            ev->back = (struct sockaddr_un){.sun_family = AF_UNIX};
            path_in_dir(ev->back.sun_path, sizeof(ev->back.sun_path), "evtchn.%u.%u.back",
                        opt.domid, port);
            return;
        }
        if (errno != EADDRINUSE)
            fail("bind %s: %s", addr.sun_path, strerror(errno));
    }
    fail("no free event channel port for domain %u in %s", opt.domid, opt.dir);
}

static void evtchn_notify(const struct evtchn *ev)
{
    uint8_t msg[4] = {(uint8_t)ev->port, (uint8_t)(ev->port >> 8), (uint8_t)(ev->port >> 16),
                      (uint8_t)(ev->port >> 24)};
    if (sendto(ev->fd, msg, sizeof(msg), MSG_DONTWAIT, (const struct sockaddr *)&ev->back,
               sizeof(ev->back)) == (ssize_t)sizeof(msg))
        return;
    /* Peer gone or a notification already pending: success for the sender. */
    if (errno == ENOENT || errno == ECONNREFUSED || errno == EAGAIN || errno == EWOULDBLOCK)
        return;
    fail("notify %s: %s", ev->back.sun_path, strerror(errno));
}

/* Consume every pending notification; each must be the 4-byte port number. */
static unsigned evtchn_drain(const struct evtchn *ev)
{
    unsigned count = 0;
    for (;;) {
        uint8_t msg[16];
        ssize_t n = recv(ev->fd, msg, sizeof(msg), MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return count;
            if (errno == EINTR)
                continue;
            fail("receive on %s: %s", ev->front_path, strerror(errno));
        }
        uint32_t port = n == 4 ? (uint32_t)msg[0] | (uint32_t)msg[1] << 8 |
                                     (uint32_t)msg[2] << 16 | (uint32_t)msg[3] << 24
                               : 0;
        if (n != 4 || port != ev->port)
            fail("notification on port %u is %zd bytes (port %" PRIu32 "), want the 4-byte port",
                 ev->port, n, port);
        count++;
    }
}

static void evtchn_unbind(struct evtchn *ev)
{
    if (ev->fd >= 0) {
        close(ev->fd);
        unlink(ev->front_path);
        ev->fd = -1;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Control socket (README.md, ferrotap serve)                                               */

static int ctl_fd = -1;

static void ctl_open(void)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(opt.control) >= sizeof(addr.sun_path))
        fail("control socket path %s is too long", opt.control);
    strcpy(addr.sun_path, opt.control);
    ctl_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ctl_fd < 0)
        fail("socket: %s", strerror(errno));
    if (connect(ctl_fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
        fail("connect to control socket %s: %s", opt.control, strerror(errno));
}

/* Send one request line and read one reply line into `reply`. */
static void ctl_call(const char *request, char *reply, size_t size)
{
    if (ctl_fd < 0)
        ctl_open();
    size_t len = strlen(request), done = 0;
    while (done < len) {
        ssize_t n = send(ctl_fd, request + done, len - done, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("send %s to %s: %s", request, opt.control, strerror(errno));
        done += (size_t)n;
    }
    size_t got = 0;
    for (;;) {
        if (got + 1 >= size)
            fail("reply to %s longer than %zu bytes", request, size);
        struct pollfd p = {.fd = ctl_fd, .events = POLLIN};
        int r = poll(&p, 1, (int)opt.timeout_ms);
        if (r == 0)
            fail("no reply to %s within %u ms", request, opt.timeout_ms);
        ssize_t n = recv(ctl_fd, reply + got, 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("control socket closed before the reply to %s", request);
        if (reply[got] == '\n')
            break;
        got++;
    }
    reply[got] = '\0';
}

/* The number after `"key":` in a flat JSON reply; false if the key is absent. */
static bool json_u64(const char *json, const char *key, uint64_t *out)
{
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "\"%s\":", key);
    const char *p = strstr(json, pattern);
    if (!p)
        return false;
    p += strlen(pattern);
    while (*p == ' ')
        p++;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(p, &end, 10);
    if (end == p || errno || *p == '-')
        return false;
    *out = v;
    return true;
}

static bool json_true(const char *json, const char *key)
{
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "\"%s\":", key);
    const char *p = strstr(json, pattern);
    if (!p)
        return false;
    p += strlen(pattern);
    while (*p == ' ')
        p++;
    return strncmp(p, "true", 4) == 0;
}

struct backend_info {
    uint64_t sectors;
    bool read_only;
    bool flush, barrier, discard;
    unsigned max_indirect_segments;
    unsigned max_ring_page_order;
    unsigned max_queues;
};

static struct backend_info backend;

static void ctl_info(void)
{
    char reply[4096];
    ctl_call("{\"op\":\"info\"}\n", reply, sizeof(reply));
    if (!json_true(reply, "ok"))
        fail("info failed: %s", reply);
    uint64_t v;
    if (!json_u64(reply, "sectors", &backend.sectors) || backend.sectors == 0)
        fail("info reply has no \"sectors\": %s", reply);
    if (json_u64(reply, "sector_size", &v) && v != SECTOR_SIZE)
        fail("info: sector_size %" PRIu64 ", xensim's is 512", v);
    backend.max_indirect_segments =
        json_u64(reply, "max_indirect_segments", &v) ? (unsigned)(v < 4096 ? v : 4096) : 0;
    backend.max_ring_page_order = json_u64(reply, "max_ring_page_order", &v) ? (unsigned)v : 0;
    backend.max_queues = json_u64(reply, "max_queues", &v) ? (unsigned)v : 1;
    backend.read_only = json_true(reply, "read_only");
    backend.flush = json_true(reply, "flush");
    backend.barrier = json_true(reply, "barrier");
    backend.discard = json_true(reply, "discard");
}

/* ------------------------------------------------------------------------------------ */
/* Rings                                                                                 */

/* A request, whatever the protocol. */
struct request {
    uint8_t operation;
    uint8_t indirect_op;   /* BLKIF_OP_INDIRECT only */
    uint16_t nr_segments;  /* segments (direct or indirect) */
    uint64_t id;
    uint64_t sector;
    uint64_t nr_sectors;   /* BLKIF_OP_DISCARD only */
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST]; /* direct */
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};

struct response {
    uint64_t id;
    uint8_t operation;
    int16_t status;
};

struct queue {
    unsigned index;
    union {
        blkif_front_ring_t native;
        blkif_x86_32_front_ring_t x86_32;
    } ring;
    void *ring_view;           /* the ring pages, contiguous in ref order */
    struct page ring_pages[1u << MAX_RING_ORDER];
    struct evtchn evtchn;
    unsigned in_flight;
};

static struct queue queues[MAX_QUEUES];

static size_t ring_bytes(void)
{
    return (size_t)PAGE_SIZE << opt.ring_order;
}

/* Entries of this protocol's ring for the chosen order (io/ring.h's rule). */
static unsigned ring_entries(void)
{
    static const unsigned native[] = {
        __CONST_RING_SIZE(blkif, PAGE_SIZE), __CONST_RING_SIZE(blkif, PAGE_SIZE << 1),
        __CONST_RING_SIZE(blkif, PAGE_SIZE << 2), __CONST_RING_SIZE(blkif, PAGE_SIZE << 3),
        __CONST_RING_SIZE(blkif, PAGE_SIZE << 4),
    };
    static const unsigned x86_32[] = {
        __CONST_RING_SIZE(blkif_x86_32, PAGE_SIZE),
        __CONST_RING_SIZE(blkif_x86_32, PAGE_SIZE << 1),
        __CONST_RING_SIZE(blkif_x86_32, PAGE_SIZE << 2),
        __CONST_RING_SIZE(blkif_x86_32, PAGE_SIZE << 3),
        __CONST_RING_SIZE(blkif_x86_32, PAGE_SIZE << 4),
    };
    _Static_assert(sizeof(native) / sizeof(native[0]) == MAX_RING_ORDER + 1, "orders");
    return opt.proto32 ? x86_32[opt.ring_order] : native[opt.ring_order];
}

/* Frames for the ring: spread out and in descending order, so a backend that treats the
 * refs as one contiguous run of frames, or maps them out of order, reads garbage. */
static void queue_alloc_ring(struct queue *q)
{
    unsigned pages = 1u << opt.ring_order;
    uint32_t base = guest.next_frame;
    for (unsigned i = 0; i < 2 * pages; i++)
        alloc_frame();
    for (unsigned i = 0; i < pages; i++) {
        q->ring_pages[i].frame = base + 2 * (pages - 1 - i) + 1;
        q->ring_pages[i].gref = alloc_gref();
    }
    /* The guest's own view: its frames mapped one after another, as a guest kernel's
     * vmap of scattered pages. */
    uint8_t *view = mmap(NULL, ring_bytes(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (view == MAP_FAILED)
        fail("reserve ring view: %s", strerror(errno));
    for (unsigned i = 0; i < pages; i++) {
        void *at = mmap(view + (size_t)i * PAGE_SIZE, PAGE_SIZE, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_FIXED, guest.mem_fd,
                        (off_t)q->ring_pages[i].frame * PAGE_SIZE);
        if (at == MAP_FAILED)
            fail("map ring page %u: %s", i, strerror(errno));
    }
    q->ring_view = view;
    if (opt.proto32) {
        blkif_x86_32_sring_t *s = (blkif_x86_32_sring_t *)view;
        SHARED_RING_INIT(s);
        FRONT_RING_INIT(&q->ring.x86_32, s, ring_bytes());
    } else {
        blkif_sring_t *s = (blkif_sring_t *)view;
        SHARED_RING_INIT(s);
        FRONT_RING_INIT(&q->ring.native, s, ring_bytes());
    }
    if ((opt.proto32 ? RING_SIZE(&q->ring.x86_32) : RING_SIZE(&q->ring.native)) !=
        ring_entries())
        fail("internal: ring size disagrees with __CONST_RING_SIZE");
    for (unsigned i = 0; i < pages; i++)
        grant(q->ring_pages[i].gref, q->ring_pages[i].frame, false);
}

static unsigned ring_free(struct queue *q)
{
    return opt.proto32 ? RING_FREE_REQUESTS(&q->ring.x86_32) : RING_FREE_REQUESTS(&q->ring.native);
}

/* Write `r` into the next free slot (not yet visible to the backend). */
static void ring_put(struct queue *q, const struct request *r)
{
    if (ring_free(q) == 0)
        fail("internal: ring %u full", q->index);
    if (opt.proto32) {
        blkif_x86_32_front_ring_t *fr = &q->ring.x86_32;
        void *slot = RING_GET_REQUEST(fr, fr->req_prod_pvt);
        memset(slot, 0, sizeof(union blkif_x86_32_sring_entry));
        if (r->operation == BLKIF_OP_INDIRECT) {
            struct blkif_x86_32_request_indirect x = {
                .operation = r->operation, .indirect_op = r->indirect_op,
                .nr_segments = r->nr_segments, .id = r->id, .sector_number = r->sector,
            };
            memcpy(x.indirect_grefs, r->indirect_grefs, sizeof(x.indirect_grefs));
            memcpy(slot, &x, sizeof(x));
        } else if (r->operation == BLKIF_OP_DISCARD) {
            struct blkif_x86_32_request_discard x = {
                .operation = r->operation, .id = r->id, .sector_number = r->sector,
                .nr_sectors = r->nr_sectors,
            };
            memcpy(slot, &x, sizeof(x));
        } else {
            struct blkif_x86_32_request x = {
                .operation = r->operation, .nr_segments = (uint8_t)r->nr_segments,
                .id = r->id, .sector_number = r->sector,
            };
            memcpy(x.seg, r->seg, sizeof(x.seg));
            memcpy(slot, &x, sizeof(x));
        }
        fr->req_prod_pvt++;
    } else {
        blkif_front_ring_t *fr = &q->ring.native;
        void *slot = RING_GET_REQUEST(fr, fr->req_prod_pvt);
        memset(slot, 0, sizeof(union blkif_sring_entry));
        if (r->operation == BLKIF_OP_INDIRECT) {
            blkif_request_indirect_t x = {
                .operation = r->operation, .indirect_op = r->indirect_op,
                .nr_segments = r->nr_segments, .id = r->id, .sector_number = r->sector,
            };
            memcpy(x.indirect_grefs, r->indirect_grefs, sizeof(x.indirect_grefs));
            memcpy(slot, &x, sizeof(x));
        } else if (r->operation == BLKIF_OP_DISCARD) {
            blkif_request_discard_t x = {
                .operation = r->operation, .id = r->id, .sector_number = r->sector,
                .nr_sectors = r->nr_sectors,
            };
            memcpy(slot, &x, sizeof(x));
        } else {
            blkif_request_t x = {
                .operation = r->operation, .nr_segments = (uint8_t)r->nr_segments,
                .id = r->id, .sector_number = r->sector,
            };
            memcpy(x.seg, r->seg, sizeof(x.seg));
            memcpy(slot, &x, sizeof(x));
        }
        fr->req_prod_pvt++;
    }
    q->in_flight++;
}

/* Publish the slots written since the last push; kick the backend when its req_event
 * says it sleeps. */
static void ring_push(struct queue *q)
{
    int notify;
    if (opt.proto32)
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->ring.x86_32, notify);
    else
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->ring.native, notify);
    if (notify)
        evtchn_notify(&q->evtchn);
}

typedef void (*response_fn)(struct queue *q, const struct response *rsp);

/* Consume every response the backend has pushed, then re-arm rsp_event. Returns how many
 * were consumed. */
static unsigned ring_consume(struct queue *q, response_fn handle)
{
    unsigned consumed = 0;
    unsigned more;
    do {
        RING_IDX prod, cons;
        if (opt.proto32) {
            blkif_x86_32_front_ring_t *fr = &q->ring.x86_32;
            prod = __atomic_load_n(&fr->sring->rsp_prod, __ATOMIC_ACQUIRE);
            if (RING_RESPONSE_PROD_OVERFLOW(fr, prod))
                fail("queue %u: backend's rsp_prod %u runs %u past rsp_cons %u (ring of %u)",
                     q->index, prod, prod - fr->rsp_cons, fr->rsp_cons, RING_SIZE(fr));
            for (cons = fr->rsp_cons; cons != prod; cons++) {
                struct blkif_x86_32_response raw;
                memcpy(&raw, RING_GET_RESPONSE(fr, cons), sizeof(raw));
                struct response rsp = {raw.id, raw.operation, raw.status};
                fr->rsp_cons = cons + 1;
                q->in_flight--;
                consumed++;
                handle(q, &rsp);
            }
            RING_FINAL_CHECK_FOR_RESPONSES(fr, more);
        } else {
            blkif_front_ring_t *fr = &q->ring.native;
            prod = __atomic_load_n(&fr->sring->rsp_prod, __ATOMIC_ACQUIRE);
            if (RING_RESPONSE_PROD_OVERFLOW(fr, prod))
                fail("queue %u: backend's rsp_prod %u runs %u past rsp_cons %u (ring of %u)",
                     q->index, prod, prod - fr->rsp_cons, fr->rsp_cons, RING_SIZE(fr));
            for (cons = fr->rsp_cons; cons != prod; cons++) {
                blkif_response_t raw;
                memcpy(&raw, RING_GET_RESPONSE(fr, cons), sizeof(raw));
                struct response rsp = {raw.id, raw.operation, raw.status};
                fr->rsp_cons = cons + 1;
                q->in_flight--;
                consumed++;
                handle(q, &rsp);
            }
            RING_FINAL_CHECK_FOR_RESPONSES(fr, more);
        }
    } while (more);
    return consumed;
}

/* Block until some queue's event channel fires (the backend crossed rsp_event). */
static void wait_for_event(unsigned nr_queues, const char *what)
{
    struct pollfd fds[MAX_QUEUES];
    for (unsigned i = 0; i < nr_queues; i++)
        fds[i] = (struct pollfd){.fd = queues[i].evtchn.fd, .events = POLLIN};
    uint64_t deadline = now_ms() + opt.timeout_ms;
    for (;;) {
        uint64_t now = now_ms();
        if (now >= deadline)
            fail("no notification within %u ms while waiting for %s", opt.timeout_ms, what);
        int r = poll(fds, nr_queues, (int)(deadline - now));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            fail("poll: %s", strerror(errno));
        if (r > 0)
            break;
    }
    for (unsigned i = 0; i < nr_queues; i++)
        if (fds[i].revents)
            evtchn_drain(&queues[i].evtchn);
}

/* ------------------------------------------------------------------------------------ */
/* Connection                                                                            */

static const char *protocol_name(void)
{
    return opt.proto32 ? "x86_32-abi" : "x86_64-abi";
}

static void ctl_connect(void)
{
    char msg[4096];
    size_t len = 0;
    len += (size_t)snprintf(msg + len, sizeof(msg) - len,
                            "{\"op\":\"connect\",\"domid\":%u,\"protocol\":\"%s\","
                            "\"ring_page_order\":%u,\"queues\":[",
                            opt.domid, protocol_name(), opt.ring_order);
    for (unsigned qi = 0; qi < opt.queues; qi++) {
        len += (size_t)snprintf(msg + len, sizeof(msg) - len, "%s{\"ring_refs\":[",
                                qi ? "," : "");
        for (unsigned i = 0; i < (1u << opt.ring_order); i++)
            len += (size_t)snprintf(msg + len, sizeof(msg) - len, "%s%" PRIu32, i ? "," : "",
                                    queues[qi].ring_pages[i].gref);
        len += (size_t)snprintf(msg + len, sizeof(msg) - len, "],\"event_channel\":%u}",
                                queues[qi].evtchn.port);
    }
    len += (size_t)snprintf(msg + len, sizeof(msg) - len, "],\"persistent\":%s}\n",
                            opt.persistent ? "true" : "false");
    if (len >= sizeof(msg))
        fail("internal: connect message too long");
    char reply[4096];
    ctl_call(msg, reply, sizeof(reply));
    if (!json_true(reply, "ok"))
        fail("connect refused: %s (request %s)", reply, msg);
}

static void ctl_disconnect(void)
{
    char reply[4096];
    ctl_call("{\"op\":\"disconnect\"}\n", reply, sizeof(reply));
    if (!json_true(reply, "ok"))
        fail("disconnect failed: %s", reply);
}

/* ------------------------------------------------------------------------------------ */
/* The disk model                                                                        */

/* The model covers sectors [0, model_span): the workload stays inside them. */
static uint64_t model_span;
static uint8_t *model_data;  /* model_span * 512 bytes */
static uint8_t *model_known; /* model_span flags: the content of this sector is known */

struct stats {
    uint64_t ops, reads, writes, fua_writes, flushes, discards, indirect;
    uint64_t verified_bytes, learned_bytes;
};

static struct stats stats;

/* ------------------------------------------------------------------------------------ */
/* Request slots: one per request in flight, each with its own pages                     */

enum kind { K_READ, K_WRITE, K_FUA_WRITE, K_FLUSH, K_DISCARD };

static const char *kind_name(enum kind k)
{
    static const char *names[] = {"READ", "WRITE", "FUA-WRITE", "FLUSH", "DISCARD"};
    return names[k];
}

struct slot {
    bool busy;
    enum kind kind;
    struct request req;    /* as submitted */
    unsigned queue;
    uint64_t sector, nr_sectors;
    uint16_t nr_segs;
    uint8_t first[MAX_INDIRECT_SEGS], last[MAX_INDIRECT_SEGS];
    uint8_t *data;         /* WRITE: the bytes written, nr_sectors * 512 */
    struct page *pages;    /* data pages (segs_per_slot) */
    struct page indirect_pages[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint8_t *canary;       /* READ: each frame's bytes before submission */
};

static struct slot *slots;
static unsigned nr_slots;
static unsigned segs_per_slot;
static unsigned indirect_pages_per_slot;
static uint32_t id_seq;

static void slots_alloc(void)
{
    nr_slots = opt.iodepth;
    slots = xcalloc(nr_slots, sizeof(*slots));
    /* Data frames come from a shuffled pool, so grant refs and frames never run in step. */
    uint32_t nr_data = nr_slots * segs_per_slot;
    uint32_t *frames = xcalloc(nr_data, sizeof(*frames));
    for (uint32_t i = 0; i < nr_data; i++)
        frames[i] = alloc_frame();
    for (uint32_t i = nr_data; i > 1; i--) {
        uint32_t j = (uint32_t)rng_below(i);
        uint32_t t = frames[i - 1];
        frames[i - 1] = frames[j];
        frames[j] = t;
    }
    for (unsigned s = 0; s < nr_slots; s++) {
        struct slot *sl = &slots[s];
        sl->pages = xcalloc(segs_per_slot, sizeof(*sl->pages));
        sl->data = xcalloc((size_t)segs_per_slot * PAGE_SIZE, 1);
        sl->canary = xcalloc((size_t)segs_per_slot * PAGE_SIZE, 1);
        for (unsigned i = 0; i < segs_per_slot; i++) {
            sl->pages[i].frame = frames[s * segs_per_slot + i];
            sl->pages[i].gref = alloc_gref();
        }
        for (unsigned i = 0; i < indirect_pages_per_slot; i++) {
            sl->indirect_pages[i].frame = alloc_frame();
            sl->indirect_pages[i].gref = alloc_gref();
        }
        if (opt.persistent) {
            /* feature-persistent: everything granted read-write once, kept until the end. */
            for (unsigned i = 0; i < segs_per_slot; i++)
                grant(sl->pages[i].gref, sl->pages[i].frame, false);
            for (unsigned i = 0; i < indirect_pages_per_slot; i++)
                grant(sl->indirect_pages[i].gref, sl->indirect_pages[i].frame, false);
        }
    }
    free(frames);
}

static struct slot *slot_free(void)
{
    for (unsigned s = 0; s < nr_slots; s++)
        if (!slots[s].busy)
            return &slots[s];
    return NULL;
}

static uint64_t next_id(unsigned slot_index)
{
    id_seq++;
    return ID_TAG | (uint64_t)id_seq << 16 | slot_index;
}

static bool writes_disk(enum kind k)
{
    return k == K_WRITE || k == K_FUA_WRITE || k == K_DISCARD;
}

/* Whether [sector, sector+n) of kind `k` may run beside what is in flight without making
 * the model's answer depend on the backend's ordering. */
static bool conflicts(enum kind k, uint64_t sector, uint64_t n)
{
    if (k == K_FLUSH)
        return false;
    for (unsigned s = 0; s < nr_slots; s++) {
        const struct slot *o = &slots[s];
        if (!o->busy || o->kind == K_FLUSH)
            continue;
        if (!writes_disk(k) && !writes_disk(o->kind))
            continue;
        if (sector < o->sector + o->nr_sectors && o->sector < sector + n)
            return true;
    }
    return false;
}

/* Lay the request's sectors over its pages: each segment is a random run of 1..8 sectors
 * inside its frame (half of them whole frames). */
static uint64_t plan_segments(struct slot *sl, unsigned nr_segs)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < nr_segs; i++) {
        unsigned first, len;
        if (rng_below(2)) {
            first = 0;
            len = SECTORS_PER_PAGE;
        } else {
            len = 1 + (unsigned)rng_below(SECTORS_PER_PAGE);
            first = (unsigned)rng_below(SECTORS_PER_PAGE - len + 1);
        }
        sl->first[i] = (uint8_t)first;
        sl->last[i] = (uint8_t)(first + len - 1);
        total += len;
    }
    sl->nr_segs = (uint16_t)nr_segs;
    return total;
}

/* Fill in the ring request for a read or write slot: direct segments, or indirect pages
 * of blkif_request_segment. Grants what a non-persistent frontend grants per request. */
static void build_rw_request(struct slot *sl, uint8_t op, bool indirect)
{
    struct request *r = &sl->req;
    bool readonly = op != BLKIF_OP_READ; /* the backend only reads a write's pages */
    if (!opt.persistent)
        for (unsigned i = 0; i < sl->nr_segs; i++)
            grant(sl->pages[i].gref, sl->pages[i].frame, readonly);
    r->sector = sl->sector;
    r->nr_segments = sl->nr_segs;
    if (!indirect) {
        r->operation = op;
        for (unsigned i = 0; i < sl->nr_segs; i++)
            r->seg[i] = (struct blkif_request_segment){
                .gref = sl->pages[i].gref, .first_sect = sl->first[i], .last_sect = sl->last[i]};
        return;
    }
    r->operation = BLKIF_OP_INDIRECT;
    r->indirect_op = op;
    unsigned nr_ind = (sl->nr_segs + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE;
    for (unsigned p = 0; p < nr_ind; p++) {
        struct blkif_request_segment *list =
            (struct blkif_request_segment *)frame_ptr(sl->indirect_pages[p].frame);
        memset(list, 0, PAGE_SIZE);
        for (unsigned j = 0; j < SEGS_PER_INDIRECT_PAGE; j++) {
            unsigned i = p * SEGS_PER_INDIRECT_PAGE + j;
            if (i >= sl->nr_segs)
                break;
            list[j] = (struct blkif_request_segment){
                .gref = sl->pages[i].gref, .first_sect = sl->first[i], .last_sect = sl->last[i]};
        }
        if (!opt.persistent)
            grant(sl->indirect_pages[p].gref, sl->indirect_pages[p].frame, true);
        r->indirect_grefs[p] = sl->indirect_pages[p].gref;
    }
}

/* CFRONT_TRACE=1 in the environment: every submission and completion on stderr. */
static bool trace;

static void describe(const struct slot *sl, char *out, size_t size);

/* Put a workload request on queue `qi`. */
static void submit(struct slot *sl, unsigned qi)
{
    sl->busy = true;
    sl->queue = qi;
    ring_put(&queues[qi], &sl->req);
    if (trace) {
        char what[160];
        describe(sl, what, sizeof(what));
        fprintf(stderr, "submit %s\n", what);
    }
}

/* Generate one random request into a free slot, or return false when the one drawn would
 * overlap what is in flight (the caller waits for completions and tries again). */
static bool generate(struct slot *sl, unsigned slot_index)
{
    unsigned roll = (unsigned)rng_below(100);
    enum kind k;
    if (backend.read_only)
        k = roll < 95 ? K_READ : K_FLUSH;
    else if (roll < 45)
        k = K_READ;
    else if (roll < 82)
        k = K_WRITE;
    else if (roll < 86 && (backend.flush || backend.barrier))
        k = K_FUA_WRITE;
    else if (roll < 91 && backend.flush)
        k = K_FLUSH;
    else if (backend.discard)
        k = K_DISCARD;
    else
        k = K_WRITE;

    memset(&sl->req, 0, sizeof(sl->req));
    sl->kind = k;
    sl->req.id = next_id(slot_index);
    uint64_t span = model_span;
    if (k == K_FLUSH) {
        sl->sector = sl->nr_sectors = 0;
        sl->nr_segs = 0;
        sl->req.operation = BLKIF_OP_FLUSH_DISKCACHE;
        return true;
    }
    if (k == K_DISCARD) {
        uint64_t n = 1 + rng_below(span < 2048 ? span : 2048);
        uint64_t sector = rng_below(span - n + 1);
        if (conflicts(k, sector, n))
            return false;
        sl->sector = sector;
        sl->nr_sectors = n;
        sl->nr_segs = 0;
        sl->req.operation = BLKIF_OP_DISCARD;
        sl->req.sector = sector;
        sl->req.nr_sectors = n;
        return true;
    }
    bool indirect = opt.indirect && k != K_FUA_WRITE && backend.max_indirect_segments > 0 &&
                    rng_below(2);
    unsigned max = indirect ? segs_per_slot : BLKIF_MAX_SEGMENTS_PER_REQUEST;
    unsigned nr_segs = 1 + (unsigned)rng_below(max);
    while ((uint64_t)nr_segs * SECTORS_PER_PAGE > span && nr_segs > 1)
        nr_segs--;
    uint64_t n = plan_segments(sl, nr_segs);
    if (n > span)
        return false;
    uint64_t sector = rng_below(span - n + 1);
    if (conflicts(k, sector, n))
        return false;
    sl->sector = sector;
    sl->nr_sectors = n;

    if (k == K_READ) {
        /* Random canaries: the backend must overwrite exactly the segments' sectors. */
        for (unsigned i = 0; i < nr_segs; i++) {
            uint8_t *page = frame_ptr(sl->pages[i].frame);
            rng_fill(page, PAGE_SIZE);
            memcpy(sl->canary + (size_t)i * PAGE_SIZE, page, PAGE_SIZE);
        }
        build_rw_request(sl, BLKIF_OP_READ, indirect);
    } else {
        rng_fill(sl->data, n * SECTOR_SIZE);
        size_t off = 0;
        for (unsigned i = 0; i < nr_segs; i++) {
            uint8_t *page = frame_ptr(sl->pages[i].frame);
            size_t len = (size_t)(sl->last[i] - sl->first[i] + 1) * SECTOR_SIZE;
            rng_fill(page, PAGE_SIZE); /* bytes outside the segment must not reach the disk */
            memcpy(page + (size_t)sl->first[i] * SECTOR_SIZE, sl->data + off, len);
            off += len;
        }
        /* Linux sends FUA writes as FLUSH_DISKCACHE (or WRITE_BARRIER) with segments. */
        uint8_t op = BLKIF_OP_WRITE;
        if (k == K_FUA_WRITE)
            op = backend.flush && (!backend.barrier || rng_below(2)) ? BLKIF_OP_FLUSH_DISKCACHE
                                                                      : BLKIF_OP_WRITE_BARRIER;
        build_rw_request(sl, op, indirect);
    }
    return true;
}

static void describe(const struct slot *sl, char *out, size_t size)
{
    snprintf(out, size, "%s id=%#" PRIx64 " queue=%u sector=%" PRIu64 " sectors=%" PRIu64
             " segs=%u%s",
             kind_name(sl->kind), sl->req.id, sl->queue, sl->sector, sl->nr_sectors, sl->nr_segs,
             sl->req.operation == BLKIF_OP_INDIRECT ? " indirect" : "");
}

/* Check a completed read against the model (learning unknown sectors) and the canaries. */
static void verify_read(const struct slot *sl)
{
    char what[160];
    uint64_t sector = sl->sector;
    for (unsigned i = 0; i < sl->nr_segs; i++) {
        const uint8_t *page = frame_ptr(sl->pages[i].frame);
        const uint8_t *canary = sl->canary + (size_t)i * PAGE_SIZE;
        size_t lo = (size_t)sl->first[i] * SECTOR_SIZE;
        size_t hi = (size_t)(sl->last[i] + 1) * SECTOR_SIZE;
        if (memcmp(page, canary, lo) != 0 || memcmp(page + hi, canary + hi, PAGE_SIZE - hi) != 0) {
            describe(sl, what, sizeof(what));
            fail("%s: segment %u (sectors %u..%u of its frame) changed bytes outside them", what,
                 i, sl->first[i], sl->last[i]);
        }
        for (size_t off = lo; off < hi; off += SECTOR_SIZE, sector++) {
            if (sector >= model_span)
                continue;
            uint8_t *model = model_data + sector * SECTOR_SIZE;
            if (model_known[sector]) {
                if (memcmp(page + off, model, SECTOR_SIZE) != 0) {
                    size_t b = 0;
                    while (page[off + b] == model[b])
                        b++;
                    describe(sl, what, sizeof(what));
                    fail("%s: disk sector %" PRIu64 " (segment %u) differs from the model at "
                         "byte %zu: read %#04x, expected %#04x",
                         what, sector, i, b, page[off + b], model[b]);
                }
                stats.verified_bytes += SECTOR_SIZE;
            } else {
                memcpy(model, page + off, SECTOR_SIZE);
                model_known[sector] = 1;
                stats.learned_bytes += SECTOR_SIZE;
            }
        }
    }
}

static void complete(struct queue *q, const struct response *rsp)
{
    uint64_t slot_index = rsp->id & 0xffff;
    struct slot *sl = slot_index < nr_slots ? &slots[slot_index] : NULL;
    if (!sl || !sl->busy || sl->req.id != rsp->id || sl->queue != q->index)
        fail("queue %u: response with id %#" PRIx64 " matches no request in flight on it "
             "(op %u, status %d)",
             q->index, rsp->id, rsp->operation, rsp->status);
    char what[160];
    describe(sl, what, sizeof(what));
    if (trace)
        fprintf(stderr, "complete %s status %d\n", what, rsp->status);
    uint8_t want_op =
        sl->req.operation == BLKIF_OP_INDIRECT ? sl->req.indirect_op : sl->req.operation;
    if (rsp->operation != want_op)
        fail("%s: response carries operation %u, expected %u", what, rsp->operation, want_op);
    if (rsp->status != BLKIF_RSP_OKAY)
        fail("%s: status %d, expected OKAY", what, rsp->status);

    switch (sl->kind) {
    case K_READ:
        verify_read(sl);
        stats.reads++;
        break;
    case K_WRITE:
    case K_FUA_WRITE:
        memcpy(model_data + sl->sector * SECTOR_SIZE, sl->data, sl->nr_sectors * SECTOR_SIZE);
        memset(model_known + sl->sector, 1, sl->nr_sectors);
        if (sl->kind == K_FUA_WRITE)
            stats.fua_writes++;
        else
            stats.writes++;
        break;
    case K_FLUSH:
        stats.flushes++;
        break;
    case K_DISCARD:
        memset(model_data + sl->sector * SECTOR_SIZE, 0, sl->nr_sectors * SECTOR_SIZE);
        memset(model_known + sl->sector, 1, sl->nr_sectors);
        stats.discards++;
        break;
    }
    if (sl->req.operation == BLKIF_OP_INDIRECT)
        stats.indirect++;
    if (!opt.persistent) {
        /* Revoke at completion, as a non-persistent frontend does. */
        for (unsigned i = 0; i < sl->nr_segs; i++)
            grant_revoke(sl->pages[i].gref);
        for (unsigned i = 0; i < indirect_pages_per_slot; i++)
            grant_revoke(sl->indirect_pages[i].gref);
    }
    stats.ops++;
    sl->busy = false;
}

static unsigned in_flight_total(void)
{
    unsigned n = 0;
    for (unsigned i = 0; i < opt.queues; i++)
        n += queues[i].in_flight;
    return n;
}

static unsigned consume_all(void)
{
    unsigned n = 0;
    for (unsigned i = 0; i < opt.queues; i++)
        n += ring_consume(&queues[i], complete);
    return n;
}

static void run_workload(uint64_t ops)
{
    uint64_t submitted = 0;
    unsigned next_queue = 0;
    uint64_t start_ops = stats.ops;
    while (submitted < ops || in_flight_total() > 0) {
        bool blocked = false;
        while (submitted < ops && !blocked) {
            struct slot *sl = slot_free();
            struct queue *q = &queues[next_queue];
            if (!sl || ring_free(q) == 0)
                break;
            if (!generate(sl, (unsigned)(sl - slots))) {
                /* It overlaps a request in flight: wait for completions. */
                if (in_flight_total() == 0)
                    fail("internal: request blocked with nothing in flight");
                blocked = true;
                break;
            }
            submit(sl, next_queue);
            submitted++;
            next_queue = (next_queue + 1) % opt.queues;
        }
        for (unsigned i = 0; i < opt.queues; i++)
            ring_push(&queues[i]);
        if (consume_all() == 0 && in_flight_total() > 0)
            wait_for_event(opt.queues, "workload responses");
    }
    if (stats.ops - start_ops != ops)
        fail("internal: %" PRIu64 " ops completed, %" PRIu64 " submitted", stats.ops - start_ops,
             ops);
}

/* --vanish: fill the rings, then die without a word (no waiting, no disconnect, the event
 * channel sockets left behind), as a guest that crashes mid-I/O. */
static void vanish(void)
{
    unsigned next_queue = 0;
    for (unsigned attempt = 0; attempt < 4 * nr_slots; attempt++) {
        struct slot *sl = slot_free();
        if (!sl || ring_free(&queues[next_queue]) == 0)
            break;
        if (!generate(sl, (unsigned)(sl - slots)))
            continue; /* overlaps one in flight: draw another */
        submit(sl, next_queue);
        next_queue = (next_queue + 1) % opt.queues;
    }
    for (unsigned i = 0; i < opt.queues; i++)
        ring_push(&queues[i]);
    printf("cfront: vanishing with %u requests in flight\n", in_flight_total());
    fflush(stdout);
    _exit(0);
}

/* --overflow: publish a req_prod more than a ring ahead of the responses. The backend must
 * stop serving the ring (no response to a bogus slot) and report it: xensim.md has the
 * device go Closing with BE/error; over the control socket, info carries an "error". Then
 * the frontend disconnects, and the caller checks that a new frontend is served. */
static void overflow_ring(void)
{
    struct queue *q = &queues[0];
    RING_IDX bogus, cons;
    const RING_IDX *rsp_prod;
    if (opt.proto32) {
        blkif_x86_32_front_ring_t *fr = &q->ring.x86_32;
        bogus = fr->rsp_cons + RING_SIZE(fr) + 1;
        cons = fr->rsp_cons;
        rsp_prod = &fr->sring->rsp_prod;
        __atomic_store_n(&fr->sring->req_prod, bogus, __ATOMIC_RELEASE);
    } else {
        blkif_front_ring_t *fr = &q->ring.native;
        bogus = fr->rsp_cons + RING_SIZE(fr) + 1;
        cons = fr->rsp_cons;
        rsp_prod = &fr->sring->rsp_prod;
        __atomic_store_n(&fr->sring->req_prod, bogus, __ATOMIC_RELEASE);
    }
    evtchn_notify(&q->evtchn);
    uint64_t deadline = now_ms() + opt.timeout_ms;
    char reply[4096];
    for (;;) {
        ctl_call("{\"op\":\"info\"}\n", reply, sizeof(reply));
        if (strstr(reply, "\"error\""))
            break;
        if (now_ms() >= deadline)
            fail("overflow: req_prod %u, and info reports no error after %u ms: %s", bogus,
                 opt.timeout_ms, reply);
        usleep(20000);
    }
    RING_IDX prod = __atomic_load_n(rsp_prod, __ATOMIC_ACQUIRE);
    if (prod != cons)
        fail("overflow: the backend answered %u bogus requests (rsp_prod %u, rsp_cons %u)",
             prod - cons, prod, cons);
    const char *connected = strstr(reply, "\"connected\":");
    printf("cfront: overflow (req_prod %u) reported, connected=%.5s: %s\n", bogus,
           connected ? connected + strlen("\"connected\":") : "?", reply);
    ctl_disconnect();
}

/* ------------------------------------------------------------------------------------ */
/* Hostile requests (--expect-error)                                                     */

static struct response single_rsp;
static bool single_done;

static void record_single(struct queue *q, const struct response *rsp)
{
    (void)q;
    if (single_done)
        fail("a second response (id %#" PRIx64 ") to a single request", rsp->id);
    single_rsp = *rsp;
    single_done = true;
}

/* Put one request on queue 0 and wait for its response. */
static struct response round_trip(const struct request *r, const char *name)
{
    struct queue *q = &queues[0];
    single_done = false;
    ring_put(q, r);
    ring_push(q);
    while (ring_consume(q, record_single) == 0)
        wait_for_event(1, name);
    return single_rsp;
}

static unsigned cases_passed;

static void expect(const char *name, const struct request *r, uint8_t want_op, int16_t want_status)
{
    struct response rsp = round_trip(r, name);
    if (rsp.id != r->id)
        fail("case %s: response id %#" PRIx64 ", request id %#" PRIx64, name, rsp.id, r->id);
    if (rsp.operation != want_op)
        fail("case %s: response op %u, expected %u", name, rsp.operation, want_op);
    if (rsp.status != want_status)
        fail("case %s: status %d, expected %d", name, rsp.status, want_status);
    cases_passed++;
}

/* A one-sector read of `sector` into slot 0's first page, checked against the model. */
static void good_read(const char *after, uint64_t sector)
{
    struct slot *sl = &slots[0];
    memset(&sl->req, 0, sizeof(sl->req));
    sl->kind = K_READ;
    sl->queue = 0;
    sl->sector = sector;
    sl->nr_sectors = 1;
    sl->nr_segs = 1;
    sl->first[0] = sl->last[0] = 3;
    uint8_t *page = frame_ptr(sl->pages[0].frame);
    rng_fill(page, PAGE_SIZE);
    memcpy(sl->canary, page, PAGE_SIZE);
    grant(sl->pages[0].gref, sl->pages[0].frame, false);
    sl->req.id = next_id(0);
    build_rw_request(sl, BLKIF_OP_READ, false);
    char name[96];
    snprintf(name, sizeof(name), "good read after %s", after);
    struct response rsp = round_trip(&sl->req, name);
    if (rsp.id != sl->req.id || rsp.operation != BLKIF_OP_READ || rsp.status != BLKIF_RSP_OKAY)
        fail("%s: response id %#" PRIx64 " op %u status %d, expected id %#" PRIx64
             " READ OKAY",
             name, rsp.id, rsp.operation, rsp.status, sl->req.id);
    verify_read(sl);
    if (!opt.persistent)
        grant_revoke(sl->pages[0].gref);
}

/* A direct request of one segment on slot 0's first page. */
static struct request one_segment(uint8_t op, uint64_t sector, grant_ref_t gref, uint8_t first,
                                  uint8_t last)
{
    struct request r = {.operation = op, .nr_segments = 1, .id = next_id(0), .sector = sector};
    r.seg[0] = (struct blkif_request_segment){.gref = gref, .first_sect = first, .last_sect = last};
    return r;
}

/* A page and grant reference the backend has never seen: the hostile grant cases use it,
 * so that a backend keeping persistent mappings cannot answer them from a mapping made
 * for an earlier, valid request. */
static struct page hostile;

static void run_expect_error(void)
{
    struct page *pg = &slots[0].pages[0];
    uint64_t last_sector = backend.sectors - 1;
    /* Learn sector 0 first, so every later good read of it is verified, not learned. */
    good_read("connect", 0);
    grant(pg->gref, pg->frame, false);

    struct request r;
    const uint8_t unknown_op = 0x2a;
    r = (struct request){.operation = unknown_op, .nr_segments = 1, .id = next_id(0)};
    r.seg[0] = (struct blkif_request_segment){.gref = pg->gref, .first_sect = 0, .last_sect = 7};
    expect("unknown-op", &r, unknown_op, BLKIF_RSP_EOPNOTSUPP);
    good_read("unknown-op", 0);

    grant(pg->gref, pg->frame, false);
    r = one_segment(BLKIF_OP_READ, last_sector, pg->gref, 0, 1);
    expect("read-past-end", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    r = one_segment(BLKIF_OP_READ, backend.sectors, pg->gref, 0, 0);
    expect("read-at-end", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    r = one_segment(BLKIF_OP_READ, UINT64_MAX - 3, pg->gref, 0, 7);
    expect("read-sector-wraps", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    good_read("read-past-end", last_sector);

    grant(pg->gref, pg->frame, false);
    r = one_segment(BLKIF_OP_READ, 0, pg->gref, 5, 2);
    expect("first-after-last", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    r = one_segment(BLKIF_OP_READ, 0, pg->gref, 0, 8);
    expect("last-sect-8", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    r = one_segment(BLKIF_OP_READ, 0, pg->gref, 0, 7);
    r.nr_segments = 0;
    expect("zero-segments", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    r.nr_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST + 1;
    r.id = next_id(0);
    expect("twelve-segments", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    good_read("bad-segments", 0);

    r = one_segment(BLKIF_OP_READ, 0, 0x7ffffff0u, 0, 7);
    expect("gref-past-table", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    r = one_segment(BLKIF_OP_READ, 0, hostile.gref, 0, 7);
    expect("never-granted-gref", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    grant_raw(hostile.gref, 7, hostile.frame, GTF_permit_access);
    r.id = next_id(0);
    expect("gref-for-other-domain", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    grant(hostile.gref, hostile.frame, true);
    r.id = next_id(0);
    expect("read-into-readonly-gref", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
    grant_raw(hostile.gref, BACKEND_DOMID, guest.nr_frames + 100, GTF_permit_access);
    r = one_segment(BLKIF_OP_WRITE, 0, hostile.gref, 0, 7);
    expect("write-from-frame-past-memory", &r, BLKIF_OP_WRITE, BLKIF_RSP_ERROR);
    grant_revoke(hostile.gref);
    good_read("bad-grefs", 0);

    if (backend.max_indirect_segments > 0) {
        struct page *ind = &slots[0].indirect_pages[0];
        struct blkif_request_segment *list =
            (struct blkif_request_segment *)frame_ptr(ind->frame);
        memset(list, 0, PAGE_SIZE);
        list[0] = (struct blkif_request_segment){.gref = pg->gref, .first_sect = 0, .last_sect = 7};
        grant(pg->gref, pg->frame, false);
        if (!opt.persistent)
            grant(ind->gref, ind->frame, true);
        r = (struct request){.operation = BLKIF_OP_INDIRECT,
                             .indirect_op = BLKIF_OP_FLUSH_DISKCACHE, .nr_segments = 1,
                             .id = next_id(0)};
        r.indirect_grefs[0] = ind->gref;
        expect("indirect-op-flush", &r, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_ERROR);
        r.indirect_op = BLKIF_OP_READ;
        r.nr_segments = 0;
        r.id = next_id(0);
        expect("indirect-zero-segments", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
        r.nr_segments = (uint16_t)(backend.max_indirect_segments + 1);
        r.id = next_id(0);
        expect("indirect-above-maximum", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
        r.nr_segments = 1;
        r.indirect_grefs[0] = hostile.gref;
        r.id = next_id(0);
        expect("indirect-page-not-granted", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
        list[0].first_sect = 6;
        list[0].last_sect = 1;
        r.indirect_grefs[0] = ind->gref;
        r.id = next_id(0);
        expect("indirect-first-after-last", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
        if (!opt.persistent)
            grant_revoke(ind->gref);
        good_read("bad-indirect", 0);
    }

    if (backend.max_indirect_segments == 0) {
        /* Not offered: every segment count is above the advertised maximum of 0. */
        struct page *ind = &hostile;
        struct blkif_request_segment *list = (struct blkif_request_segment *)frame_ptr(ind->frame);
        memset(list, 0, PAGE_SIZE);
        list[0] = (struct blkif_request_segment){.gref = pg->gref, .first_sect = 0, .last_sect = 7};
        grant(ind->gref, ind->frame, true);
        grant(pg->gref, pg->frame, false);
        r = (struct request){.operation = BLKIF_OP_INDIRECT, .indirect_op = BLKIF_OP_READ,
                             .nr_segments = 1, .id = next_id(0)};
        r.indirect_grefs[0] = ind->gref;
        expect("indirect-not-offered", &r, BLKIF_OP_READ, BLKIF_RSP_ERROR);
        grant_revoke(ind->gref);
        good_read("indirect-not-offered", 0);
    }
    if (!backend.discard) {
        r = (struct request){.operation = BLKIF_OP_DISCARD, .id = next_id(0), .sector = 0,
                             .nr_sectors = 8};
        expect("discard-not-offered", &r, BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP);
        good_read("discard-not-offered", 0);
    }
    if (!backend.barrier) {
        grant(pg->gref, pg->frame, true);
        r = one_segment(BLKIF_OP_WRITE_BARRIER, 0, pg->gref, 0, 7);
        expect("barrier-not-offered", &r, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP);
        good_read("barrier-not-offered", 0);
    }

    if (backend.discard && !backend.read_only) {
        r = (struct request){.operation = BLKIF_OP_DISCARD, .id = next_id(0),
                             .sector = last_sector, .nr_sectors = 2};
        expect("discard-past-end", &r, BLKIF_OP_DISCARD, BLKIF_RSP_ERROR);
        good_read("discard-past-end", last_sector);
    }

    if (backend.read_only) {
        grant(pg->gref, pg->frame, !opt.persistent);
        r = one_segment(BLKIF_OP_WRITE, 0, pg->gref, 0, 7);
        expect("write-to-read-only-disk", &r, BLKIF_OP_WRITE, BLKIF_RSP_ERROR);
        good_read("write-to-read-only-disk", 0);
    }
    /* A flood of notifications with nothing on the ring: the backend must shrug it off. */
    for (unsigned i = 0; i < 5000; i++)
        evtchn_notify(&queues[0].evtchn);
    good_read("notification-flood", 0);

    /* Leave slot 0's page as the workload expects it. */
    if (opt.persistent)
        grant(pg->gref, pg->frame, false);
    else
        grant_revoke(pg->gref);
}

/* ------------------------------------------------------------------------------------ */
/* Grant and event-channel probe (--probe): the platform layer's contract, no serve      */

/* The byte at offset `i` of the frame granted as `gref` in the probe. */
static uint8_t probe_pattern(uint32_t gref, size_t i)
{
    return (uint8_t)(gref * 37u + i * 11u + (i >> 8));
}

/* What the backend writes into the target frame: bytes [512, 1536), byte i = i*13+5. */
#define PROBE_WRITE_OFFSET 512u
#define PROBE_WRITE_LEN 1024u

static void run_probe(void)
{
    guest_create(64, 64, 64, 64);
    struct evtchn *ev = &queues[0].evtchn;
    evtchn_bind(ev);
    /* Scattered frames; the second below the first, for a two-ref map in ref order. */
    const uint32_t frames[8] = {40, 17, 23, 5, 31, 11, 50, 63};
    uint32_t ok_a = alloc_gref(), ok_b = alloc_gref(), ro = alloc_gref(), wrongdom = alloc_gref(),
             revoked = alloc_gref(), badpage = alloc_gref(), target = alloc_gref(),
             flagged = alloc_gref(), transitive = alloc_gref();
    uint32_t pastend = guest.nr_grefs + 5;
    const uint32_t with_data[] = {ok_a, ok_b, ro, target, flagged};
    for (unsigned i = 0; i < 5; i++) {
        uint8_t *page = frame_ptr(frames[i]);
        for (size_t b = 0; b < PAGE_SIZE; b++)
            page[b] = probe_pattern(with_data[i], b);
    }
    grant(ok_a, frames[0], false);
    grant(ok_b, frames[1], false);
    grant(ro, frames[2], true);
    grant(target, frames[3], false);
    /* GTF_reading/GTF_writing are Xen's bookkeeping: a backend ignores them. */
    grant_raw(flagged, BACKEND_DOMID, frames[4],
              (uint16_t)(GTF_permit_access | GTF_reading | GTF_writing));
    grant_raw(transitive, BACKEND_DOMID, frames[5], (uint16_t)GTF_transitive);
    grant_raw(wrongdom, 7, frames[6], GTF_permit_access);
    grant(revoked, frames[7], false);
    grant_revoke(revoked);
    grant(badpage, guest.nr_frames, false);

    printf("probe: domid=%u port=%u frames=%u grefs=%u ok_a=%u ok_b=%u ro=%u wrongdom=%u "
           "revoked=%u badpage=%u pastend=%u target=%u flagged=%u transitive=%u\n",
           opt.domid, ev->port, guest.nr_frames, guest.nr_grefs, ok_a, ok_b, ro, wrongdom,
           revoked, badpage, pastend, target, flagged, transitive);
    fflush(stdout);

    wait_for_event(1, "the probe's notification");
    const uint8_t *page = frame_ptr(frames[3]);
    for (size_t b = 0; b < PAGE_SIZE; b++) {
        bool written = b >= PROBE_WRITE_OFFSET && b < PROBE_WRITE_OFFSET + PROBE_WRITE_LEN;
        uint8_t want = written ? (uint8_t)(b * 13u + 5u) : probe_pattern(target, b);
        if (page[b] != want)
            fail("probe: target frame byte %zu is %#04x, expected %#04x (%s)", b, page[b], want,
                 written ? "written by the backend" : "outside the backend's copy");
    }
    for (unsigned i = 0; i < 5; i++) {
        if (with_data[i] == target)
            continue;
        const uint8_t *p = frame_ptr(frames[i]);
        for (size_t b = 0; b < PAGE_SIZE; b++)
            if (p[b] != probe_pattern(with_data[i], b))
                fail("probe: frame of gref %u changed at byte %zu", with_data[i], b);
    }
    printf("probe: target verified\n");
    fflush(stdout);
    evtchn_notify(ev);
}

/* ------------------------------------------------------------------------------------ */

static void cleanup(void)
{
    for (unsigned i = 0; i < MAX_QUEUES; i++)
        evtchn_unbind(&queues[i].evtchn);
}

static void write_model(void)
{
    FILE *f = fopen(opt.model_out, "wb");
    if (!f)
        fail("create %s: %s", opt.model_out, strerror(errno));
    for (uint64_t s = 0; s < model_span; s++) {
        if (!model_known[s])
            continue;
        uint8_t le[8];
        for (unsigned b = 0; b < 8; b++)
            le[b] = (uint8_t)(s >> (8 * b));
        if (fwrite(le, 8, 1, f) != 1 || fwrite(model_data + s * SECTOR_SIZE, SECTOR_SIZE, 1, f) != 1)
            fail("write %s: %s", opt.model_out, strerror(errno));
    }
    if (fclose(f) != 0)
        fail("write %s: %s", opt.model_out, strerror(errno));
}

int main(int argc, char **argv)
{
    parse_options(argc, argv);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (unsigned i = 0; i < MAX_QUEUES; i++)
        queues[i] = (struct queue){.index = i, .evtchn = {.fd = -1}};
    rng_state = opt.seed;
    trace = getenv("CFRONT_TRACE") && strcmp(getenv("CFRONT_TRACE"), "1") == 0;
    if (opt.probe) {
        run_probe();
        cleanup();
        return 0;
    }

    ctl_info();
    if (opt.ring_order > backend.max_ring_page_order)
        fail("ring-page-order %u above the backend's maximum %u", opt.ring_order,
             backend.max_ring_page_order);
    if (opt.queues > backend.max_queues)
        fail("%u queues, the backend offers %u", opt.queues, backend.max_queues);
    if (opt.indirect && backend.max_indirect_segments == 0)
        fail("--indirect, but the backend offers no indirect segments");
    unsigned entries = ring_entries();
    if (opt.iodepth > entries * opt.queues)
        opt.iodepth = entries * opt.queues;
    if (opt.iodepth > 0xffff)
        opt.iodepth = 0xffff;

    segs_per_slot = BLKIF_MAX_SEGMENTS_PER_REQUEST;
    if (opt.indirect) {
        unsigned max = backend.max_indirect_segments < opt.max_segs ? backend.max_indirect_segments
                                                                    : opt.max_segs;
        if (max > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_PAGE)
            max = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_PAGE;
        if (max > MAX_INDIRECT_SEGS)
            max = MAX_INDIRECT_SEGS;
        if (max > segs_per_slot)
            segs_per_slot = max;
    }
    indirect_pages_per_slot = backend.max_indirect_segments > 0 ? (segs_per_slot +
                              SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE : 0;

    model_span = opt.span < backend.sectors ? opt.span : backend.sectors;
    model_data = xcalloc(model_span, SECTOR_SIZE);
    model_known = xcalloc(model_span, 1);

    uint32_t ring_frames = opt.queues * (2u << opt.ring_order);
    uint32_t data_frames = opt.iodepth * (segs_per_slot + indirect_pages_per_slot);
    uint32_t frames = 1 + ring_frames + data_frames + 16;
    uint32_t grefs = FIRST_GREF + ring_frames + data_frames + 16;
    if (opt.grow)
        /* Just the rings at first: frames 1..ring_frames, refs up to their last. */
        guest_create(frames, grefs, 1 + ring_frames,
                     FIRST_GREF + (opt.queues << opt.ring_order));
    else
        guest_create(frames, grefs, frames, grefs);
    for (unsigned i = 0; i < opt.queues; i++) {
        queue_alloc_ring(&queues[i]);
        evtchn_bind(&queues[i].evtchn);
    }

    ctl_connect();
    if (opt.grow)
        guest_grow();
    slots_alloc();
    hostile = (struct page){.frame = alloc_frame(), .gref = alloc_gref()};
    if (opt.vanish)
        vanish();
    if (opt.expect_error)
        run_expect_error();
    run_workload(opt.ops);
    if (opt.overflow)
        overflow_ring();
    else
        ctl_disconnect();
    if (opt.model_out)
        write_model();
    cleanup();
    printf("cfront: ops=%" PRIu64 " reads=%" PRIu64 " writes=%" PRIu64 " fua_writes=%" PRIu64
           " flushes=%" PRIu64 " discards=%" PRIu64 " indirect=%" PRIu64
           " verified_bytes=%" PRIu64 " learned_bytes=%" PRIu64 " error_cases=%u errors=0\n",
           stats.ops, stats.reads, stats.writes, stats.fua_writes, stats.flushes, stats.discards,
           stats.indirect, stats.verified_bytes, stats.learned_bytes, cases_passed);
    return 0;
}
