import Testing
import Virtio
import VirtioEmulator
#if canImport(Glibc)
import Glibc
#endif

@Suite("reset stops the device (spec 2.4, 4.1.4.3.2, 2.6.1)")
struct ResetTests {
    @Test func nothingIsTouchedAfterTheResetReadsZero() throws {
        var model = EmulatedDevice.Model.rng
        model.pollsRings = true  // the device would even pick buffers up unnotified
        let r = try Rig(model)
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1))
        try Lifecycle.reset(r.transport)
        #expect(!r.device.isWorkerRunning && !r.device.isQueueEnabled(0))
        let used = bytes(r.ring.used)
        let b = try r.buffer(8)
        r.ring.submit([.writable(b)])
        settle()
        #expect(bytes(r.ring.used) == used)
        #expect(bytes(b).allSatisfy { $0 == 0 })
        #expect(r.device.driverFeatures == [])
        #expect(r.transport.readISR() == 0)
    }

    @Test func aSlowResetStillGuaranteesNothingAfterZero() throws {
        let r = try Rig(.rng)
        r.device.faults.resetLatencyReads = 50
        // Keep the queue busy while the reset is pending.
        for _ in 0..<4 { r.ring.submit([.writable(try r.buffer(8))]) }
        try Lifecycle.reset(r.transport)
        let snapshot = bytes(r.ring.used)
        settle()
        #expect(bytes(r.ring.used) == snapshot)
        #expect(!r.device.isWorkerRunning)
    }

    @Test func renegotiateAndRebuildAfterReset() throws {
        let r = try Rig(.rng)
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1))
        try Lifecycle.reset(r.transport)
        r.dma.reset()
        _ = try Lifecycle.negotiate(r.transport, wanted: [.ringEventIdx])
        let ring = try TestRing(r.dma, size: 8)
        ring.doorbell = try r.transport.enableQueue(0, size: 8, rings: ring.rings, vector: 0)
        try Lifecycle.driverOK(r.transport)
        ring.submit([.writable(try r.buffer(8))])
        #expect(ring.waitUsed(1))
        #expect(r.device.violations.isEmpty)
    }

    @Test func perQueueReset() throws {
        let r = try Rig(.blk(capacitySectors: 64, queues: 2), wanted: [.ringReset])
        try r.transport.resetQueue(0, timeout: .seconds(1))
        #expect(!r.device.isQueueEnabled(0))
        let io = try BlockIO(r, type: BlockType.flush, sector: 0)
        r.ring.submit([.readable(io.header), .writable(io.status)])
        settle()
        #expect(r.ring.usedIdx == 0)  // §2.6.1.1: nothing executed from a reset queue
        // Re-enable after DRIVER_OK: allowed with RING_RESET, state starts over.
        let ring = try TestRing(r.dma, size: 64)
        ring.doorbell = try r.transport.enableQueue(0, size: 64, rings: ring.rings, vector: 0)
        ring.submit([.readable(io.header), .writable(io.status)])
        #expect(ring.waitUsed(1))
        #expect(r.device.violations.isEmpty)
    }

    @Test func perQueueResetNeedsRingReset() throws {
        let r = try Rig(.rng)
        #expect(throws: VirtioError.self) { try r.transport.resetQueue(0, timeout: .seconds(1)) }
        #expect(r.device.hasViolation("without VIRTIO_F_RING_RESET"))
        #expect(r.device.isQueueEnabled(0))
    }

    @Test func thousandCyclesLeakNoThreadsOrDescriptors() throws {
        var model = EmulatedDevice.Model.rng
        model.memorySize = 64 << 10
        func cycle() throws {
            let r = try Rig(model)
            r.ring.submit([.writable(try r.buffer(16))])
            #expect(r.ring.waitUsed(1))
            try Lifecycle.reset(r.transport)
        }
        try cycle()  // warm up lazily created process state
        let fds = countEntries("/proc/self/fd")
        let tasks = countEntries("/proc/self/task")
        for i in 0..<1000 {
            // Every other device goes away with its thread still running (deinit joins it).
            if i % 2 == 0 {
                try cycle()
            } else {
                let r = try Rig(model)
                r.ring.submit([.writable(try r.buffer(16))])
                #expect(r.ring.waitUsed(1))
            }
        }
        // Other suites run in parallel in this process: allow their few, not our thousand.
        #expect(countEntries("/proc/self/fd") < fds + 32)
        #expect(countEntries("/proc/self/task") < tasks + 32)
    }
}
