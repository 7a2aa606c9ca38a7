import Testing
@testable import Virtio

/// The test plays the device of a packed queue: it reads the descriptors the driver made
/// available and writes used descriptors itself, including ones no honest device writes.
final class PackedRingFixture {
    let memory: UnsafeMutableRawPointer
    let arena: DMAArena
    /// The queue's doorbell: 16 bits, or 32 with VIRTIO_F_NOTIFICATION_DATA (`bell32`).
    let bell = UnsafeMutablePointer<UInt16>.allocate(capacity: 2)
    static let deviceBase: UInt64 = 0x4000_0000

    init(bytes: Int = 1 << 20) {
        memory = .allocate(byteCount: bytes, alignment: 4096)
        arena = DMAArena(memory: DMASlice(pointer: memory, deviceAddress: PackedRingFixture.deviceBase, size: bytes))
        bell.initialize(repeating: 0xFFFF, count: 2)
    }

    var bell32: UInt32 { UnsafeRawPointer(bell).load(as: UInt32.self) }

    deinit {
        memory.deallocate()
        bell.deallocate()
    }

    func queue(size: UInt16 = 8, features: Features = [], indirectEntries: Int = 0) throws -> PackedQueue {
        let m = try PackedQueueMemory(arena: arena, size: size, indirectEntries: indirectEntries)
        return PackedQueue(index: 0, memory: m, features: features, doorbell: Doorbell(address: bell, value: 0))
    }

    func pointer(_ deviceAddress: UInt64) -> UnsafeMutableRawPointer { memory + Int(deviceAddress - PackedRingFixture.deviceBase) }

    struct Descriptor: Equatable { var address: UInt64; var length: UInt32; var id: UInt16; var flags: UInt16 }

    func descriptor(_ q: borrowing PackedQueue, _ i: Int, table: UInt64? = nil) -> Descriptor {
        let p = pointer(table ?? q.rings.descriptors) + PackedQueueLayout.descriptor(i)
        return Descriptor(address: p.load(fromByteOffset: PackedQueueLayout.descriptorAddress, as: UInt64.self),
                          length: p.load(fromByteOffset: PackedQueueLayout.descriptorLength, as: UInt32.self),
                          id: p.load(fromByteOffset: PackedQueueLayout.descriptorID, as: UInt16.self),
                          flags: p.load(fromByteOffset: PackedQueueLayout.descriptorFlags, as: UInt16.self))
    }

    /// The device writes a used descriptor at ring position `slot`: `id`, `length` and flags
    /// AVAIL = USED = `wrap` (plus WRITE unless `write` is false), or exactly `flags`.
    func use(_ q: borrowing PackedQueue, slot: Int, id: UInt16, length: UInt32, wrap: Bool = true, write: Bool = true, flags: UInt16? = nil) {
        let p = pointer(q.rings.descriptors) + PackedQueueLayout.descriptor(slot)
        p.storeBytes(of: id, toByteOffset: PackedQueueLayout.descriptorID, as: UInt16.self)
        p.storeBytes(of: length, toByteOffset: PackedQueueLayout.descriptorLength, as: UInt32.self)
        let f = flags ?? (PackedQueueLayout.usedFlags(wrap: wrap) | (write ? PackedQueueLayout.flagWrite : 0))
        p.storeBytes(of: f, toByteOffset: PackedQueueLayout.descriptorFlags, as: UInt16.self)
    }

    /// The Device Event Suppression structure (the device writes it).
    func setDeviceEvent(_ q: borrowing PackedQueue, offWrap: UInt16 = 0, flags: UInt16) {
        let p = pointer(q.rings.device)
        p.storeBytes(of: offWrap, toByteOffset: PackedQueueLayout.eventDescriptor, as: UInt16.self)
        p.storeBytes(of: flags, toByteOffset: PackedQueueLayout.eventFlags, as: UInt16.self)
    }
    /// The Driver Event Suppression structure as the driver left it: (desc, flags).
    func driverEvent(_ q: borrowing PackedQueue) -> (UInt16, UInt16) {
        let p = pointer(q.rings.driver)
        return (p.load(fromByteOffset: PackedQueueLayout.eventDescriptor, as: UInt16.self),
                p.load(fromByteOffset: PackedQueueLayout.eventFlags, as: UInt16.self))
    }
}

