// What split.c and packed.c share: ring memory accessors, the barriers (the same fences as
// CVirtioShim's), the writable-bytes rule and vring_need_event.
#ifndef CRR_RING_H
#define CRR_RING_H

#include "CRingReference.h"
#include "CVirtioShim.h"
#include <endian.h>
#include <string.h>

// Barriers: CVirtioShim's own (each use names the spec section it serves), chosen by the
// queue's `platform_order` as DeviceOrdering chooses them (VIRTIO_F_ORDER_PLATFORM, §6: the
// platform's barriers for a hardware device; else the SMP ones).
static inline void crr_barrier_full(bool platform) {
    if (platform) CVirtioShim_platform_barrier_full(); else CVirtioShim_barrier_full();
}
static inline void crr_barrier_read(bool platform) {
    if (platform) CVirtioShim_platform_barrier_read(); else CVirtioShim_barrier_read();
}
static inline void crr_barrier_write(bool platform) {
    if (platform) CVirtioShim_platform_barrier_write(); else CVirtioShim_barrier_write();
}

// Driver-written ring fields: plain little-endian stores, ordered by the barriers.
static inline void crr_store16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static inline void crr_store32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline void crr_store64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

// Device-written fields: one volatile load each, never repeated or elided by the compiler.
static inline uint16_t crr_load_device16(const uint8_t *p) { return le16toh(*(const volatile uint16_t *)p); }
static inline uint32_t crr_load_device32(const uint8_t *p) { return le32toh(*(const volatile uint32_t *)p); }

/// The doorbell: one 16-bit volatile store of the queue index (§4.1.5.2), as Doorbell.ring().
static inline void crr_ring_doorbell(void *address, uint16_t value) {
    *(volatile uint16_t *)address = htole16(value);
}

/// With VIRTIO_F_NOTIFICATION_DATA (§2.9): one 32-bit store of the queue index and `next`
/// (next_off and next_wrap), as Doorbell.ring(next:).
static inline void crr_ring_doorbell_data(void *address, uint16_t value, uint16_t next) {
    *(volatile uint32_t *)address = htole32((uint32_t)value | (uint32_t)next << 16);
}

/// The device-writable bytes of a request, checking that no device-readable segment follows a
/// device-writable one (§2.7.4.2 / §2.8.17); summed in 64 bits, saturated at UINT32_MAX.
/// False if the order is wrong.
static inline bool crr_writable_bytes(const struct crr_segment *s, long count, uint32_t *writable) {
    bool saw_writable = false;
    uint64_t sum = 0;
    for (long i = 0; i < count; i++) {
        if (s[i].device_writable) {
            saw_writable = true;
            sum += s[i].length;
        } else if (saw_writable) {
            return false;
        }
    }
    *writable = sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
    return true;
}

/// vring_need_event (§2.7.7.2, §2.7.10.1): whether moving an index from `old` to `new` passes
/// the other side's `event` index.
static inline bool crr_need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

#define CRR_REASON_SIZE 200

#endif
