import CVirtioShim
import Virtio

/// One virtio-blk request queue with its request slots (virtio 1.2 §5.2.6).
///
/// Each slot owns, in DMA memory, a request header, a status byte and a data buffer of
/// `maxTransfer` bytes; a request is `header (readable) + data segments + status (writable)`.
/// Data is split into segments of at most `size_max` bytes and at most `seg_max` of them
/// (§5.2.6.1). The slot number is the request's token. Nothing here allocates per request.
public struct BlockQueue: ~Copyable {
    public let index: Int
    var queue: Virtqueue
    let headers: DMASlice
    let statuses: DMASlice
    let data: DMASlice
    public let slots: Int
    public let maxTransfer: Int
    /// Bytes from one data slot to the next (`Layout.slotStride`).
    let slotStride: Int
    let segmentBytes: Int
    /// Room for one request's segments, filled by `resubmit`.
    let segments: FixedArray<BufferSegment>
    /// What each slot's request was: to check its completion, and to give it to the device again
    /// after a reset (`resubmit`) from this private record, never from the header in DMA memory.
    let pending: FixedArray<PendingRequest>
    var idle: SlotStack
    let waiter: CompletionWaiter
    public private(set) var wakes = WakeCounts()

    static let headerSize = 16

    /// Where one queue's rings and slots go in the device's DMA arena, and the request limits they
    /// are sized for. Computed by `layout` alone, in one allocation order, so a successor process
    /// can recompute a running queue's layout and compare it with the device's.
    public struct Layout: Sendable {
        public let size: UInt16
        public let memory: QueueMemory
        let headers: DMASlice
        let statuses: DMASlice
        let data: DMASlice
        let slots: Int
        let maxTransfer: Int
        /// Bytes between data slots: `maxTransfer`, or more where each slot must stay inside
        /// one page of memory the device sees in pieces (`DMAArena.elementStride`).
        let slotStride: Int
        let segmentBytes: Int
        let perRequest: Int

        public var rings: QueueRings { memory.rings }
    }

    /// The most DMA memory `layout` can take for a queue of `size` entries and requests of up to
    /// `maxTransfer` bytes, whatever the device's segment limits (each data segment is at least
    /// 512 bytes: §5.2.4 `size_max` is read as 1 MiB when absent, and a smaller one only makes
    /// more segments of a transfer that is already bounded here), with every allocation's
    /// alignment padding. What a caller opens the device's arena with, so that queues larger than
    /// the default get the memory they need instead of "out of DMA memory".
    public static func memoryBound(size: UInt16, maxTransfer wanted: Int) -> Int {
        let n = Int(size)
        let maxTransfer = max(512, wanted / 512 * 512)
        let perRequest = (maxTransfer + 511) / 512 + 2
        // The split ring's parts; a packed ring of the same size takes less (§2.8.10).
        let rings = SplitQueueLayout.descriptorTableSize(n) + SplitQueueLayout.availSize(n)
            + SplitQueueLayout.usedPageOffset + SplitQueueLayout.usedSize(n)
        let indirect = n * perRequest * SplitQueueLayout.descriptorSize
        let slots = n * (headerSize + 1 + maxTransfer)
        return rings + indirect + slots + 7 * 4096
    }

