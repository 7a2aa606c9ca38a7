// The ring benchmark's driver hot path in C: RingBenchmark/HotPath.swift's two functions, line
// for line, over the C queues. The loop around them (waiting, checking every completion) is the
// Swift RingBench's, for both implementations.
#include "CRingReference.h"
#include <stdint.h>
#include <limits.h>
#include <string.h>

enum { BLK_HEADER = 16 };

/// The disk sector request `sequence` reads (RingBench.blkSector).
static inline uint64_t blk_sector(const struct crr_bench *b, uint64_t sequence) {
    uint64_t sectors = (uint64_t)(b->buffer_size / 512);
    return (sequence * sectors) % (b->blk_capacity_sectors - sectors + 1);
}

__attribute__((noinline))
long virtio_bench_c_submit(struct crr_bench *b, long count) {
    struct crr_segment segments[3];
    long added = 0;
    long buffer_size = b->buffer_size;
    bool is_blk = b->is_blk;
    long segment_count = is_blk ? 3 : 1;
    while (added < count && b->idle_count > 0) {
        long slot = b->idle[--b->idle_count];
        uint8_t *buffer = b->slots + slot * b->stride;
        uint64_t address = b->slots_device_address + (uint64_t)(slot * b->stride);
        if (is_blk) {
            // struct virtio_blk_req (spec 5.2.6): le32 type (IN = 0), le32 reserved, le64 sector;
            // data; u8 status, set to an invalid value so a request the device skipped shows.
            uint8_t *header = buffer + buffer_size;
            uint32_t zero = 0;
            uint64_t sector = blk_sector(b, b->submitted);
            memcpy(header, &zero, 4);
            memcpy(header + 4, &zero, 4);
            memcpy(header + 8, &sector, 8);
            header[BLK_HEADER] = 0xFF;
            segments[0] = (struct crr_segment){ address + (uint64_t)buffer_size, BLK_HEADER, false };
            segments[1] = (struct crr_segment){ address, (uint32_t)buffer_size, true };
            segments[2] = (struct crr_segment){ address + (uint64_t)(buffer_size + BLK_HEADER), 1, true };
        } else {
            segments[0] = (struct crr_segment){ address, (uint32_t)buffer_size, true };
        }
        uint64_t token = b->submitted << 16 | (uint64_t)slot;
        int r = b->split ? crr_split_add(b->split, segments, segment_count, token)
                         : crr_packed_add(b->packed, segments, segment_count, token);
        if (r < 0) {
            b->idle[b->idle_count++] = (uint32_t)slot;
            b->last_error = r;
            return r;
        }
        if (r == 0) {
            b->idle[b->idle_count++] = (uint32_t)slot;
            break;
        }
        b->submitted++;
        added++;
    }
    if (b->split ? crr_split_publish(b->split) : crr_packed_publish(b->packed)) b->doorbells++;
    return added;
}

__attribute__((noinline))
long virtio_bench_c_complete(struct crr_bench *b) {
    long pending = b->pending;
    long n = b->split ? crr_split_drain(b->split, LONG_MAX, b->tokens + pending, b->lengths + pending)
                      : crr_packed_drain(b->packed, LONG_MAX, b->tokens + pending, b->lengths + pending);
    if (n < 0) {
        b->last_error = (int)n;
        return n;
    }
    b->pending = pending + n;
    b->drains++;
    return n;
}

bool crr_bench_has_used(const struct crr_bench *b) {
    return b->split ? crr_split_has_used(b->split) : crr_packed_has_used(b->packed);
}
long crr_bench_in_flight(const struct crr_bench *b) {
    return b->split ? crr_split_in_flight(b->split) : crr_packed_in_flight(b->packed);
}
const char *crr_bench_reason(const struct crr_bench *b) {
    return b->split ? crr_split_reason(b->split) : crr_packed_reason(b->packed);
}
