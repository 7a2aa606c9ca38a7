// The packed virtqueue (virtio 1.2 §2.8), the work of Sources/Virtio/PackedQueue.swift in C:
// buffer IDs from a free stack, per ID the ring descriptors it takes, the device-writable bytes,
// the token and the publish round it was added in; descriptors made available in ring order with
// the first flags of a batch written last by publish; every used descriptor validated (flags
// state, something published, ID range, in flight, made available, length). Messages are
// PackedQueue's, word for word.
#include "ring.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

// Byte layout (§2.8.13, §2.8.14), as PackedQueueLayout.
enum {
    DESC_SIZE = 16, DESC_ADDR = 0, DESC_LEN = 8, DESC_ID = 12, DESC_FLAGS = 14,
    EVENT_DESC = 0, EVENT_FLAGS = 2, EVENT_SIZE = 4,
    F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4, F_AVAIL = 1 << 7, F_USED = 1 << 15,
    EVENT_ENABLE = 0, EVENT_DISABLE = 1, EVENT_DESC_SPECIFIC = 2, EVENT_WRAP = 1 << 15,
};

/// §2.8.1: making available with wrap counter w: AVAIL = w, USED = !w; used: both = w.
static inline uint16_t available_flags(bool wrap) { return wrap ? F_AVAIL : F_USED; }
static inline uint16_t used_flags(bool wrap) { return wrap ? F_AVAIL | F_USED : 0; }

struct crr_packed {
    int index;
    uint16_t size;
    bool event_index;
    bool platform_order;
    bool notification_data;
    bool use_indirect;
    // Device-visible memory.
    uint8_t *ring;
    uint8_t *driver_event;
    uint8_t *device_event;
    uint8_t *indirect;
    uint64_t indirect_device;
    long indirect_entries;
    long indirect_stride;
    void *doorbell;
    uint16_t doorbell_value;
    // Driver-private shadow state, one entry per buffer ID.
    uint16_t *next_free_id;
    uint16_t *descriptor_count;   // IDs in flight: ring descriptors the buffer takes; else 0
    uint32_t *writable;           // IDs in flight: device-writable bytes
    uint64_t *tokens;
    uint32_t *added_round;        // the publish round each ID in flight was added in
    uint16_t free_id_head;
    long free_ids;
    long free_count;              // ring descriptors not part of a buffer in flight
    uint16_t next_avail;          // and the Driver Ring Wrap Counter (§2.8.1)
    bool avail_wrap;
    uint16_t next_used;
    bool used_wrap;
    long pending_descriptors;     // added since the last publish
    uint16_t pending_head;
    uint16_t pending_head_flags;
    uint32_t round;
    long in_flight;
    bool broken;
    char reason[CRR_REASON_SIZE];
};

struct crr_packed *crr_packed_create(const struct crr_queue_config *c) {
    long n = c->size;
    if (n <= 0 || n > 32768) return NULL;
    struct crr_packed *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->next_free_id = malloc(n * sizeof *q->next_free_id);
    q->descriptor_count = calloc(n, sizeof *q->descriptor_count);
    q->writable = calloc(n, sizeof *q->writable);
    q->tokens = calloc(n, sizeof *q->tokens);
    q->added_round = calloc(n, sizeof *q->added_round);
    if (!q->next_free_id || !q->descriptor_count || !q->writable || !q->tokens || !q->added_round) {
        crr_packed_destroy(q);
        return NULL;
    }
    for (long i = 0; i < n; i++) q->next_free_id[i] = (uint16_t)(i + 1);
    q->index = c->index;
    q->size = c->size;
    q->event_index = c->event_index;
    q->platform_order = c->platform_order;
    q->notification_data = c->notification_data;
    q->use_indirect = c->use_indirect && c->indirect != NULL;
    q->ring = c->descriptors;
    q->driver_event = c->driver_area;
    q->device_event = c->device_area;
    q->indirect = c->indirect;
    q->indirect_device = c->indirect_device_address;
    q->indirect_entries = c->indirect_entries;
    q->indirect_stride = c->indirect_stride;
    q->doorbell = c->doorbell;
    q->doorbell_value = c->doorbell_value;
    q->free_ids = n;
    q->free_count = n;
    // §2.8.1: both wrap counters start at 1.
    q->avail_wrap = true;
    q->used_wrap = true;
    q->round = 1;
    // §2.8.13: "The descriptor ring is zero-initialized".
    memset(q->ring, 0, DESC_SIZE * n);
    memset(q->driver_event, 0, EVENT_SIZE);
    memset(q->device_event, 0, EVENT_SIZE);
    return q;
}

void crr_packed_destroy(struct crr_packed *q) {
    if (!q) return;
    free(q->next_free_id);
    free(q->descriptor_count);
    free(q->writable);
    free(q->tokens);
    free(q->added_round);
    free(q);
}

