import CVirtioShim

/// The device's accesses to memory it shares with the driver (rings and the notify slots).
///
/// Every ring field goes through these volatile, little-endian loads and stores (spec 2.7: all
/// ring fields are little-endian for a non-legacy device), and every ordering through the named
/// barriers below, each with the spec rule it serves. Buffer contents are copied with memcpy.
enum Ring {
    @inline(__always) static func load16(_ p: UnsafeRawPointer) -> UInt16 {
        UInt16(littleEndian: CVirtioShim_mmio_read16(p))
    }
    @inline(__always) static func load32(_ p: UnsafeRawPointer) -> UInt32 {
        UInt32(littleEndian: CVirtioShim_mmio_read32(p))
    }
    @inline(__always) static func load64(_ p: UnsafeRawPointer) -> UInt64 {
        UInt64(littleEndian: CVirtioShim_mmio_read64(p))
    }
    @inline(__always) static func store16(_ p: UnsafeMutableRawPointer, _ v: UInt16) {
        CVirtioShim_mmio_write16(p, v.littleEndian)
    }
    @inline(__always) static func store32(_ p: UnsafeMutableRawPointer, _ v: UInt32) {
        CVirtioShim_mmio_write32(p, v.littleEndian)
    }

    /// After reading the available `idx`: the ring entries and descriptors it exposes are read
    /// after it (spec 2.7.13.3: "once available idx is updated ... this exposes the descriptor").
    @inline(__always) static func acquireAfterAvailIdx() { CVirtioShim_barrier_read() }

    /// Before publishing the used `idx`: the used elements and the buffer contents are visible
    /// first (spec 2.7.8.2: "the device MUST set len prior to updating the used idx" and write
    /// the data before it).
    @inline(__always) static func releaseBeforeUsedIdx() { CVirtioShim_barrier_write() }

    /// Between a store the driver must see and a load of what the driver wrote in answer:
    /// used `idx` before reading `flags`/`used_event` (spec 2.7.7), `avail_event` before
    /// re-reading the available `idx` (spec 2.7.10) — otherwise a notification can be lost.
    @inline(__always) static func full() { CVirtioShim_barrier_full() }
}
