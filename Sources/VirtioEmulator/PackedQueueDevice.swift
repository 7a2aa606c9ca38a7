import Virtio

/// The device side of one enabled packed virtqueue (spec 2.8): where the descriptor ring and the
/// two event suppression structures are (CPU addresses, translated and bounds-checked once when
/// the queue was enabled), and the device's own ring positions and wrap counters. It reads a
/// descriptor only after seeing its AVAIL/USED bits say it is available in the current lap, and
/// never reads back what it wrote.
///
/// Layout from the driver's `PackedQueueLayout`, pinned against the spec by
/// `PackedQueueLayoutTests`; the protocol checks are the emulator's own.
final class PackedQueueDevice: QueueDevice {
    let ring: UnsafeMutableRawPointer
    /// Driver Event Suppression (written by the driver: when to send used buffer notifications).
    let driverEvent: UnsafeMutableRawPointer
    /// Device Event Suppression (written by the device: when the driver should notify).
    let deviceEvent: UnsafeMutableRawPointer

    /// The next descriptor the device looks at, and the wrap counter an available one carries
    /// there (spec 2.8.1: the device tracks the driver's counter as it walks the ring).
    var nextAvail: UInt16 = 0
    var availWrap = true
    /// Where the next used descriptor goes, and the Device Ring Wrap Counter (starts at 1).
    var nextUsed: UInt16 = 0
    var usedWrap = true
    /// Ring descriptors the chain being served takes (1 for an indirect one).
    var chainDescriptors = 0
    /// The buffer ID of the chain being served (from its last descriptor, spec 2.8.6).
    var chainID: UInt16 = 0

    init(index: Int, size: UInt16, ring: UnsafeMutableRawPointer, driverEvent: UnsafeMutableRawPointer,
         deviceEvent: UnsafeMutableRawPointer, vector: Int?) {
        self.ring = ring
        self.driverEvent = driverEvent
        self.deviceEvent = deviceEvent
        super.init(index: index, size: size, vector: vector)
    }

    @inline(__always) func descriptor(_ i: UInt16) -> UnsafeMutableRawPointer { ring + PackedQueueLayout.descriptor(Int(i)) }

    /// Whether the descriptor at `i` is available in the lap whose driver wrap counter is `wrap`
    /// (AVAIL equal to it, USED not, spec 2.8.1), from its flags.
    @inline(__always) static func isAvailable(_ flags: UInt16, wrap: Bool) -> Bool {
        flags & (PackedQueueLayout.flagAvail | PackedQueueLayout.flagUsed) == PackedQueueLayout.availableFlags(wrap: wrap)
    }

    /// The flags at `nextAvail`, with acquire ordering for the descriptor they expose (2.8.21:
    /// "once the descriptor flags field is updated by the driver, this exposes the descriptor").
    func availFlags(at i: UInt16) -> UInt16 {
        let v = Ring.load16(descriptor(i) + PackedQueueLayout.descriptorFlags)
        Ring.acquireAfterAvailIdx()
        return v
    }

    /// Moves a ring position by `count`, toggling `wrap` when it passes the end (spec 2.8.1).
    static func advance(_ position: inout UInt16, _ wrap: inout Bool, by count: Int, size: UInt16) {
        var next = Int(position) + count
        while next >= Int(size) {
            next -= Int(size)
            wrap.toggle()
        }
        position = UInt16(truncatingIfNeeded: next)
    }

    /// Writes the used descriptor for a buffer at `nextUsed`: ID and length first, then (after a
    /// write barrier, spec 2.8.1/2.8.21 by symmetry: the flags publish the descriptor) the flags
    /// with AVAIL = USED = the device's wrap counter, WRITE if anything was written (2.8.3).
    /// Then skips the buffer's other descriptors (2.8.4).
    func writeUsed(id: UInt16, length: UInt32, descriptors count: Int, flags override: UInt16? = nil, markWrite: Bool = true) {
        let d = descriptor(nextUsed)
        Ring.store16(d + PackedQueueLayout.descriptorID, id)
        Ring.store32(d + PackedQueueLayout.descriptorLength, length)
        Ring.releaseBeforeUsedIdx()
        var flags = PackedQueueLayout.usedFlags(wrap: usedWrap)
        if length > 0 && markWrite { flags |= PackedQueueLayout.flagWrite }
        Ring.store16(d + PackedQueueLayout.descriptorFlags, override ?? flags)
        PackedQueueDevice.advance(&nextUsed, &usedWrap, by: count, size: size)
    }

    // struct pvirtq_event_suppress { le16 desc; le16 flags; } (2.8.14)
    func driverEventFlags() -> UInt16 { Ring.load16(driverEvent + PackedQueueLayout.eventFlags) }
    func driverEventOffWrap() -> UInt16 { Ring.load16(driverEvent + PackedQueueLayout.eventDescriptor) }
    func writeDeviceEvent(offWrap: UInt16, flags: UInt16) {
        Ring.store16(deviceEvent + PackedQueueLayout.eventDescriptor, offWrap)
        Ring.store16(deviceEvent + PackedQueueLayout.eventFlags, flags)
    }
}
