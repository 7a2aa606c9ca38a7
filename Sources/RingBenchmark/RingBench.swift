// The ring benchmark's core: requests through a `Virtqueue` (split or packed) against the in-process emulator,
// every completion checked, the driver's work counted (docs/PERFORMANCE.md).
//
// Two tools use it and so measure the same code: the `virtio-vfio-ring-bench` executable (the
// command tools/bench-ci runs under callgrind) and Benchmarks/ (ordo-one/benchmark, with its
// malloc and retain thresholds). The driver hot path that callgrind measures is in HotPath.swift.
//
// With `implementation: .c` the same loop (same device, slots, tokens and checks) drives
// CRingReference's C rings through its C hot path (virtio_bench_c_submit/complete), the yardstick
// of docs/PERFORMANCE.md's "Swift against a C reference".
import CRingReference
import Virtio
import VirtioEmulator
import Glibc

/// The emulated device the ring benchmark drives.
public enum RingBenchDevice: String, CaseIterable, Sendable {
    /// virtio-rng (spec 5.4): one device-writable buffer per request, filled by the device.
    case rng
    /// virtio-blk (spec 5.2): IN requests (header, data, status byte), read from a pre-filled disk.
    case blk
}

/// Which driver runs the rings: the project's (Swift, Sources/Virtio) or the C reference
/// (Sources/CRingReference: the same algorithms and checks in C).
public enum RingBenchImplementation: String, CaseIterable, Sendable {
    case swift
    case c
}

public struct RingBenchOptions: Sendable {
    public var device: RingBenchDevice = .rng
    public var queueSize: UInt16 = 256
    /// Requests submitted (and published with one `publish()`) per round; the round waits for all.
    public var batch = 32
    /// rng: bytes per buffer. blk: data bytes per request (a multiple of 512).
    public var bufferSize = 64
    /// The virtqueue format: split (§2.7) or packed (§2.8, RING_PACKED offered by the emulator).
    public var ring: RingFormat = .split
    public var eventIndex = true
    public var indirect = true
    /// Compare every completed buffer with what the device must have written.
    public var verifyData = true
    /// Keep one bit per request and check each completed exactly once (`run` sets it up).
    public var trackEach = true
    /// Run the device thread and the driver on two different CPUs (the first two this process
    /// may use), as a device and its driver are. Left to the scheduler, the two threads may
    /// share a CPU, and a round trip then includes a context switch.
    public var pinThreads = true
    /// Whose ring code runs: Swift's (`virtio_bench_submit/complete`) or the C reference's
    /// (`virtio_bench_c_submit/complete`). The loop, the device and every check are the same.
    public var implementation: RingBenchImplementation = .swift

    public init() {}
}

public enum RingBenchFailure: Error, CustomStringConvertible {
    case setup(String)
    case queue(VirtioError)
    case lost(String)
    case wrong(String)

    public var description: String {
        switch self {
        case .setup(let why): return "setup: \(why)"
        case .queue(let e): return "queue: \(e)"
        case .lost(let why): return "request lost: \(why)"
        case .wrong(let why): return "wrong completion: \(why)"
        }
    }
}

/// The driver side of the benchmark: one queue (split or packed) on an `EmulatedDevice` whose worker thread
/// serves it. Each round pops buffer slots, adds one request per slot and publishes
/// (`ringBenchSubmit`), spins until the used ring moves, drains it (`ringBenchComplete`), then checks
/// every completion and returns its slot (`check`). Only the two `ringBench*` functions are the
/// driver hot path that callgrind measures; waiting and checking are outside it.
///
/// Tokens are `sequence << 16 | slot`: the sequence number of the request (its order of
/// submission) and the buffer slot it used.
public struct RingBench: ~Copyable {
    public let options: RingBenchOptions
    let device: EmulatedDevice
    let transport: EmulatedTransport
    /// The features the driver and the emulated device agreed on.
    public let negotiated: Features
    var queue: Virtqueue
    /// Buffer slots: rng `[buffer]`; blk `[data | header 16 | status 1]`, `stride` bytes apart.
    let slots: DMASlice
    let stride: Int
    var idle: SlotStack
    /// The segments of the request being added (3 at most), allocated once.
    let segments: UnsafeMutablePointer<BufferSegment>
    /// Completions drained and not yet checked: token and used length.
    let tokens: UnsafeMutablePointer<UInt64>
    let lengths: UnsafeMutablePointer<UInt32>
    var pending = 0
    /// One bit per request when `trackEach` (set by `run`), else nil.
    var seen: UnsafeMutablePointer<UInt64>?
    var seenCapacity = 0
    /// `implementation == .c`: the C hot path's state, on its own C queue over the same rings
    /// (`queue` is then built but not used), its own idle slots, and `tokens`/`lengths` shared.
    let reference: UnsafeMutablePointer<crr_bench>?
    /// The CPUs of the driver (`run` pins its caller there) and of the device thread, when
    /// `pinThreads` found two.
    public let driverCPU: Int?
    public let deviceCPU: Int?

