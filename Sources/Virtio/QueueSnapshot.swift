/// One idle virtqueue as a driver process hands it to its successor (live upgrade): where its
/// rings are and how far the indices went. Taken only when nothing is in flight, so
/// `availIndex == usedIndex`; the successor builds its queue with `SplitQueue(adopting:)` on
/// the same memory and continues from these indices without a reset.
public struct QueueSnapshot: Sendable, Equatable {
    public var index: Int
    public var size: UInt16
    public var rings: QueueRings
    /// The driver's next available index (everything before it is published).
    public var availIndex: UInt16
    /// The driver's next used index to consume (everything before it was consumed).
    public var usedIndex: UInt16

    public init(index: Int, size: UInt16, rings: QueueRings, availIndex: UInt16, usedIndex: UInt16) {
        self.index = index
        self.size = size
        self.rings = rings
        self.availIndex = availIndex
        self.usedIndex = usedIndex
    }
}
