import CVirtioShim

/// The driver side of a packed virtqueue (virtio 1.2 §2.8).
///
/// One descriptor ring that both sides write: the driver makes descriptors available in ring
/// order (AVAIL = its wrap counter, USED = the inverse), the device overwrites them with used
/// descriptors (AVAIL = USED = its wrap counter) in the order it completes buffers, one per
/// buffer, carrying the buffer ID; both then skip the buffer's other descriptors (§2.8.4,
/// §2.8.6). Buffer IDs are this driver's own (a free stack), independent of ring positions.
///
/// Ownership as in `SplitQueue`: the ring is memory the device may scribble on, so the queue
/// never reads back what it wrote. From the device it reads only the `flags` of the next used
/// position, then that descriptor's `id` and `len` (once each, validated before use), and the
/// Device Event Suppression structure when deciding whether to notify.
///
/// Batching: `add` writes every descriptor of a request, flags included, except the flags of the
/// first descriptor added since the last `publish`; `publish` writes that one last, after a write
/// barrier, which makes the whole batch available at once (the device polls the ring in order
/// and does not look past a descriptor that is not available, §2.8.5).
///
/// The hot path (`add`, `publish`, `drainUsed`) allocates nothing and touches no reference count.
public struct PackedQueue: ~Copyable {
    public let index: Int
    public let size: UInt16
    public let memory: PackedQueueMemory
    public let doorbell: Doorbell
    let eventIndex: Bool
    /// The barriers against the device (VIRTIO_F_ORDER_PLATFORM or not), chosen here once.
    public let ordering: DeviceOrdering
    /// VIRTIO_F_NOTIFICATION_DATA: notifications carry the next available position (§2.9).
    let notificationData: Bool
    let useIndirect: Bool

    // Device-visible memory.
    let ring: UnsafeMutableRawPointer
    let driverEvent: UnsafeMutableRawPointer
    let deviceEvent: UnsafeMutableRawPointer

    // Driver-private shadow state, one entry per buffer ID.
    let nextFreeID: FixedArray<UInt16>
    let descriptorCount: FixedArray<UInt16>  // IDs in flight: ring descriptors the buffer takes; else 0
    let writableBytes: FixedArray<UInt32>    // IDs in flight: device-writable bytes
    let tokens: FixedArray<UInt64>
    /// The `publish` round in which each ID in flight was added (`round`): one not yet published
    /// cannot have been used by the device.
    let addedRound: FixedArray<UInt32>
    var freeIDHead: UInt16
    /// Buffer IDs free (at most `size`, one per buffer).
    var freeIDs: Int
    /// Ring descriptors free: not part of a buffer in flight.
    public private(set) var freeCount: Int

    /// Where the next descriptor is made available, and the Driver Ring Wrap Counter (§2.8.1).
    var nextAvail: UInt16
    var availWrap: Bool
    /// Where the next used descriptor will be written, and the wrap counter it will carry.
    var nextUsed: UInt16
    var usedWrap: Bool
    /// Descriptors added since the last `publish` (Linux's num_added) and the first one's flags,
    /// written by `publish`.
    var pendingDescriptors: Int
    var pendingHead: UInt16
    var pendingHeadFlags: UInt16
    /// Counts `publish` calls that exposed something; `addedRound` compares against it.
    var round: UInt32
    /// Set when the device broke the protocol; every later call fails with it until a reset.
    public private(set) var brokenReason: VirtioError?
    /// Requests added and not yet completed or cancelled.
    public private(set) var inFlight = 0