    /// The driver's counters: requests submitted and completed (checked), rounds, doorbells
    /// rung, `drainUsed` calls and polls of the used index while waiting.
    public internal(set) var submitted: UInt64 = 0
    public internal(set) var completed: UInt64 = 0
    public internal(set) var rounds = 0
    public internal(set) var doorbells = 0
    public internal(set) var drains = 0
    public internal(set) var spins = 0

    /// The emulated rng's seed. Its generator is SplitMix64, whose state advances by a constant
    /// per output; a request of `bufferSize` bytes takes (bufferSize + 7) / 8 outputs, so the
    /// bytes of request `n` are a function of the seed and `n` alone (see `rngMatches`).
    static let seed: UInt64 = 0x5EED_0000_0000_1234
    static let blkCapacitySectors: UInt64 = 2048
    static let blkHeader = 16

    public init(options: RingBenchOptions) throws(RingBenchFailure) {
        let n = Int(options.queueSize)
        guard n > 0, n & (n - 1) == 0, n <= 32768 else {
            throw .setup("queue size \(n) is not a power of two up to 32768")
        }
        guard options.batch >= 1 else { throw .setup("batch must be at least 1") }
        let stride: Int
        var model: EmulatedDevice.Model
        switch options.device {
        case .rng:
            guard options.bufferSize >= 1 else { throw .setup("buffer size must be at least 1") }
            stride = (options.bufferSize + 63) / 64 * 64
            model = .rng(seed: RingBench.seed, queueSize: options.queueSize)
        case .blk:
            guard options.bufferSize >= 512, options.bufferSize % 512 == 0,
                  UInt64(options.bufferSize / 512) <= RingBench.blkCapacitySectors else {
                throw .setup("blk data size must be a multiple of 512 up to \(RingBench.blkCapacitySectors * 512)")
            }
            stride = (options.bufferSize + RingBench.blkHeader + 1 + 63) / 64 * 64
            model = .blk(capacitySectors: RingBench.blkCapacitySectors, queueSize: options.queueSize)
        }
        let indirectEntries = options.indirect && options.device == .blk ? 4 : 0
        if options.ring == .packed { model.offeredFeatures.insert(.ringPacked) }
        model.memorySize = n * stride + n * (16 + 8 + 2 + 4 * 16) + (1 << 20)
        let device = EmulatedDevice(model: model)
        let transport = EmulatedTransport(device: device)
        var wanted: Features = []
        if options.eventIndex { wanted.insert(.ringEventIdx) }
        if options.indirect { wanted.insert(.ringIndirectDesc) }
        if options.ring == .packed { wanted.insert(.ringPacked) }

        let queue: Virtqueue
        var cSplit: OpaquePointer? = nil
        var cPacked: OpaquePointer? = nil
        let slots: DMASlice
        let negotiation: Lifecycle.Negotiation
        // The device thread starts in enableQueue and inherits this thread's CPU mask: give it
        // the device's CPU for that moment, then restore ours (run() pins the driver).
        let cpus = options.pinThreads ? ThreadAffinity.allowed() : []
        let original = cpus.count >= 2 ? ThreadAffinity.current() : nil
        if original != nil { _ = ThreadAffinity.pinCallingThread(to: cpus[1]) }
        defer { if let original { _ = ThreadAffinity.setCallingThread(original) } }
        do throws(VirtioError) {
            // Spec 3.1.1: reset, negotiate, queue setup, DRIVER_OK; the emulator checks every step.
            try Lifecycle.reset(transport)
            negotiation = try Lifecycle.negotiate(transport, wanted: wanted)
            transport.dma.reset()
            let memory = try QueueMemory(RingFormat(negotiation.accepted), arena: transport.dma, size: options.queueSize,
                                         indirectEntries: indirectEntries)
            slots = try transport.dma.allocate(n * stride, alignment: 4096)
            try transport.setConfigVector(nil)
            let doorbell = try transport.enableQueue(0, size: options.queueSize, rings: memory.rings, vector: nil)
            var q = Virtqueue(index: 0, memory: memory, features: negotiation.accepted, doorbell: doorbell)
            q.suppressInterrupts()
            if options.implementation == .c {
                // The C queue on the same rings, zeroed again and with interrupts suppressed the
                // same way, before DRIVER_OK; the Swift queue `q` is left idle.
                (cSplit, cPacked) = try RingBench.referenceQueue(memory, features: negotiation.accepted, doorbell: doorbell)
            }
            try Lifecycle.driverOK(transport)
            queue = q
        } catch {
            throw .queue(error)
        }
        if options.device == .blk {
            // The disk the IN requests read: every byte a function of its offset (see `diskByte`).
            let bytes = (0..<Int(RingBench.blkCapacitySectors) * 512).map { RingBench.diskByte(UInt64($0)) }
            device.writeDisk(offset: 0, bytes)
        }
        self.options = options
        self.device = device
        self.transport = transport
        self.negotiated = negotiation.accepted
        self.queue = queue
        self.slots = slots
        self.stride = stride
        self.idle = SlotStack(filledTo: n)
        self.segments = .allocate(capacity: 3)
        self.tokens = .allocate(capacity: n)
        self.lengths = .allocate(capacity: n)
        self.driverCPU = original != nil ? cpus[0] : nil
        self.deviceCPU = original != nil ? cpus[1] : nil
        if options.implementation == .c {
            let idle = UnsafeMutablePointer<UInt32>.allocate(capacity: n)
            for i in 0..<n { idle[i] = UInt32(i) }  // as SlotStack(filledTo:)
            let b = UnsafeMutablePointer<crr_bench>.allocate(capacity: 1)
            b.initialize(to: crr_bench(
                split: cSplit, packed: cPacked, idle: idle, idle_count: n, idle_capacity: n,
                slots: slots.pointer.assumingMemoryBound(to: UInt8.self), slots_device_address: slots.deviceAddress,
                stride: stride, buffer_size: options.bufferSize, is_blk: options.device == .blk,
                blk_capacity_sectors: RingBench.blkCapacitySectors, submitted: 0, doorbells: 0, drains: 0,
                pending: 0, tokens: tokens, lengths: lengths, last_error: 0))
            self.reference = b
        } else {
            self.reference = nil
        }
    }

