/// One virtqueue in either format, as the devices use it: they submit, publish, drain and reset
/// without knowing whether the ring is split (§2.7) or packed (§2.8).
///
/// The format's queue lives in memory of its own and is called in place: one test of which
/// format, then that format's code. (A `~Copyable` enum or Optional of the two moved the queue
/// out and back on every call: about 100 instructions per request more, by callgrind.)
/// Owned linearly: the queue's private state is freed with the `Virtqueue`.
public struct Virtqueue: ~Copyable {
    let split: UnsafeMutablePointer<SplitQueue>?
    let packed: UnsafeMutablePointer<PackedQueue>?
    public let index: Int
    public let size: UInt16
    public let memory: QueueMemory
    public let doorbell: Doorbell

    /// A new queue on `memory` (zeroed by the format's initialiser) with the negotiated `features`.
    public init(index: Int, memory: QueueMemory, features: Features, doorbell: Doorbell) {
        switch memory {
        case .split(let m): self.init(SplitQueue(index: index, memory: m, features: features, doorbell: doorbell))
        case .packed(let m): self.init(PackedQueue(index: index, memory: m, features: features, doorbell: doorbell))
        }
    }

    /// Takes over a running queue (live upgrade) from a snapshot of the previous driver, without
    /// a reset. Split rings only: a packed ring's wrap counters and buffer IDs are not in the
    /// state record yet, so adopting one is refused by name before anything is written, and the
    /// caller takes the device over by reset instead.
    public init(adopting memory: QueueMemory, features: Features, doorbell: Doorbell, snapshot: QueueSnapshot) throws(VirtioError) {
        switch memory {
        case .split(let m):
            self.init(try SplitQueue(adopting: m, features: features, doorbell: doorbell, index: snapshot.index,
                                     availIndex: snapshot.availIndex, usedIndex: snapshot.usedIndex,
                                     outstanding: snapshot.outstanding))
        case .packed:
            throw Virtqueue.packedAdoption(queue: snapshot.index)
        }
    }

    public init(_ queue: consuming SplitQueue) {
        index = queue.index
        size = queue.size
        memory = .split(queue.memory)
        doorbell = queue.doorbell
        let p = UnsafeMutablePointer<SplitQueue>.allocate(capacity: 1)
        p.initialize(to: queue)
        split = p
        packed = nil
    }

    public init(_ queue: consuming PackedQueue) {
        index = queue.index
        size = queue.size
        memory = .packed(queue.memory)
        doorbell = queue.doorbell
        let p = UnsafeMutablePointer<PackedQueue>.allocate(capacity: 1)
        p.initialize(to: queue)
        packed = p
        split = nil
    }

    deinit {
        if let split { split.deinitialize(count: 1); split.deallocate() }
        if let packed { packed.deinitialize(count: 1); packed.deallocate() }
    }

    static func packedAdoption(queue: Int?) -> VirtioError {
        .adoption(queue: queue, "a packed ring (§2.8) is not handed over live by this version: its wrap counters and buffer IDs are not in the state record; the device is taken over by reset")
    }

    public var format: RingFormat { split != nil ? .split : .packed }
    public var rings: QueueRings { memory.rings }

    // MARK: - State

    public var freeCount: Int {
        if let split { return split.pointee.freeCount }
        return packed.unsafelyUnwrapped.pointee.freeCount
    }
    public var inFlight: Int {
        if let split { return split.pointee.inFlight }
        return packed.unsafelyUnwrapped.pointee.inFlight
    }
    /// Set when the device broke the protocol; every later call fails with it until a reset.
    public var brokenReason: VirtioError? {
        if let split { return split.pointee.brokenReason }
        return packed.unsafelyUnwrapped.pointee.brokenReason
    }
    /// Nothing in flight and not broken.
    public var isIdle: Bool { inFlight == 0 && brokenReason == nil }
    /// The barriers the queue uses against the device (`DeviceOrdering`).
    public var ordering: DeviceOrdering {
        if let split { return split.pointee.ordering }
        return packed.unsafelyUnwrapped.pointee.ordering
    }
    public var usesIndirectDescriptors: Bool {
        if let split { return split.pointee.usesIndirectDescriptors }
        return packed.unsafelyUnwrapped.pointee.usesIndirectDescriptors
    }

    /// The idle queue for a successor. A packed ring's record (its positions, the wrap counters
    /// in bit 15) goes into the state record too, so that a successor in reset or auto mode can
    /// take over; a successor's live adoption of it is refused (`Adoption.checkLive`).
    public func idleSnapshot() throws(VirtioError) -> QueueSnapshot {
        if let reason = brokenReason { throw reason }
        guard inFlight == 0 else { throw .adoption(queue: index, "\(inFlight) requests in flight") }
        if let split { return split.pointee.snapshot }
        return packed.unsafelyUnwrapped.pointee.snapshot
    }

    /// The queue with its requests in flight (`SplitQueue.handoverSnapshot`); a packed ring only
    /// when idle (`idleSnapshot`): its requests in flight are not handed over.
    public func handoverSnapshot() throws(VirtioError) -> QueueSnapshot {
        guard let split else {
            guard inFlight == 0 else { throw Virtqueue.packedAdoption(queue: index) }
            return try idleSnapshot()
        }
        return try split.pointee.handoverSnapshot()
    }

    // MARK: - Hot path: one test of the format, then its code in place

    /// Adds one request (readable segments first, §2.7.4.2 / §2.8.4); false when there is no room.
    public mutating func add(_ segments: UnsafeBufferPointer<BufferSegment>, token: UInt64) throws(VirtioError) -> Bool {
        if let split { return try split.pointee.add(segments, token: token) }
        return try packed.unsafelyUnwrapped.pointee.add(segments, token: token)
    }

    /// Makes the added requests visible and notifies the device if it asked; true if it rang.
    @discardableResult
    public mutating func publish() -> Bool {
        if let split { return split.pointee.publish() }
        return packed.unsafelyUnwrapped.pointee.publish()
    }

    public func hasUsed() -> Bool {
        if let split { return split.pointee.hasUsed() }
        return packed.unsafelyUnwrapped.pointee.hasUsed()
    }

    /// Consumes up to `limit` used buffers, each validated, passing (token, written length).
    public mutating func drainUsed(limit: Int = .max, _ body: (UInt64, UInt32) -> Void) throws(VirtioError) -> Int {
        if let split { return try split.pointee.drainUsed(limit: limit, body) }
        return try packed.unsafelyUnwrapped.pointee.drainUsed(limit: limit, body)
    }

    public mutating func suppressInterrupts() {
        if let split { split.pointee.suppressInterrupts() } else { packed.unsafelyUnwrapped.pointee.suppressInterrupts() }
    }

    /// Asks for an interrupt at the next use; false if used buffers are already there.
    public mutating func armInterrupts() -> Bool {
        if let split { return split.pointee.armInterrupts() }
        return packed.unsafelyUnwrapped.pointee.armInterrupts()
    }

    // MARK: - Reset

    /// After a device or queue reset (the device then uses none of the buffers, §2.4, §2.6.1):
    /// hands back every request in flight and makes the queue as new on the same memory.
    public mutating func reclaimAll(_ body: (UInt64) -> Void) {
        if let split { split.pointee.reclaimAll(body) } else { packed.unsafelyUnwrapped.pointee.reclaimAll(body) }
    }

    /// `reclaimAll`, giving the queue up.
    public consuming func cancelAll(_ body: (UInt64) -> Void) {
        reclaimAll(body)
    }
}
