import Virtio

/// What a block request can fail with, beyond a broken device.
public enum BlockError: Error, Equatable, CustomStringConvertible {
    case virtio(VirtioError)
    /// The device answered VIRTIO_BLK_S_IOERR (or a short transfer).
    case ioError(type: String, sector: UInt64)
    /// The device answered VIRTIO_BLK_S_UNSUPP, or the feature was not negotiated.
    case unsupported(String)
    /// Writes to a device that offered VIRTIO_BLK_F_RO (§5.2.6.2: the driver MUST NOT).
    case readOnly
    /// A range past the device's capacity, or not a whole number of sectors.
    case outOfRange(String)

    public var description: String {
        switch self {
        case .virtio(let e): return e.description
        case .ioError(let type, let sector): return "\(type) at sector \(sector) failed: the device reported an I/O error"
        case .unsupported(let what): return "\(what) is not supported by this device"
        case .readOnly: return "the device is read-only (VIRTIO_BLK_F_RO)"
        case .outOfRange(let why): return why
        }
    }
}

/// virtio-blk (virtio 1.2 §5.2) over any transport: negotiation, validated configuration, and one
/// request queue with pipelined synchronous helpers for scripting (`read`, `write`, `flush`, `id`).
public struct BlockDevice<T: Transport & ~Copyable>: ~Copyable {
    public var transport: T
    public let negotiation: Lifecycle.Negotiation
    public let config: BlockConfig
    public var queue: BlockQueue
    /// The eventfd queue 0's completions interrupt (owned by the transport), nil in poll mode.
    public let interruptDescriptor: Int32?
    /// Request queues 1..n-1 with VIRTIO_BLK_F_MQ (§5.2.3), each meant for one worker thread.
    public let workerQueues: [WorkerQueue]

    /// The features this driver uses when offered (§5.2.3).
    public static var supported: Features {
        [.blkSizeMax, .blkSegMax, .blkBlockSize, .blkReadOnly, .blkFlush, .blkTopology, .blkConfigWCE,
         .blkDiscard, .blkWriteZeroes, .blkMultiQueue, .ringIndirectDesc, .ringEventIdx]
    }

    /// The most entries a request queue gets unless the caller asks for another limit. The
    /// driver may use fewer than the device's maximum (§4.1.4.3: it writes `queue_size`), and each
    /// entry here holds a slot of `maxTransfer` bytes of DMA memory: a device offering 1024-entry
    /// queues would otherwise need 128 MiB per queue. 256 is QEMU's default and `bench blk`'s depth.
    public static var defaultQueueSize: UInt16 { 256 }

    /// `ring`: the virtqueue format to ask for (RING_PACKED when offered, by default).
    public init(transport: consuming T, wanted: Features = BlockDevice.supported, ring: RingPreference = .auto,
                mode: CompletionMode = .poll,
                maxTransfer: Int = 128 << 10, queueSize requestedQueueSize: UInt16? = nil, queues: Int = 1,
                completionTimeout: Duration = .seconds(10)) throws(VirtioError) {
        guard transport.deviceType == .block else {
            throw .queueSetup(queue: 0, "device is virtio-\(transport.deviceType), not virtio-blk")
        }
        try Lifecycle.reset(transport)
        let negotiation = try Lifecycle.negotiate(transport, wanted: ring.features(wanted))
        _ = try ring.format(negotiation)
        let config = try BlockConfig(reading: transport, features: negotiation.accepted)
        transport.dma.reset()
        // §5.2.5: with MQ the device has num_queues request queues; use up to `queues` of them.
        let count = max(1, min(queues, Int(config.numQueues)))
        let queueSize = requestedQueueSize ?? Self.defaultQueueSize
        var eventfds: [Int32] = []
        if mode != .poll { eventfds = try transport.enableInterrupts(count: count) }
        try transport.setConfigVector(nil)
        // Every queue is set up before DRIVER_OK (§3.1.1 step 7), each with its own MSI-X vector.
        let queue = try BlockQueue(index: 0, transport: transport, config: config, features: negotiation.accepted,
                                   maxTransfer: maxTransfer, queueSize: queueSize, mode: mode, eventfd: eventfds.first,
                                   vector: mode == .poll ? nil : 0, completionTimeout: completionTimeout)
        var workers: [WorkerQueue] = []
        for i in 1..<count {
            workers.append(WorkerQueue(try BlockQueue(index: i, transport: transport, config: config, features: negotiation.accepted,
                                                      maxTransfer: maxTransfer, queueSize: queueSize, mode: mode,
                                                      eventfd: mode == .poll ? nil : eventfds[i], vector: mode == .poll ? nil : UInt16(i),
                                                      completionTimeout: completionTimeout)))
        }
        try Lifecycle.driverOK(transport)
        self.workerQueues = workers
        self.interruptDescriptor = eventfds.first
        self.queue = queue
        self.config = config
        self.negotiation = negotiation
        self.transport = transport
    }

