import Testing
import Foundation
import Virtio
import VirtioDevices
import VirtioEmulator

@Suite("virtio-blk driver against the emulator", .serialized)
struct BlockDeviceTests {
    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    @Test(arguments: CompletionMode.allCases, RingFormat.allCases)
    func writesReadsFlushesAndIdentifies(_ mode: CompletionMode, _ format: RingFormat) throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 8192).offering(format)
        model.block.serial = "emu-serial-1"
        let device = EmulatedDevice(model: model)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: mode)
        #expect(RingFormat(blk.negotiation.accepted) == format)
        let data = pattern(300 * 1024, seed: 5)
        try data.withUnsafeBytes { try blk.write(sector: 100, from: $0) }
        try blk.flush()
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 100, into: $0) }
        #expect(back == data)
        #expect(device.readDisk(offset: 100 * 512, count: 1024) == Array(data.prefix(1024)))
        #expect(try blk.identify() == "emu-serial-1")
        #expect(blk.config.capacitySectors == 8192)
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    /// QEMU's packed used descriptors carry the length without WRITE (found by the HIL matrix:
    /// every read failed): the driver takes the length of a buffer with writable bytes anyway.
    @Test(arguments: CompletionMode.allCases)
    func packedUsedDescriptorsAsQEMUWritesThem(_ mode: CompletionMode) throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 4096).offering(.packed)
        model.packedUsedWithoutWrite = true
        let device = EmulatedDevice(model: model)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: mode)
        let data = pattern(64 * 1024, seed: 3)
        try data.withUnsafeBytes { try blk.write(sector: 64, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 64, into: $0) }
        #expect(back == data)
        _ = try blk.shutdown()
        let rngModel = { var m = EmulatedDevice.Model.rng(seed: 4).offering(.packed); m.packedUsedWithoutWrite = true; return m }()
        let rngDevice = EmulatedDevice(model: rngModel)
        var rng = try EntropyDevice(transport: EmulatedTransport(device: rngDevice), mode: mode)
        var n = 0
        try rng.read(10_000) { n += $0.count }
        #expect(n == 10_000)
        _ = try rng.shutdown()
        #expect(device.violations.isEmpty && rngDevice.violations.isEmpty)
    }

    /// `--ring`: split keeps to the split ring where packed is offered; packed is refused by name
    /// where it is not, and the device is left resettable (a fresh start works).
    @Test func theRingPreferenceIsHonouredOrRefusedByName() throws {
        let offering = EmulatedDevice(model: .blk(capacitySectors: 4096).offering(.packed))
        var split = try BlockDevice(transport: EmulatedTransport(device: offering), ring: .split)
        #expect(RingFormat(split.negotiation.accepted) == .split)
        _ = try split.shutdown()
        let plain = EmulatedDevice(model: .blk(capacitySectors: 4096))
        #expect { _ = try BlockDevice(transport: EmulatedTransport(device: plain), ring: .packed) } throws: {
            "\($0)".contains("RING_PACKED")
        }
        var again = try BlockDevice(transport: EmulatedTransport(device: plain), ring: .auto)
        #expect(RingFormat(again.negotiation.accepted) == .split)
        _ = try again.shutdown()
        #expect(offering.violations.isEmpty && plain.violations.isEmpty, "\(offering.violations) \(plain.violations)")
    }

    @Test(arguments: RingFormat.allCases)
    func requestsAreSplitAtSegMaxAndSizeMax(_ format: RingFormat) throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 4096).offering(format)
        model.block.segMax = 2
        model.block.sizeMax = 4096
        model.offeredFeatures.insert(Features(bit: 1))  // SIZE_MAX
        let device = EmulatedDevice(model: model)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device))
        #expect(blk.queue.maxTransfer == 8192)  // 2 segments of 4 KiB
        let data = pattern(40 * 1024, seed: 9)
        try data.withUnsafeBytes { try blk.write(sector: 7, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 7, into: $0) }
        #expect(back == data)
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func rangeAndReadOnlyAreCheckedBeforeTheDeviceSeesAnything() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 100, readOnly: true))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device))
        var buffer = [UInt8](repeating: 0, count: 1024)
        #expect(throws: BlockError.self) { try buffer.withUnsafeMutableBytes { try blk.read(sector: 99, into: $0) } }
        #expect(throws: BlockError.readOnly) { try buffer.withUnsafeBytes { try blk.write(sector: 0, from: $0) } }
        try buffer.withUnsafeMutableBytes { try blk.read(sector: 98, into: $0) }
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func ioNotCoveringWholeLogicalBlocksIsRefusedByName() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 4096)
        model.block.blockSize = 4096  // QEMU's logical_block_size=4096
        let device = EmulatedDevice(model: model)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device))
        #expect(blk.config.blockSize == 4096)
        let sector = pattern(512, seed: 3), block = pattern(4096, seed: 4)
        for (first, data) in [(UInt64(1), sector), (UInt64(0), sector), (UInt64(4), block)] {
            do {
                try data.withUnsafeBytes { try blk.write(sector: first, from: $0) }
                Issue.record("a write of \(data.count) bytes at sector \(first) went to a device with 4096-byte blocks")
            } catch BlockError.outOfRange(let why) {
                #expect(why.contains("logical blocks are 4096 bytes") && why.contains("multiple of 8 sectors"), "\(why)")
            }
        }
        #expect(device.readDisk(offset: 0, count: 8192) == [UInt8](repeating: 0, count: 8192), "nothing reached the disk")
        try block.withUnsafeBytes { try blk.write(sector: 8, from: $0) }
        var back = [UInt8](repeating: 0, count: 4096)
        try back.withUnsafeMutableBytes { try blk.read(sector: 8, into: $0) }
        #expect(back == block)
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test(arguments: RingFormat.allCases)
    func queuesLargerThanTheDriverNeedsAreProgrammedSmaller(_ format: RingFormat) throws {
        // QEMU num-queues=4,queue-size=1024: the driver writes queue_size 256 (§4.1.4.3) and
        // sizes its DMA memory for that, unless told otherwise.
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192, queues: 4, queueSize: 1024).offering(format))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device))
        #expect(device.queueState(0)?.size == BlockDevice<EmulatedTransport>.defaultQueueSize)
        let data = pattern(64 * 1024, seed: 8)
        try data.withUnsafeBytes { try blk.write(sector: 16, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 16, into: $0) }
        #expect(back == data)
        _ = try blk.shutdown()
        var small = try BlockDevice(transport: EmulatedTransport(device: device), queueSize: 64)
        #expect(device.queueState(0)?.size == 64)
        _ = try small.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test(arguments: [(UInt16(1024), 4, 4096), (UInt16(256), 1, 128 << 10), (UInt16(32768), 1, 512)])
    func memoryBoundHoldsWhatTheQueuesTake(size: UInt16, queues: Int, maxTransfer: Int) throws {
        // The arena `bench blk` opens for its queues: enough for every queue at the size asked
        // (here up to QEMU's queue-size=1024 with num-queues=4, and the spec's 32768), and not
        // much more than the queues take.
        let bound = BlockQueue.memoryBound(size: size, maxTransfer: maxTransfer)
        var model = EmulatedDevice.Model.blk(capacitySectors: 8192, queues: queues, queueSize: size)
        model.memorySize = queues * bound
        let device = EmulatedDevice(model: model)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), maxTransfer: maxTransfer, queueSize: size, queues: queues)
        #expect(device.queueState(0)?.size == size)
        #expect(blk.queue.slots == Int(size), "indirect descriptors: one request per entry")
        #expect(device.dma.used <= queues * bound && device.dma.used * 10 >= queues * bound * 8,
                "used \(device.dma.used) of the bound \(queues * bound)")
        let data = pattern(min(maxTransfer, 4096), seed: 9)
        try data.withUnsafeBytes { try blk.write(sector: 8, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 8, into: $0) }
        #expect(back == data)
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func theEmulatorFailsIONotCoveringWholeLogicalBlocksAsQEMUDoes() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 4096)
        model.block.blockSize = 4096
        let device = EmulatedDevice(model: model)
        // A driver that takes blk_size for 512 (it did not negotiate BLK_SIZE) sends 512 bytes.
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), wanted: BlockDevice<EmulatedTransport>.supported.subtracting(.blkBlockSize))
        #expect(blk.config.blockSize == 512)
        let data = pattern(512, seed: 6)
        #expect(throws: BlockError.ioError(type: "write", sector: 1)) { try data.withUnsafeBytes { try blk.write(sector: 1, from: $0) } }
        _ = try blk.shutdown()
    }

    @Test(arguments: [UInt64(0), UInt64.max / 256])
    func absurdCapacitiesAreRefused(_ capacity: UInt64) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: capacity))
        #expect { _ = try BlockDevice(transport: EmulatedTransport(device: device)) } throws: { "\($0)".contains("capacity") }
    }

    /// qemu-storage-daemon's vhost-user-blk offers SIZE_MAX with size_max 0 (HIL
    /// `vhost-user-blk.sh`): read as Linux does, 4 KiB segments; a limit below a sector is refused.
    @Test func sizeMaxZeroMeansPageSegmentsAndBelowASectorIsRefused() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 4096)
        model.block.sizeMax = 0
        model.block.segMax = 4
        model.offeredFeatures.insert(Features(bit: 1))  // SIZE_MAX
        let device = EmulatedDevice(model: model)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device))
        #expect(blk.config.sizeMax == 4096 && blk.queue.maxTransfer == 16384)  // 4 segments of 4 KiB
        let data = (0..<40960).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try data.withUnsafeBytes { try blk.write(sector: 3, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 3, into: $0) }
        #expect(back == data)
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
        model.block.sizeMax = 511
        #expect { _ = try BlockDevice(transport: EmulatedTransport(device: EmulatedDevice(model: model))) } throws: {
            "\($0)".contains("size_max 511 is below one sector")
        }
    }

    @Test func segMaxZeroIsRefused() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 100)
        model.block.segMax = 0
        #expect { _ = try BlockDevice(transport: EmulatedTransport(device: EmulatedDevice(model: model))) } throws: {
            "\($0)".contains("seg_max 0")
        }
    }

    @Test(arguments: RingFormat.allCases)
    func resetHandsBackEveryRequestInFlight(_ format: RingFormat) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 4096).offering(format))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), completionTimeout: .milliseconds(200))
        #expect(RingFormat(blk.negotiation.accepted) == format)
        var faults = EmulatedDevice.Faults()
        faults.stopCompleting = true
        device.faults = faults
        var slots: [Int] = []
        for i in 0..<5 {
            guard let slot = blk.queue.acquire() else { Issue.record("no free slot"); return }
            _ = try blk.queue.submit(.read, sector: UInt64(i * 8), bytes: 4096, slot: slot)
            slots.append(slot)
        }
        blk.queue.publish()
        #expect(throws: VirtioError.self) { try blk.queue.wait() }
        // The seed's rule: reset first, then the device uses none of them, then reclaim.
        try Lifecycle.reset(blk.transport)
        var cancelled: [Int] = []
        blk.queue.cancelAll { cancelled.append($0) }
        #expect(cancelled.sorted() == slots.sorted())
        #expect(blk.queue.inFlight == 0)
    }

    @Test(arguments: RingFormat.allCases)
    func multiqueueGivesEachWorkerItsOwnQueue(_ format: RingFormat) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192, queues: 3).offering(format))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: .msix, maxTransfer: 16 << 10, queues: 3)
        #expect(blk.negotiation.accepted.contains(.blkMultiQueue))
        #expect(blk.workerQueues.count == 2 && blk.queue.index == 0)
        #expect(RingFormat(blk.negotiation.accepted) == format)
        // Each worker writes its own sectors through its own queue, on its own thread.
        let threads = blk.workerQueues.enumerated().map { (i, worker) in
            JoinedThread {
                guard let slot = worker.queue.acquire() else { return }
                let buffer = worker.queue.buffer(slot)
                for j in 0..<4096 { buffer[j] = UInt8(i + 1) }
                _ = try? worker.queue.submit(.write, sector: UInt64(1000 + 8 * i), bytes: 4096, slot: slot)
                worker.queue.publish()
                while worker.queue.inFlight > 0 {
                    try? worker.queue.wait()
                    _ = try? worker.queue.complete { _, _, _ in }
                }
                worker.queue.release(slot)
            }
        }
        threads.forEach { $0.join() }
        var back = [UInt8](repeating: 0, count: 8192)
        try back.withUnsafeMutableBytes { try blk.read(sector: 1000, into: $0) }
        #expect(back[0..<4096].allSatisfy { $0 == 1 } && back[4096...].allSatisfy { $0 == 2 })
        for i in 0..<3 { #expect(device.statistics(queue: i).completed >= 1, "queue \(i) did no work") }
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