static inline void store_descriptor(uint8_t *table, long i, uint64_t address, uint32_t length, uint16_t id) {
    uint8_t *d = table + DESC_SIZE * i;
    crr_store64(d + DESC_ADDR, address);
    crr_store32(d + DESC_LEN, length);
    crr_store16(d + DESC_ID, id);
}
static inline void store_flags(uint8_t *table, long i, uint16_t flags) {
    crr_store16(table + DESC_SIZE * i + DESC_FLAGS, flags);
}

__attribute__((cold, format(printf, 3, 4)))
static long refuse(struct crr_packed *q, int error, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(q->reason, sizeof q->reason, format, args);
    va_end(args);
    if (error == CRR_BROKEN) q->broken = true;
    return error;
}

static inline void advance_avail(struct crr_packed *q) {
    q->next_avail++;
    if (q->next_avail == q->size) {
        q->next_avail = 0;
        q->avail_wrap = !q->avail_wrap;  // §2.8.1: after the last descriptor of the ring
    }
}

int crr_packed_add(struct crr_packed *q, const struct crr_segment *segments, long count, uint64_t token) {
    if (q->broken) return CRR_BROKEN;
    if (count <= 0) return (int)refuse(q, CRR_BAD_REQUEST, "a request needs at least one buffer");
    uint32_t writable;
    if (!crr_writable_bytes(segments, count, &writable)) {
        return (int)refuse(q, CRR_BAD_REQUEST, "device-readable buffers must come before device-writable ones (§2.8.17)");
    }
    bool indirect = q->use_indirect && count > 1 && count <= q->indirect_entries;
    long needed = indirect ? 1 : count;
    if (needed > q->free_count || q->free_ids <= 0) {
        if (needed > q->size) {
            return (int)refuse(q, CRR_BAD_REQUEST, "request of %ld buffers exceeds the queue size %u (§2.8.17)", count, q->size);
        }
        return 0;
    }
    uint16_t id = q->free_id_head;
    uint16_t first = q->next_avail;
    uint16_t head_flags = 0;
    if (indirect) {
        // §2.8.8: the table's descriptors carry only WRITE; their IDs are ignored.
        long offset = id * q->indirect_stride;
        uint8_t *entries = q->indirect + offset;
        for (long i = 0; i < count; i++) {
            store_descriptor(entries, i, segments[i].address, segments[i].length, 0);
            store_flags(entries, i, segments[i].device_writable ? F_WRITE : 0);
        }
        store_descriptor(q->ring, first, q->indirect_device + (uint64_t)offset, (uint32_t)(DESC_SIZE * count), id);
        head_flags = F_INDIRECT | available_flags(q->avail_wrap);
        advance_avail(q);
    } else {
        for (long i = 0; i < count; i++) {
            uint16_t flags = available_flags(q->avail_wrap);
            if (segments[i].device_writable) flags |= F_WRITE;
            if (i + 1 < count) flags |= F_NEXT;
            // §2.8.6: the buffer ID goes in the last descriptor; every descriptor gets it here.
            store_descriptor(q->ring, q->next_avail, segments[i].address, segments[i].length, id);
            if (i == 0) head_flags = flags;
            else store_flags(q->ring, q->next_avail, flags);
            advance_avail(q);
        }
    }
    if (q->pending_descriptors == 0) {
        // The first of the batch: its flags wait for publish (§2.8.6: the first descriptor of a
        // list is made available after the rest).
        q->pending_head = first;
        q->pending_head_flags = head_flags;
    } else {
        // Later requests of a batch are not looked at before the batch's first descriptor is
        // available, which publish orders after these (§2.8.21.1).
        store_flags(q->ring, first, head_flags);
    }
    q->pending_descriptors += needed;
    q->free_id_head = q->next_free_id[id];
    q->free_ids--;
    q->free_count -= needed;
    q->descriptor_count[id] = (uint16_t)needed;
    q->writable[id] = writable;
    q->tokens[id] = token;
    q->added_round[id] = q->round;
    q->in_flight++;
    return 1;
}

bool crr_packed_publish(struct crr_packed *q) {
    if (q->pending_descriptors <= 0) return false;
    // §2.8.21.1 "Updating flags": every descriptor of the batch before the first one's flags.
    crr_barrier_write(q->platform_order);
    store_flags(q->ring, q->pending_head, q->pending_head_flags);
    // §2.8.21.3.1: before reading the Device Event Suppression structure (store-load: full).
    crr_barrier_full(q->platform_order);
    uint16_t added = (uint16_t)q->pending_descriptors;
    q->pending_descriptors = 0;
    q->round++;
    uint16_t flags = crr_load_device16(q->device_event + EVENT_FLAGS) & 3;
    bool notify;
    if (flags == EVENT_DESC_SPECIFIC && q->event_index) {
        // §2.8.10 with VIRTIO_F_EVENT_IDX (Linux virtqueue_kick_prepare_packed): notify if the
        // descriptors made available include the one the device named; an offset in the other
        // lap counts one ring size earlier.
        uint16_t off_wrap = crr_load_device16(q->device_event + EVENT_DESC);
        uint16_t event = off_wrap & (uint16_t)~EVENT_WRAP;
        if (((off_wrap & EVENT_WRAP) != 0) != q->avail_wrap) event -= q->size;
        notify = crr_need_event(event, q->next_avail, (uint16_t)(q->next_avail - added));
    } else {
        // ENABLE, DESC without EVENT_IDX, or the reserved 3: only DISABLE suppresses.
        notify = flags != EVENT_DISABLE;
    }
    if (notify) {
        // §2.9: the next available position and the Driver Ring Wrap Counter in bit 15.
        if (q->notification_data) {
            crr_ring_doorbell_data(q->doorbell, q->doorbell_value, (uint16_t)(q->next_avail | (q->avail_wrap ? 0x8000 : 0)));
        } else {
            crr_ring_doorbell(q->doorbell, q->doorbell_value);
        }
    }
    return notify;
}