    /// Takes over a running virtio-blk device from a previous driver process (live upgrade): no
    /// reset, nothing zeroed, no queue programmed again. `features` and `queues` are the
    /// handed-over state (queue 0 first, then the worker queues in order); the DMA memory is the
    /// same at the same device addresses. Requests left in flight on queue 0 come as `carried`
    /// (from `handoverSnapshots()`); the device completes them here. Every check reads the device
    /// once and names what differs; on any refusal the caller starts the device with a reset
    /// instead. Checks, in order: status live and healthy, features as handed over and offered,
    /// the snapshots are queues 0..<n with n ≤ num_queues, each queue enabled with the snapshot's
    /// size and rings (and, in an interrupt mode, still routed to its MSI-X vector), this
    /// version's layout of the arena puts every ring where the device has it, the carried
    /// requests match the outstanding descriptors (`BlockQueue.carriedRecords`), and each queue's
    /// used.idx is at most its outstanding requests ahead of the snapshot's.
    public init(adopting transport: consuming T, features: Features, queues snapshots: [QueueSnapshot],
                mode: CompletionMode = .poll, maxTransfer: Int = 128 << 10, queueSize: UInt16? = nil,
                completionTimeout: Duration = .seconds(10), verified: Adoption.Verified? = nil,
                carried: [CarriedBlockRequest] = []) throws(VirtioError) {
        guard transport.deviceType == .block else {
            throw .adoption(queue: nil, "device is virtio-\(transport.deviceType), not virtio-blk")
        }
        let negotiation = try Adoption.live(transport, features: features, verified: verified)
        let config = try BlockConfig(reading: transport, features: features)
        // §5.2.5: this version uses request queues 0..<n, n at most num_queues.
        guard !snapshots.isEmpty, snapshots.count <= Int(config.numQueues) else {
            throw .adoption(queue: nil, "\(snapshots.count) queues handed over, the device has \(config.numQueues) request queues")
        }
        for (i, snapshot) in snapshots.enumerated() where snapshot.index != i {
            throw .adoption(queue: snapshot.index, "handed over as queue number \(i): queues must be 0..<\(snapshots.count) in order")
        }
        // First every check, then the first change (interrupts): a refusal leaves the device as it was.
        var doorbells: [Doorbell] = []
        var layouts: [BlockQueue.Layout] = []
        var records: [[PendingRequest?]] = []
        transport.dma.reset()
        for snapshot in snapshots {
            doorbells.append(try Adoption.doorbell(transport, snapshot, verified: verified,
                                                   vector: mode == .poll ? nil : UInt16(snapshot.index)))
            // Same sizing and allocation order as `init`, over the live memory, unzeroed. The
            // programmed size stands in for the maximum (on PCI queue_size now reads it).
            let layout: BlockQueue.Layout
            do {
                layout = try BlockQueue.layout(arena: transport.dma, size: SplitQueueLayout.queueSize(maximum: snapshot.size, limit: queueSize),
                                               config: config, features: features, maxTransfer: maxTransfer, zeroed: false)
            } catch {
                throw .adoption(queue: snapshot.index, "this version's layout does not fit the DMA memory (\(error))")
            }
            guard layout.size == snapshot.size else {
                throw .adoption(queue: snapshot.index, "this version would use \(layout.size) entries (queue size \(queueSize.map(String.init) ?? "-")), the device runs \(snapshot.size)")
            }
            try Adoption.checkLayout(layout.rings, snapshot)
            records.append(try BlockQueue.carriedRecords(snapshot, snapshot.index == 0 ? carried : [], layout: layout))
            layouts.append(layout)
        }
        var eventfds: [Int32] = []
        // MSI-X: the eventfds are this process's; queue_msix_vector and config_msix_vector are
        // still programmed and are not written again, nor is queue_enable (§4.1.4.3.2).
        if mode != .poll { eventfds = try transport.enableInterrupts(count: snapshots.count) }
        let queue = try BlockQueue(adopting: snapshots[0], carried: records[0], layout: layouts[0], features: features,
                                   doorbell: doorbells[0], mode: mode, eventfd: eventfds.first, completionTimeout: completionTimeout)
        var workers: [WorkerQueue] = []
        for i in 1..<snapshots.count {
            workers.append(WorkerQueue(try BlockQueue(adopting: snapshots[i], carried: records[i], layout: layouts[i], features: features,
                                                      doorbell: doorbells[i], mode: mode,
                                                      eventfd: mode == .poll ? nil : eventfds[i],
                                                      completionTimeout: completionTimeout)))
        }
        self.workerQueues = workers
        self.interruptDescriptor = eventfds.first
        self.queue = queue
        self.config = config
        self.negotiation = negotiation
        self.transport = transport
    }

