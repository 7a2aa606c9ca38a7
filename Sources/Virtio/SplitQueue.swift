import CVirtioShim

/// One buffer of a request: a device address and length, readable or writable by the device.
public struct BufferSegment: Sendable, Equatable {
    public var address: UInt64
    public var length: UInt32
    public var deviceWritable: Bool

    public init(address: UInt64, length: UInt32, deviceWritable: Bool) {
        self.address = address
        self.length = length
        self.deviceWritable = deviceWritable
    }
}

extension BufferSegment {
    /// The device-writable bytes of a request's `segments`, checking that no device-readable
    /// segment follows a device-writable one (§2.7.4.2 split, §2.8.17 packed: `section` names the
    /// rule in the error). Summed in 64 bits: a request can describe more than 4 GiB of writable
    /// memory, and a used length (32 bits) can never exceed that, so the sum saturates at
    /// UInt32.max. Shared by both queue formats' `add`.
    @inline(__always)
    static func writableBytes(_ segments: UnsafeBufferPointer<BufferSegment>, queue: Int, section: StaticString) throws(VirtioError) -> UInt32 {
        var sawWritable = false
        var writableSum: UInt64 = 0
        for s in segments {
            if s.deviceWritable { sawWritable = true; writableSum += UInt64(s.length) } else if sawWritable {
                throw .queueSetup(queue: queue, "device-readable buffers must come before device-writable ones (\(section))")
            }
        }
        return UInt32(clamping: writableSum)
    }
}

/// The driver side of a split virtqueue (virtio 1.2 §2.7).
///
/// Ownership: the rings live in device-visible memory the device may scribble on at any time, so
/// the queue never reads back what it wrote there. Its bookkeeping (free list, chain lengths,
/// writable byte counts, tokens) is a private shadow. From the device it reads only `used.idx`,
/// each used element's `id` and `len` (once each, validated before use) and, with EVENT_IDX,
/// `avail_event`; with neither, `used.flags`.
///
/// The hot path (`add`, `publish`, `drainUsed`) allocates nothing and touches no reference count.
/// Each request carries a caller-chosen 64-bit token, returned with its completion.
public struct SplitQueue: ~Copyable {
    public let index: Int
    public let size: UInt16
    public let memory: SplitQueueMemory
    public let doorbell: Doorbell
    let eventIndex: Bool
    /// The barriers against the device (VIRTIO_F_ORDER_PLATFORM or not), chosen here once.
    public let ordering: DeviceOrdering
    /// VIRTIO_F_NOTIFICATION_DATA: notifications carry the next available index (§2.9).
    let notificationData: Bool
    let useIndirect: Bool
    let mask: UInt16

    // Device-visible ring pointers.
    let descriptors: UnsafeMutableRawPointer
    let avail: UnsafeMutableRawPointer
    let used: UnsafeMutableRawPointer

    // Driver-private shadow state, one entry per descriptor (index = descriptor / head number).
    let nextFree: FixedArray<UInt16>
    let chainLength: FixedArray<UInt16>     // heads in flight: descriptors used; else 0
    let writableBytes: FixedArray<UInt32>   // heads in flight: device-writable bytes
    let tokens: FixedArray<UInt64>
    var freeHead: UInt16
    public private(set) var freeCount: Int
    /// The available index as this driver knows it (never read back from the ring).
    var availIndex: UInt16
    /// The available index the device was last told about.
    var publishedAvailIndex: UInt16
    /// The next used element to consume.
    var lastUsedIndex: UInt16
    /// Set when the device broke the protocol; every later call fails with it until a reset.
    public private(set) var brokenReason: VirtioError?
    /// Requests added and not yet completed or cancelled.
    public private(set) var inFlight = 0

