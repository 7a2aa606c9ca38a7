// The split virtqueue (virtio 1.2 §2.7), the work of Sources/Virtio/SplitQueue.swift in C:
// a free list of descriptors, per head the chain length, the device-writable bytes and the
// token, the available index kept privately (never read back from the ring), every used element
// validated before use, EVENT_IDX notification decisions. Messages are SplitQueue's, word for word.
#include "ring.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

// Byte layout (§2.7.5, §2.7.6, §2.7.8), as SplitQueueLayout.
enum {
    DESC_SIZE = 16, DESC_ADDR = 0, DESC_LEN = 8, DESC_FLAGS = 12, DESC_NEXT = 14,
    AVAIL_FLAGS = 0, AVAIL_IDX = 2, AVAIL_RING = 4,
    USED_FLAGS = 0, USED_IDX = 2, USED_RING = 4, USED_ELEM_SIZE = 8, USED_ELEM_ID = 0, USED_ELEM_LEN = 4,
    F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4,
    AVAIL_NO_INTERRUPT = 1, USED_NO_NOTIFY = 1,
};

struct crr_split {
    int index;
    uint16_t size;
    uint16_t mask;
    bool event_index;
    bool platform_order;
    bool notification_data;
    bool use_indirect;
    // Device-visible memory.
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint8_t *indirect;
    uint64_t indirect_device;
    long indirect_entries;
    long indirect_stride;
    void *doorbell;
    uint16_t doorbell_value;
    // Driver-private shadow state, one entry per descriptor (index = descriptor / head number).
    uint16_t *next_free;
    uint16_t *chain_length;     // heads in flight: descriptors used; else 0
    uint32_t *writable;         // heads in flight: device-writable bytes
    uint64_t *tokens;
    uint16_t free_head;
    long free_count;
    uint16_t avail_idx;          // as this driver knows it
    uint16_t published_avail_idx;
    uint16_t last_used;
    long in_flight;
    bool broken;
    char reason[CRR_REASON_SIZE];
};

struct crr_split *crr_split_create(const struct crr_queue_config *c) {
    long n = c->size;
    if (n <= 0 || (n & (n - 1)) != 0 || n > 32768) return NULL;
    struct crr_split *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->next_free = malloc(n * sizeof *q->next_free);
    q->chain_length = calloc(n, sizeof *q->chain_length);
    q->writable = calloc(n, sizeof *q->writable);
    q->tokens = calloc(n, sizeof *q->tokens);
    if (!q->next_free || !q->chain_length || !q->writable || !q->tokens) {
        crr_split_destroy(q);
        return NULL;
    }
    for (long i = 0; i < n; i++) q->next_free[i] = (uint16_t)(i + 1);
    q->index = c->index;
    q->size = c->size;
    q->mask = (uint16_t)(c->size - 1);
    q->event_index = c->event_index;
    q->platform_order = c->platform_order;
    q->notification_data = c->notification_data;
    q->use_indirect = c->use_indirect && c->indirect != NULL;
    q->desc = c->descriptors;
    q->avail = c->driver_area;
    q->used = c->device_area;
    q->indirect = c->indirect;
    q->indirect_device = c->indirect_device_address;
    q->indirect_entries = c->indirect_entries;
    q->indirect_stride = c->indirect_stride;
    q->doorbell = c->doorbell;
    q->doorbell_value = c->doorbell_value;
    q->free_count = n;
    // §2.7.10.1: used flags start at 0, and a fresh queue has both indices at 0 (§2.7.6, §2.7.8).
    memset(q->desc, 0, DESC_SIZE * n);
    memset(q->avail, 0, AVAIL_RING + 2 * n + 2);
    memset(q->used, 0, USED_RING + USED_ELEM_SIZE * n + 2);
    return q;
}

void crr_split_destroy(struct crr_split *q) {
    if (!q) return;
    free(q->next_free);
    free(q->chain_length);
    free(q->writable);
    free(q->tokens);
    free(q);
}

