#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization
import Virtio

/// Everything the emulated device is, shared by the driver-facing `EmulatedDevice` and the
/// device's worker thread. All mutable state is in `state`, behind one lock: register accesses,
/// queue setup and every pass of the worker over the rings take it, so a reset that has read
/// back 0 is ordered after the last ring access of the device (spec 2.4, 4.1.4.3.2).
final class DeviceCore: @unchecked Sendable {
    typealias Model = EmulatedDevice.Model
    typealias Violation = EmulatedDevice.Violation

    struct State {
        var status: DeviceStatus = []
        var driverFeatures: Features = []
        var pendingResetReads: Int?
        var configGeneration: UInt8 = 0
        var resets = 0
        var functionResets = 0
        /// Writes of queue_enable (one per enabled queue) and of config_msix_vector, counted so
        /// tests can tell that an adopting driver did not program a running queue again.
        var queueEnableWrites = 0
        var configVectorWrites = 0
        var violations: [Violation] = []
        var faults = EmulatedDevice.Faults()
        var queues: [QueueDevice?]
        var statistics: [EmulatedDevice.QueueStatistics]
        var vectors: [InterruptVector] = []
        var configVector: Int?
        var isr: UInt8 = 0
        var worker: Worker?
        var entropy: SplitMix64
        var capacitySectors: UInt64
        /// The block device's storage; outlives resets like a disk.
        let store = BlockStore()
        /// The network device's frame pipe, link and receive filters (NetModel.swift).
        var net = NetState()

        static let violationLimit = 10_000

        mutating func record(_ rule: String) {
            if violations.count < State.violationLimit { violations.append(Violation(rule: rule)) }
        }
    }

    let model: Model
    let memory: DeviceMemory
    let notify: NotifySlots
    let state: Mutex<State>
    /// This device's worker threads started and not yet joined (0 or 1).
    let liveWorkerThreads = Atomic<Int>(0)

    init(model: Model) {
        precondition(model.queueMaxSizes.count <= Int(UInt16.max), "too many queues")
        self.model = model
        memory = DeviceMemory(size: model.memorySize, deviceBase: model.memoryBase, segmentSize: model.memorySegmentSize)
        notify = NotifySlots(count: model.queueMaxSizes.count)
        state = Mutex(State(
            queues: Array(repeating: nil, count: model.queueMaxSizes.count),
            statistics: Array(repeating: .init(), count: model.queueMaxSizes.count),
            entropy: SplitMix64(state: model.entropySeed),
            capacitySectors: model.block.capacitySectors))
    }

    /// Stops the worker (the device is going away). Not called with the lock held.
    func shutdown() {
        let worker = state.withLock { s -> Worker? in
            defer { s.worker = nil }
            return s.worker
        }
        worker?.stopAndJoin()
    }

    // MARK: Status and features (spec 2.1, 2.2, 3.1)

    func readStatus() -> DeviceStatus {
        let (status, stopped) = state.withLock { s -> (DeviceStatus, Worker?) in
            var stopped: Worker?
            if let pending = s.pendingResetReads {
                if s.faults.resetNeverCompletes { return (s.status, nil) }
                if pending > 0 {
                    s.pendingResetReads = pending - 1
                    return (s.status, nil)
                }
                stopped = completeReset(&s)
            }
            if s.faults.clearFeaturesOK { s.status.remove(.featuresOK) }
            return (s.status, stopped)
        }
        // The worker cannot be in a pass (we held the lock) and finds no queue in the next one;
        // it is joined here, outside the lock it may be waiting for.
        stopped?.stopAndJoin()
        return status
    }

