import Testing
import Virtio
import VirtioEmulator

@Suite("queue setup is checked (spec 4.1.5.1.3, 2.7.1) and DMA is bounded like an IOMMU")
struct QueueSetupTests {
    /// A device negotiated up to FEATURES_OK, with two vectors and rings for queue 0.
    func negotiated(_ model: EmulatedDevice.Model = .rng, wanted: Features = [])
        throws -> (EmulatedDevice, EmulatedTransport, TestRing)
    {
        let d = EmulatedDevice(model: model)
        let t = EmulatedTransport(device: d)
        try Lifecycle.reset(t)
        _ = try Lifecycle.negotiate(t, wanted: wanted)
        _ = try t.enableInterrupts(count: 2)
        return (d, t, try TestRing(t.dma, size: model.queueMaxSizes.first ?? 8))
    }

    func refused(_ body: () throws -> Void) -> VirtioError? {
        do { try body(); return nil } catch { return error as? VirtioError }
    }

    @Test func everyBadSetupIsRefusedAndRecorded() throws {
        let (d, t, ring) = try negotiated()
        let good = ring.rings
        let base = d.memory.deviceAddress
        let end = base + UInt64(d.memory.size)
        var rings = good
        let cases: [(String, Int, UInt16, QueueRings)] = [
            ("no such queue", 1, 8, good),
            ("size 0", 0, 0, good),
            ("exceeds the maximum 8", 0, 16, good),
            ("not a power of 2", 0, 6, good),
            ("descriptor table at", 0, 8, { rings.descriptors += 8; return rings }()),
            ("available ring at", 0, 8, { rings = good; rings.driver += 1; return rings }()),
            ("used ring at", 0, 8, { rings = good; rings.device += 2; return rings }()),
            ("DMA to unmapped address 0x1000", 0, 8, { rings = good; rings.descriptors = 0x1000; return rings }()),
            ("used ring: DMA to unmapped address", 0, 8, { rings = good; rings.device = end - 8; return rings }()),
            ("overlap", 0, 8, { rings = good; rings.driver = good.descriptors + 16; return rings }()),
        ]
        for (fragment, index, size, rings) in cases {
            let before = d.violations.count
            let error = refused { _ = try t.enableQueue(index, size: size, rings: rings, vector: nil) }
            guard case .queueSetup(let q, let why)? = error else {
                Issue.record("\(fragment): not refused (\(String(describing: error)))")
                continue
            }
            #expect(q == index && why.contains(fragment), "\(fragment): \(why)")
            #expect(d.violations.count == before + 1, "\(fragment) not recorded")
            #expect(!d.isQueueEnabled(index))
        }
        // Used flags must start at 0 (§2.7.10.1).
        ring.used.pointer.storeBytes(of: UInt16(1), toByteOffset: SplitQueueLayout.usedFlags, as: UInt16.self)
        #expect(refused { _ = try t.enableQueue(0, size: 8, rings: good, vector: nil) } != nil)
        ring.used.pointer.storeBytes(of: UInt16(0), toByteOffset: SplitQueueLayout.usedFlags, as: UInt16.self)

        // A vector that is not enabled is refused like NO_VECTOR, but it is no driver violation.
        let before = d.violations.count
        #expect(refused { _ = try t.enableQueue(0, size: 8, rings: good, vector: 2) } != nil)
        #expect(d.violations.count == before)

        // The good setup works, once.
        _ = try t.enableQueue(0, size: 8, rings: good, vector: 0)
        #expect(d.isQueueEnabled(0) && d.isWorkerRunning)
        #expect(refused { _ = try t.enableQueue(0, size: 8, rings: good, vector: 0) } != nil)
        #expect(d.hasViolation("already enabled"))
        #expect(refused { _ = try t.enableQueue(0, size: 4, rings: good, vector: nil) } != nil)
    }

    @Test func setupOnlyBetweenFeaturesOKAndDriverOK() throws {
        let d = EmulatedDevice(model: .rng)
        let t = EmulatedTransport(device: d)
        let ring = try TestRing(t.dma, size: 8)
        try Lifecycle.reset(t)
        t.writeStatus([.acknowledge, .driver])
        #expect(refused { _ = try t.enableQueue(0, size: 8, rings: ring.rings, vector: nil) } != nil)
        #expect(d.hasViolation("before FEATURES_OK"))

        // After DRIVER_OK only with RING_RESET (and after a queue reset).
        try Lifecycle.reset(t)
        _ = try Lifecycle.negotiate(t, wanted: [])
        try Lifecycle.driverOK(t)
        #expect(refused { _ = try t.enableQueue(0, size: 8, rings: ring.rings, vector: nil) } != nil)
        #expect(d.hasViolation("after DRIVER_OK without VIRTIO_F_RING_RESET"))
    }

