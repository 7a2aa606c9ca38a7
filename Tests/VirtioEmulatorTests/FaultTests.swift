import Testing
import Virtio
import VirtioEmulator

@Suite("fault injection: each hook is observable")
struct FaultTests {
    func faulty(_ set: (inout EmulatedDevice.Faults) -> Void, wanted: Features = []) throws -> Rig {
        let r = try Rig(.rng, wanted: wanted)
        var f = r.device.faults
        set(&f)
        r.device.faults = f
        return r
    }

    @Test func usedIDNotInFlight() throws {
        let r = try faulty { $0.usedIDNotInFlight = true }
        let head = r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).id != UInt32(head))
    }

    @Test func duplicateCompletion() throws {
        let r = try faulty { $0.duplicateCompletion = true }
        let head = r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(2))
        #expect(r.ring.usedElement(0).id == UInt32(head) && r.ring.usedElement(1).id == UInt32(head))
    }

    @Test func usedLengthPastTheBuffer() throws {
        let r = try faulty { $0.usedLengthPastBuffer = true }
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == 9)
    }

    @Test func usedIndexJumpsPastTheQueueSize() throws {
        let r = try faulty { $0.usedIndexJump = true }
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1 + r.ring.size))
    }

    @Test func stopCompletingThenResume() throws {
        let r = try faulty { $0.stopCompleting = true }
        r.ring.submit([.writable(try r.buffer(8))])
        settle()
        #expect(r.ring.usedIdx == 0)
        r.device.faults = .init()
        #expect(r.ring.waitUsed(1))  // the notification was not lost
    }

    @Test func needsResetAtAnyTime() throws {
        let r = try Rig(.rng)
        try r.transport.setConfigVector(1)
        r.device.setNeedsReset()
        #expect(r.transport.readStatus().contains(.deviceNeedsReset))
        #expect(r.device.waitForInterrupt(vector: 1, timeout: .seconds(5)) == 1)
        r.ring.submit([.writable(try r.buffer(8))])
        settle()
        #expect(r.ring.usedIdx == 0)
        try Lifecycle.reset(r.transport)
        #expect(r.transport.readStatus().rawValue == 0)
    }

    @Test func featuresOKClearedByTheDevice() throws {
        let r = try Rig(.rng)
        #expect(r.transport.readStatus().contains(.featuresOK))
        r.device.faults.clearFeaturesOK = true
        #expect(!r.transport.readStatus().contains(.featuresOK))
        #expect(r.transport.readStatus().contains(.driverOK))
    }

    @Test func configGenerationChangesOnEveryRead() throws {
        let r = try Rig(.blk(capacitySectors: 8))
        r.device.faults.unstableConfigGeneration = true
        #expect(r.transport.configGeneration() != r.transport.configGeneration())
        #expect(throws: VirtioError.self) {
            try Lifecycle.readConfig(r.transport, attempts: 4) { r.transport.readDeviceConfig(0, width: 4) }
        }
    }

    @Test func queueResetThatNeverCompletes() throws {
        let r = try Rig(.rng, wanted: [.ringReset])
        r.device.faults.queueResetNeverCompletes = true
        #expect { try r.transport.resetQueue(0, timeout: .milliseconds(10)) } throws: { error in
            guard case .brokenQueue(0, let why)? = error as? VirtioError else { return false }
            return why.contains("queue_reset still reads 1")
        }
    }

    @Test func resetThatNeverCompletesKeepsTheQueueRunning() throws {
        let r = try Rig(.rng)
        r.device.faults.resetNeverCompletes = true
        #expect(throws: VirtioError.self) { try Lifecycle.reset(r.transport, timeout: .milliseconds(10)) }
        // Until status reads 0 the device may still use buffers (and this one does).
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1))
    }
}

@Suite("driver bugs the device detects (spec 2.7.5, 2.7.6)")
struct DriverBugTests {
    @Test func loopingChain() throws {
        let r = try Rig(.rng)
        let b = try r.buffer(8)
        r.ring.setDescriptor(0, .writable(b), next: 1)
        r.ring.setDescriptor(1, .writable(b), next: 0)
        r.ring.makeAvailable(0)
        r.ring.publish()
        r.ring.kick()
        #expect(poll { r.device.queueFailure(0) != nil })
        #expect(r.device.hasViolation("descriptor chain from head 0 loops"))
        #expect(r.transport.readStatus().contains(.deviceNeedsReset))
        #expect(r.ring.usedIdx == 0)
    }