    /// The reset completes: from here on the device uses no buffer and sends no notification
    /// (spec 2.4, 4.1.4.3.2). Queues, vector routing, ISR and features are forgotten; the
    /// interrupt eventfds (owned like VFIO's) and the block storage stay.
    private func completeReset(_ s: inout State) -> Worker? {
        s.pendingResetReads = nil
        s.status = []
        s.driverFeatures = []
        s.resets += 1
        if s.faults.endAtReset { s.faults = EmulatedDevice.Faults() }
        for i in s.queues.indices {
            s.queues[i] = nil
            notify.clear(i)
        }
        s.configVector = nil
        s.isr = 0
        s.net.deviceReset()
        defer { s.worker = nil }
        return s.worker
    }

    /// A function-level reset: the whole function starts over, whatever its status logic was
    /// doing (a reset that never completed included); faults are ended, as on new hardware.
    func resetFunction() {
        let stopped = state.withLock { s -> Worker? in
            s.faults = EmulatedDevice.Faults()
            s.functionResets += 1
            return completeReset(&s)
        }
        stopped?.stopAndJoin()
    }

    func writeStatus(_ new: DeviceStatus) {
        let kick = state.withLock { s -> Worker? in
            // §2.4 / §4.1.4.3.1: writing 0 resets the device. The driver waits for 0 (§4.1.4.3.2).
            // Until then the device may go on using buffers, as real devices do.
            if new.rawValue == 0 {
                s.pendingResetReads = s.faults.resetLatencyReads
                return nil
            }
            func violation(_ rule: String) { s.record(rule) }
            if s.pendingResetReads != nil {
                violation("status written before a reset read back 0 (§4.1.4.3.2)")
                return nil
            }
            if s.status.contains(.failed) {
                violation("status \(new) written after FAILED without a reset (§2.1.1)")
                return nil
            }
            // §2.1.1: the driver MUST NOT clear a device status bit.
            if !new.isSuperset(of: s.status.subtracting(.deviceNeedsReset)) {
                violation("status \(new) clears bits of \(s.status) (§2.1.1)")
                return nil
            }
            if new.contains(.driver) && !new.contains(.acknowledge) {
                violation("DRIVER set without ACKNOWLEDGE (§3.1.1)")
                return nil
            }
            // DEVICE_NEEDS_RESET is the device's: it stays until a reset, whatever the driver writes.
            let sticky = s.status.intersection(.deviceNeedsReset)
            if new.contains(.featuresOK) && !s.status.contains(.featuresOK) {
                guard new.contains(.driver) else {
                    violation("FEATURES_OK set before DRIVER (§3.1.1)")
                    return nil
                }
                // §3.1.1 step 5-6: the device refuses FEATURES_OK for a subset it cannot support.
                let ok = s.driverFeatures.isSubset(of: model.offeredFeatures)
                    && s.driverFeatures.contains(.version1) && !s.faults.refuseFeaturesOK
                if !ok {
                    s.status = new.subtracting([.featuresOK, .driverOK]).union(sticky)
                    return nil
                }
            }
            if new.contains(.driverOK) && !new.contains(.featuresOK) {
                violation("DRIVER_OK set before FEATURES_OK (§3.1.1)")
                return nil
            }
            let becameLive = new.contains(.driverOK) && !s.status.contains(.driverOK)
            s.status = new.union(sticky)
            return becameLive ? s.worker : nil
        }
        kick?.kick()
    }

    func writeDriverFeatures(_ features: Features) {
        state.withLock { s in
            // §3.1.1 step 4: features are written after DRIVER and before FEATURES_OK, and only then.
            guard s.status.contains(.driver), !s.status.contains(.featuresOK), !s.status.contains(.failed) else {
                s.record("driver features written in status \(s.status) (§3.1.1)")
                return
            }
            s.driverFeatures = features
        }
    }

    func configGeneration() -> UInt8 {
        state.withLock { s in
            if s.faults.unstableConfigGeneration { s.configGeneration &+= 1 }
            return s.configGeneration
        }
    }

    // MARK: Queue setup (spec 4.1.5.1.3, 2.7, 2.6.1)