    /// The C reference's queue on `memory`, configured as the Swift queue is (same features,
    /// same indirect tables, same doorbell).
    static func referenceQueue(_ memory: QueueMemory, features: Features,
                               doorbell: Doorbell) throws(VirtioError) -> (OpaquePointer?, OpaquePointer?) {
        var config = crr_queue_config()
        config.index = 0
        config.event_index = features.contains(.ringEventIdx)
        config.use_indirect = features.contains(.ringIndirectDesc)
        config.platform_order = features.contains(.orderPlatform)
        config.notification_data = features.contains(.notificationData)
        config.doorbell = doorbell.address
        config.doorbell_value = doorbell.value
        let indirect: DMASlice?
        switch memory {
        case .split(let m):
            config.size = m.size
            config.descriptors = m.descriptors.pointer
            config.driver_area = m.avail.pointer
            config.device_area = m.used.pointer
            (indirect, config.indirect_entries, config.indirect_stride) = (m.indirect, m.indirectEntries, m.indirectStride)
        case .packed(let m):
            config.size = m.size
            config.descriptors = m.descriptors.pointer
            config.driver_area = m.driverEvent.pointer
            config.device_area = m.deviceEvent.pointer
            (indirect, config.indirect_entries, config.indirect_stride) = (m.indirect, m.indirectEntries, m.indirectStride)
        }
        if let indirect {
            // The C queue computes a table's device address as base + offset: linear memory only
            // (the emulator's is).
            guard indirect.segments == nil else { throw .queueSetup(queue: 0, "the C reference needs linear DMA memory") }
            config.indirect = indirect.pointer
            config.indirect_device_address = indirect.deviceAddress
        }
        switch memory {
        case .split:
            guard let q = crr_split_create(&config) else { throw .queueSetup(queue: 0, "the C reference refused the split queue") }
            crr_split_suppress_interrupts(q)
            return (q, nil)
        case .packed:
            guard let q = crr_packed_create(&config) else { throw .queueSetup(queue: 0, "the C reference refused the packed queue") }
            crr_packed_suppress_interrupts(q)
            return (nil, q)
        }
    }

