import CVirtioShim
#if canImport(Glibc)
import Glibc
#endif
import Testing
import Virtio
import VirtioEmulator

/// The emulator's packed ring (spec 2.8) driven by the driver's `PackedQueue`, and driver faults
/// written by hand that the device must refuse.
struct PackedRig: ~Copyable {
    let device: EmulatedDevice
    let transport: EmulatedTransport
    let memory: PackedQueueMemory
    var queue: PackedQueue

    init(_ model: EmulatedDevice.Model, wanted: Features = [], size: UInt16? = nil, indirectEntries: Int = 0) throws {
        var model = model
        model.offeredFeatures.insert(.ringPacked)
        let device = EmulatedDevice(model: model)
        let transport = EmulatedTransport(device: device)
        try Lifecycle.reset(transport)
        let features = try Lifecycle.negotiate(transport, wanted: wanted.union(.ringPacked))
        let memory = try PackedQueueMemory(arena: transport.dma, size: size ?? model.queueMaxSizes[0], indirectEntries: indirectEntries)
        let doorbell = try transport.enableQueue(0, size: memory.size, rings: memory.rings, vector: nil)
        try Lifecycle.driverOK(transport)
        self.device = device
        self.transport = transport
        self.memory = memory
        queue = PackedQueue(index: 0, memory: memory, features: features.accepted, doorbell: doorbell)
    }
}

@Suite("packed virtqueue, device side (spec 2.8)")
struct PackedRingTests {
    /// Waits for `count` completions on `queue`.
    static func drain(_ queue: inout PackedQueue, count: Int) throws -> [(UInt64, UInt32)] {
        var got: [(UInt64, UInt32)] = []
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while got.count < count && clock.now < deadline {
            if try queue.drainUsed(limit: count - got.count, { got.append(($0, $1)) }) == 0 { sched_yield() }
        }
        #expect(got.count == count)
        return got
    }

    static func add(_ queue: inout PackedQueue, _ segments: [BufferSegment], token: UInt64) throws -> Bool {
        try segments.withUnsafeBufferPointer { try queue.add($0, token: token) }
    }