    func enableQueue(_ index: Int, size: UInt16, rings: QueueRings, vector: UInt16?) throws(VirtioError) -> Doorbell {
        try state.withLock { s throws(VirtioError) -> Doorbell in
            func refuse(_ why: String) -> VirtioError {
                s.record("queue \(index): \(why)")
                return .queueSetup(queue: index, why)
            }
            guard model.queueMaxSizes.indices.contains(index) else {
                throw refuse("no such queue: the device has \(model.queueMaxSizes.count) (§4.1.5.1.3)")
            }
            guard s.pendingResetReads == nil else { throw refuse("enabled before the reset read back 0 (§4.1.4.3.2)") }
            guard !s.status.contains(.failed) else { throw refuse("enabled after FAILED without a reset (§2.1.1)") }
            guard s.status.contains(.featuresOK) else { throw refuse("enabled before FEATURES_OK (§3.1.1 step 7)") }
            if s.status.contains(.driverOK) && !s.driverFeatures.contains(.ringReset) {
                throw refuse("enabled after DRIVER_OK without VIRTIO_F_RING_RESET (§3.1.1, §2.6.1)")
            }
            guard s.queues[index] == nil else {
                throw refuse("already enabled: only a device or queue reset disables it (§4.1.4.3.2)")
            }
            let packed = s.driverFeatures.contains(.ringPacked)
            if packed && model.type == .net {
                // An emulator limitation, not a driver fault: no violation.
                throw .queueSetup(queue: index, "VIRTIO_F_RING_PACKED negotiated; the emulator's virtio-net receive path uses split virtqueues only")
            }
            let maximum = model.queueMaxSizes[index]
            guard maximum != 0 else { throw refuse("unavailable: queue_size reads 0 (§4.1.4.3.2)") }
            guard size != 0 else { throw refuse("size 0 (§2.7, §2.8)") }
            guard size <= maximum else { throw refuse("size \(size) exceeds the maximum \(maximum) (§4.1.4.3)") }
            // §2.8: a packed ring's size need not be a power of 2; a split ring's must (§2.7).
            guard packed || size & (size &- 1) == 0 else { throw refuse("size \(size) is not a power of 2, as a split ring needs (§2.7)") }

            // §2.7.1 / §2.8.10.1: each part aligned (split: descriptor table 16, available ring 2,
            // used ring 4; packed: descriptor ring 16, each event structure 4) and, as for any
            // DMA, inside memory the device can reach.
            let n = Int(size)
            let parts: [(String, UInt64, Int, UInt64)] = packed ? [
                ("descriptor ring", rings.descriptors, PackedQueueLayout.ringSize(n), UInt64(PackedQueueLayout.descriptorAlignment)),
                ("driver event suppression", rings.driver, PackedQueueLayout.eventSize, UInt64(PackedQueueLayout.eventAlignment)),
                ("device event suppression", rings.device, PackedQueueLayout.eventSize, UInt64(PackedQueueLayout.eventAlignment)),
            ] : [
                ("descriptor table", rings.descriptors, SplitQueueLayout.descriptorTableSize(n), UInt64(SplitQueueLayout.descriptorAlignment)),
                ("available ring", rings.driver, SplitQueueLayout.availSize(n), UInt64(SplitQueueLayout.availAlignment)),
                ("used ring", rings.device, SplitQueueLayout.usedSize(n), UInt64(SplitQueueLayout.usedAlignment)),
            ]
            var pointers: [UnsafeMutableRawPointer] = []
            for (name, address, length, alignment) in parts {
                guard address % alignment == 0 else {
                    throw refuse("\(name) at 0x\(hex(address)) is not \(alignment)-byte aligned (\(packed ? "§2.8.10.1" : "§2.7.1"))")
                }
                guard let p = memory.translate(address, length) else {
                    throw refuse("\(name): DMA to unmapped address 0x\(hex(address)) (\(length) bytes) outside device memory \(memoryRange)")
                }
                pointers.append(p)
            }
            for i in 0..<parts.count {
                for j in (i + 1)..<parts.count {
                    let a = parts[i], b = parts[j]
                    if a.1 < b.1 + UInt64(b.2) && b.1 < a.1 + UInt64(a.2) {
                        throw refuse("\(a.0) and \(b.0) overlap (§2.7)")
                    }
                }
            }
            if packed {
                // §2.8.13: the descriptor ring is zero-initialized, so nothing in it is available yet.
                for i in 0..<n where Ring.load16(pointers[0] + PackedQueueLayout.descriptor(i) + PackedQueueLayout.descriptorFlags) != 0 {
                    throw refuse("descriptor ring not zero-initialized: descriptor \(i) has flags set (§2.8.13)")
                }
            } else {
                // §2.7.10.1: the driver MUST initialize flags in the used ring to 0.
                guard Ring.load16(pointers[2] + SplitQueueLayout.usedFlags) == 0 else { throw refuse("used ring flags not initialised to 0 (§2.7.10.1)") }
            }

            var routed: Int?
            if let vector, vector != noMSIXVector {
                // Like a device answering NO_VECTOR (§4.1.5.1.3): refused, not a driver violation.
                guard Int(vector) < s.vectors.count else {
                    throw .queueSetup(queue: index, "MSI-X vector \(vector) refused: \(s.vectors.count) vectors enabled")
                }
                routed = Int(vector)
            }
            notify.clear(index)
            s.queueEnableWrites += 1
            s.queues[index] = packed
                ? PackedQueueDevice(index: index, size: size, ring: pointers[0], driverEvent: pointers[1],
                                    deviceEvent: pointers[2], vector: routed)
                : SplitQueueDevice(index: index, size: size, descriptors: pointers[0], avail: pointers[1],
                                   used: pointers[2], vector: routed)
            s.statistics[index] = .init()
            if let worker = s.worker {
                worker.kick()
            } else {
                s.worker = Worker.start(self)
            }
            return Doorbell(address: notify.address(index), value: UInt16(index))
        }
    }