    /// The state of queue 0 and every worker queue for a successor process. Throws if any queue
    /// has requests in flight (or was broken by the device): drain first.
    public func queueSnapshots() throws(VirtioError) -> [QueueSnapshot] {
        guard queue.isIdle else {
            throw .adoption(queue: queue.index, "\(queue.inFlight) requests in flight (or the queue is broken); complete them before handing over")
        }
        return try handoverSnapshots().queues
    }

    /// `queueSnapshots()`, except that queue 0 may have requests in flight, carried to the
    /// successor (`init(adopting:carried:)`) when each takes one descriptor (RING_INDIRECT_DESC).
    public func handoverSnapshots() throws(VirtioError) -> (queues: [QueueSnapshot], carried: [CarriedBlockRequest]) {
        let (first, carried) = try queue.handoverSnapshot()
        var result = [first]
        for worker in workerQueues {
            guard worker.queue.isIdle else {
                throw .adoption(queue: worker.queue.index, "\(worker.queue.inFlight) requests in flight (or the queue is broken); complete them before handing over")
            }
            result.append(try worker.queue.snapshot())
        }
        return (result, carried)
    }

    /// Gives the transport back with the device still running (live upgrade): no reset, nothing
    /// written to the device or its rings, interrupts left as they are; the successor, which now
    /// owns the device, adopts it with `init(adopting:)`. The queues' private memory is freed.
    /// Only after `queueSnapshots()` succeeded and with no worker thread still using a queue.
    public consuming func detach() -> T {
        // The queues (and their shadow state) are destroyed with the rest of `self`.
        return transport
    }

    func check(sector: UInt64, bytes: Int) throws(BlockError) {
        guard bytes % BlockConfig.sectorSize == 0 else {
            throw .outOfRange("\(bytes) bytes is not a whole number of 512-byte sectors")
        }
        // The protocol counts 512-byte sectors (§5.2.6), but a device with larger logical blocks
        // (blk_size, §5.2.4) fails I/O that does not cover whole ones: refused here, by name.
        let block = Int(config.blockSize)
        guard sector % UInt64(block / BlockConfig.sectorSize) == 0, bytes % block == 0 else {
            throw .outOfRange("sector \(sector), \(bytes) bytes: the device's logical blocks are \(block) bytes (blk_size), so I/O must start at a multiple of \(block / BlockConfig.sectorSize) sectors and cover whole \(block)-byte blocks")
        }
        let sectors = UInt64(bytes / BlockConfig.sectorSize)
        guard sector <= config.capacitySectors, sectors <= config.capacitySectors - sector else {
            throw .outOfRange("sectors \(sector)..<\(sector &+ sectors) are past the capacity of \(config.capacitySectors) sectors")
        }
    }

    /// Runs `bytes` bytes from `sector` as requests of at most `maxTransfer`, keeping every slot
    /// busy: `fill(slot, offset, length)` before submitting (writes), `drain(slot, offset, length)`
    /// after completion (reads).
    mutating func pipeline(_ type: BlockRequestType, sector: UInt64, bytes: Int,
                           fill: (UnsafeMutableRawBufferPointer, Int, Int) -> Void,
                           drain: (UnsafeMutableRawBufferPointer, Int, Int) -> Void) throws(BlockError) {
        let chunk = queue.maxTransfer
        var submitted = 0
        var completed = 0
        let offsets = UnsafeMutablePointer<Int>.allocate(capacity: queue.slots)
        // Completions are collected first and handled after the drain (the queue is busy during it).
        let doneSlots = UnsafeMutablePointer<Int>.allocate(capacity: queue.slots)
        let doneStatus = UnsafeMutablePointer<UInt8>.allocate(capacity: queue.slots)
        defer { offsets.deallocate(); doneSlots.deallocate(); doneStatus.deallocate() }
        var failure: BlockError?
        // A flush carries no data: one request of 0 bytes.
        let total = max(bytes, 1)
        while completed < total && failure == nil {
            while submitted < total, let slot = queue.acquire() {
                let length = min(chunk, bytes - submitted)
                if length > 0 { fill(queue.buffer(slot), submitted, length) }
                offsets[slot] = submitted
                let at = sector + UInt64(submitted / BlockConfig.sectorSize)
                do {
                    guard try queue.submit(type, sector: at, bytes: length, slot: slot) else { queue.release(slot); break }
                } catch { throw .virtio(error) }
                submitted += max(length, 1)
            }
            queue.publish()
            var count = 0
            do {
                try queue.wait()
                count = try queue.complete { slot, status, _ in
                    doneSlots[count] = slot
                    doneStatus[count] = status
                    count += 1
                }
            } catch { throw .virtio(error) }
            for i in 0..<count {
                let slot = doneSlots[i], offset = offsets[slot]
                let length = min(chunk, bytes - offset)
                if doneStatus[i] == BlockStatus.ok {
                    if length > 0 { drain(queue.buffer(slot), offset, length) }
                } else if failure == nil {
                    failure = doneStatus[i] == BlockStatus.unsupported
                        ? .unsupported("request type \(type)")
                        : .ioError(type: "\(type)", sector: sector + UInt64(offset / BlockConfig.sectorSize))
                }
                completed += max(length, 1)
                queue.release(slot)
            }
        }
        // Requests still in flight after a failure finish before we return: their slots are reused.
        while queue.inFlight > 0 {
            var count = 0
            do {
                try queue.wait()
                count = try queue.complete { slot, _, _ in doneSlots[count] = slot; count += 1 }
            } catch { throw .virtio(error) }
            for i in 0..<count { queue.release(doneSlots[i]) }
        }
        if let failure { throw failure }
    }