func add(_ q: inout PackedQueue, _ segments: [BufferSegment], token: UInt64) throws -> Bool {
    try segments.withUnsafeBufferPointer { try q.add($0, token: token) }
}

func drain(_ q: inout PackedQueue) throws -> [(UInt64, UInt32)] {
    var got: [(UInt64, UInt32)] = []
    _ = try q.drainUsed { got.append(($0, $1)) }
    return got
}

@Suite("packed virtqueue layout (spec 2.8)")
struct PackedQueueLayoutTests {
    @Test func fieldsSizesAndFlagsAreTheSpecs() {
        // struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } (§2.8.13)
        #expect(PackedQueueLayout.descriptorSize == 16)
        #expect(PackedQueueLayout.descriptorAddress == 0 && PackedQueueLayout.descriptorLength == 8)
        #expect(PackedQueueLayout.descriptorID == 12 && PackedQueueLayout.descriptorFlags == 14)
        #expect(PackedQueueLayout.ringSize(256) == 4096 && PackedQueueLayout.descriptor(3) == 48)
        // struct pvirtq_event_suppress { le16 desc; le16 flags; } (§2.8.14)
        #expect(PackedQueueLayout.eventDescriptor == 0 && PackedQueueLayout.eventFlags == 2 && PackedQueueLayout.eventSize == 4)
        // §2.8.10.1: alignment 16 and 4.
        #expect(PackedQueueLayout.descriptorAlignment == 16 && PackedQueueLayout.eventAlignment == 4)
        // Flags: NEXT 1, WRITE 2, INDIRECT 4, AVAIL 1 << 7, USED 1 << 15; events 0, 1, 2.
        #expect(PackedQueueLayout.flagNext == 1 && PackedQueueLayout.flagWrite == 2 && PackedQueueLayout.flagIndirect == 4)
        #expect(PackedQueueLayout.flagAvail == 0x80 && PackedQueueLayout.flagUsed == 0x8000)
        #expect(PackedQueueLayout.eventEnable == 0 && PackedQueueLayout.eventDisable == 1 && PackedQueueLayout.eventDescriptorSpecific == 2)
        // §2.8.1: available = AVAIL equal to the wrap counter, USED the inverse; used = both equal.
        #expect(PackedQueueLayout.availableFlags(wrap: true) == 0x80 && PackedQueueLayout.availableFlags(wrap: false) == 0x8000)
        #expect(PackedQueueLayout.usedFlags(wrap: true) == 0x8080 && PackedQueueLayout.usedFlags(wrap: false) == 0)
        #expect(PackedQueueLayout.eventOffsetWrap(5, wrap: true) == 0x8005 && PackedQueueLayout.eventOffsetWrap(5, wrap: false) == 5)
    }

    @Test func theMemoryIsAlignedAndTheSizeNeedNotBeAPowerOfTwo() throws {
        let f = PackedRingFixture()
        let m = try PackedQueueMemory(arena: f.arena, size: 100, indirectEntries: 4)
        #expect(m.descriptors.size == 1600 && m.descriptors.deviceAddress % 16 == 0)
        #expect(m.driverEvent.deviceAddress % 4 == 0 && m.deviceEvent.deviceAddress % 4 == 0)
        #expect(m.driverEvent.deviceAddress != m.deviceEvent.deviceAddress)
        #expect(m.rings == QueueRings(descriptors: m.descriptors.deviceAddress, driver: m.driverEvent.deviceAddress,
                                      device: m.deviceEvent.deviceAddress))
        #expect(m.indirectStride >= 64 && m.indirect!.size == 100 * m.indirectStride)
    }
}