    /// Queue `index`'s registers as a driver reads them back (§4.1.4.3): an enabled queue reports
    /// what it was enabled with (ring addresses recovered from the translated pointers); one not
    /// enabled reports its maximum size, no rings and NO_VECTOR. nil if there is no such queue.
    func queueState(_ index: Int) -> QueueState? {
        guard model.queueMaxSizes.indices.contains(index) else { return nil }
        let doorbell = Doorbell(address: notify.address(index), value: UInt16(index))
        return state.withLock { s -> QueueState in
            guard let q = s.queues[index] else {
                return QueueState(size: model.queueMaxSizes[index], enabled: false,
                                  rings: QueueRings(descriptors: 0, driver: 0, device: 0),
                                  msixVector: noMSIXVector, doorbell: doorbell)
            }
            func bus(_ p: UnsafeMutableRawPointer) -> UInt64 { memory.busAddress(ofOffset: p - memory.cpuBase) }
            let rings: QueueRings
            if let packed = q as? PackedQueueDevice {
                rings = QueueRings(descriptors: bus(packed.ring), driver: bus(packed.driverEvent), device: bus(packed.deviceEvent))
            } else if let split = q as? SplitQueueDevice {
                rings = QueueRings(descriptors: bus(split.descriptors), driver: bus(split.avail), device: bus(split.used))
            } else {
                rings = QueueRings(descriptors: 0, driver: 0, device: 0)
            }
            return QueueState(size: q.size, enabled: true, rings: rings,
                              msixVector: q.vector.map { UInt16($0) } ?? noMSIXVector, doorbell: doorbell)
        }
    }