bool crr_packed_has_used(const struct crr_packed *q) {
    uint16_t state = crr_load_device16(q->ring + DESC_SIZE * q->next_used + DESC_FLAGS) & (F_AVAIL | F_USED);
    if (state == used_flags(q->used_wrap)) return true;
    return state != available_flags(q->used_wrap) && q->size - q->free_count - q->pending_descriptors > 0;
}

static inline void release(struct crr_packed *q, uint16_t id, uint16_t count) {
    q->descriptor_count[id] = 0;
    q->writable[id] = 0;
    q->next_free_id[id] = q->free_id_head;
    q->free_id_head = id;
    q->free_ids++;
    q->free_count += count;
    q->in_flight--;
}

long crr_packed_drain(struct crr_packed *q, long limit, uint64_t *tokens, uint32_t *lengths) {
    if (q->broken) return CRR_BROKEN;
    const uint16_t both = F_AVAIL | F_USED;
    long consumed = 0;
    while (consumed < limit) {
        // Per descriptor: the wrap counter changes when the ring wraps inside the loop.
        uint16_t used = used_flags(q->used_wrap);
        uint16_t position = q->next_used;
        const uint8_t *descriptor = q->ring + DESC_SIZE * position;
        // §2.8.22: the flags of the next used position, read once.
        uint16_t flags = crr_load_device16(descriptor + DESC_FLAGS);
        uint16_t state = flags & both;
        long published = q->size - q->free_count - q->pending_descriptors;
        if (state != used) {
            // Inside the published part the device changes the driver's flags only to used (§2.8.1).
            if (published > 0 && state != available_flags(q->used_wrap)) {
                return refuse(q, CRR_BROKEN, "descriptor %u has AVAIL %d and USED %d with the used wrap counter at %d: "
                              "neither available nor used in this lap (§2.8.1)",
                              position, (flags & F_AVAIL) != 0, (flags & F_USED) != 0, q->used_wrap);
            }
            break;
        }
        if (published <= 0) {
            return refuse(q, CRR_BROKEN, "descriptor %u marked used with no request in flight (nothing was made available there)",
                          position);
        }
        // §2.8.22 (the example's read_memory_barrier): the flags before the id and length.
        crr_barrier_read(q->platform_order);
        uint16_t id = crr_load_device16(descriptor + DESC_ID);
        if (id >= q->size) {
            return refuse(q, CRR_BROKEN, "used buffer ID %u at descriptor %u is not an ID (queue size %u)", id, position, q->size);
        }
        uint16_t count = q->descriptor_count[id];
        if (count == 0) {
            return refuse(q, CRR_BROKEN, "used buffer ID %u at descriptor %u is not a request in flight "
                          "(completed twice, or never submitted)", id, position);
        }
        if (q->added_round[id] == q->round) {
            return refuse(q, CRR_BROKEN, "used buffer ID %u at descriptor %u was added but not yet made available", id, position);
        }
        // §2.8.4, as PackedQueue reads it: the length counts for a buffer with writable bytes
        // whether or not the device set WRITE (QEMU never does), and is ignored for one without.
        uint32_t length = q->writable[id] == 0 ? 0 : crr_load_device32(descriptor + DESC_LEN);
        if (length > q->writable[id]) {
            return refuse(q, CRR_BROKEN, "used length %u for buffer ID %u is past the %u device-writable bytes",
                          length, id, q->writable[id]);
        }
        uint64_t token = q->tokens[id];
        release(q, id, count);
        // §2.8.4: skip the buffer's other descriptors to where the next used one goes.
        long next = (long)position + count;
        if (next >= q->size) {
            next -= q->size;
            q->used_wrap = !q->used_wrap;
        }
        q->next_used = (uint16_t)next;
        tokens[consumed] = token;
        lengths[consumed] = length;
        consumed++;
    }
    return consumed;
}

void crr_packed_suppress_interrupts(struct crr_packed *q) {
    crr_store16(q->driver_event + EVENT_FLAGS, EVENT_DISABLE);
}

long crr_packed_in_flight(const struct crr_packed *q) { return q->in_flight; }
const char *crr_packed_reason(const struct crr_packed *q) { return q->reason; }