    /// Builds the queue on `memory` (zeroed here): after a device or queue reset the same memory is
    /// used again. `features` are the negotiated ones (EVENT_IDX, INDIRECT_DESC matter here).
    public init(index: Int, memory: SplitQueueMemory, features: Features, doorbell: Doorbell) {
        // §2.7.10.1: the driver MUST initialize flags in the used ring to 0 (and a fresh queue
        // starts with both indices at 0, §2.7.6, §2.7.8).
        memory.descriptors.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: memory.descriptors.size)
        memory.avail.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: memory.avail.size)
        memory.used.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: memory.used.size)
        self.init(index: index, memory: memory, features: features, doorbell: doorbell, availIndex: 0, usedIndex: 0)
    }

    /// Takes over queue `index` of a running device from a previous driver (live upgrade, no
    /// reset): the same `memory` at the same device addresses, its indices continued from
    /// `availIndex` and `usedIndex`, and the requests the device still holds (`outstanding`, one
    /// descriptor each) as they were handed over. Nothing in the rings is written or zeroed, and
    /// nothing a driver wrote (descriptors, the available ring) is read back: the free list is
    /// every descriptor that is not an outstanding head.
    ///
    /// Checked before anything is kept: `outstanding` holds exactly `availIndex - usedIndex`
    /// requests (every published one not consumed) with distinct heads below the queue size; the
    /// device's `used.idx`, read once, is at most that many ahead of `usedIndex` (the device may
    /// have used some since the previous driver stopped looking: they are consumed next). With
    /// EVENT_IDX, `used_event` and `avail_event` stay as they are (`suppressInterrupts` /
    /// `armInterrupts` rewrite `used_event`; `avail_event` is the device's).
    public init(adopting memory: SplitQueueMemory, features: Features, doorbell: Doorbell, index: Int,
                availIndex: UInt16, usedIndex: UInt16, outstanding: [QueueSnapshot.Outstanding] = []) throws(VirtioError) {
        let published = Int(availIndex &- usedIndex)
        guard published == outstanding.count else {
            if outstanding.isEmpty {
                throw .adoption(queue: index, "not idle: available index \(availIndex), used index \(usedIndex) (requests were in flight)")
            }
            throw .adoption(queue: index, "\(outstanding.count) requests handed over, but the indices say \(published) are outstanding (available \(availIndex), used \(usedIndex))")
        }
        guard published <= Int(memory.size) else {
            throw .adoption(queue: index, "\(published) requests outstanding in a queue of \(memory.size)")
        }
        var seen = [Bool](repeating: false, count: Int(memory.size))
        for request in outstanding {
            guard request.head < memory.size else {
                throw .adoption(queue: index, "outstanding head \(request.head) is not a descriptor (queue size \(memory.size))")
            }
            guard !seen[Int(request.head)] else {
                throw .adoption(queue: index, "outstanding head \(request.head) is handed over twice")
            }
            seen[Int(request.head)] = true
        }
        // §2.7.8: used.idx is the device's; one volatile load, validated before anything relies on it.
        let deviceIndex = UInt16(littleEndian: CVirtioShim_mmio_read16(memory.used.pointer + SplitQueueLayout.usedIndex))
        guard Int(deviceIndex &- usedIndex) <= published else {
            if outstanding.isEmpty {
                throw .adoption(queue: index, "used idx is \(deviceIndex) in the ring, expected \(usedIndex) from the handed-over state")
            }
            throw .adoption(queue: index, "used idx is \(deviceIndex) in the ring, more than the \(published) outstanding requests past \(usedIndex)")
        }
        // §2.7.14: like drainUsed, order the used.idx load before any later read of the rings.
        DeviceOrdering(features).read()
        self.init(index: index, memory: memory, features: features, doorbell: doorbell,
                  availIndex: availIndex, usedIndex: usedIndex)
        for request in outstanding {
            let head = Int(request.head)
            chainLength[head] = 1
            writableBytes[head] = request.writableBytes
            tokens[head] = request.token
        }
        // The free list: every other descriptor, in index order (shadow links only).
        var previous: Int? = nil
        var first = Int(size)
        for i in 0..<Int(size) where !seen[i] {
            if let previous { nextFree[previous] = UInt16(truncatingIfNeeded: i) } else { first = i }
            previous = i
        }
        if let previous { nextFree[previous] = UInt16(truncatingIfNeeded: Int(size)) }
        freeHead = UInt16(truncatingIfNeeded: first)
        freeCount = Int(size) - published
        inFlight = published
    }

    /// What both initialisers share: the shadow state (all descriptors free) and the indices.
    /// Writes nothing to the rings.
    init(index: Int, memory: SplitQueueMemory, features: Features, doorbell: Doorbell,
         availIndex: UInt16, usedIndex: UInt16) {
        let n = Int(memory.size)
        precondition(n > 0 && n & (n - 1) == 0 && n <= SplitQueueLayout.maximumSize,
                     "split queue size must be a power of two up to 32768 (§2.7)")
        self.index = index
        self.size = memory.size
        self.memory = memory
        self.doorbell = doorbell
        self.eventIndex = features.contains(.ringEventIdx)
        self.ordering = DeviceOrdering(features)
        self.notificationData = features.contains(.notificationData)
        self.mask = memory.size &- 1
        descriptors = memory.descriptors.pointer
        avail = memory.avail.pointer
        used = memory.used.pointer
        nextFree = FixedArray(count: n) { UInt16(truncatingIfNeeded: $0 + 1) }
        chainLength = FixedArray(repeating: 0, count: n)
        writableBytes = FixedArray(repeating: 0, count: n)
        tokens = FixedArray(repeating: 0, count: n)
        freeHead = 0
        freeCount = n
        self.availIndex = availIndex
        publishedAvailIndex = availIndex
        lastUsedIndex = usedIndex
        useIndirect = features.contains(.ringIndirectDesc) && memory.indirect != nil
    }

    public var rings: QueueRings { memory.rings }

    /// Every request with more than one buffer goes as one indirect descriptor (when it fits the
    /// indirect table), so it can be handed over in flight (`handoverSnapshot`).
    public var usesIndirectDescriptors: Bool { useIndirect }

    /// Nothing in flight (and the device did not break the queue): a snapshot may be handed on.
    public var isIdle: Bool { inFlight == 0 && brokenReason == nil }

    /// The queue as a successor takes it over with `init(adopting:)`. Valid only when `isIdle`.
    public var snapshot: QueueSnapshot {
        QueueSnapshot(index: index, size: size, rings: rings, availIndex: publishedAvailIndex, usedIndex: lastUsedIndex)
    }

    /// The queue with the requests the device still holds, for a successor that adopts it while
    /// they are outstanding (virtio-net keeps its receive buffers posted across a live upgrade).
    /// Refused when the device broke the queue, when requests were added but not published (the
    /// caller publishes first), or when a request takes more than one descriptor.
    public func handoverSnapshot() throws(VirtioError) -> QueueSnapshot {
        if let brokenReason { throw brokenReason }
        guard availIndex == publishedAvailIndex else {
            throw .adoption(queue: index, "\(availIndex &- publishedAvailIndex) requests added but not published")
        }
        var outstanding: [QueueSnapshot.Outstanding] = []
        outstanding.reserveCapacity(inFlight)
        for head in 0..<Int(size) where chainLength[head] != 0 {
            guard chainLength[head] == 1 else {
                throw .adoption(queue: index, "request at head \(head) takes \(chainLength[head]) descriptors: only single-descriptor requests are handed over (complete it first)")
            }
            outstanding.append(.init(head: UInt16(truncatingIfNeeded: head), token: tokens[head], writableBytes: writableBytes[head]))
        }
        return QueueSnapshot(index: index, size: size, rings: rings, availIndex: publishedAvailIndex,
                             usedIndex: lastUsedIndex, outstanding: outstanding)
    }

    // MARK: - Ring memory accessors (little-endian, plain loads/stores ordered by the barriers below)

    @inline(__always) func storeDescriptor(_ table: UnsafeMutableRawPointer, _ i: Int, address: UInt64,
                                           length: UInt32, flags: UInt16, next: UInt16) {
        let d = table + SplitQueueLayout.descriptor(i)
        d.storeBytes(of: address.littleEndian, toByteOffset: SplitQueueLayout.descriptorAddress, as: UInt64.self)
        d.storeBytes(of: length.littleEndian, toByteOffset: SplitQueueLayout.descriptorLength, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: SplitQueueLayout.descriptorFlags, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: SplitQueueLayout.descriptorNext, as: UInt16.self)
    }

    /// Device-written 16-bit fields are read with one volatile load each: the device may change them
    /// under us, and the compiler must neither repeat nor elide the read.
    @inline(__always) func loadDeviceU16(_ p: UnsafeMutableRawPointer) -> UInt16 {
        UInt16(littleEndian: CVirtioShim_mmio_read16(p))
    }
    @inline(__always) func loadDeviceU32(_ p: UnsafeMutableRawPointer) -> UInt32 {
        UInt32(littleEndian: CVirtioShim_mmio_read32(p))
    }

    var usedIndexPointer: UnsafeMutableRawPointer { used + SplitQueueLayout.usedIndex }
    var usedFlagsPointer: UnsafeMutableRawPointer { used + SplitQueueLayout.usedFlags }
    /// avail_event sits after the used ring (§2.7.8).
    var availEventPointer: UnsafeMutableRawPointer { used + SplitQueueLayout.availEvent(Int(size)) }
    /// used_event sits after the available ring (§2.7.6).
    var usedEventPointer: UnsafeMutableRawPointer { avail + SplitQueueLayout.usedEvent(Int(size)) }
    var availFlagsPointer: UnsafeMutableRawPointer { avail + SplitQueueLayout.availFlags }

    // MARK: - Submitting

    /// Adds one request: `segments` (device-readable ones first, then device-writable ones, §2.7.4.2)
    /// as a descriptor chain, or as one indirect descriptor when INDIRECT_DESC was negotiated and the
    /// chain has more than one segment. Not visible to the device until `publish()`.
    /// Returns false (and changes nothing) when the queue has no room.
    public mutating func add(_ segments: UnsafeBufferPointer<BufferSegment>, token: UInt64) throws(VirtioError) -> Bool {
        if let brokenReason { throw brokenReason }
        let count = segments.count
        guard count > 0 else { throw .queueSetup(queue: index, "a request needs at least one buffer") }
        let writable = try BufferSegment.writableBytes(segments, queue: index, section: "§2.7.4.2")
        let indirect = useIndirect && count > 1 && count <= memory.indirectEntries
        let needed = indirect ? 1 : count
        guard needed <= freeCount else {
            guard needed <= Int(size) else {
                throw .queueSetup(queue: index, "request of \(count) buffers exceeds the queue size \(size)")
            }
            return false
        }

        let head = freeHead
        if indirect, let table = memory.indirect {
            // One indirect table per head: entries chained 0..count-1 (§2.7.5.3.1: the driver MUST
            // NOT set VIRTQ_DESC_F_INDIRECT in an indirect table's descriptors).
            let offset = Int(head) * memory.indirectStride
            let entries = table.pointer + offset
            for (i, s) in segments.enumerated() {
                var flags: UInt16 = s.deviceWritable ? SplitQueueLayout.flagWrite : 0
                if i + 1 < count { flags |= SplitQueueLayout.flagNext }
                storeDescriptor(entries, i, address: s.address, length: s.length, flags: flags,
                                next: UInt16(truncatingIfNeeded: i + 1))
            }
            storeDescriptor(descriptors, Int(head), address: table.deviceAddress(at: offset),
                            length: UInt32(SplitQueueLayout.descriptorTableSize(count)),
                            flags: SplitQueueLayout.flagIndirect, next: 0)
            freeHead = nextFree[Int(head)]
        } else {
            var d = head
            for (i, s) in segments.enumerated() {
                let following = nextFree[Int(d)]
                var flags: UInt16 = s.deviceWritable ? SplitQueueLayout.flagWrite : 0
                if i + 1 < count { flags |= SplitQueueLayout.flagNext }
                storeDescriptor(descriptors, Int(d), address: s.address, length: s.length, flags: flags, next: following)
                if i + 1 < count { d = following }
                else { freeHead = following }
            }
        }
        freeCount -= needed
        chainLength[Int(head)] = UInt16(truncatingIfNeeded: needed)
        writableBytes[Int(head)] = writable
        tokens[Int(head)] = token
        // §2.7.13.2: place the head in the next available ring slot; the index is published later.
        (avail + SplitQueueLayout.availRing(Int(availIndex & mask))).storeBytes(of: head.littleEndian, as: UInt16.self)
        availIndex &+= 1
        inFlight += 1
        return true
    }

    /// Makes every added request visible to the device and notifies it if it asked to be
    /// (§2.7.13.3, §2.7.13.4). Returns whether the doorbell was rung.
    @discardableResult
    public mutating func publish() -> Bool {
        guard availIndex != publishedAvailIndex else { return false }
        // §2.7.13.3: "The driver performs a suitable memory barrier to ensure the device sees the
        // updated descriptor table and available ring before the next step."
        ordering.write()
        (avail + SplitQueueLayout.availIndex).storeBytes(of: availIndex.littleEndian, as: UInt16.self)
        // §2.7.13.4: "The driver performs a suitable memory barrier to ensure that it updates the idx
        // field before checking for notification suppression." A store-load order: full barrier.
        ordering.full()
        let old = publishedAvailIndex
        publishedAvailIndex = availIndex
        let notify: Bool
        if eventIndex {
            // §2.7.10.1 with VIRTIO_F_EVENT_IDX: notify if the new index passed avail_event.
            notify = SplitQueueLayout.needsEvent(event: loadDeviceU16(availEventPointer), new: availIndex, old: old)
        } else {
            // §2.7.10.1 without it: notify unless the device set VIRTQ_USED_F_NO_NOTIFY.
            notify = loadDeviceU16(usedFlagsPointer) & SplitQueueLayout.usedNoNotify == 0
        }
        if notify {
            // §2.9: next_off and next_wrap are the 16 bits of the available index.
            if notificationData { doorbell.ring(next: availIndex) } else { doorbell.ring() }
        }
        return notify
    }

    // MARK: - Completing

    /// Whether the device has used buffers this driver has not consumed yet.
    public func hasUsed() -> Bool {
        loadDeviceU16(usedIndexPointer) != lastUsedIndex
    }

    /// Consumes up to `limit` used elements, validating each, and passes (token, written length)
    /// to `body`. Returns how many were consumed. A device that breaks the protocol marks the queue
    /// broken (the error names what it did) and nothing more is consumed.
    public mutating func drainUsed(limit: Int = .max, _ body: (UInt64, UInt32) -> Void) throws(VirtioError) -> Int {
        if let brokenReason { throw brokenReason }
        // Read used.idx once (§2.7.14: the device's idx is the only truth about how many are ready).
        let deviceIndex = loadDeviceU16(usedIndexPointer)
        let pending = deviceIndex &- lastUsedIndex
        if pending == 0 { return 0 }
        // The device can complete at most what is in flight; a larger jump (including one past the
        // queue size) means it invented completions.
        guard Int(pending) <= inFlight else {
            return try fail("used idx jumped by \(pending) with only \(inFlight) requests in flight (queue size \(size))")
        }
        // §2.7.14 / Linux virtqueue_get_buf: read barrier between reading idx and reading the
        // ring entries it covers, so we never see an entry older than the index.
        ordering.read()
        var consumed = 0
        while consumed < limit && lastUsedIndex != deviceIndex {
            let element = used + SplitQueueLayout.usedElement(Int(lastUsedIndex & mask))
            // Each field is read exactly once into a local and validated before any use.
            let id = loadDeviceU32(element + SplitQueueLayout.usedElementID)
            let length = loadDeviceU32(element + SplitQueueLayout.usedElementLength)
            guard id < UInt32(size) else {
                return try fail("used id \(id) is not a descriptor index (queue size \(size))")
            }
            let head = Int(id)
            let chain = chainLength[head]
            guard chain != 0 else {
                return try fail("used id \(id) is not a request in flight (completed twice, or never submitted)")
            }
            guard length <= writableBytes[head] else {
                return try fail("used length \(length) for id \(id) is past the \(writableBytes[head]) device-writable bytes")
            }
            let token = tokens[head]
            release(head: head, chain: Int(chain))
            lastUsedIndex &+= 1
            consumed += 1
            body(token, length)
        }
        return consumed
    }

    /// Returns a head's descriptors to the free list (shadow links only).
    @inline(__always) mutating func release(head: Int, chain: Int) {
        var last = head
        for _ in 1..<max(chain, 1) { last = Int(nextFree[last]) }
        nextFree[last] = freeHead
        freeHead = UInt16(truncatingIfNeeded: head)
        freeCount += chain
        chainLength[head] = 0
        writableBytes[head] = 0
        inFlight -= 1
    }

    mutating func fail(_ why: String) throws(VirtioError) -> Int {
        let error = VirtioError.brokenQueue(queue: index, why)
        brokenReason = error
        throw error
    }

    // MARK: - Interrupt suppression (§2.7.7, §2.7.10)

    /// Asks the device not to interrupt (the driver polls). Advisory: the device may still.
    public mutating func suppressInterrupts() {
        if eventIndex {
            // With EVENT_IDX: an event index half the ring space away is never reached by polling.
            usedEventPointer.storeBytes(of: (lastUsedIndex &+ 0x8000).littleEndian, as: UInt16.self)
        } else {
            availFlagsPointer.storeBytes(of: SplitQueueLayout.availNoInterrupt.littleEndian, as: UInt16.self)
        }
    }

    /// Asks for an interrupt at the next used buffer. Returns false if used buffers are already
    /// pending, in which case the caller must consume them instead of sleeping (the interrupt for
    /// them may have been suppressed before this call).
    public mutating func armInterrupts() -> Bool {
        if eventIndex {
            usedEventPointer.storeBytes(of: lastUsedIndex.littleEndian, as: UInt16.self)
        } else {
            availFlagsPointer.storeBytes(of: UInt16(0), as: UInt16.self)
        }
        // §2.7.7.1 (Linux virtqueue_enable_cb): the store above must be visible before we read
        // used.idx, or an interrupt could be lost between the check and the sleep. Full barrier.
        ordering.full()
        return !hasUsed()
    }

    // MARK: - Reset

    /// After the device (or this queue) was reset, the device uses none of the buffers (§2.4):
    /// hands every request still in flight back to its owner (in head order).
    /// The queue is consumed; build a new one on the same memory to continue.
    public consuming func cancelAll(_ body: (UInt64) -> Void) {
        reclaimAll(body)
    }

    /// `cancelAll` without giving the queue up: every request in flight is handed back and the
    /// queue is as new (empty rings, all descriptors free, indices 0). Only after a reset; the
    /// queue must be enabled on the device again before it is used.
    public mutating func reclaimAll(_ body: (UInt64) -> Void) {
        for head in 0..<Int(size) where chainLength[head] != 0 {
            body(tokens[head])
            chainLength[head] = 0
            writableBytes[head] = 0
        }
        for i in 0..<Int(size) { nextFree[i] = UInt16(truncatingIfNeeded: i + 1) }
        descriptors.initializeMemory(as: UInt8.self, repeating: 0, count: memory.descriptors.size)
        avail.initializeMemory(as: UInt8.self, repeating: 0, count: memory.avail.size)
        used.initializeMemory(as: UInt8.self, repeating: 0, count: memory.used.size)
        freeHead = 0
        freeCount = Int(size)
        availIndex = 0
        publishedAvailIndex = 0
        lastUsedIndex = 0
        inFlight = 0
        brokenReason = nil
    }
}
