/// Byte layout of a split virtqueue (virtio 1.2 §2.7): offsets and sizes, in one place.
public enum SplitQueueLayout {
    /// struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (§2.7.5)
    @inlinable public static var descriptorSize: Int { 16 }
    @inlinable public static var descriptorAlignment: Int { 16 }
    /// struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; } (§2.7.6)
    @inlinable public static var availAlignment: Int { 2 }
    /// struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N]; le16 avail_event; } (§2.7.8)
    @inlinable public static var usedAlignment: Int { 4 }
    @inlinable public static var usedElementSize: Int { 8 }
    /// Where in its page the used ring starts: 4 bytes in, so that every 8-byte used element
    /// (at 4 + 8i) is naturally aligned and no single write of the device crosses a page.
    ///
    /// The spec asks only 4-byte alignment (§2.7, "Virtqueue Part Alignment"), so this is allowed;
    /// it is needed because QEMU before 9.0 splits a write that crosses an IOMMU page wrongly
    /// (physmem.c, `address_space_write_cached_slow`: the part after the boundary goes to an IOVA
    /// equal to its offset in the ring). With a page-aligned used ring of 512 or more entries,
    /// element 511's `len` went to IOVA 0x1000: a DMAR fault, a stale length, a failed request.
    /// QEMU 9.0's fix (47293c92) continues at the next guest-physical address instead, which is
    /// only right for physically contiguous rings; ours are pages of a memfd.
    @inlinable public static var usedPageOffset: Int { 4 }

    @inlinable public static func descriptorTableSize(_ n: Int) -> Int { descriptorSize * n }
    @inlinable public static func availSize(_ n: Int) -> Int { usedEvent(n) + 2 }
    @inlinable public static func usedSize(_ n: Int) -> Int { availEvent(n) + 2 }

    // Byte offsets of every field, from the start of its part (`n` is the queue size, `i` a
    // descriptor index or ring slot). Each ring field is little-endian (§2.7).

    /// Descriptor `i` in a descriptor table (or an indirect table, §2.7.5.3).
    @inlinable public static func descriptor(_ i: Int) -> Int { descriptorSize * i }
    /// struct virtq_desc (§2.7.5), from the descriptor's start.
    @inlinable public static var descriptorAddress: Int { 0 }
    @inlinable public static var descriptorLength: Int { 8 }
    @inlinable public static var descriptorFlags: Int { 12 }
    @inlinable public static var descriptorNext: Int { 14 }

    /// struct virtq_avail (§2.7.6), from the available ring's start.
    @inlinable public static var availFlags: Int { 0 }
    @inlinable public static var availIndex: Int { 2 }
    /// `ring[i]`: the head of a descriptor chain.
    @inlinable public static func availRing(_ i: Int) -> Int { 4 + 2 * i }
    /// `used_event`, after the `n` ring entries (VIRTIO_F_EVENT_IDX, §2.7.7.2).
    @inlinable public static func usedEvent(_ n: Int) -> Int { availRing(n) }

    /// struct virtq_used (§2.7.8), from the used ring's start.
    @inlinable public static var usedFlags: Int { 0 }
    @inlinable public static var usedIndex: Int { 2 }
    /// `ring[i]`: struct virtq_used_elem { le32 id; le32 len; }.
    @inlinable public static func usedElement(_ i: Int) -> Int { 4 + usedElementSize * i }
    /// Within a used element.
    @inlinable public static var usedElementID: Int { 0 }
    @inlinable public static var usedElementLength: Int { 4 }
    /// `avail_event`, after the `n` used elements (VIRTIO_F_EVENT_IDX, §2.7.10.2).
    @inlinable public static func availEvent(_ n: Int) -> Int { usedElement(n) }

    // Descriptor flags (§2.7.5).
    public static let flagNext: UInt16 = 1
    public static let flagWrite: UInt16 = 2
    public static let flagIndirect: UInt16 = 4
    // Ring flags (§2.7.7, §2.7.10).
    public static let availNoInterrupt: UInt16 = 1
    public static let usedNoNotify: UInt16 = 1

    /// Largest split queue (§2.7: Queue Size is at most 32768).
    public static let maximumSize = 32768

    /// The size a driver uses for a queue whose maximum (`queue_size` as read) is `maximum`: the
    /// largest power of two not above it (§2.7: split queue sizes are powers of 2), at most
    /// `limit` when given.
    public static func queueSize(maximum: UInt16, limit: UInt16?) -> UInt16 {
        var size = UInt16(1) << UInt16(15 - min(maximum, UInt16(maximumSize)).leadingZeroBitCount)
        if let limit { size = min(size, limit) }
        return size
    }

    /// vring_need_event (§2.7.7.2, §2.7.10.1): whether moving an index from `old` to `new` passes
    /// the other side's `event` index, i.e. whether it asked to be told.
    @inline(__always)
    public static func needsEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        new &- event &- 1 < new &- old
    }
}

/// The device-visible memory of one split queue: rings plus, with VIRTIO_F_INDIRECT_DESC, one
/// indirect table per head. Allocated once from the device's arena and reused after a reset.
public struct SplitQueueMemory: Sendable {
    public let size: UInt16
    public let descriptors: DMASlice
    public let avail: DMASlice
    public let used: DMASlice
    /// `size` tables of `indirectEntries` descriptors each, `indirectStride` bytes apart (each one
    /// range for the device, `DMAArena.elementStride`), or nil.
    public let indirect: DMASlice?
    public let indirectEntries: Int
    public let indirectStride: Int

    /// Carves the rings (and indirect tables) from `arena`. With `zeroed: false` nothing is
    /// written: the same layout is recomputed over the rings of a running queue to adopt it.
    public init(arena: DMAArena, size: UInt16, indirectEntries: Int = 0, zeroed: Bool = true) throws(VirtioError) {
        let n = Int(size)
        descriptors = try arena.allocate(SplitQueueLayout.descriptorTableSize(n), alignment: 4096, zeroed: zeroed)
        avail = try arena.allocate(SplitQueueLayout.availSize(n), alignment: 64, zeroed: zeroed)
        // 4 bytes into a page (`usedPageOffset`): no used element crosses a page.
        used = try arena.allocate(SplitQueueLayout.usedPageOffset + SplitQueueLayout.usedSize(n), alignment: 4096, zeroed: zeroed)
            .slice(SplitQueueLayout.usedPageOffset, SplitQueueLayout.usedSize(n))
        indirectStride = arena.elementStride(indirectEntries * SplitQueueLayout.descriptorSize)
        indirect = indirectEntries > 0
            ? try arena.allocate(n * indirectStride, alignment: 4096, element: indirectStride, zeroed: zeroed) : nil
        self.size = size
        self.indirectEntries = indirectEntries
    }

    public var rings: QueueRings {
        QueueRings(descriptors: descriptors.deviceAddress, driver: avail.deviceAddress, device: used.deviceAddress)
    }
}