    @Test func loopInsideAnIndirectTable() throws {
        let r = try Rig(.rng, wanted: [.ringIndirectDesc])
        let table = try r.dma.allocate(32, alignment: 16), b = try r.buffer(8)
        TestRing.writeDescriptor(table.pointer, 0, .writable(b), next: 1)
        TestRing.writeDescriptor(table.pointer, 1, .writable(b), next: 0)
        r.ring.submit([.indirect(table)])
        #expect(poll { r.device.queueFailure(0) != nil })
        #expect(r.device.hasViolation("loops"))
    }

    @Test func indirectRules() throws {
        func failure(_ wanted: Features, _ build: (Rig) throws -> Void) throws -> String? {
            let r = try Rig(.rng, wanted: wanted)
            try build(r)
            _ = poll(timeout: .seconds(5)) { r.device.queueFailure(0) != nil }
            return r.device.queueFailure(0)
        }
        // Not negotiated.
        let notNegotiated = try failure([]) { r in r.ring.submit([.indirect(try r.dma.allocate(16, alignment: 16))]) }
        #expect(notNegotiated?.contains("VIRTIO_F_INDIRECT_DESC was not negotiated") == true)
        // Nested.
        let nested = try failure([.ringIndirectDesc]) { r in
            let outer = try r.dma.allocate(16, alignment: 16), inner = try r.dma.allocate(16, alignment: 16)
            TestRing.writeDescriptor(outer.pointer, 0, .indirect(inner), next: nil)
            r.ring.submit([.indirect(outer)])
        }
        #expect(nested?.contains("INDIRECT inside an indirect table") == true)
        // Length not a multiple of 16.
        let odd = try failure([.ringIndirectDesc]) { r in
            r.ring.submit([.indirect(try r.dma.allocate(24, alignment: 16))])
        }
        #expect(odd?.contains("not a non-zero multiple of 16") == true)
        // INDIRECT with NEXT.
        let withNext = try failure([.ringIndirectDesc]) { r in
            let t = try r.dma.allocate(16, alignment: 16)
            r.ring.setDescriptor(0, .indirect(t), next: 1)
            r.ring.setDescriptor(1, .writable(try r.buffer(4)), next: nil)
            r.ring.makeAvailable(0); r.ring.publish(); r.ring.kick()
        }
        #expect(withNext?.contains("both INDIRECT and NEXT") == true)
        // A chain longer than the queue size through an indirect table.
        let long = try failure([.ringIndirectDesc]) { r in
            let n = Int(r.ring.size) + 1
            let t = try r.dma.allocate(16 * n, alignment: 16), b = try r.buffer(4)
            for i in 0..<n { TestRing.writeDescriptor(t.pointer, i, .writable(b), next: i == n - 1 ? nil : UInt16(i + 1)) }
            r.ring.submit([.indirect(t)])
        }
        #expect(long?.contains("more than 8 descriptors") == true)
    }

    @Test func readableAfterWritable() throws {
        let r = try Rig(.rng)
        r.ring.submit([.writable(try r.buffer(4)), .readable(try r.buffer(4))])
        #expect(poll { r.device.queueFailure(0) != nil })
        #expect(r.device.hasViolation("device-readable descriptor after a device-writable one (§2.7.4.2)"))
    }

    @Test func headOutsideTheTableAndAvailIndexTooFarAhead() throws {
        let r = try Rig(.rng)
        r.ring.makeAvailable(200)
        r.ring.publish(); r.ring.kick()
        #expect(poll { r.device.queueFailure(0) != nil })
        #expect(r.device.hasViolation("names descriptor 200"))

        let s = try Rig(.rng)
        for _ in 0..<9 { s.ring.makeAvailable(0) }  // 9 entries in a ring of 8
        s.ring.publish(); s.ring.kick()
        #expect(poll { s.device.queueFailure(0) != nil })
        #expect(s.device.hasViolation("more than the queue size 8 ahead"))
    }

    @Test func wrongNotificationValue() throws {
        let r = try Rig(.rng)
        let b = try r.buffer(8)
        r.ring.submit([.writable(b)], kick: false)
        Doorbell(address: r.ring.doorbell!.address, value: 5).ring()
        #expect(r.ring.waitUsed(1))
        #expect(r.device.hasViolation("notification wrote 5"))
    }
}