    /// The C reference's last failure as the Swift queue would have thrown it.
    static func referenceError(_ b: UnsafeMutablePointer<crr_bench>) -> VirtioError {
        let why = String(cString: crr_bench_reason(b))
        return b.pointee.last_error == CRR_BROKEN.rawValue ? .brokenQueue(queue: 0, why) : .queueSetup(queue: 0, why)
    }

    deinit {
        if let reference {
            crr_split_destroy(reference.pointee.split)
            crr_packed_destroy(reference.pointee.packed)
            reference.pointee.idle.deallocate()
            reference.deallocate()
        }
        segments.deallocate()
        tokens.deallocate()
        lengths.deallocate()
        seen?.deallocate()
    }

    @inline(__always) static func diskByte(_ offset: UInt64) -> UInt8 {
        UInt8(truncatingIfNeeded: (offset >> 9) &* 151 &+ (offset & 511) &* 7 &+ (offset >> 17))
    }

    /// The disk sector request `sequence` reads.
    @inline(__always) func blkSector(_ sequence: UInt64) -> UInt64 {
        let sectors = UInt64(options.bufferSize / 512)
        return (sequence &* sectors) % (RingBench.blkCapacitySectors - sectors + 1)
    }

    /// The bytes the emulated rng must have put in request `sequence`'s buffer, compared in place.
    func rngMatches(_ sequence: UInt64, _ buffer: UnsafeRawPointer, _ count: Int) -> Bool {
        let words = UInt64((options.bufferSize + 7) / 8)
        var state = RingBench.seed &+ sequence &* words &* 0x9E37_79B9_7F4A_7C15
        var i = 0
        while i < count {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            if count - i >= 8 {
                // The device stores each output as 8 little-endian bytes.
                if UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: i, as: UInt64.self)) != z { return false }
            } else {
                for b in 0..<(count - i) where buffer.load(fromByteOffset: i + b, as: UInt8.self) != UInt8(truncatingIfNeeded: z >> (8 * UInt64(b))) {
                    return false
                }
            }
            i += 8
        }
        return true
    }

    /// Spins until the device has used buffers; gives the core away every 256 checks (the device
    /// thread may share it, as it always does under valgrind). A device silent for 5 s lost them.
    mutating func waitForUsed() throws(RingBenchFailure) {
        var checks = 0
        var deadline: ContinuousClock.Instant?
        while !hasUsed() {
            checks += 1
            if checks & 255 == 0 {
                sched_yield()
                let now = ContinuousClock.now
                if let deadline {
                    if now > deadline {
                        throw .lost("\(inFlight) requests in flight and no completion for 5 s "
                                    + "(\(completed) of \(submitted) completed)")
                    }
                } else {
                    deadline = now + .seconds(5)
                }
            }
        }
        spins += checks
    }

    func hasUsed() -> Bool {
        if let reference { return crr_bench_has_used(reference) }
        return queue.hasUsed()
    }

    var inFlight: Int {
        if let reference { return crr_bench_in_flight(reference) }
        return queue.inFlight
    }

    /// A checked completion's slot goes back to the idle slots of the hot path that runs.
    mutating func release(slot: Int) throws(RingBenchFailure) {
        guard let reference else { idle.push(slot); return }
        guard reference.pointee.idle_count < reference.pointee.idle_capacity else {
            throw .wrong("slot \(slot) freed twice")
        }
        reference.pointee.idle[reference.pointee.idle_count] = UInt32(truncatingIfNeeded: slot)
        reference.pointee.idle_count += 1
    }

    /// Checks every drained completion (slot, sequence, length, data) and returns its slot.
    mutating func check() throws(RingBenchFailure) {
        for i in 0..<pending {
            let token = tokens[i]
            let slot = Int(token & 0xFFFF)
            let sequence = token >> 16
            guard slot < Int(options.queueSize), sequence < submitted else {
                throw .wrong("token \(token) was never submitted")
            }
            if let seen {
                guard sequence < UInt64(seenCapacity) else { throw .wrong("sequence \(sequence) past the run") }
                let word = Int(sequence >> 6), bit = UInt64(1) << (sequence & 63)
                guard seen[word] & bit == 0 else { throw .wrong("request \(sequence) completed twice") }
                seen[word] |= bit
            }
            let buffer = UnsafeRawPointer(slots.pointer + slot * stride)
            let length = Int(lengths[i])
            switch options.device {
            case .rng:
                guard length == options.bufferSize else {
                    throw .wrong("rng request \(sequence): device wrote \(length) bytes of \(options.bufferSize)")
                }
                if options.verifyData && !rngMatches(sequence, buffer, length) {
                    throw .wrong("rng request \(sequence): bytes differ from the device's generator")
                }
            case .blk:
                let status = buffer.load(fromByteOffset: options.bufferSize + RingBench.blkHeader, as: UInt8.self)
                guard status == 0 else { throw .wrong("blk request \(sequence): status \(status), not OK") }
                guard length == options.bufferSize + 1 else {
                    throw .wrong("blk request \(sequence): used length \(length), not \(options.bufferSize + 1)")
                }
                if options.verifyData {
                    let base = blkSector(sequence) * 512
                    for j in 0..<options.bufferSize where buffer.load(fromByteOffset: j, as: UInt8.self) != RingBench.diskByte(base + UInt64(j)) {
                        throw .wrong("blk request \(sequence): byte \(j) of sector \(base / 512) differs from the disk")
                    }
                }
            }
            try release(slot: slot)
        }
        completed += UInt64(pending)
        pending = 0
        reference?.pointee.pending = 0
    }

    /// One round: submit up to `count` requests, then complete and check all of them.
    mutating func round(_ count: Int) throws(RingBenchFailure) {
        let added: Int
        if let reference {
            let r = virtio_bench_c_submit(reference, count)
            submitted = reference.pointee.submitted
            doorbells = reference.pointee.doorbells
            guard r >= 0 else { throw .queue(RingBench.referenceError(reference)) }
            added = r
        } else {
            do { added = try ringBenchSubmit(&self, count) } catch { throw .queue(error) }
        }
        guard added > 0 else { throw .lost("the queue has no room although every request completed") }
        var done = 0
        while done < added {
            try waitForUsed()
            if let reference {
                let n = virtio_bench_c_complete(reference)
                guard n >= 0 else { throw .queue(RingBench.referenceError(reference)) }
                done += n
                pending = reference.pointee.pending
                drains = reference.pointee.drains
            } else {
                do { done += try ringBenchComplete(&self) } catch { throw .queue(error) }
            }
        }
        guard done == added else { throw .wrong("\(done) completions for \(added) requests") }
        try check()
        rounds += 1
    }

    /// Runs `total` requests in rounds of `options.batch`, checking each exactly once.
    public mutating func run(_ total: Int) throws(RingBenchFailure) {
        if let driverCPU, !ThreadAffinity.pinCallingThread(to: driverCPU) {
            throw .setup("could not pin the driver thread to CPU \(driverCPU)")
        }
        let start = submitted
        if options.trackEach {
            seen?.deallocate()
            seenCapacity = Int(start) + total
            let words = (seenCapacity + 63) / 64
            seen = .allocate(capacity: words)
            seen!.initialize(repeating: 0, count: words)
            // Requests before this run count as seen.
            for s in 0..<Int(start) { seen![s >> 6] |= UInt64(1) << UInt64(s & 63) }
        }
        while submitted - start < UInt64(total) {
            try round(min(options.batch, total - Int(submitted - start)))
        }
        if options.trackEach, let seen {
            for s in Int(start)..<seenCapacity where seen[s >> 6] & (UInt64(1) << UInt64(s & 63)) == 0 {
                throw .lost("request \(s) never completed")
            }
        }
    }

    /// Switches the emulated device's faults (hardening tests: a hostile device).
    public func updateFaults(_ change: (inout EmulatedDevice.Faults) -> Void) {
        var faults = device.faults
        change(&faults)
        device.faults = faults
    }

    /// What the emulated device did on the queue so far.
    public var deviceCounters: RingBenchDeviceCounters {
        let s = device.statistics(queue: 0)
        return RingBenchDeviceCounters(notifications: s.notifications, completed: s.completed, interrupts: s.interrupts)
    }

    /// Resets the device (it then uses no buffer, spec 2.4) and checks it saw no spec violation.
    public consuming func finish() throws(RingBenchFailure) {
        do { try Lifecycle.reset(transport) } catch { throw .queue(error) }
        let violations = device.violations
        guard violations.isEmpty else {
            throw .wrong("the device saw \(violations.count) spec violations, first: \(violations[0])")
        }
    }
}

/// The emulated device's side of a run, for the report.
public struct RingBenchDeviceCounters: Sendable, Equatable {
    /// Available buffer notifications it took from the doorbell.
    public let notifications: Int
    /// Requests it completed.
    public let completed: Int
    /// Used buffer notifications it sent (none while the driver suppresses them).
    public let interrupts: Int
}