@Suite("packed virtqueue, driver side (spec 2.8)")
struct PackedQueueTests {
    @Test func addWritesTheListAndPublishMakesItsFirstDescriptorAvailableLast() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        let v1 = try add(&q, [readable, writable, status], token: 42)
        #expect(v1)
        // The rest of the list is written, the first descriptor's flags wait for publish (§2.8.6).
        #expect(f.descriptor(q, 0) == .init(address: 0x5000_0000, length: 16, id: 0, flags: 0))
        #expect(f.descriptor(q, 1) == .init(address: 0x5000_1000, length: 512, id: 0, flags: 0x80 | 2 | 1))
        #expect(f.descriptor(q, 2) == .init(address: 0x5000_2000, length: 1, id: 0, flags: 0x80 | 2))
        #expect(f.bell.pointee == 0xFFFF)
        let v2 = q.publish()
        #expect(v2)
        #expect(f.descriptor(q, 0).flags == 0x80 | 1)
        #expect(f.bell.pointee == 0)  // RING_EVENT_FLAGS_ENABLE (0): notified with the queue index
        #expect(q.freeCount == 5 && q.inFlight == 1)
        let v3 = q.publish()  // nothing new
        #expect(!v3)
    }

    /// VIRTIO_F_NOTIFICATION_DATA (§2.9): the queue index, the next position a descriptor will be
    /// made available at and the Driver Ring Wrap Counter, in one 32-bit write; after a wrap the
    /// counter is 0.
    @Test func notificationDataCarriesTheNextPositionAndWrapCounter() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 4, features: [.notificationData])
        for token in 0..<3 { _ = try add(&q, [writable], token: UInt64(token)) }
        do { let rang = q.publish(); #expect(rang) }
        #expect(f.bell32 == 0 | (0x8000 | 3) << 16)
        for slot in 0..<3 { f.use(q, slot: slot, id: UInt16(slot), length: 1) }
        let n = try drain(&q).count
        #expect(n == 3)
        for token in 3..<5 { _ = try add(&q, [writable], token: UInt64(token)) }
        do { let rang = q.publish(); #expect(rang) }
        #expect(f.bell32 == 0 | 1 << 16, "position 1 of the second lap, wrap counter 0")
        let ordered = try f.queue(features: [.orderPlatform])
        #expect(ordered.ordering.platform && !q.ordering.platform)
    }

    @Test func aUsedDescriptorGivesTheTokenAndLengthAndSkipsTheList() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [readable, writable, status], token: 42)
        _ = try add(&q, [writable], token: 43)
        q.publish()
        let v4 = q.hasUsed()
        #expect(!v4)
        f.use(q, slot: 0, id: 0, length: 513)  // over the list's first descriptor (§2.8.6)
        let v5 = q.hasUsed()
        #expect(v5)
        let got = try drain(&q)
        #expect(got.count == 1 && got[0] == (42, 513))
        #expect(q.freeCount == 7 && q.inFlight == 1)
        // The next used descriptor goes 3 further, where the second buffer's list began.
        f.use(q, slot: 3, id: 1, length: 100)
        let second = try drain(&q)
        #expect(second.count == 1 && second[0] == (43, 100))
        #expect(q.freeCount == 8 && q.inFlight == 0)
    }

    @Test func buffersCompleteInAnyOrderAndIDsAreReused() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 4)
        for t in 0..<4 { let ok = try add(&q, [writable], token: UInt64(t)); #expect(ok) }
        let v6 = try add(&q, [writable], token: 9)  // ring full
        #expect(!v6)
        q.publish()
        // The device finishes 2, 0, 3, 1, writing used descriptors in that order from slot 0.
        for (slot, id) in [2, 0, 3, 1].enumerated() { f.use(q, slot: slot, id: UInt16(id), length: UInt32(id)) }
        let got = try drain(&q)
        #expect(got.map(\.0) == [2, 0, 3, 1] && got.map(\.1) == [2, 0, 3, 1])
        // The ring wrapped: the next lap's descriptors carry AVAIL 0, USED 1.
        let v7 = try add(&q, [writable], token: 10)
        #expect(v7)
        q.publish()
        #expect(f.descriptor(q, 0).flags == 0x8000 | 2)
        #expect(f.descriptor(q, 0).id == 1)  // the ID freed last is handed out first
        f.use(q, slot: 0, id: 1, length: 5, wrap: false)
        let next = try drain(&q)
        #expect(next.count == 1 && next[0] == (10, 5))
    }

    @Test func aThousandLapsKeepTheWrapCountersInStep() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 5)  // not a power of two: allowed for packed rings (§2.8)
        var slot = 0, wrap = true
        for i in 0..<5000 {
            let segments = i % 3 == 0 ? [readable, writable] : [writable]
            let v8 = try add(&q, segments, token: UInt64(i))
            #expect(v8)
            q.publish()
            let id = f.descriptor(q, (slot + segments.count - 1) % 5).id
            f.use(q, slot: slot, id: id, length: 7, wrap: wrap)
            let got = try drain(&q)
            #expect(got.count == 1 && got[0] == (UInt64(i), 7))
            slot += segments.count
            if slot >= 5 { slot -= 5; wrap.toggle() }
        }
        #expect(q.isIdle && q.freeCount == 5)
    }

    @Test func aListLongerThanTheRingIsRefusedAndAFullRingSaysSo() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 2)
        do { _ = try add(&q, [readable, writable, status], token: 1); Issue.record("accepted") } catch {}
        let v9 = try add(&q, [readable, writable], token: 1)
        #expect(v9)
        let v10 = try add(&q, [writable], token: 2)
        #expect(!v10)
        do { _ = try add(&q, [writable, readable], token: 3); Issue.record("accepted") } catch {}  // readable after writable
        do { _ = try add(&q, [], token: 3); Issue.record("accepted") } catch {}
    }

    @Test func indirectDescriptorsTakeOneRingSlot() throws {
        let f = PackedRingFixture()
        var q = try f.queue(features: .ringIndirectDesc, indirectEntries: 4)
        _ = try add(&q, [readable, writable, status], token: 1)
        q.publish()
        #expect(q.freeCount == 7)
        let head = f.descriptor(q, 0)
        #expect(head.flags == PackedQueueLayout.flagIndirect | 0x80 && head.length == 48 && head.id == 0)
        // §2.8.8: in the table only WRITE is valid.
        #expect(f.descriptor(q, 0, table: head.address) == .init(address: 0x5000_0000, length: 16, id: 0, flags: 0))
        #expect(f.descriptor(q, 1, table: head.address).flags == 2)
        #expect(f.descriptor(q, 2, table: head.address).flags == 2)
        f.use(q, slot: 0, id: 0, length: 1)
        let n = try drain(&q).count
        #expect(n == 1 && q.freeCount == 8)
    }

    /// The used length counts for a buffer with writable bytes whether or not the device set
    /// WRITE (QEMU never does; Linux reads it regardless), and is ignored for a buffer with none.
    @Test func theUsedLengthCountsForWritableBuffersWithOrWithoutWrite() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [readable], token: 5)
        _ = try add(&q, [readable, status], token: 6)
        q.publish()
        f.use(q, slot: 0, id: 0, length: 0xDEAD, write: false)  // nothing writable: ignored
        f.use(q, slot: 1, id: 1, length: 1, write: false)       // as QEMU writes it
        let got = try drain(&q)
        #expect(got.count == 2 && got[0] == (5, 0) && got[1] == (6, 1))
    }

    @Test func notificationsFollowTheDeviceEventSuppressionStructure() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 8, features: .ringEventIdx)
        f.setDeviceEvent(q, flags: PackedQueueLayout.eventDisable)
        _ = try add(&q, [writable], token: 0)
        let v11 = q.publish()
        #expect(!v11)
        // A descriptor-specific event at offset 2 of the first lap: publishing 1..1 does not
        // reach it, 1..3 does.
        f.setDeviceEvent(q, offWrap: PackedQueueLayout.eventOffsetWrap(2, wrap: true), flags: PackedQueueLayout.eventDescriptorSpecific)
        _ = try add(&q, [writable], token: 1)
        let v12 = q.publish()
        #expect(!v12)
        _ = try add(&q, [writable], token: 2)
        _ = try add(&q, [writable], token: 3)
        let v13 = q.publish()
        #expect(v13)
        // An event in the next lap (wrap 0) at offset 1 is reached only after the ring wraps.
        for (slot, id) in [0, 1, 2, 3].enumerated() { f.use(q, slot: slot, id: UInt16(id), length: 0) }
        let four = try drain(&q).count
        #expect(four == 4)
        f.setDeviceEvent(q, offWrap: PackedQueueLayout.eventOffsetWrap(1, wrap: false), flags: PackedQueueLayout.eventDescriptorSpecific)
        for t in 4..<8 { _ = try add(&q, [writable], token: UInt64(t)) }
        let v14 = q.publish()  // positions 4-7 of the first lap
        #expect(!v14)
        _ = try add(&q, [writable], token: 8)
        let v15 = q.publish()  // position 0 of the second lap
        #expect(!v15)
        _ = try add(&q, [writable], token: 9)
        let v16 = q.publish()   // position 1 of the second lap: the event
        #expect(v16)
        // Without EVENT_IDX negotiated, a descriptor-specific request is answered with a notification.
        let g = PackedRingFixture()
        var plain = try g.queue()
        g.setDeviceEvent(plain, offWrap: 7, flags: PackedQueueLayout.eventDescriptorSpecific)
        _ = try add(&plain, [writable], token: 0)
        let v17 = plain.publish()
        #expect(v17)
    }

    @Test func interruptsAreArmedForTheNextUsedPositionAndItsLap() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 4, features: .ringEventIdx)
        q.suppressInterrupts()
        #expect(f.driverEvent(q).1 == PackedQueueLayout.eventDisable)
        let v18 = q.armInterrupts()
        #expect(v18)
        #expect(f.driverEvent(q) == (0x8000, PackedQueueLayout.eventDescriptorSpecific))
        for t in 0..<3 { _ = try add(&q, [writable], token: UInt64(t)) }
        q.publish()
        for slot in 0..<3 { f.use(q, slot: slot, id: UInt16(slot), length: 0) }
        let v19 = q.armInterrupts()  // used buffers are waiting: consume them instead of sleeping
        #expect(!v19)
        _ = try drain(&q)
        let v20 = q.armInterrupts()
        #expect(v20)
        #expect(f.driverEvent(q) == (0x8003, PackedQueueLayout.eventDescriptorSpecific))
        let g = PackedRingFixture()
        var plain = try g.queue()
        plain.suppressInterrupts()
        let armed = plain.armInterrupts()
        #expect(armed && g.driverEvent(plain).1 == PackedQueueLayout.eventEnable)
    }

    @Test func reclaimAllHandsEveryRequestBackAndStartsOver() throws {
        let f = PackedRingFixture()
        var q = try f.queue(size: 4)
        for t in 0..<3 { _ = try add(&q, [writable], token: UInt64(t)) }
        q.publish()
        var back: [UInt64] = []
        q.reclaimAll { back.append($0) }
        #expect(back.sorted() == [0, 1, 2] && q.isIdle && q.freeCount == 4)
        #expect((0..<4).allSatisfy { f.descriptor(q, $0).flags == 0 })  // zeroed, wrap counters 1
        _ = try add(&q, [writable], token: 7)
        q.publish()
        #expect(f.descriptor(q, 0).flags == 0x80 | 2)
    }
}