static inline void store_descriptor(uint8_t *table, long i, uint64_t address, uint32_t length,
                                    uint16_t flags, uint16_t next) {
    uint8_t *d = table + DESC_SIZE * i;
    crr_store64(d + DESC_ADDR, address);
    crr_store32(d + DESC_LEN, length);
    crr_store16(d + DESC_FLAGS, flags);
    crr_store16(d + DESC_NEXT, next);
}

__attribute__((cold, format(printf, 3, 4)))
static int refuse(struct crr_split *q, int error, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(q->reason, sizeof q->reason, format, args);
    va_end(args);
    if (error == CRR_BROKEN) q->broken = true;
    return error;
}

int crr_split_add(struct crr_split *q, const struct crr_segment *segments, long count, uint64_t token) {
    if (q->broken) return CRR_BROKEN;
    if (count <= 0) return refuse(q, CRR_BAD_REQUEST, "a request needs at least one buffer");
    uint32_t writable;
    if (!crr_writable_bytes(segments, count, &writable)) {
        return refuse(q, CRR_BAD_REQUEST, "device-readable buffers must come before device-writable ones (§2.7.4.2)");
    }
    bool indirect = q->use_indirect && count > 1 && count <= q->indirect_entries;
    long needed = indirect ? 1 : count;
    if (needed > q->free_count) {
        if (needed > q->size) {
            return refuse(q, CRR_BAD_REQUEST, "request of %ld buffers exceeds the queue size %u", count, q->size);
        }
        return 0;
    }
    uint16_t head = q->free_head;
    if (indirect) {
        // One indirect table per head: entries chained 0..count-1 (§2.7.5.3.1: no INDIRECT flag
        // inside an indirect table).
        long offset = head * q->indirect_stride;
        uint8_t *entries = q->indirect + offset;
        for (long i = 0; i < count; i++) {
            uint16_t flags = segments[i].device_writable ? F_WRITE : 0;
            if (i + 1 < count) flags |= F_NEXT;
            store_descriptor(entries, i, segments[i].address, segments[i].length, flags, (uint16_t)(i + 1));
        }
        store_descriptor(q->desc, head, q->indirect_device + (uint64_t)offset, (uint32_t)(DESC_SIZE * count),
                         F_INDIRECT, 0);
        q->free_head = q->next_free[head];
    } else {
        uint16_t d = head;
        for (long i = 0; i < count; i++) {
            uint16_t following = q->next_free[d];
            uint16_t flags = segments[i].device_writable ? F_WRITE : 0;
            if (i + 1 < count) flags |= F_NEXT;
            store_descriptor(q->desc, d, segments[i].address, segments[i].length, flags, following);
            if (i + 1 < count) d = following;
            else q->free_head = following;
        }
    }
    q->free_count -= needed;
    q->chain_length[head] = (uint16_t)needed;
    q->writable[head] = writable;
    q->tokens[head] = token;
    // §2.7.13.2: the head goes in the next available ring slot; the index is published later.
    crr_store16(q->avail + AVAIL_RING + 2 * (q->avail_idx & q->mask), head);
    q->avail_idx++;
    q->in_flight++;
    return 1;
}

