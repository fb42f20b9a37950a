/*
 * The 32-bit x86 blkif ring ("x86_32-abi"), as a 64-bit frontend must lay it out.
 *
 * Xen's public headers describe the 32-bit ABI only implicitly: xen/foreign/x86_32.h
 * carries the x86_32 core structures (with `#pragma pack(4)`, the i386 alignment of
 * 64-bit integers) but no blkif types. These are the structures of xen/io/blkif.h as an
 * i386 compiler lays them out: 64-bit fields aligned to 4 bytes, and the `pad` that
 * blkif.h adds to the indirect request under `__i386__`. The ring itself comes from
 * io/ring.h's DEFINE_RING_TYPES, like the native one.
 */
#ifndef CFRONT_BLKIF_X86_32_H
#define CFRONT_BLKIF_X86_32_H

#include <stddef.h>
#include <stdint.h>

#if !defined(xen_mb) || !defined(xen_rmb) || !defined(xen_wmb)
#error "define io/ring.h's barriers (xen_mb, xen_rmb, xen_wmb) before including this header"
#endif
#include <xen/io/blkif.h>

#pragma pack(push, 4)
struct blkif_x86_32_request {
    uint8_t operation;
    uint8_t nr_segments;
    blkif_vdev_t handle;
    uint64_t id;
    blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};

struct blkif_x86_32_request_discard {
    uint8_t operation;
    uint8_t flag;
    blkif_vdev_t handle;
    uint64_t id;
    blkif_sector_t sector_number;
    uint64_t nr_sectors;
};

struct blkif_x86_32_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint64_t id;
    blkif_sector_t sector_number;
    blkif_vdev_t handle;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t pad;
};

struct blkif_x86_32_response {
    uint64_t id;
    uint8_t operation;
    int16_t status;
};
#pragma pack(pop)

DEFINE_RING_TYPES(blkif_x86_32, struct blkif_x86_32_request, struct blkif_x86_32_response);

/* The layouts of xensim.md section 5, checked at compile time. */
_Static_assert(sizeof(struct blkif_x86_32_request) == 108, "x86_32 request is 108 bytes");
_Static_assert(offsetof(struct blkif_x86_32_request, id) == 4, "x86_32 id@4");
_Static_assert(offsetof(struct blkif_x86_32_request, sector_number) == 12, "x86_32 sector@12");
_Static_assert(offsetof(struct blkif_x86_32_request, seg) == 20, "x86_32 seg@20");
_Static_assert(offsetof(struct blkif_x86_32_request_discard, nr_sectors) == 20,
               "x86_32 discard nr_sectors@20");
_Static_assert(offsetof(struct blkif_x86_32_request_indirect, id) == 4, "x86_32 indirect id@4");
_Static_assert(offsetof(struct blkif_x86_32_request_indirect, sector_number) == 12,
               "x86_32 indirect sector@12");
_Static_assert(offsetof(struct blkif_x86_32_request_indirect, handle) == 20,
               "x86_32 indirect handle@20");
_Static_assert(offsetof(struct blkif_x86_32_request_indirect, indirect_grefs) == 24,
               "x86_32 indirect grefs@24");
_Static_assert(offsetof(struct blkif_x86_32_response, operation) == 8, "x86_32 response op@8");
_Static_assert(offsetof(struct blkif_x86_32_response, status) == 10, "x86_32 response status@10");
_Static_assert(sizeof(union blkif_x86_32_sring_entry) == 108, "x86_32 ring entry is 108 bytes");
_Static_assert(offsetof(struct blkif_x86_32_sring, ring) == 64, "ring entries start at 64");

#endif