    @Test(arguments: [false, true])
    func entropyFillsEveryBufferOverManyLaps(eventIdx: Bool) throws {
        var r = try PackedRig(.rng(seed: 3, queueSize: 6), wanted: eventIdx ? .ringEventIdx : [])
        let buffers = try (0..<4).map { _ in try r.transport.dma.allocate(64, alignment: 16) }
        var total = 0
        for round in 0..<200 {
            for (i, b) in buffers.enumerated() {
                b.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: 64)
                let segment = BufferSegment(address: b.deviceAddress, length: 64, deviceWritable: true)
                let v1 = try Self.add(&r.queue, [segment], token: UInt64(round * 4 + i))
                #expect(v1)
            }
            r.queue.publish()
            let got = try Self.drain(&r.queue, count: 4)
            #expect(Set(got.map(\.0)) == Set((0..<4).map { UInt64(round * 4 + $0) }) && got.allSatisfy { $0.1 == 64 })
            #expect(buffers.allSatisfy { b in UnsafeRawBufferPointer(start: b.pointer, count: 64).contains { $0 != 0 } })
            total += got.count
        }
        // 800 buffers through a 6-entry ring: 133 laps, both wrap counters flipped every lap.
        #expect(total == 800 && r.queue.isIdle)
        #expect(r.device.violations.isEmpty, "\(r.device.violations)")
        #expect(r.device.statistics(queue: 0).completed == 800)
    }

    @Test func listsAndIndirectTablesAreWalkedAsTheDriverWroteThem() throws {
        for indirect in [false, true] {
            var r = try PackedRig(.rng(seed: 1, queueSize: 8), wanted: indirect ? .ringIndirectDesc : [],
                                  indirectEntries: indirect ? 4 : 0)
            let a = try r.transport.dma.allocate(3, alignment: 16), b = try r.transport.dma.allocate(13, alignment: 16)
            for t in 0..<20 {
                let ok = try Self.add(&r.queue, [BufferSegment(address: a.deviceAddress, length: 3, deviceWritable: true),
                                                 BufferSegment(address: b.deviceAddress, length: 13, deviceWritable: true)], token: UInt64(t))
                #expect(ok)
                r.queue.publish()
                let got = try Self.drain(&r.queue, count: 1)
                #expect(got.count == 1 && got[0] == (UInt64(t), 16))
            }
            #expect(r.device.violations.isEmpty, "\(r.device.violations)")
        }
    }

    @Test func interruptsFollowTheDriverEventSuppressionStructure() throws {
        for eventIdx in [false, true] {
            var r = try PackedRig(.rng(seed: 1, queueSize: 8), wanted: eventIdx ? .ringEventIdx : [])
            let b = try r.transport.dma.allocate(8, alignment: 16)
            let segment = BufferSegment(address: b.deviceAddress, length: 8, deviceWritable: true)
            r.queue.suppressInterrupts()
            _ = try Self.add(&r.queue, [segment], token: 0)
            r.queue.publish()
            _ = try Self.drain(&r.queue, count: 1)
            #expect(r.device.statistics(queue: 0).interrupts == 0)
            let v2 = r.queue.armInterrupts()
            #expect(v2)
            _ = try Self.add(&r.queue, [segment], token: 1)
            r.queue.publish()
            _ = try Self.drain(&r.queue, count: 1)
            #expect(poll { r.device.statistics(queue: 0).interrupts == 1 })
            #expect(r.device.violations.isEmpty, "\(r.device.violations)")
        }
    }

    @Test func blockRequestsGoThroughAPackedRing() throws {
        var r = try PackedRig(.blk(capacitySectors: 64, queueSize: 16))
        let header = try r.transport.dma.allocate(16, alignment: 16)
        let data = try r.transport.dma.allocate(512, alignment: 512)
        let status = try r.transport.dma.allocate(1, alignment: 1)
        func request(_ type: UInt32, sector: UInt64, token: UInt64) throws -> (UInt64, UInt32) {
            header.pointer.storeBytes(of: type.littleEndian, toByteOffset: 0, as: UInt32.self)
            header.pointer.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
            header.pointer.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
            status.pointer.storeBytes(of: UInt8(0xFF), as: UInt8.self)
            let segments = [BufferSegment(address: header.deviceAddress, length: 16, deviceWritable: false),
                            BufferSegment(address: data.deviceAddress, length: 512, deviceWritable: type == 0),
                            BufferSegment(address: status.deviceAddress, length: 1, deviceWritable: true)]
            let v3 = try Self.add(&r.queue, segments, token: token)
            #expect(v3)
            r.queue.publish()
            return try Self.drain(&r.queue, count: 1)[0]
        }
        for sector in 0..<40 {
            (data.pointer).initializeMemory(as: UInt8.self, repeating: UInt8(sector), count: 512)
            let w = try request(1, sector: UInt64(sector), token: UInt64(sector))
            #expect(w == (UInt64(sector), 1) && status.pointer.load(as: UInt8.self) == 0)
        }
        for sector in (0..<40).reversed() {
            data.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: 512)
            let got = try request(0, sector: UInt64(sector), token: 100)
            #expect(got == (100, 513) && status.pointer.load(as: UInt8.self) == 0)
            #expect(UnsafeRawBufferPointer(start: data.pointer, count: 512).allSatisfy { $0 == UInt8(sector) })
        }
        #expect(r.device.violations.isEmpty, "\(r.device.violations)")
    }

    @Test func hostileCompletionsBreakThePackedQueueByName() throws {
        let cases: [(WritableKeyPath<EmulatedDevice.Faults, Bool>, String)] = [
            (\.usedIDNotInFlight, "is not an ID (queue size 8)"),
            (\.usedLengthPastBuffer, "past the 8 device-writable bytes"),
            (\.duplicateCompletion, "is not a request in flight"),
            (\.usedIndexJump, "neither available nor used in this lap"),
        ]
        for (fault, words) in cases {
            var r = try PackedRig(.rng(seed: 1, queueSize: 8))
            let b = try r.transport.dma.allocate(8, alignment: 16)
            let segment = BufferSegment(address: b.deviceAddress, length: 8, deviceWritable: true)
            // One honest round trip, then the fault.
            _ = try Self.add(&r.queue, [segment], token: 0)
            r.queue.publish()
            _ = try Self.drain(&r.queue, count: 1)
            var faults = r.device.faults
            faults[keyPath: fault] = true
            r.device.faults = faults
            _ = try Self.add(&r.queue, [segment], token: 1)
            _ = try Self.add(&r.queue, [segment], token: 2)
            r.queue.publish()
            do { _ = try Self.drain(&r.queue, count: 2); Issue.record("no error") } catch {}
            #expect("\(r.queue.brokenReason.map { "\($0)" } ?? "not broken")".contains(words), "\(fault): \(String(describing: r.queue.brokenReason))")
            // Recovery by reset (§2.4): every request handed back, a fresh negotiation, the same
            // memory, and buffers go round again.
            r.device.faults = .init()
            try Lifecycle.reset(r.transport)
            var back: [UInt64] = []
            r.queue.reclaimAll { back.append($0) }
            #expect(Set(back).isSubset(of: [1, 2]) && r.queue.isIdle)
            let features = try Lifecycle.negotiate(r.transport, wanted: .ringPacked)
            let doorbell = try r.transport.enableQueue(0, size: r.memory.size, rings: r.memory.rings, vector: nil)
            r.queue = PackedQueue(index: 0, memory: r.memory, features: features.accepted, doorbell: doorbell)
            try Lifecycle.driverOK(r.transport)
            for t in 10..<30 {
                _ = try Self.add(&r.queue, [segment], token: UInt64(t))
                r.queue.publish()
                let got = try Self.drain(&r.queue, count: 1)
                #expect(got.count == 1 && got[0] == (UInt64(t), 8))
            }
        }
    }
}