bool crr_split_publish(struct crr_split *q) {
    if (q->avail_idx == q->published_avail_idx) return false;
    // §2.7.13.3: the device sees the descriptor table and available ring before the new idx.
    crr_barrier_write(q->platform_order);
    crr_store16(q->avail + AVAIL_IDX, q->avail_idx);
    // §2.7.13.4: idx updated before checking for notification suppression (store-load: full).
    crr_barrier_full(q->platform_order);
    uint16_t old = q->published_avail_idx;
    q->published_avail_idx = q->avail_idx;
    bool notify;
    if (q->event_index) {
        // §2.7.10.1 with VIRTIO_F_EVENT_IDX: notify if the new index passed avail_event.
        uint16_t event = crr_load_device16(q->used + USED_RING + USED_ELEM_SIZE * q->size);
        notify = crr_need_event(event, q->avail_idx, old);
    } else {
        // §2.7.10.1 without it: notify unless the device set VIRTQ_USED_F_NO_NOTIFY.
        notify = (crr_load_device16(q->used + USED_FLAGS) & USED_NO_NOTIFY) == 0;
    }
    if (notify) {
        // §2.9: next_off and next_wrap are the 16 bits of the available index.
        if (q->notification_data) crr_ring_doorbell_data(q->doorbell, q->doorbell_value, q->avail_idx);
        else crr_ring_doorbell(q->doorbell, q->doorbell_value);
    }
    return notify;
}

bool crr_split_has_used(const struct crr_split *q) {
    return crr_load_device16(q->used + USED_IDX) != q->last_used;
}

/// Returns a head's descriptors to the free list (shadow links only).
static inline void release(struct crr_split *q, uint16_t head, uint16_t chain) {
    uint16_t last = head;
    for (long i = 1; i < (chain > 1 ? chain : 1); i++) last = q->next_free[last];
    q->next_free[last] = q->free_head;
    q->free_head = head;
    q->free_count += chain;
    q->chain_length[head] = 0;
    q->writable[head] = 0;
    q->in_flight--;
}

long crr_split_drain(struct crr_split *q, long limit, uint64_t *tokens, uint32_t *lengths) {
    if (q->broken) return CRR_BROKEN;
    // used.idx, read once (§2.7.14: the device's idx is the only truth about how many are ready).
    uint16_t device_idx = crr_load_device16(q->used + USED_IDX);
    uint16_t pending = device_idx - q->last_used;
    if (pending == 0) return 0;
    // The device can complete at most what is in flight.
    if (pending > q->in_flight) {
        return refuse(q, CRR_BROKEN, "used idx jumped by %u with only %ld requests in flight (queue size %u)",
                      pending, q->in_flight, q->size);
    }
    // §2.7.14: read barrier between the idx and the ring entries it covers.
    crr_barrier_read(q->platform_order);
    long consumed = 0;
    while (consumed < limit && q->last_used != device_idx) {
        const uint8_t *element = q->used + USED_RING + USED_ELEM_SIZE * (q->last_used & q->mask);
        // Each field read exactly once and validated before any use.
        uint32_t id = crr_load_device32(element + USED_ELEM_ID);
        uint32_t length = crr_load_device32(element + USED_ELEM_LEN);
        if (id >= q->size) {
            return refuse(q, CRR_BROKEN, "used id %u is not a descriptor index (queue size %u)", id, q->size);
        }
        uint16_t chain = q->chain_length[id];
        if (chain == 0) {
            return refuse(q, CRR_BROKEN, "used id %u is not a request in flight (completed twice, or never submitted)", id);
        }
        if (length > q->writable[id]) {
            return refuse(q, CRR_BROKEN, "used length %u for id %u is past the %u device-writable bytes",
                          length, id, q->writable[id]);
        }
        uint64_t token = q->tokens[id];
        release(q, (uint16_t)id, chain);
        q->last_used++;
        tokens[consumed] = token;
        lengths[consumed] = length;
        consumed++;
    }
    return consumed;
}

void crr_split_suppress_interrupts(struct crr_split *q) {
    if (q->event_index) {
        // An event index half the ring space away is never reached by polling (§2.7.10).
        crr_store16(q->avail + AVAIL_RING + 2 * q->size, (uint16_t)(q->last_used + 0x8000));
    } else {
        crr_store16(q->avail + AVAIL_FLAGS, AVAIL_NO_INTERRUPT);
    }
}

long crr_split_in_flight(const struct crr_split *q) { return q->in_flight; }
const char *crr_split_reason(const struct crr_split *q) { return q->reason; }
