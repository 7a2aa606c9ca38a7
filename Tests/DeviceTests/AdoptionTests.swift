import Testing
import Foundation
import Glibc
import Virtio
import VirtioDevices
import VirtioEmulator

/// Live upgrade: a second driver takes over a running device from the first one without a reset
/// (`init(adopting:)`), through a second transport on the same emulated device and DMA memory, as
/// a successor process does with the handed-over VFIO fds and memfd.
@Suite("adopting a running device without a reset", .serialized)
struct AdoptionTests {
    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ Int(seed)) } }

    /// What a previous driver process leaves behind: a running blk device (set up in `mode`), some
    /// data written, the queues' snapshots and the accepted features.
    struct Handover {
        let device: EmulatedDevice
        let features: Features
        var snapshots: [QueueSnapshot]
    }

    func runningBlk(queues: Int = 1, mode: CompletionMode = .msix, maxTransfer: Int = 128 << 10,
                    queueSize: UInt16? = nil) throws -> Handover {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192, queues: queues))
        var old = try BlockDevice(transport: EmulatedTransport(device: device), mode: mode, maxTransfer: maxTransfer,
                                  queueSize: queueSize, queues: queues)
        let data = pattern(64 * 1024, seed: 1)
        try data.withUnsafeBytes { try old.write(sector: 0, from: $0) }
        let snapshots = try old.queueSnapshots()
        let features = old.negotiation.accepted
        _ = old.detach()
        return Handover(device: device, features: features, snapshots: snapshots)
    }

    /// The description of the error adoption fails with, or nil if it succeeded.
    func refusal(_ h: Handover, features: Features? = nil, mode: CompletionMode = .poll, maxTransfer: Int = 128 << 10,
                 queueSize: UInt16? = nil) -> String? {
        do {
            let blk = try BlockDevice(adopting: EmulatedTransport(device: h.device), features: features ?? h.features,
                                      queues: h.snapshots, mode: mode, maxTransfer: maxTransfer, queueSize: queueSize)
            _ = blk.detach()
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test func adoptingASplitQueueWritesNothingAndChecksTheIndices() throws {
        let size = 1 << 16
        let block = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        let bell = UnsafeMutablePointer<UInt16>.allocate(capacity: 1)
        defer { block.deallocate(); bell.deallocate() }
        for i in 0..<size { block.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ 1), toByteOffset: i, as: UInt8.self) }
        let arena = DMAArena(memory: DMASlice(pointer: block, deviceAddress: 0x10_0000, size: size))
        let memory = try SplitQueueMemory(arena: arena, size: 16, indirectEntries: 4, zeroed: false)
        memory.used.pointer.storeBytes(of: UInt16(0x1234).littleEndian, toByteOffset: SplitQueueLayout.usedIndex, as: UInt16.self)
        let before = Array(UnsafeRawBufferPointer(start: block, count: size))
        let doorbell = Doorbell(address: UnsafeMutableRawPointer(bell), value: 3)
        let queue = try SplitQueue(adopting: memory, features: [.ringEventIdx, .ringIndirectDesc], doorbell: doorbell,
                                   index: 3, availIndex: 0x1234, usedIndex: 0x1234)
        #expect(queue.isIdle && queue.freeCount == 16)
        #expect(queue.snapshot == QueueSnapshot(index: 3, size: 16, rings: memory.rings, availIndex: 0x1234, usedIndex: 0x1234))
        #expect(Array(UnsafeRawBufferPointer(start: block, count: size)) == before, "adoption wrote to ring memory")
        #expect { _ = try SplitQueue(adopting: memory, features: [], doorbell: doorbell, index: 3, availIndex: 0x1235, usedIndex: 0x1234) }
            throws: { "\($0)".contains("queue 3: not idle: available index 4661, used index 4660") }
        #expect { _ = try SplitQueue(adopting: memory, features: [], doorbell: doorbell, index: 3, availIndex: 0x1233, usedIndex: 0x1233) }
            throws: { "\($0)".contains("queue 3: used idx is 4660 in the ring, expected 4659") }
    }

    @Test(arguments: CompletionMode.allCases)
    func blkContinuesWithoutAReset(_ mode: CompletionMode) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        var old = try BlockDevice(transport: EmulatedTransport(device: device), mode: .msix)
        let first = pattern(300 * 1024, seed: 3)
        try first.withUnsafeBytes { try old.write(sector: 10, from: $0) }
        let snapshots = try old.queueSnapshots()
        #expect(snapshots.count == 1 && snapshots[0].availIndex == snapshots[0].usedIndex && snapshots[0].usedIndex > 0)
        let features = old.negotiation.accepted
        let oldTransport = old.detach()
        let resets = device.resetCount, enables = device.queueEnableWrites, configVectors = device.configVectorWrites

        var blk = try BlockDevice(adopting: EmulatedTransport(sharing: oldTransport), features: features,
                                  queues: snapshots, mode: mode)
        #expect(blk.negotiation.accepted == features && blk.negotiation.transitions.isEmpty)
        var back = [UInt8](repeating: 0, count: first.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 10, into: $0) }
        #expect(back == first)
        let second = pattern(200 * 1024, seed: 9)
        try second.withUnsafeBytes { try blk.write(sector: 2000, from: $0) }
        try blk.flush()
        #expect(device.readDisk(offset: 2000 * 512, count: second.count) == second)
        #expect(device.readDisk(offset: 10 * 512, count: first.count) == first)
        // The indices went on from the handed-over ones.
        #expect(try blk.queue.snapshot().usedIndex &- snapshots[0].usedIndex > 0)
        #expect(device.resetCount == resets, "adoption reset the device")
        #expect(device.queueEnableWrites == enables, "adoption wrote queue_enable again")
        #expect(device.configVectorWrites == configVectors, "adoption wrote config_msix_vector again")
        #expect(device.violations.isEmpty, "\(device.violations)")
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func fiftyHandoversAlternatingPollAndMSIXKeepDataAndResources() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192, queues: 2))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: .msix, maxTransfer: 64 << 10, queues: 2)
        let resets = device.resetCount, enables = device.queueEnableWrites
        var before = ProcessResources.now()
        // The device's own count is exact whatever else runs; the process-wide one only when no
        // other test runs (tests in parallel start and stop their devices' threads meanwhile).
        #expect(device.liveWorkerThreads == 1)
        let threads = EmulatedDevice.liveWorkerThreads
        for round in 0..<50 {
            if round == 10 { before = ProcessResources.now() }
            let data = pattern(8192, seed: UInt8(round))
            try data.withUnsafeBytes { try blk.write(sector: UInt64(round * 16), from: $0) }
            let snapshots = try blk.queueSnapshots()
            let features = blk.negotiation.accepted
            let transport = blk.detach()
            blk = try BlockDevice(adopting: EmulatedTransport(sharing: transport), features: features, queues: snapshots,
                                  mode: round % 2 == 0 ? .poll : .msix, maxTransfer: 64 << 10)
            #expect(blk.workerQueues.count == 1)
            var back = [UInt8](repeating: 0, count: data.count)
            try back.withUnsafeMutableBytes { try blk.read(sector: UInt64(round * 16), into: $0) }
            #expect(back == data, "round \(round)")
            #expect(device.readDisk(offset: UInt64(round * 16 * 512), count: data.count) == data)
        }
        #expect(device.resetCount == resets && device.queueEnableWrites == enables)
        #expect(device.liveWorkerThreads == 1, "adoption started or lost the device's thread")
        if getenv("VIRTIO_VFIO_ISOLATED") != nil {
            #expect(EmulatedDevice.liveWorkerThreads == threads)
            let after = ProcessResources.now()
            #expect(after.descriptors <= before.descriptors && after.threads <= before.threads, "before \(before), after \(after)")
        }
        #expect(device.violations.isEmpty, "\(device.violations)")
        _ = try blk.shutdown()
    }

    @Test func differentFeaturesAreRefused() throws {
        let h = try runningBlk()
        let message = refusal(h, features: h.features.subtracting(.ringEventIdx))
        #expect(message?.contains("the device runs with features") == true, "\(message ?? "adopted")")
        #expect(h.device.violations.isEmpty && h.device.resetCount == 1)
    }

    @Test func aMovedRingIsRefused() throws {
        var h = try runningBlk()
        h.snapshots[0].rings.driver += 64
        let message = refusal(h)
        #expect(message?.contains("queue 0: rings are at") == true, "\(message ?? "adopted")")
    }

    @Test func aDifferentQueueSizeIsRefused() throws {
        var h = try runningBlk()
        h.snapshots[0].size = 128
        let message = refusal(h)
        #expect(message?.contains("queue_size is 256, the handed-over state says 128") == true, "\(message ?? "adopted")")
    }

    @Test func needsResetIsRefused() throws {
        let h = try runningBlk()
        h.device.setNeedsReset()
        let message = refusal(h)
        #expect(message?.contains("needs a reset") == true, "\(message ?? "adopted")")
    }

    @Test func aResetDeviceIsRefused() throws {
        let h = try runningBlk()
        try Lifecycle.reset(EmulatedTransport(device: h.device))
        let message = refusal(h)
        #expect(message?.contains("status is") == true && message?.contains("was reset") == true, "\(message ?? "adopted")")
    }

    @Test func aUsedIndexPastTheSnapshotIsRefused() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        var old = try BlockDevice(transport: EmulatedTransport(device: device))
        let snapshots = try old.queueSnapshots()
        let features = old.negotiation.accepted
        // The old driver goes on after the snapshot: one more request, completed.
        var sector = [UInt8](repeating: 0, count: 512)
        try sector.withUnsafeMutableBytes { try old.read(sector: 0, into: $0) }
        _ = old.detach()
        do {
            _ = try BlockDevice(adopting: EmulatedTransport(device: device), features: features, queues: snapshots).detach()
            Issue.record("adopted a queue whose used idx moved past the snapshot")
        } catch {
            #expect("\(error)".contains("queue 0: used idx is \(snapshots[0].usedIndex &+ 1) in the ring, expected \(snapshots[0].usedIndex)"), "\(error)")
        }
        #expect(device.violations.isEmpty)
    }

    @Test func aQueueWithRequestsInFlightCannotBeSnapshot() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), completionTimeout: .milliseconds(100))
        var faults = EmulatedDevice.Faults()
        faults.stopCompleting = true
        device.faults = faults
        guard let slot = blk.queue.acquire() else { Issue.record("no slot"); return }
        _ = try blk.queue.submit(.read, sector: 0, bytes: 512, slot: slot)
        blk.queue.publish()
        #expect { _ = try blk.queueSnapshots() } throws: { "\($0)".contains("queue 0: 1 requests in flight") }
        _ = try blk.shutdown()
    }

    @Test func aDifferentLayoutIsRefused() throws {
        // With two queues a larger maxTransfer (more indirect entries, larger slots) moves queue 1.
        let h = try runningBlk(queues: 2, maxTransfer: 32 << 10)
        let message = refusal(h, maxTransfer: 64 << 10)
        #expect(message?.contains("queue 1: this version lays the rings out at") == true, "\(message ?? "adopted")")
        // A layout that does not fit the memory at all.
        let large = refusal(h, maxTransfer: 1 << 20)
        #expect(large?.contains("does not fit") == true, "\(large ?? "adopted")")
        // A smaller queue size than the device runs.
        let sized = refusal(h, maxTransfer: 32 << 10, queueSize: 128)
        #expect(sized?.contains("queue 0: this version would use 128 entries") == true, "\(sized ?? "adopted")")
        // No refusal changed anything: the same handover is still adoptable.
        #expect(refusal(h, maxTransfer: 32 << 10) == nil)
        #expect(h.device.violations.isEmpty && h.device.resetCount == 1)
    }

    @Test func interruptsNeedTheVectorsStillProgrammed() throws {
        let h = try runningBlk(mode: .poll)
        let message = refusal(h, mode: .msix)
        #expect(message?.contains("queue_msix_vector is NO_VECTOR") == true, "\(message ?? "adopted")")
        #expect(refusal(h, mode: .poll) == nil)
    }

    @Test func moreQueuesThanTheDeviceHasAreRefused() throws {
        var h = try runningBlk()
        h.snapshots.append(QueueSnapshot(index: 1, size: 256, rings: h.snapshots[0].rings, availIndex: 0, usedIndex: 0))
        let message = refusal(h)
        #expect(message?.contains("2 queues handed over, the device has 1") == true, "\(message ?? "adopted")")
    }

    @Test(arguments: [CompletionMode.poll, .msix])
    func rngContinuesWithoutAReset(_ mode: CompletionMode) throws {
        let device = EmulatedDevice(model: .rng(seed: 11))
        var old = try EntropyDevice(transport: EmulatedTransport(device: device), wanted: [.ringEventIdx, .ringIndirectDesc], mode: .msix)
        try old.read(10_000) { _ in }
        let snapshot = try old.queueSnapshot()
        #expect(snapshot.availIndex == snapshot.usedIndex && snapshot.usedIndex > 0)
        let features = old.negotiation.accepted
        let transport = old.detach()
        let resets = device.resetCount, enables = device.queueEnableWrites, configVectors = device.configVectorWrites
        var rng = try EntropyDevice(adopting: EmulatedTransport(sharing: transport), features: features, queue: snapshot, mode: mode)
        var bytes: [UInt8] = []
        try rng.read(50_000) { bytes.append(contentsOf: $0) }
        #expect(bytes.count == 50_000 && Set(bytes).count > 200)
        #expect(device.resetCount == resets && device.queueEnableWrites == enables && device.configVectorWrites == configVectors)
        // And once more from the adopted one, with a stale snapshot refused.
        let next = try rng.queueSnapshot()
        _ = rng.detach()
        #expect { _ = try EntropyDevice(adopting: EmulatedTransport(device: device), features: features, queue: snapshot).detach() }
            throws: { "\($0)".contains("queue 0: used idx is \(next.usedIndex) in the ring, expected \(snapshot.usedIndex)") }
        var again = try EntropyDevice(adopting: EmulatedTransport(device: device), features: features, queue: next)
        try again.read(1000) { _ in }
        _ = try again.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