@Suite("packed virtqueue: a device that breaks the protocol")
struct PackedQueueHostileDeviceTests {
    func expectBroken(_ q: inout PackedQueue, _ words: String) {
        do { _ = try drain(&q); Issue.record("no error") } catch { #expect("\(error)".contains(words), "\(error)") }
        // Broken for good: every later call fails with the same error until a reset.
        do { _ = try drain(&q); Issue.record("no error") } catch { #expect("\(error)".contains(words), "\(error)") }
        do { _ = try add(&q, [writable], token: 99); Issue.record("no error") } catch { #expect("\(error)".contains(words), "\(error)") }
    }

    @Test func aBufferIDOutsideTheQueue() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [writable], token: 1)
        q.publish()
        f.use(q, slot: 0, id: 8, length: 1)
        expectBroken(&q, "used buffer ID 8 at descriptor 0 is not an ID (queue size 8)")
    }

    @Test func aBufferIDNotInFlightOrUsedTwice() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [writable], token: 1)
        _ = try add(&q, [writable], token: 2)
        q.publish()
        f.use(q, slot: 0, id: 0, length: 1)
        f.use(q, slot: 1, id: 0, length: 1)  // the same buffer again
        do { _ = try drain(&q); Issue.record("no error") } catch { #expect("\(error)".contains("used buffer ID 0 at descriptor 1 is not a request in flight"), "\(error)") }
        let g = PackedRingFixture()
        var r = try g.queue()
        _ = try add(&r, [writable], token: 1)
        r.publish()
        g.use(r, slot: 0, id: 5, length: 1)  // never submitted
        expectBroken(&r, "used buffer ID 5 at descriptor 0 is not a request in flight")
    }