    /// Carves a queue of `size` entries and its request slots from `arena`: rings (and indirect
    /// tables), headers, status bytes, data. With `zeroed: false` nothing is written (adoption).
    static func layout(arena: DMAArena, size: UInt16, config: BlockConfig, features: Features,
                       maxTransfer wanted: Int, zeroed: Bool) throws(VirtioError) -> Layout {
        // Segment limits (§5.2.6.1): at most seg_max data segments of at most size_max bytes each.
        let segmentBytes = Int(config.sizeMax ?? UInt32(1 << 20))
        let segMax = Int(config.segMax ?? 128)
        let maxTransfer = max(512, min(wanted, segMax * segmentBytes) / 512 * 512)
        let dataSegments = (maxTransfer + segmentBytes - 1) / segmentBytes
        let perRequest = dataSegments + 2
        let indirect = features.contains(.ringIndirectDesc) && perRequest > 1
        // Without indirect descriptors every request takes `perRequest` ring entries.
        let slots = indirect ? Int(size) : max(1, Int(size) / perRequest)
        let memory = try QueueMemory(RingFormat(features), arena: arena, size: size, indirectEntries: indirect ? perRequest : 0, zeroed: zeroed)
        let headers = try arena.allocate(slots * BlockQueue.headerSize, alignment: 64, element: BlockQueue.headerSize, zeroed: zeroed)
        let statuses = try arena.allocate(slots, alignment: 64, element: 1, zeroed: zeroed)
        // Data buffers are never zeroed: each is written (from a client, or by the device) before
        // it is read, and a read's data is used only when the device reports all of it written
        // (`complete`). Zeroing 16 MiB of slots cost about 450 ms of a reset-mode upgrade under TCG.
        let slotStride = arena.elementStride(maxTransfer)
        let data = try arena.allocate(slots * slotStride, alignment: 4096, element: slotStride, zeroed: false)
        return Layout(size: size, memory: memory, headers: headers, statuses: statuses, data: data, slots: slots,
                      maxTransfer: maxTransfer, slotStride: slotStride, segmentBytes: segmentBytes, perRequest: perRequest)
    }

    /// Builds queue `index` on `transport`: rings and slots from its DMA arena, then enables it.
    public init<T: Transport & ~Copyable>(index: Int, transport: borrowing T, config: BlockConfig, features: Features,
                                          maxTransfer wanted: Int, queueSize: UInt16?, mode: CompletionMode,
                                          eventfd: Int32?, vector: UInt16?,
                                          completionTimeout: Duration = .seconds(10)) throws(VirtioError) {
        let maximum = transport.queueMaxSize(index)
        guard maximum > 0 else { throw .queueSetup(queue: index, "the device reports queue size 0") }
        let layout = try BlockQueue.layout(arena: transport.dma, size: SplitQueueLayout.queueSize(maximum: maximum, limit: queueSize),
                                           config: config, features: features, maxTransfer: wanted, zeroed: true)
        let doorbell = try transport.enableQueue(index, size: layout.size, rings: layout.rings, vector: vector)
        self.init(index: index, layout: layout,
                  queue: Virtqueue(index: index, memory: layout.memory, features: features, doorbell: doorbell),
                  mode: mode, eventfd: eventfd, completionTimeout: completionTimeout)
    }

    /// Takes over running queue `snapshot.index` (live upgrade, no reset): `layout` was recomputed
    /// unzeroed and checked against the device (`BlockDevice.init(adopting:)`); the split queue
    /// continues from the snapshot's indices. Nothing is programmed on the device.
    ///
    /// Requests the previous driver left in flight (`snapshot.outstanding`, token = slot) are
    /// carried with `carried`, its private record of each: one entry per outstanding request, in
    /// a slot of this layout, offering the device exactly the bytes that request lets it write.
    /// Their completions are collected by the next `complete`; their slots are not idle.
    init(adopting snapshot: QueueSnapshot, carried records: [PendingRequest?], layout: Layout, features: Features,
         doorbell: Doorbell, mode: CompletionMode, eventfd: Int32?, completionTimeout: Duration) throws(VirtioError) {
        let queue = try Virtqueue(adopting: layout.memory, features: features, doorbell: doorbell, snapshot: snapshot)
        self.init(index: snapshot.index, layout: layout, queue: queue, mode: mode, eventfd: eventfd,
                  completionTimeout: completionTimeout, busy: records.map { $0 != nil })
        for (slot, record) in records.enumerated() { if let record { pending[slot] = record } }
    }