    /// Builds the queue on `memory` (zeroed here: §2.8.13, "The descriptor ring is
    /// zero-initialized"). `features` are the negotiated ones (EVENT_IDX and INDIRECT_DESC matter).
    public init(index: Int, memory: PackedQueueMemory, features: Features, doorbell: Doorbell) {
        memory.descriptors.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: memory.descriptors.size)
        memory.driverEvent.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: memory.driverEvent.size)
        memory.deviceEvent.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: memory.deviceEvent.size)
        let n = Int(memory.size)
        precondition(n > 0 && n <= PackedQueueLayout.maximumSize, "packed queue size must be 1 to 32768 (§2.8)")
        self.index = index
        self.size = memory.size
        self.memory = memory
        self.doorbell = doorbell
        eventIndex = features.contains(.ringEventIdx)
        ordering = DeviceOrdering(features)
        notificationData = features.contains(.notificationData)
        useIndirect = features.contains(.ringIndirectDesc) && memory.indirect != nil
        ring = memory.descriptors.pointer
        driverEvent = memory.driverEvent.pointer
        deviceEvent = memory.deviceEvent.pointer
        nextFreeID = FixedArray(count: n) { UInt16(truncatingIfNeeded: $0 + 1) }
        descriptorCount = FixedArray(repeating: 0, count: n)
        writableBytes = FixedArray(repeating: 0, count: n)
        tokens = FixedArray(repeating: 0, count: n)
        addedRound = FixedArray(repeating: 0, count: n)
        freeIDHead = 0
        freeIDs = n
        freeCount = n
        // §2.8.1: both wrap counters start at 1.
        nextAvail = 0
        availWrap = true
        nextUsed = 0
        usedWrap = true
        pendingDescriptors = 0
        pendingHead = 0
        pendingHeadFlags = 0
        round = 1
    }

    public var rings: QueueRings { memory.rings }

    /// Every request with more than one buffer goes as one indirect descriptor (when it fits).
    public var usesIndirectDescriptors: Bool { useIndirect }

    /// Nothing in flight (and the device did not break the queue).
    public var isIdle: Bool { inFlight == 0 && brokenReason == nil }

    /// The idle queue's positions for a state record: the next available and next used ring
    /// positions, each with its wrap counter in bit 15 (as §2.8.10's event offsets carry it).
    /// Not adopted live by this version (`Virtqueue`); it tells a successor where the ring stood.
    public var snapshot: QueueSnapshot {
        QueueSnapshot(index: index, size: size, rings: rings,
                      availIndex: PackedQueueLayout.eventOffsetWrap(nextAvail, wrap: availWrap),
                      usedIndex: PackedQueueLayout.eventOffsetWrap(nextUsed, wrap: usedWrap))
    }

    // MARK: - Ring memory accessors (little-endian, plain stores ordered by the barriers below)

    @inline(__always) func storeDescriptor(_ table: UnsafeMutableRawPointer, _ i: Int, address: UInt64,
                                           length: UInt32, id: UInt16) {
        let d = table + PackedQueueLayout.descriptor(i)
        d.storeBytes(of: address.littleEndian, toByteOffset: PackedQueueLayout.descriptorAddress, as: UInt64.self)
        d.storeBytes(of: length.littleEndian, toByteOffset: PackedQueueLayout.descriptorLength, as: UInt32.self)
        d.storeBytes(of: id.littleEndian, toByteOffset: PackedQueueLayout.descriptorID, as: UInt16.self)
    }
    @inline(__always) func storeFlags(_ table: UnsafeMutableRawPointer, _ i: Int, _ flags: UInt16) {
        (table + PackedQueueLayout.descriptor(i)).storeBytes(of: flags.littleEndian, toByteOffset: PackedQueueLayout.descriptorFlags,
                                                             as: UInt16.self)
    }
    /// Device-written fields: one volatile load each, never repeated or elided by the compiler.
    @inline(__always) func loadDeviceU16(_ p: UnsafeMutableRawPointer) -> UInt16 {
        UInt16(littleEndian: CVirtioShim_mmio_read16(p))
    }
    @inline(__always) func loadDeviceU32(_ p: UnsafeMutableRawPointer) -> UInt32 {
        UInt32(littleEndian: CVirtioShim_mmio_read32(p))
    }

    // MARK: - Submitting

    /// Adds one request: `segments` (device-readable ones first, then device-writable ones,
    /// §2.8.17) as descriptors in ring order, or as one indirect descriptor when INDIRECT_DESC was
    /// negotiated and the request has more than one segment. Not visible to the device until
    /// `publish()`. Returns false (and changes nothing) when the ring or the buffer IDs are full.
    public mutating func add(_ segments: UnsafeBufferPointer<BufferSegment>, token: UInt64) throws(VirtioError) -> Bool {
        if let brokenReason { throw brokenReason }
        let count = segments.count
        guard count > 0 else { throw .queueSetup(queue: index, "a request needs at least one buffer") }
        let writable = try BufferSegment.writableBytes(segments, queue: index, section: "§2.8.17")
        let indirect = useIndirect && count > 1 && count <= memory.indirectEntries
        let needed = indirect ? 1 : count
        guard needed <= freeCount, freeIDs > 0 else {
            guard needed <= Int(size) else {
                throw .queueSetup(queue: index, "request of \(count) buffers exceeds the queue size \(size) (§2.8.17)")
            }
            return false
        }
        let id = freeIDHead
        let first = nextAvail
        var headFlags: UInt16 = 0
        if indirect, let table = memory.indirect {
            // §2.8.8: the table's descriptors carry only WRITE; their IDs are ignored.
            let offset = Int(id) * memory.indirectStride
            let entries = table.pointer + offset
            for (i, s) in segments.enumerated() {
                storeDescriptor(entries, i, address: s.address, length: s.length, id: 0)
                storeFlags(entries, i, s.deviceWritable ? PackedQueueLayout.flagWrite : 0)
            }
            storeDescriptor(ring, Int(first), address: table.deviceAddress(at: offset),
                            length: UInt32(PackedQueueLayout.descriptorSize * count), id: id)
            headFlags = PackedQueueLayout.flagIndirect | PackedQueueLayout.availableFlags(wrap: availWrap)
            advanceAvail()
        } else {
            for (i, s) in segments.enumerated() {
                var flags = PackedQueueLayout.availableFlags(wrap: availWrap)
                if s.deviceWritable { flags |= PackedQueueLayout.flagWrite }
                if i + 1 < count { flags |= PackedQueueLayout.flagNext }
                // §2.8.6: the buffer ID goes in the last descriptor; every descriptor gets it here.
                storeDescriptor(ring, Int(nextAvail), address: s.address, length: s.length, id: id)
                if i == 0 { headFlags = flags } else { storeFlags(ring, Int(nextAvail), flags) }
                advanceAvail()
            }
        }
        if pendingDescriptors == 0 {
            // The first of the batch: its flags wait for `publish` (§2.8.6: the first descriptor
            // of a list is made available after the rest).
            pendingHead = first
            pendingHeadFlags = headFlags
        } else {
            // §2.8.21.1: a barrier before each flags update, so the device never sees a descriptor
            // available before its contents. Later requests of a batch are not looked at before
            // the batch's first descriptor is available, which `publish` orders after these.
            storeFlags(ring, Int(first), headFlags)
        }
        pendingDescriptors += needed
        freeIDHead = nextFreeID[Int(id)]
        freeIDs -= 1
        freeCount -= needed
        descriptorCount[Int(id)] = UInt16(truncatingIfNeeded: needed)
        writableBytes[Int(id)] = writable
        tokens[Int(id)] = token
        addedRound[Int(id)] = round
        inFlight += 1
        return true
    }

    @inline(__always) mutating func advanceAvail() {
        nextAvail &+= 1
        if nextAvail == size {
            nextAvail = 0
            availWrap.toggle()  // §2.8.1: after making the last descriptor of the ring available
        }
    }

    /// Makes every added request visible to the device and notifies it if it asked to be
    /// (§2.8.21, §2.8.10). Returns whether the doorbell was rung.
    @discardableResult
    public mutating func publish() -> Bool {
        guard pendingDescriptors > 0 else { return false }
        // §2.8.21.1 "Updating flags": a barrier before the flags update so the device sees every
        // descriptor of the batch (and each request's other descriptors) before the first one.
        ordering.write()
        storeFlags(ring, Int(pendingHead), pendingHeadFlags)
        // §2.8.21.3.1: a barrier before reading the Device Event Suppression structure, or a
        // needed notification can be missed. A store-load order: full barrier.
        ordering.full()
        let added = UInt16(truncatingIfNeeded: pendingDescriptors)
        pendingDescriptors = 0
        round &+= 1
        let flags = loadDeviceU16(deviceEvent + PackedQueueLayout.eventFlags) & 3
        let notify: Bool
        if flags == PackedQueueLayout.eventDescriptorSpecific && eventIndex {
            // §2.8.10 with VIRTIO_F_EVENT_IDX (Linux virtqueue_kick_prepare_packed): notify if the
            // descriptors made available, [nextAvail - added, nextAvail), include the one the
            // device named; an offset in the other lap counts one ring size earlier.
            let offWrap = loadDeviceU16(deviceEvent + PackedQueueLayout.eventDescriptor)
            var event = offWrap & ~PackedQueueLayout.eventWrapBit
            if (offWrap & PackedQueueLayout.eventWrapBit != 0) != availWrap { event &-= size }
            notify = SplitQueueLayout.needsEvent(event: event, new: nextAvail, old: nextAvail &- added)
        } else {
            // ENABLE, or DESC without EVENT_IDX (not valid for the device to ask; notifying is
            // the safe answer), or the reserved value 3: only DISABLE suppresses.
            notify = flags != PackedQueueLayout.eventDisable
        }
        if notify {
            // §2.9: next_off is the position the next descriptor will be made available at,
            // next_wrap the Driver Ring Wrap Counter that goes with it.
            if notificationData {
                doorbell.ring(next: PackedQueueLayout.eventOffsetWrap(nextAvail, wrap: availWrap))
            } else {
                doorbell.ring()
            }
        }
        return notify
    }

    // MARK: - Completing

    /// The AVAIL/USED bits at the next used position: whether the device used it in this lap.
    @inline(__always) func usedFlagsAtNext() -> UInt16 {
        loadDeviceU16(ring + PackedQueueLayout.descriptor(Int(nextUsed)) + PackedQueueLayout.descriptorFlags)
    }

    /// Ring descriptors made available to the device and not yet used: those in flight less the
    /// ones added since the last `publish`. They start at the next used position.
    @inline(__always) var publishedDescriptors: Int { Int(size) - freeCount - pendingDescriptors }

    /// Whether `drainUsed` has something to look at: the device used the next buffer, or, while
    /// buffers are published, wrote flags there that are neither available nor used in this lap
    /// (which `drainUsed` then names, instead of a wait that ends in a timeout).
    public func hasUsed() -> Bool {
        let state = usedFlagsAtNext() & (PackedQueueLayout.flagAvail | PackedQueueLayout.flagUsed)
        if state == PackedQueueLayout.usedFlags(wrap: usedWrap) { return true }
        return state != PackedQueueLayout.availableFlags(wrap: usedWrap) && publishedDescriptors > 0
    }

    /// Consumes up to `limit` used descriptors, validating each, and passes (token, written
    /// length) to `body`. Returns how many were consumed. A device that breaks the protocol
    /// marks the queue broken (the error names what it did) and nothing more is consumed.
    public mutating func drainUsed(limit: Int = .max, _ body: (UInt64, UInt32) -> Void) throws(VirtioError) -> Int {
        if let brokenReason { throw brokenReason }
        let both = PackedQueueLayout.flagAvail | PackedQueueLayout.flagUsed
        var consumed = 0
        while consumed < limit {
            // Per descriptor: the wrap counter changes when the ring wraps inside the loop.
            let used = PackedQueueLayout.usedFlags(wrap: usedWrap)
            let position = nextUsed
            let descriptor = ring + PackedQueueLayout.descriptor(Int(position))
            // §2.8.22: the flags of the next used position, read once.
            let flags = loadDeviceU16(descriptor + PackedQueueLayout.descriptorFlags)
            let state = flags & both
            // Descriptors made available and not yet used start at the next used position; the
            // ones after them (added, not yet published) and the rest of the ring hold what an
            // earlier lap left, which the device has no business changing.
            let published = publishedDescriptors
            if state != used {
                // Inside the published part the driver wrote AVAIL = the wrap counter, USED the
                // inverse (§2.8.1); the device changes that only to used, in the same lap.
                if published > 0 && state != PackedQueueLayout.availableFlags(wrap: usedWrap) {
                    return try fail("descriptor \(position) has AVAIL \(flags & PackedQueueLayout.flagAvail != 0 ? 1 : 0) and USED "
                                    + "\(flags & PackedQueueLayout.flagUsed != 0 ? 1 : 0) with the used wrap counter at \(usedWrap ? 1 : 0): "
                                    + "neither available nor used in this lap (§2.8.1)")
                }
                break
            }
            guard published > 0 else {
                return try fail("descriptor \(position) marked used with no request in flight (nothing was made available there)")
            }
            // §2.8.22 (the example's read_memory_barrier): the flags before the id and length.
            ordering.read()
            let id = loadDeviceU16(descriptor + PackedQueueLayout.descriptorID)
            guard id < size else {
                return try fail("used buffer ID \(id) at descriptor \(position) is not an ID (queue size \(size))")
            }
            let count = descriptorCount[Int(id)]
            guard count != 0 else {
                return try fail("used buffer ID \(id) at descriptor \(position) is not a request in flight (completed twice, or never submitted)")
            }
            guard addedRound[Int(id)] != round else {
                return try fail("used buffer ID \(id) at descriptor \(position) was added but not yet made available")
            }
            // §2.8.4: the used length is what the device wrote into the buffer, and is reserved
            // (ignored) in a used descriptor without WRITE. QEMU never sets WRITE in a used
            // descriptor (virtqueue_packed_fill_desc) and Linux reads the length regardless
            // (virtqueue_get_buf_ctx_packed): so it is read whenever the buffer has writable
            // bytes, and bounded by them below, and ignored when it has none.
            let writable = writableBytes[Int(id)]
            let length = writable == 0 ? 0 : loadDeviceU32(descriptor + PackedQueueLayout.descriptorLength)
            guard length <= writable else {
                return try fail("used length \(length) for buffer ID \(id) is past the \(writableBytes[Int(id)]) device-writable bytes")
            }
            let token = tokens[Int(id)]
            release(id: id, count: count)
            // §2.8.4: skip the buffer's other descriptors to where the next used one goes.
            var next = Int(position) + Int(count)
            if next >= Int(size) {
                next -= Int(size)
                usedWrap.toggle()
            }
            nextUsed = UInt16(truncatingIfNeeded: next)
            consumed += 1
            body(token, length)
        }
        return consumed
    }

    @inline(__always) mutating func release(id: UInt16, count: UInt16) {
        descriptorCount[Int(id)] = 0
        writableBytes[Int(id)] = 0
        nextFreeID[Int(id)] = freeIDHead
        freeIDHead = id
        freeIDs += 1
        freeCount += Int(count)
        inFlight -= 1
    }

    mutating func fail(_ why: String) throws(VirtioError) -> Int {
        let error = VirtioError.brokenQueue(queue: index, why)
        brokenReason = error
        throw error
    }

    // MARK: - Interrupt suppression (§2.8.10)

    /// Asks the device not to interrupt (the driver polls). Advisory: the device may still.
    public mutating func suppressInterrupts() {
        (driverEvent + PackedQueueLayout.eventFlags).storeBytes(of: PackedQueueLayout.eventDisable.littleEndian, as: UInt16.self)
    }

    /// Asks for an interrupt at the next used buffer. Returns false if used buffers are already
    /// pending, in which case the caller must consume them instead of sleeping.
    public mutating func armInterrupts() -> Bool {
        if eventIndex {
            // §2.8.10: an event for the descriptor at the next used position, in its lap. The
            // offset and wrap are stored before the flags that make the device read them; the
            // write barrier orders the two stores (§2.8.14: `desc` is valid only with
            // RING_EVENT_FLAGS_DESC, so the device must not see the flag before the offset).
            (driverEvent + PackedQueueLayout.eventDescriptor).storeBytes(
                of: PackedQueueLayout.eventOffsetWrap(nextUsed, wrap: usedWrap).littleEndian, as: UInt16.self)
            ordering.write()
            (driverEvent + PackedQueueLayout.eventFlags).storeBytes(of: PackedQueueLayout.eventDescriptorSpecific.littleEndian, as: UInt16.self)
        } else {
            (driverEvent + PackedQueueLayout.eventFlags).storeBytes(of: PackedQueueLayout.eventEnable.littleEndian, as: UInt16.self)
        }
        // §2.8.22 (the example's memory_barrier after enabling events): the store above is
        // visible before the used flags are read again, or an interrupt could be lost.
        ordering.full()
        return !hasUsed()
    }

    // MARK: - Reset

    /// After the device (or this queue) was reset, the device uses none of the buffers (§2.4):
    /// hands every request still in flight back to its owner (in buffer ID order).
    public consuming func cancelAll(_ body: (UInt64) -> Void) {
        reclaimAll(body)
    }

    /// `cancelAll` without giving the queue up: every request in flight is handed back and the
    /// queue is as new (zeroed ring, wrap counters 1). Only after a reset.
    public mutating func reclaimAll(_ body: (UInt64) -> Void) {
        for id in 0..<Int(size) where descriptorCount[id] != 0 {
            body(tokens[id])
            descriptorCount[id] = 0
            writableBytes[id] = 0
        }
        for i in 0..<Int(size) { nextFreeID[i] = UInt16(truncatingIfNeeded: i + 1) }
        ring.initializeMemory(as: UInt8.self, repeating: 0, count: memory.descriptors.size)
        driverEvent.initializeMemory(as: UInt8.self, repeating: 0, count: memory.driverEvent.size)
        deviceEvent.initializeMemory(as: UInt8.self, repeating: 0, count: memory.deviceEvent.size)
        freeIDHead = 0
        freeIDs = Int(size)
        freeCount = Int(size)
        nextAvail = 0
        availWrap = true
        nextUsed = 0
        usedWrap = true
        pendingDescriptors = 0
        round &+= 1
        inFlight = 0
        brokenReason = nil
    }
}