    /// Reads `into.count` bytes (a whole number of sectors) starting at `sector`.
    public mutating func read(sector: UInt64, into destination: UnsafeMutableRawBufferPointer) throws(BlockError) {
        try check(sector: sector, bytes: destination.count)
        try pipeline(.read, sector: sector, bytes: destination.count, fill: { _, _, _ in }, drain: { buffer, offset, length in
            (destination.baseAddress! + offset).copyMemory(from: buffer.baseAddress!, byteCount: length)
        })
    }

    /// Writes `source` (a whole number of sectors) starting at `sector`.
    public mutating func write(sector: UInt64, from source: UnsafeRawBufferPointer) throws(BlockError) {
        guard !config.readOnly else { throw .readOnly }
        try check(sector: sector, bytes: source.count)
        try pipeline(.write, sector: sector, bytes: source.count, fill: { buffer, offset, length in
            buffer.baseAddress!.copyMemory(from: source.baseAddress! + offset, byteCount: length)
        }, drain: { _, _, _ in })
    }

    /// VIRTIO_BLK_T_FLUSH (§5.2.6.2): everything completed before is on stable storage after it.
    public mutating func flush() throws(BlockError) {
        guard config.flush else { throw .unsupported("flush (VIRTIO_BLK_F_FLUSH not offered)") }
        try pipeline(.flush, sector: 0, bytes: 0, fill: { _, _, _ in }, drain: { _, _, _ in })
    }

    /// VIRTIO_BLK_T_GET_ID: the device's serial (up to 20 bytes, NUL-padded).
    public mutating func identify() throws(BlockError) -> String {
        var result = ""
        guard let slot = queue.acquire() else { throw .virtio(.queueSetup(queue: 0, "no free request slot")) }
        defer { queue.release(slot) }
        do {
            guard try queue.submit(.getID, sector: 0, bytes: 20, slot: slot) else {
                throw BlockError.virtio(.queueSetup(queue: 0, "ring full"))
            }
            queue.publish()
            var status = BlockStatus.ioError, written = 0
            while queue.inFlight > 0 {
                try queue.wait()
                _ = try queue.complete { _, s, n in status = s; written = n }
            }
            // (the slot goes back in the defer above)
            guard status == BlockStatus.ok else {
                throw status == BlockStatus.unsupported ? BlockError.unsupported("GET_ID") : .ioError(type: "GET_ID", sector: 0)
            }
            let bytes = queue.buffer(slot).prefix(written).prefix { $0 != 0 }
            result = String(decoding: bytes, as: UTF8.self)
        } catch let error as BlockError { throw error } catch let error as VirtioError { throw .virtio(error) } catch {
            throw .virtio(.queueSetup(queue: 0, "\(error)"))
        }
        return result
    }

    /// Shuts down as the seed says: reset (the device then uses no buffer), reclaim, release.
    public consuming func shutdown() throws(VirtioError) -> T {
        try Lifecycle.reset(transport)
        queue.cancelAll { _ in }
        for worker in workerQueues { worker.queue.cancelAll { _ in } }
        transport.disableInterrupts()
        transport.dma.reset()
        return transport
    }
}

/// A request queue handed to one worker thread (with VIRTIO_BLK_F_MQ). The box gives the thread a
/// reference to the queue; only that thread may use it, and only while the device is live.
public final class WorkerQueue: @unchecked Sendable {
    public var queue: BlockQueue
    init(_ queue: consuming BlockQueue) { self.queue = queue }
}