    /// The records of the requests carried in flight into queue `snapshot` with `layout`, by
    /// slot, checked before anything is adopted: one per outstanding request, each in a slot of
    /// this layout, within it, and offering the device exactly the bytes its request lets it write.
    static func carriedRecords(_ snapshot: QueueSnapshot, _ carried: [CarriedBlockRequest],
                               layout: Layout) throws(VirtioError) -> [PendingRequest?] {
        var records = [PendingRequest?](repeating: nil, count: layout.slots)
        for request in carried {
            guard request.slot >= 0, request.slot < layout.slots else {
                throw .adoption(queue: snapshot.index, "a carried request names slot \(request.slot) of \(layout.slots)")
            }
            guard records[request.slot] == nil else {
                throw .adoption(queue: snapshot.index, "slot \(request.slot) carries two requests")
            }
            if let problem = request.problem(maxTransfer: layout.maxTransfer) {
                throw .adoption(queue: snapshot.index, "the request carried in slot \(request.slot) \(problem)")
            }
            records[request.slot] = PendingRequest(type: request.type, bytes: request.bytes, sector: request.sector)
        }
        guard carried.count == snapshot.outstanding.count else {
            throw .adoption(queue: snapshot.index, "\(snapshot.outstanding.count) requests outstanding, \(carried.count) carried")
        }
        for request in snapshot.outstanding {
            guard request.token < UInt64(layout.slots), let record = records[Int(request.token)] else {
                throw .adoption(queue: snapshot.index, "outstanding head \(request.head) names slot \(request.token), which carries no request")
            }
            let expected = UInt32(record.deviceWritableBytes)
            guard request.writableBytes == expected else {
                throw .adoption(queue: snapshot.index, "outstanding head \(request.head) lets the device write \(request.writableBytes) bytes, its request \(expected)")
            }
        }
        return records
    }

    /// What both paths share: the slots' private state over `layout`, interrupts suppressed.
    init(index: Int, layout: Layout, queue: consuming Virtqueue, mode: CompletionMode, eventfd: Int32?,
         completionTimeout: Duration, busy: [Bool] = []) {
        queue.suppressInterrupts()
        self.index = index
        self.queue = queue
        self.headers = layout.headers
        self.statuses = layout.statuses
        self.data = layout.data
        self.slots = layout.slots
        self.maxTransfer = layout.maxTransfer
        self.slotStride = layout.slotStride
        self.segmentBytes = layout.segmentBytes
        self.segments = FixedArray(repeating: BufferSegment(address: 0, length: 0, deviceWritable: false),
                                   count: layout.perRequest)
        self.pending = FixedArray(repeating: PendingRequest(type: 0, bytes: 0, sector: 0), count: layout.slots)
        var idle = SlotStack(capacity: layout.slots)
        for slot in 0..<layout.slots where busy.isEmpty || !busy[slot] { idle.push(slot) }
        self.idle = idle
        self.waiter = CompletionWaiter(mode: mode, eventfd: eventfd, timeout: completionTimeout)
    }

    /// A slot's data buffer (CPU view).
    public func buffer(_ slot: Int) -> UnsafeMutableRawBufferPointer {
        precondition(slot >= 0 && slot < slots, "slot \(slot) out of range")
        return UnsafeMutableRawBufferPointer(start: data.pointer + slot * slotStride, count: maxTransfer)
    }

    /// A free slot, or nil if every slot has a request in flight.
    public mutating func acquire() -> Int? { idle.pop() }
    /// Gives a slot back once its completion was handled.
    public mutating func release(_ slot: Int) { idle.push(slot) }
    public var inFlight: Int { queue.inFlight }
    /// No request in flight: the queue can be handed to a successor (`snapshot`).
    public var isIdle: Bool { queue.isIdle }
    /// The queue's rings and indices for a successor; only when `isIdle` (refused for packed rings).
    public func snapshot() throws(VirtioError) -> QueueSnapshot { try queue.idleSnapshot() }

