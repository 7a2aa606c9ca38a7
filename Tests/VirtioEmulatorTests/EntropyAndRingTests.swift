import Testing
import Virtio
import VirtioEmulator

@Suite("split virtqueue and entropy device (spec 2.7, 5.4)")
struct EntropyAndRingTests {
    @Test func fillsEveryWritableBufferWithRandomBytes() throws {
        let r = try Rig(.rng)
        let buffers = try (0..<3).map { _ in try r.buffer(64) }
        var heads: [UInt16] = []
        for b in buffers { heads.append(r.ring.submit([.writable(b)])) }
        #expect(r.ring.waitUsed(3))
        for i in 0..<3 {
            let e = r.ring.usedElement(UInt16(i))
            #expect(e.id == UInt32(heads[i]) && e.length == 64)
            #expect(bytes(buffers[i]).contains { $0 != 0 })
        }
        #expect(bytes(buffers[0]) != bytes(buffers[1]))
        #expect(r.device.violations.isEmpty)
        #expect(r.device.statistics(queue: 0).completed == 3)
    }

    @Test func sameSeedSameBytes() throws {
        func draw(_ seed: UInt64) throws -> [UInt8] {
            let r = try Rig(.rng(seed: seed))
            let b = try r.buffer(100)
            r.ring.submit([.writable(b)])
            #expect(r.ring.waitUsed(1))
            return bytes(b)
        }
        #expect(try draw(7) == draw(7))
        #expect(try draw(7) != draw(8))
    }