    func resetQueue(_ index: Int, timeout: Duration) throws(VirtioError) {
        let completes = try state.withLock { s throws(VirtioError) -> Bool in
            guard s.driverFeatures.contains(.ringReset), s.status.contains(.featuresOK) else {
                s.record("queue \(index): queue reset without VIRTIO_F_RING_RESET negotiated (§2.6.1, §4.1.4.3)")
                throw .queueSetup(queue: index, "per-queue reset needs VIRTIO_F_RING_RESET, which was not negotiated")
            }
            guard model.queueMaxSizes.indices.contains(index) else {
                s.record("queue \(index): reset of a queue that does not exist (§4.1.4.3)")
                throw .queueSetup(queue: index, "no such queue: the device has \(model.queueMaxSizes.count)")
            }
            if s.faults.queueResetNeverCompletes { return false }
            // §2.6.1.1: the device executes nothing more from this queue and forgets its state.
            s.queues[index] = nil
            notify.clear(index)
            return true
        }
        if !completes {
            sleep(timeout)
            throw .brokenQueue(queue: index, "queue_reset still reads 1 \(timeout) after the reset was written")
        }
    }

    // MARK: Interrupts (spec 4.1.4.5, 4.1.5.4)

    func enableInterrupts(count: Int) throws(VirtioError) -> [Int32] {
        guard count >= 1, count <= model.vectorCount else {
            throw .interrupts("\(count) vectors asked, the device has \(model.vectorCount) MSI-X vectors")
        }
        var vectors: [InterruptVector] = []
        for _ in 0..<count {
            do { vectors.append(try InterruptVector()) } catch {
                throw .interrupts("eventfd for vector \(vectors.count): \(error)")
            }
        }
        let raws = vectors.map(\.raw)
        state.withLock { s in s.vectors = vectors }
        return raws
    }

    func disableInterrupts() {
        let old = state.withLock { s -> [InterruptVector] in
            defer { s.vectors = [] }
            return s.vectors
        }
        _ = old  // closed here, outside the lock
    }

    func setConfigVector(_ vector: UInt16?) throws(VirtioError) {
        try state.withLock { s throws(VirtioError) in
            s.configVectorWrites += 1
            guard let vector, vector != noMSIXVector else {
                s.configVector = nil
                return
            }
            guard Int(vector) < s.vectors.count else {
                throw .interrupts("configuration vector \(vector) refused: \(s.vectors.count) vectors enabled")
            }
            s.configVector = Int(vector)
        }
    }

    func readISR() -> UInt8 {
        state.withLock { s in
            defer { s.isr = 0 }
            return s.isr
        }
    }

    /// A used buffer notification: ISR bit 0, then the queue's vector if it has one.
    func queueInterrupt(_ q: QueueDevice, _ s: inout State) {
        s.isr |= 1
        s.statistics[q.index].interrupts += 1
        if let v = q.vector, v < s.vectors.count { s.vectors[v].signal() }
    }

    /// A configuration change notification: ISR bit 1, then the configuration vector.
    func configInterrupt(_ s: inout State) {
        s.isr |= 2
        if let v = s.configVector, v < s.vectors.count { s.vectors[v].signal() }
    }

    /// The device enters an error state (spec 2.1.2): DEVICE_NEEDS_RESET, and a configuration
    /// change notification if DRIVER_OK is set. It stops using every queue until a reset.
    func needsReset(_ s: inout State) {
        guard !s.status.contains(.deviceNeedsReset) else { return }
        s.status.insert(.deviceNeedsReset)
        if s.status.contains(.driverOK) { configInterrupt(&s) }
    }

    var memoryRange: String {
        guard let segments = memory.segments else {
            return "0x\(hex(memory.deviceBase))-0x\(hex(memory.deviceBase + UInt64(memory.size) - 1))"
        }
        return "\(segments.count) segments of \(segments.size) bytes from 0x\(hex(memory.deviceBase))"
    }
}

func hex(_ v: UInt64) -> String { String(v, radix: 16) }

func sleep(_ d: Duration) {
    let (seconds, attoseconds) = d.components
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}