    @Test func aLengthPastTheWritableBytes() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [readable, status], token: 1)
        q.publish()
        f.use(q, slot: 0, id: 0, length: 2)
        expectBroken(&q, "used length 2 for buffer ID 0 is past the 1 device-writable bytes")
    }

    @Test func flagsNoLapCanHave() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [writable], token: 1)
        q.publish()
        let before = q.hasUsed()
        #expect(!before)
        // AVAIL 0, USED 1 with the used wrap counter at 1: available in a lap not yet begun.
        f.use(q, slot: 0, id: 0, length: 1, flags: PackedQueueLayout.flagUsed)
        // A waiter wakes for it (and drainUsed names it) instead of waiting for a timeout.
        let after = q.hasUsed()
        #expect(after)
        expectBroken(&q, "neither available nor used in this lap")
    }

    @Test func aUsedDescriptorOfTheWrongLap() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [writable], token: 1)
        q.publish()
        // AVAIL = USED = 0 while the lap's counter is 1: used in a lap that is over.
        f.use(q, slot: 0, id: 0, length: 1, wrap: false)
        expectBroken(&q, "descriptor 0 has AVAIL 0 and USED 0 with the used wrap counter at 1")
    }

    @Test func leftoversOfAnEarlierLapAreNotMistakenForUse() throws {
        // A two-descriptor list leaves its second descriptor available-looking after the device
        // used the first; a lap later the next used position can land on it with nothing
        // published there: that is not a completion and not a fault.
        let f = PackedRingFixture()
        var q = try f.queue(size: 3)
        _ = try add(&q, [readable, writable], token: 1)
        q.publish()
        f.use(q, slot: 0, id: 0, length: 1)
        var n = try drain(&q).count
        #expect(n == 1)
        _ = try add(&q, [writable], token: 2)  // slot 2, then the ring wraps
        q.publish()
        f.use(q, slot: 2, id: 0, length: 1)
        n = try drain(&q).count
        #expect(n == 1)
        // Next used position: slot 0 of lap 2; slot 1 still says "available in lap 1".
        _ = try add(&q, [readable, writable], token: 3)  // slots 0-1 of lap 2, not published
        n = try drain(&q).count
        #expect(n == 0 && q.brokenReason == nil)
        q.publish()
        f.use(q, slot: 0, id: 0, length: 1, wrap: false)
        let got = try drain(&q)
        #expect(got.count == 1 && got[0] == (3, 1))
    }

    @Test func aUsedDescriptorWithNothingInFlight() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        f.use(q, slot: 0, id: 0, length: 0)
        expectBroken(&q, "descriptor 0 marked used with no request in flight")
    }

    @Test func aBufferUsedBeforeItWasMadeAvailable() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [writable], token: 1)
        q.publish()
        _ = try add(&q, [writable], token: 2)  // ID 1, not published
        f.use(q, slot: 0, id: 1, length: 1)
        expectBroken(&q, "used buffer ID 1 at descriptor 0 was added but not yet made available")
    }

    @Test func aResetRecoversABrokenQueue() throws {
        let f = PackedRingFixture()
        var q = try f.queue()
        _ = try add(&q, [writable], token: 1)
        q.publish()
        f.use(q, slot: 0, id: 9, length: 1)
        do { _ = try drain(&q); Issue.record("no error") } catch {}
        var back: [UInt64] = []
        q.reclaimAll { back.append($0) }
        #expect(back == [1] && q.brokenReason == nil)
        _ = try add(&q, [writable], token: 2)
        q.publish()
        f.use(q, slot: 0, id: 0, length: 3)
        let got = try drain(&q)
        #expect(got.count == 1 && got[0] == (2, 3))
    }
}