    @Test func mayFillLessThanTheBuffer() throws {
        var model = EmulatedDevice.Model.rng
        model.entropyBytesPerRequest = 5
        let r = try Rig(model)
        let b = try r.buffer(32)
        r.ring.submit([.writable(b)])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == 5)
        #expect(bytes(b)[5...].allSatisfy { $0 == 0 })
    }

    @Test func scattersOverAChainOfWritableDescriptors() throws {
        let r = try Rig(.rng)
        let a = try r.buffer(3), b = try r.buffer(13)
        r.ring.submit([.writable(a), .writable(b)])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == 16)
        #expect(bytes(b).contains { $0 != 0 })
    }

    @Test func readableBufferOnTheEntropyQueueIsAViolation() throws {
        let r = try Rig(.rng)
        let a = try r.buffer(8), b = try r.buffer(8)
        r.ring.submit([.readable(a), .writable(b)])
        #expect(r.ring.waitUsed(1))
        #expect(r.device.hasViolation("MUST NOT place device-readable buffers (§5.4.6.1)"))
    }

    @Test func interruptsOnTheQueueVectorAndSetsISR() throws {
        let r = try Rig(.rng, vector: 1)
        let b = try r.buffer(16)
        r.ring.submit([.writable(b)])
        #expect(r.device.waitForInterrupt(vector: 1, timeout: .seconds(5)) == 1)
        #expect(r.ring.usedIdx == 1)
        #expect(r.transport.readISR() & 1 == 1)
        #expect(r.transport.readISR() == 0)  // read clears
        #expect(r.device.statistics(queue: 0).interrupts == 1)
    }

    @Test func processesOnlyAfterANotification() throws {
        let r = try Rig(.rng)
        let b = try r.buffer(16)
        r.ring.submit([.writable(b)], kick: false)
        settle()
        #expect(r.ring.usedIdx == 0)  // a strict device waits for the doorbell (2.7.13.4)
        r.ring.kick()
        #expect(r.ring.waitUsed(1))
        #expect(r.device.statistics(queue: 0).notifications == 1)

        var polling = EmulatedDevice.Model.rng
        polling.pollsRings = true
        let p = try Rig(polling)
        p.ring.submit([.writable(try p.buffer(16))], kick: false)
        #expect(p.ring.waitUsed(1))
    }

    @Test func nothingIsUsedBeforeDriverOK() throws {
        let r = try Rig(.rng, driverOK: false)
        r.ring.submit([.writable(try r.buffer(16))])
        settle()
        #expect(r.ring.usedIdx == 0)  // §2.1.2
        try Lifecycle.driverOK(r.transport)
        #expect(r.ring.waitUsed(1))  // the notification was kept
    }

    @Test func noInterruptFlagSuppressesInterruptsWithoutEventIdx() throws {
        let r = try Rig(.rng)
        r.ring.setAvailFlags(1)  // VIRTQ_AVAIL_F_NO_INTERRUPT
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(1))
        #expect(poll { r.device.statistics(queue: 0).suppressedInterrupts == 1 })
        #expect(r.device.statistics(queue: 0).interrupts == 0)
        #expect(r.device.waitForInterrupt(vector: 0, timeout: .milliseconds(20)) == 0)
        r.ring.setAvailFlags(0)
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.device.waitForInterrupt(vector: 0, timeout: .seconds(5)) == 1)
    }

    @Test func eventIdxInterruptsOnlyWhenUsedEventIsPassed() throws {
        let r = try Rig(.rng, wanted: [.ringEventIdx])
        #expect(r.device.driverFeatures.contains(.ringEventIdx))
        r.ring.setAvailFlags(1)  // must be ignored with EVENT_IDX (§2.7.7.2)
        r.ring.setUsedEvent(2)   // interrupt when the device writes used entry 2
        for n in 1...2 {
            r.ring.submit([.writable(try r.buffer(8))])
            #expect(r.ring.waitUsed(UInt16(n)))
        }
        #expect(poll { r.device.statistics(queue: 0).suppressedInterrupts == 2 })
        #expect(r.device.waitForInterrupt(vector: 0, timeout: .milliseconds(20)) == 0)
        r.ring.submit([.writable(try r.buffer(8))])
        #expect(r.ring.waitUsed(3))
        #expect(r.device.waitForInterrupt(vector: 0, timeout: .seconds(5)) == 1)
        #expect(r.device.statistics(queue: 0).interrupts == 1)
        // The device publishes avail_event: the next entry it wants to be notified of (§2.7.10).
        #expect(poll { r.ring.availEvent == 3 })
    }

    @Test func eventIdxLetsTheDriverSkipNotifications() throws {
        // A driver that notifies only when vring_need_event(avail_event, new, old) says so never
        // stalls, including when it reads avail_event before the device has updated it.
        let r = try Rig(.rng, wanted: [.ringEventIdx])
        var old = r.ring.availIdx
        for n in 1...20 {
            let head = r.ring.chain([.writable(try r.buffer(4))])
            r.ring.makeAvailable(head)
            r.ring.publish()
            let new = r.ring.availIdx
            let event = r.ring.availEvent
            if new &- event &- 1 < new &- old { r.ring.kick() }  // vring_need_event
            old = new
            #expect(r.ring.waitUsed(UInt16(n)))
        }
        #expect(r.device.statistics(queue: 0).completed == 20)
    }

    @Test func indirectTableWhenNegotiated() throws {
        let r = try Rig(.rng, wanted: [.ringIndirectDesc])
        let table = try r.dma.allocate(32, alignment: 16)
        let a = try r.buffer(10), b = try r.buffer(6)
        TestRing.writeDescriptor(table.pointer, 0, .writable(a), next: 1)
        TestRing.writeDescriptor(table.pointer, 1, .writable(b), next: nil)
        r.ring.submit([.indirect(table)])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == 16)
        #expect(r.device.violations.isEmpty)
    }

    @Test func directDescriptorsThenAnIndirectTable() throws {
        // §2.7.5.3.2: zero or more chained descriptors followed by one INDIRECT descriptor.
        let r = try Rig(.rng, wanted: [.ringIndirectDesc])
        let table = try r.dma.allocate(16, alignment: 16)
        let a = try r.buffer(4), b = try r.buffer(4)
        TestRing.writeDescriptor(table.pointer, 0, .writable(b), next: nil)
        r.ring.submit([.writable(a), .indirect(table)])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == 8)
    }
}
