// CRingReference: a C reference implementation of the driver side of both virtqueue formats,
// split (virtio 1.2 §2.7) and packed (§2.8), doing exactly the work of Sources/Virtio's
// SplitQueue and PackedQueue (same shadow state, same validation of every used entry, same
// token bookkeeping, same barriers and the same doorbell store), so that the ring benchmark can
// measure the Swift driver against what the same algorithms cost in C (docs/PERFORMANCE.md,
// "Swift against a C reference").
//
// It is a yardstick, not a driver: only virtio-vfio-ring-bench (through RingBenchmark) links it;
// the shipped virtio-vfio does not. State is allocated once at creation; the hot path
// (add, publish, drain) allocates nothing.
#ifndef CRINGREFERENCE_H
#define CRINGREFERENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/// One buffer of a request, laid out like Swift's BufferSegment (16 bytes).
struct crr_segment {
    uint64_t address;
    uint32_t length;
    bool device_writable;
};

/// Where a queue's memory is and what was negotiated. Split: `descriptors` is the descriptor
/// table, `driver_area` the available ring, `device_area` the used ring. Packed: the descriptor
/// ring, the Driver and the Device Event Suppression structures. `indirect` (or NULL): one table
/// of `indirect_entries` descriptors per head / buffer ID, `indirect_stride` bytes apart, at
/// device address `indirect_device_address` + offset (linear device memory only).
struct crr_queue_config {
    int index;
    uint16_t size;
    void *descriptors;
    void *driver_area;
    void *device_area;
    void *indirect;
    uint64_t indirect_device_address;
    long indirect_entries;
    long indirect_stride;
    bool event_index;
    bool use_indirect;
    bool platform_order;     // VIRTIO_F_ORDER_PLATFORM: the platform's barriers (§6)
    bool notification_data;  // VIRTIO_F_NOTIFICATION_DATA: 32-bit notifications (§2.9)
    void *doorbell;
    uint16_t doorbell_value;
};

/// What a failed call means (the queue's `reason` says more).
enum crr_error { CRR_BROKEN = -1, CRR_BAD_REQUEST = -2 };

struct crr_split;
struct crr_packed;

// Split ring (§2.7). create zeroes the ring memory (as SplitQueue.init does); NULL on a bad size.
struct crr_split *crr_split_create(const struct crr_queue_config *config);
void crr_split_destroy(struct crr_split *q);
/// 1: added; 0: no room (nothing changed); CRR_BROKEN / CRR_BAD_REQUEST: refused (see reason).
int crr_split_add(struct crr_split *q, const struct crr_segment *segments, long count, uint64_t token);
/// Makes the added requests visible; true if the doorbell was rung.
bool crr_split_publish(struct crr_split *q);
bool crr_split_has_used(const struct crr_split *q);
/// Consumes up to `limit` used elements, each validated, writing token and length of the i-th to
/// tokens[i] and lengths[i]. The count, or CRR_BROKEN (the queue is then broken for good).
long crr_split_drain(struct crr_split *q, long limit, uint64_t *tokens, uint32_t *lengths);
void crr_split_suppress_interrupts(struct crr_split *q);
long crr_split_in_flight(const struct crr_split *q);
const char *crr_split_reason(const struct crr_split *q);

// Packed ring (§2.8), the same calls.
struct crr_packed *crr_packed_create(const struct crr_queue_config *config);
void crr_packed_destroy(struct crr_packed *q);
int crr_packed_add(struct crr_packed *q, const struct crr_segment *segments, long count, uint64_t token);
bool crr_packed_publish(struct crr_packed *q);
bool crr_packed_has_used(const struct crr_packed *q);
long crr_packed_drain(struct crr_packed *q, long limit, uint64_t *tokens, uint32_t *lengths);
void crr_packed_suppress_interrupts(struct crr_packed *q);
long crr_packed_in_flight(const struct crr_packed *q);
const char *crr_packed_reason(const struct crr_packed *q);

/// The ring benchmark's driver hot path in C, the counterpart of RingBenchmark/HotPath.swift:
/// the same slots, requests, tokens and counters, on one of the two queues above.
struct crr_bench {
    struct crr_split *split;      // exactly one of the two is set
    struct crr_packed *packed;
    uint32_t *idle;               // stack of idle buffer slots
    long idle_count;
    long idle_capacity;
    uint8_t *slots;               // buffer slots, `stride` bytes apart
    uint64_t slots_device_address;
    long stride;
    long buffer_size;             // rng: bytes per buffer; blk: data bytes per request
    bool is_blk;
    uint64_t blk_capacity_sectors;
    uint64_t submitted;
    long doorbells;
    long drains;
    long pending;                 // completions in tokens/lengths not yet checked
    uint64_t *tokens;
    uint32_t *lengths;
    int last_error;               // the crr_error of the last failed call
};

/// Part 1 (callgrind: --toggle-collect=virtio_bench_c_submit): for up to `count` idle slots,
/// describe one request and add it, then publish once. Returns how many were added, or a
/// crr_error.
long virtio_bench_c_submit(struct crr_bench *b, long count);
/// Part 2 (callgrind: --toggle-collect=virtio_bench_c_complete): one drain into tokens/lengths
/// from `pending` on. Returns how many, or a crr_error.
long virtio_bench_c_complete(struct crr_bench *b);
bool crr_bench_has_used(const struct crr_bench *b);
long crr_bench_in_flight(const struct crr_bench *b);
const char *crr_bench_reason(const struct crr_bench *b);

#endif