    /// The queue with its requests in flight, for a successor that carries them on
    /// (`init(adopting:carried:...)`): the snapshot (token = slot) and this driver's record of each.
    /// Refused when the device broke the queue, or a request takes more than one descriptor
    /// (without RING_INDIRECT_DESC): then they are completed first.
    public func handoverSnapshot() throws(VirtioError) -> (QueueSnapshot, [CarriedBlockRequest]) {
        let snapshot = try queue.handoverSnapshot()
        let carried = snapshot.outstanding.map { o in
            let slot = Int(o.token)
            return CarriedBlockRequest(slot: slot, type: pending[slot].type, sector: pending[slot].sector, bytes: pending[slot].bytes)
        }
        return (snapshot, carried)
    }

    /// Each request takes one descriptor (its segments in an indirect table sized for the largest)
    /// on a split ring: requests in flight can be handed over (`handoverSnapshot`). A packed ring's
    /// requests are completed before a handover instead (`Virtqueue.handoverSnapshot`).
    public var usesOneDescriptorPerRequest: Bool { queue.usesIndirectDescriptors && queue.format == .split }

    /// Why the device broke the queue (nil while it is healthy); cleared by a reset (`recover`).
    public var brokenReason: VirtioError? { queue.brokenReason }
    /// How long a wait goes without a completion before the device counts as stopped.
    public var completionTimeout: Duration { waiter.timeout }

    /// Queues a request in `slot` (data already in `buffer(slot)` for writes). Not visible to the
    /// device until `publish()`. Returns false if the ring is full.
    public mutating func submit(_ type: BlockRequestType, sector: UInt64, bytes: Int, slot: Int) throws(VirtioError) -> Bool {
        hold(type, sector: sector, bytes: bytes, slot: slot)
        return try resubmit(slot)
    }

    /// Records a request in `slot` without giving it to the device; `resubmit(slot)` does that
    /// (a backend holds requests this way while the device is being recovered).
    public mutating func hold(_ type: BlockRequestType, sector: UInt64, bytes: Int, slot: Int) {
        precondition(bytes >= 0 && bytes <= maxTransfer, "request of \(bytes) bytes exceeds the slot's \(maxTransfer)")
        pending[slot] = PendingRequest(type: type.rawValue, bytes: bytes, sector: sector)
    }

    /// Gives the device the request recorded for `slot` (by `submit` or `hold`), the same again
    /// after a reset handed it back (`cancelAll`): header and status rewritten from the record,
    /// data in place (a write's data is still in the slot; a read reads again). Returns false if
    /// the ring is full.
    public mutating func resubmit(_ slot: Int) throws(VirtioError) -> Bool {
        let type = pending[slot].type, bytes = pending[slot].bytes, sector = pending[slot].sector
        let header = headers.pointer + slot * BlockQueue.headerSize
        // struct virtio_blk_req header: le32 type, le32 reserved, le64 sector (§5.2.6).
        header.storeBytes(of: type.littleEndian, toByteOffset: 0, as: UInt32.self)
        header.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
        header.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        // A status the device never writes must not read as OK.
        (statuses.pointer + slot).storeBytes(of: 0xFF, as: UInt8.self)
        var n = 0
        segments[n] = BufferSegment(address: headers.deviceAddress(at: slot * BlockQueue.headerSize),
                                    length: UInt32(BlockQueue.headerSize), deviceWritable: false)
        n += 1
        let deviceWrites = type == BlockRequestType.read.rawValue || type == BlockRequestType.getID.rawValue
        var offset = 0
        while offset < bytes {
            let length = min(segmentBytes, bytes - offset)
            segments[n] = BufferSegment(address: data.deviceAddress(at: slot * slotStride + offset),
                                        length: UInt32(length), deviceWritable: deviceWrites)
            n += 1
            offset += length
        }
        segments[n] = BufferSegment(address: statuses.deviceAddress(at: slot), length: 1, deviceWritable: true)
        n += 1
        return try queue.add(UnsafeBufferPointer(rebasing: segments.unsafeElements[..<n]), token: UInt64(slot))
    }

