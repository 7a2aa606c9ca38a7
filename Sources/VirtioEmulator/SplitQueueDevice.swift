import Virtio

/// The device side of one enabled split virtqueue (spec 2.7): where its rings are (CPU
/// addresses, translated and bounds-checked once when the queue was enabled) and the device's
/// own indices. The device keeps `lastAvail` and `usedIdx` itself and never reads back what it
/// wrote to shared memory.
///
/// Ring layout: the emulator uses the driver's `SplitQueueLayout` (offsets, sizes, flags,
/// `needsEvent`) rather than a second copy. It stays an independent oracle of the protocol (what
/// it validates, orders and refuses is its own), but not of the byte layout: that is pinned
/// against the spec's numbers by `SplitQueueLayoutTests`, so a wrong offset fails there instead of
/// being agreed on by both sides.
final class SplitQueueDevice: QueueDevice {
    let descriptors: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer

    /// Next available ring entry the device will take.
    var lastAvail: UInt16 = 0
    /// Next used ring entry the device will write (published as used `idx`).
    var usedIdx: UInt16 = 0

    init(index: Int, size: UInt16, descriptors: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer,
         used: UnsafeMutableRawPointer, vector: Int?) {
        self.descriptors = descriptors
        self.avail = avail
        self.used = used
        super.init(index: index, size: size, vector: vector)
    }

    @inline(__always) private func slot(_ i: UInt16) -> Int { Int(i & (size &- 1)) }

    // struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; } (2.7.6)

    /// The available `idx`, read once, with acquire ordering for what it exposes.
    func availIdx() -> UInt16 {
        let v = Ring.load16(avail + SplitQueueLayout.availIndex)
        Ring.acquireAfterAvailIdx()
        return v
    }
    func availFlags() -> UInt16 { Ring.load16(avail + SplitQueueLayout.availFlags) }
    func availEntry(_ i: UInt16) -> UInt16 { Ring.load16(avail + SplitQueueLayout.availRing(slot(i))) }
    func usedEvent() -> UInt16 { Ring.load16(avail + SplitQueueLayout.usedEvent(Int(size))) }

    // struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N]; le16 avail_event; } (2.7.8)

    func writeAvailEvent(_ v: UInt16) { Ring.store16(used + SplitQueueLayout.availEvent(Int(size)), v) }

    /// Writes one used element at `usedIdx` and advances the device's (unpublished) index.
    func writeUsed(id: UInt32, length: UInt32) {
        let e = used + SplitQueueLayout.usedElement(slot(usedIdx))
        Ring.store32(e + SplitQueueLayout.usedElementID, id)
        Ring.store32(e + SplitQueueLayout.usedElementLength, length)
        usedIdx &+= 1
    }

    /// Publishes `usedIdx` after the elements and data it covers (2.7.8.2).
    func publishUsed() {
        Ring.releaseBeforeUsedIdx()
        Ring.store16(used + SplitQueueLayout.usedIndex, usedIdx)
    }
}
