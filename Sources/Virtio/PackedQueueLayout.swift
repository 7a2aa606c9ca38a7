/// Byte layout of a packed virtqueue (virtio 1.2 §2.8): offsets, sizes and flags, in one place.
public enum PackedQueueLayout {
    /// struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } (§2.8.13)
    @inlinable public static var descriptorSize: Int { 16 }
    /// §2.8.10.1, "Structure Size and Alignment": descriptor ring 16, both event suppression
    /// structures 4 (and 4 bytes each).
    @inlinable public static var descriptorAlignment: Int { 16 }
    @inlinable public static var eventAlignment: Int { 4 }
    @inlinable public static var eventSize: Int { 4 }

    @inlinable public static func ringSize(_ n: Int) -> Int { descriptorSize * n }

    /// Descriptor `i` of the ring (or of an indirect table, §2.8.8).
    @inlinable public static func descriptor(_ i: Int) -> Int { descriptorSize * i }
    /// struct pvirtq_desc, from the descriptor's start.
    @inlinable public static var descriptorAddress: Int { 0 }
    @inlinable public static var descriptorLength: Int { 8 }
    @inlinable public static var descriptorID: Int { 12 }
    @inlinable public static var descriptorFlags: Int { 14 }

    /// struct pvirtq_event_suppress { le16 desc; le16 flags; } (§2.8.14): `desc` holds the
    /// descriptor ring offset (bits 0-14) and the wrap counter (bit 15) of a descriptor-specific
    /// event; `flags` (bits 0-1) one of the `event*` values.
    @inlinable public static var eventDescriptor: Int { 0 }
    @inlinable public static var eventFlags: Int { 2 }

    // Descriptor flags (§2.8.1, §2.8.3, §2.8.6, §2.8.7).
    public static let flagNext: UInt16 = 1
    public static let flagWrite: UInt16 = 2
    public static let flagIndirect: UInt16 = 4
    public static let flagAvail: UInt16 = 1 << 7
    public static let flagUsed: UInt16 = 1 << 15

    // Event suppression flags (§2.8.10).
    public static let eventEnable: UInt16 = 0
    public static let eventDisable: UInt16 = 1
    /// Only with VIRTIO_F_EVENT_IDX: an event when the descriptor at `desc` is made available / used.
    public static let eventDescriptorSpecific: UInt16 = 2
    /// `desc`'s wrap counter bit.
    public static let eventWrapBit: UInt16 = 1 << 15

    /// Largest packed queue (§2.8: up to 2^15 entries; the size need not be a power of two).
    public static let maximumSize = 32768

    /// The AVAIL and USED bits a driver sets to make a descriptor available with wrap counter
    /// `wrap` (§2.8.1: AVAIL equal to it, USED its inverse).
    @inline(__always)
    public static func availableFlags(wrap: Bool) -> UInt16 { wrap ? flagAvail : flagUsed }

    /// The AVAIL and USED bits of a descriptor the device used with wrap counter `wrap`
    /// (§2.8.1: both equal to it).
    @inline(__always)
    public static func usedFlags(wrap: Bool) -> UInt16 { wrap ? flagAvail | flagUsed : 0 }

    /// A descriptor-specific event `desc` value: ring offset and wrap counter.
    @inline(__always)
    public static func eventOffsetWrap(_ offset: UInt16, wrap: Bool) -> UInt16 { offset | (wrap ? eventWrapBit : 0) }
}

/// The device-visible memory of one packed queue: the descriptor ring, the two event suppression
/// structures and, with VIRTIO_F_INDIRECT_DESC, one indirect table per buffer ID. Allocated once
/// from the device's arena and reused after a reset.
public struct PackedQueueMemory: Sendable {
    public let size: UInt16
    public let descriptors: DMASlice
    /// The Driver Event Suppression structure (the driver area): written by the driver.
    public let driverEvent: DMASlice
    /// The Device Event Suppression structure (the device area): written by the device.
    public let deviceEvent: DMASlice
    /// `size` tables of `indirectEntries` descriptors each, `indirectStride` bytes apart, or nil.
    public let indirect: DMASlice?
    public let indirectEntries: Int
    public let indirectStride: Int

    /// Carves the ring, the event structures (and indirect tables) from `arena`. With
    /// `zeroed: false` nothing is written: the same layout is recomputed to adopt a running queue.
    public init(arena: DMAArena, size: UInt16, indirectEntries: Int = 0, zeroed: Bool = true) throws(VirtioError) {
        let n = Int(size)
        precondition(n > 0 && n <= PackedQueueLayout.maximumSize, "packed queue size must be 1 to 32768 (§2.8)")
        descriptors = try arena.allocate(PackedQueueLayout.ringSize(n), alignment: 4096, zeroed: zeroed)
        // Both structures in one 8-byte piece: neither crosses a page (4-byte aligned, 4 bytes).
        let events = try arena.allocate(2 * PackedQueueLayout.eventSize, alignment: 64, zeroed: zeroed)
        driverEvent = events.slice(0, PackedQueueLayout.eventSize)
        deviceEvent = events.slice(PackedQueueLayout.eventSize, PackedQueueLayout.eventSize)
        indirectStride = arena.elementStride(indirectEntries * PackedQueueLayout.descriptorSize)
        indirect = indirectEntries > 0
            ? try arena.allocate(n * indirectStride, alignment: 4096, element: indirectStride, zeroed: zeroed) : nil
        self.size = size
        self.indirectEntries = indirectEntries
    }

    /// Where the device finds the parts (common configuration: queue_desc, queue_driver, queue_device).
    public var rings: QueueRings {
        QueueRings(descriptors: descriptors.deviceAddress, driver: driverEvent.deviceAddress, device: deviceEvent.deviceAddress)
    }
}
