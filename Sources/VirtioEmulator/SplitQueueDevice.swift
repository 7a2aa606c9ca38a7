/// The device side of one enabled split virtqueue (spec 2.7): where its rings are (CPU
/// addresses, translated and bounds-checked once when the queue was enabled) and the device's
/// own indices. The device keeps `lastAvail` and `usedIdx` itself and never reads back what it
/// wrote to shared memory.
final class SplitQueueDevice {
    let index: Int
    let size: UInt16
    let descriptors: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer
    /// MSI-X vector for used buffer notifications, nil for none.
    let vector: Int?

    /// Next available ring entry the device will take.
    var lastAvail: UInt16 = 0
    /// Next used ring entry the device will write (published as used `idx`).
    var usedIdx: UInt16 = 0
    /// Why the device stopped using this queue (it then has DEVICE_NEEDS_RESET set).
    var failure: String?
    /// Work left over from a bounded pass: look again without waiting for a notification.
    var rescan = false
    /// Scratch for the chain being served.
    var chain = DescriptorChain()

    init(index: Int, size: UInt16, descriptors: UnsafeMutableRawPointer, avail: UnsafeMutableRawPointer,
         used: UnsafeMutableRawPointer, vector: Int?) {
        self.index = index
        self.size = size
        self.descriptors = descriptors
        self.avail = avail
        self.used = used
        self.vector = vector
    }

    @inline(__always) private func slot(_ i: UInt16) -> Int { Int(i & (size &- 1)) }

    // struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; } (2.7.6)

    /// The available `idx`, read once, with acquire ordering for what it exposes.
    func availIdx() -> UInt16 {
        let v = Ring.load16(avail + 2)
        Ring.acquireAfterAvailIdx()
        return v
    }
    func availFlags() -> UInt16 { Ring.load16(avail) }
    func availEntry(_ i: UInt16) -> UInt16 { Ring.load16(avail + 4 + 2 * slot(i)) }
    func usedEvent() -> UInt16 { Ring.load16(avail + 4 + 2 * Int(size)) }

    // struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N]; le16 avail_event; } (2.7.8)

    func writeAvailEvent(_ v: UInt16) { Ring.store16(used + 4 + 8 * Int(size), v) }

    /// Writes one used element at `usedIdx` and advances the device's (unpublished) index.
    func writeUsed(id: UInt32, length: UInt32) {
        let e = used + 4 + 8 * slot(usedIdx)
        Ring.store32(e, id)
        Ring.store32(e + 4, length)
        usedIdx &+= 1
    }

    /// Publishes `usedIdx` after the elements and data it covers (2.7.8.2).
    func publishUsed() {
        Ring.releaseBeforeUsedIdx()
        Ring.store16(used + 2, usedIdx)
    }
}

/// vring_need_event (spec 2.7.7.2 and virtio_ring.h): whether moving the index from `old` to
/// `new` passes `event`, i.e. whether the other side asked to be told.
@inline(__always)
func vringNeedEvent(event: UInt16, new: UInt16, old: UInt16) -> Bool {
    new &- event &- 1 < new &- old
}