@Suite("packed virtqueue: driver faults the device refuses (spec 2.8)")
struct PackedDriverFaultTests {
    /// A hand-written descriptor at `slot` of the rig's ring.
    static func write(_ r: borrowing PackedRig, slot: Int, address: UInt64, length: UInt32, id: UInt16, flags: UInt16) {
        let d = r.memory.descriptors.pointer + PackedQueueLayout.descriptor(slot)
        d.storeBytes(of: address, toByteOffset: PackedQueueLayout.descriptorAddress, as: UInt64.self)
        d.storeBytes(of: length, toByteOffset: PackedQueueLayout.descriptorLength, as: UInt32.self)
        d.storeBytes(of: id, toByteOffset: PackedQueueLayout.descriptorID, as: UInt16.self)
        CVirtioShim_barrier_write()
        d.storeBytes(of: flags, toByteOffset: PackedQueueLayout.descriptorFlags, as: UInt16.self)
    }

    static func kick(_ r: borrowing PackedRig) {
        CVirtioShim_barrier_full()
        r.queue.doorbell.ring()
    }

    @Test func aListWhoseNextDescriptorIsNotAvailable() throws {
        let r = try PackedRig(.rng(seed: 1, queueSize: 8))
        let b = try r.transport.dma.allocate(16, alignment: 16)
        let avail = PackedQueueLayout.availableFlags(wrap: true)
        Self.write(r, slot: 0, address: b.deviceAddress, length: 8, id: 0, flags: avail | PackedQueueLayout.flagWrite | PackedQueueLayout.flagNext)
        Self.kick(r)
        #expect(poll { r.device.hasViolation("continues the list at 0 (NEXT) but is not available in this lap") })
        #expect(r.device.readStatus().contains(.deviceNeedsReset))
    }

    @Test func indirectWithNextAndIndirectWithoutTheFeature() throws {
        let r = try PackedRig(.rng(seed: 1, queueSize: 8), wanted: .ringIndirectDesc)
        let table = try r.transport.dma.allocate(32, alignment: 16)
        let avail = PackedQueueLayout.availableFlags(wrap: true)
        Self.write(r, slot: 0, address: table.deviceAddress, length: 32, id: 0,
                   flags: avail | PackedQueueLayout.flagIndirect | PackedQueueLayout.flagNext)
        Self.kick(r)
        #expect(poll { r.device.hasViolation("INDIRECT in a list linked by NEXT (§2.8.19)") })

        let s = try PackedRig(.rng(seed: 1, queueSize: 8))
        let t = try s.transport.dma.allocate(32, alignment: 16)
        Self.write(s, slot: 0, address: t.deviceAddress, length: 32, id: 0, flags: avail | PackedQueueLayout.flagIndirect)
        Self.kick(s)
        #expect(poll { s.device.hasViolation("INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated (§2.8.19)") })
    }

    @Test func flagsOtherThanWriteInAnIndirectTable() throws {
        let r = try PackedRig(.rng(seed: 1, queueSize: 8), wanted: .ringIndirectDesc)
        let table = try r.transport.dma.allocate(32, alignment: 16)
        let b = try r.transport.dma.allocate(8, alignment: 16)
        for i in 0..<2 {
            let e = table.pointer + PackedQueueLayout.descriptor(i)
            e.storeBytes(of: b.deviceAddress, toByteOffset: 0, as: UInt64.self)
            e.storeBytes(of: UInt32(4), toByteOffset: 8, as: UInt32.self)
            e.storeBytes(of: UInt16(PackedQueueLayout.flagWrite | (i == 0 ? PackedQueueLayout.flagNext : 0)), toByteOffset: 14, as: UInt16.self)
        }
        Self.write(r, slot: 0, address: table.deviceAddress, length: 32, id: 0,
                   flags: PackedQueueLayout.availableFlags(wrap: true) | PackedQueueLayout.flagIndirect)
        Self.kick(r)
        #expect(poll { r.device.hasViolation("only WRITE is valid there (§2.8.19)") })
    }

    @Test func aRingThatIsNotZeroedAtEnable() throws {
        var model = EmulatedDevice.Model.rng(seed: 1, queueSize: 8)
        model.offeredFeatures.insert(.ringPacked)
        let device = EmulatedDevice(model: model)
        let transport = EmulatedTransport(device: device)
        try Lifecycle.reset(transport)
        _ = try Lifecycle.negotiate(transport, wanted: .ringPacked)
        let memory = try PackedQueueMemory(arena: transport.dma, size: 8)
        (memory.descriptors.pointer + PackedQueueLayout.descriptor(3)).storeBytes(of: UInt16(0x80), toByteOffset: 14, as: UInt16.self)
        #expect { _ = try transport.enableQueue(0, size: 8, rings: memory.rings, vector: nil) } throws: {
            "\($0)".contains("descriptor ring not zero-initialized: descriptor 3 has flags set (§2.8.13)")
        }
    }
}