    @discardableResult
    public mutating func publish() -> Bool { queue.publish() }

    /// Asks for an interrupt at the next completion (interrupt modes). Returns false if completions
    /// are already pending, in which case the caller must collect them instead of sleeping.
    public mutating func armForNextCompletion() -> Bool { queue.armInterrupts() }

    /// Waits (in the queue's completion mode) until at least one request completed.
    public mutating func wait() throws(VirtioError) {
        wakes.count(try waiter.wait(for: &queue))
    }

    /// Hands each completed request to `body` as (slot, status, data bytes the device wrote).
    /// The status byte is read once. A read (or GET_ID) that wrote fewer bytes than asked plus the
    /// status byte is reported as IOERR: its buffer holds stale memory, not data (§5.2.6). A status
    /// the device does not write (§5.2.6: OK, IOERR or UNSUPP) is reported as `BlockStatus.invalid`.
    public mutating func complete(_ body: (Int, UInt8, Int) -> Void) throws(VirtioError) -> Int {
        let statusBase = statuses.pointer
        let pending = self.pending.unsafeElements
        return try queue.drainUsed { token, length in
            let slot = Int(token)
            var status = CVirtioShim_mmio_read8(statusBase + slot)
            var written = 0
            let type = pending[slot].type
            if type == BlockRequestType.read.rawValue {
                // The device writes all the data and then the status byte.
                if Int(length) != pending[slot].bytes + 1 && status == BlockStatus.ok { status = BlockStatus.ioError }
                written = pending[slot].bytes
            } else if type == BlockRequestType.getID.rawValue {
                written = max(0, min(Int(length) - 1, pending[slot].bytes))
            }
            // Any other value (0xFF: the byte `submit` put there) means the device completed a
            // request without answering it; `invalid` lets the caller fail it or recover.
            if status > BlockStatus.unsupported { status = BlockStatus.invalid }
            body(slot, status, written)
        }
    }

    /// After a device reset: every request in flight is handed back (slot) to be failed or resubmitted.
    public mutating func cancelAll(_ body: (Int) -> Void) {
        queue.reclaimAll { body(Int($0)) }
    }
}

/// A slot's request as this driver recorded it (`BlockQueue.pending`).
struct PendingRequest {
    /// BlockRequestType raw value.
    var type: UInt32
    /// Data bytes.
    var bytes: Int
    var sector: UInt64

    /// What `resubmit` lets the device write: the data of a read or GET_ID, and the status byte.
    var deviceWritableBytes: Int {
        (type == BlockRequestType.read.rawValue || type == BlockRequestType.getID.rawValue ? bytes : 0) + 1
    }
}

/// A request that crosses a hot upgrade in flight: its slot and what it asks (a successor checks it
/// with `problem` and against the device's outstanding descriptor before relying on it).
public struct CarriedBlockRequest: Sendable, Equatable {
    public var slot: Int
    /// BlockRequestType raw value.
    public var type: UInt32
    public var sector: UInt64
    /// Data bytes.
    public var bytes: Int

    public init(slot: Int, type: UInt32, sector: UInt64, bytes: Int) {
        self.slot = slot
        self.type = type
        self.sector = sector
        self.bytes = bytes
    }

    /// Why a queue with slots of `maxTransfer` bytes cannot carry this request, or nil.
    public func problem(maxTransfer: Int) -> String? {
        guard let kind = BlockRequestType(rawValue: type) else { return "has request type \(type)" }
        guard bytes >= 0, bytes <= maxTransfer else { return "has \(bytes) data bytes, a slot holds \(maxTransfer)" }
        switch kind {
        case .flush where bytes != 0: return "is a flush with \(bytes) data bytes"
        case .discard, .writeZeroes: return bytes == 16 ? nil : "is a \(kind) with \(bytes) bytes of ranges (one range of 16)"
        default: return nil
        }
    }
}
