/// One virtqueue as a driver process hands it to its successor (live upgrade): where its rings
/// are, how far the indices went and, when requests were still with the device, which ones.
/// The successor builds its queue with `SplitQueue(adopting:)` on the same memory and continues
/// from these indices without a reset.
///
/// A request in flight is handed over only when it takes exactly one descriptor (one buffer, or
/// one indirect table): the successor then rebuilds the free list from the heads alone, without
/// reading back a descriptor table the device can see. Longer chains are drained before a
/// handover (`SplitQueue.handoverSnapshot()` refuses them).
public struct QueueSnapshot: Sendable, Equatable {
    /// A request the device still holds: its descriptor, the caller's token (for virtio-net, the
    /// buffer slot) and how many bytes of it the device may write (the bound on its used length).
    public struct Outstanding: Sendable, Equatable {
        public var head: UInt16
        public var token: UInt64
        public var writableBytes: UInt32

        public init(head: UInt16, token: UInt64, writableBytes: UInt32) {
            self.head = head
            self.token = token
            self.writableBytes = writableBytes
        }
    }

    public var index: Int
    public var size: UInt16
    public var rings: QueueRings
    /// The driver's next available index (everything before it is published).
    public var availIndex: UInt16
    /// The driver's next used index to consume (everything before it was consumed).
    public var usedIndex: UInt16
    /// The requests published and not consumed, by head: `availIndex - usedIndex` of them.
    public var outstanding: [Outstanding]

    public init(index: Int, size: UInt16, rings: QueueRings, availIndex: UInt16, usedIndex: UInt16,
                outstanding: [Outstanding] = []) {
        self.index = index
        self.size = size
        self.rings = rings
        self.availIndex = availIndex
        self.usedIndex = usedIndex
        self.outstanding = outstanding
    }
}