    @Test func queueSizesFromTheModel() throws {
        var model = EmulatedDevice.Model.rng
        model.queueMaxSizes = [0]
        let (d, t, _) = try negotiated(model)
        #expect(t.queueMaxSize(0) == 0)
        let ring = try TestRing(t.dma, size: 8)
        #expect(refused { _ = try t.enableQueue(0, size: 8, rings: ring.rings, vector: nil) } != nil)
        #expect(d.hasViolation("unavailable"))

        model.queueMaxSizes = [6]
        let (d6, t6, _) = try negotiated(model)
        #expect(t6.queueMaxSize(0) == 6)
        let ring6 = try TestRing(t6.dma, size: 6)
        #expect(refused { _ = try t6.enableQueue(0, size: 6, rings: ring6.rings, vector: nil) } != nil)
        #expect(d6.hasViolation("not a power of 2"))
        // A driver that picks a smaller power of 2 gets a working queue.
        let ring4 = try TestRing(t6.dma, size: 4)
        ring4.doorbell = try t6.enableQueue(0, size: 4, rings: ring4.rings, vector: nil)
        try Lifecycle.driverOK(t6)
        ring4.submit([.writable(try t6.dma.allocate(8))])
        #expect(ring4.waitUsed(1))
    }

    @Test func interruptVectorCount() throws {
        let d = EmulatedDevice(model: .rng)  // 1 queue: 2 vectors
        let t = EmulatedTransport(device: d)
        #expect(throws: VirtioError.self) { _ = try t.enableInterrupts(count: 3) }
        let fds = try t.enableInterrupts(count: 2)
        #expect(fds.count == 2 && fds.allSatisfy { $0 >= 0 } && fds[0] != fds[1])
        #expect(throws: VirtioError.self) { try t.setConfigVector(2) }
        try t.setConfigVector(1)
        try t.setConfigVector(nil)
        t.disableInterrupts()
        #expect(throws: VirtioError.self) { try t.setConfigVector(0) }
    }

    @Test func unmappedBufferAddressBreaksTheQueueAndNeedsReset() throws {
        let r = try Rig(.rng)
        try r.transport.setConfigVector(1)
        let end = r.device.memory.deviceAddress + UInt64(r.device.memory.size)
        // A buffer straddling the end of device memory: nothing of it may be touched.
        r.ring.submit([TestRing.Part(address: end - 4, length: 8, flags: 2)])
        #expect(poll { r.transport.readStatus().contains(.deviceNeedsReset) })
        #expect(r.device.hasViolation("DMA to unmapped address 0x\(String(end - 4, radix: 16))"))
        #expect(r.device.queueFailure(0) != nil)
        #expect(r.ring.usedIdx == 0)
        // §2.1.2: a configuration change notification goes with DEVICE_NEEDS_RESET after DRIVER_OK.
        #expect(r.device.waitForInterrupt(vector: 1, timeout: .seconds(5)) == 1)
        #expect(r.transport.readISR() & 2 == 2)
        // The device uses nothing more until a reset...
        r.ring.submit([.writable(try r.buffer(8))])
        settle()
        #expect(r.ring.usedIdx == 0)
        // ...and the status bit survives driver writes.
        r.transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK, .failed])
        #expect(r.transport.readStatus().contains(.deviceNeedsReset))
        // Reset is the way back.
        try Lifecycle.reset(r.transport)
        #expect(r.transport.readStatus().rawValue == 0)
        #expect(!r.device.isWorkerRunning)
    }

    @Test func unmappedIndirectTable() throws {
        let r = try Rig(.rng, wanted: [.ringIndirectDesc])
        r.ring.submit([TestRing.Part(address: 0x10, length: 32, flags: 4)])
        #expect(poll { r.device.queueFailure(0) != nil })
        #expect(r.device.hasViolation("DMA to unmapped address 0x10 (indirect table"))
    }
}
