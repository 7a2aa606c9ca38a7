import Testing
@testable import Virtio

/// The test plays the device: it reads what the driver put in the rings and writes used elements
/// itself, including the hostile ones a broken device would write.
final class RingFixture {
    let memory: UnsafeMutableRawPointer
    let arena: DMAArena
    /// The queue's doorbell: 16 bits, or 32 with VIRTIO_F_NOTIFICATION_DATA (`bell32`).
    let bell = UnsafeMutablePointer<UInt16>.allocate(capacity: 2)
    static let deviceBase: UInt64 = 0x4000_0000

    init(bytes: Int = 1 << 20) {
        memory = .allocate(byteCount: bytes, alignment: 4096)
        arena = DMAArena(memory: DMASlice(pointer: memory, deviceAddress: RingFixture.deviceBase, size: bytes))
        bell.initialize(repeating: 0xFFFF, count: 2)
    }

    var bell32: UInt32 { UnsafeRawPointer(bell).load(as: UInt32.self) }

    deinit {
        memory.deallocate()
        bell.deallocate()
    }

    func queue(size: UInt16 = 8, features: Features = [], indirectEntries: Int = 0) throws -> SplitQueue {
        let m = try SplitQueueMemory(arena: arena, size: size, indirectEntries: indirectEntries)
        return SplitQueue(index: 0, memory: m, features: features, doorbell: Doorbell(address: bell, value: 0))
    }

    func pointer(_ deviceAddress: UInt64) -> UnsafeMutableRawPointer { memory + Int(deviceAddress - RingFixture.deviceBase) }

    struct Descriptor: Equatable { var address: UInt64; var length: UInt32; var flags: UInt16; var next: UInt16 }

    func descriptor(_ q: borrowing SplitQueue, _ i: Int, table: UInt64? = nil) -> Descriptor {
        let p = pointer(table ?? q.rings.descriptors) + SplitQueueLayout.descriptor(i)
        return Descriptor(address: p.load(fromByteOffset: SplitQueueLayout.descriptorAddress, as: UInt64.self),
                          length: p.load(fromByteOffset: SplitQueueLayout.descriptorLength, as: UInt32.self),
                          flags: p.load(fromByteOffset: SplitQueueLayout.descriptorFlags, as: UInt16.self),
                          next: p.load(fromByteOffset: SplitQueueLayout.descriptorNext, as: UInt16.self))
    }

    func availIndex(_ q: borrowing SplitQueue) -> UInt16 { pointer(q.rings.driver).load(fromByteOffset: SplitQueueLayout.availIndex, as: UInt16.self) }
    func availEntry(_ q: borrowing SplitQueue, _ i: Int) -> UInt16 {
        pointer(q.rings.driver).load(fromByteOffset: SplitQueueLayout.availRing(i), as: UInt16.self)
    }
    func availFlags(_ q: borrowing SplitQueue) -> UInt16 {
        pointer(q.rings.driver).load(fromByteOffset: SplitQueueLayout.availFlags, as: UInt16.self)
    }
    func usedEvent(_ q: borrowing SplitQueue) -> UInt16 {
        pointer(q.rings.driver).load(fromByteOffset: SplitQueueLayout.usedEvent(Int(q.size)), as: UInt16.self)
    }

    /// The device writes a used element at position `slot` and publishes used idx = `index`.
    func complete(_ q: borrowing SplitQueue, slot: Int, id: UInt32, length: UInt32, index: UInt16) {
        let used = pointer(q.rings.device)
        let element = SplitQueueLayout.usedElement(slot)
        used.storeBytes(of: id, toByteOffset: element + SplitQueueLayout.usedElementID, as: UInt32.self)
        used.storeBytes(of: length, toByteOffset: element + SplitQueueLayout.usedElementLength, as: UInt32.self)
        used.storeBytes(of: index, toByteOffset: SplitQueueLayout.usedIndex, as: UInt16.self)
    }
    func setUsedFlags(_ q: borrowing SplitQueue, _ flags: UInt16) {
        pointer(q.rings.device).storeBytes(of: flags, toByteOffset: SplitQueueLayout.usedFlags, as: UInt16.self)
    }
    func setAvailEvent(_ q: borrowing SplitQueue, _ v: UInt16) {
        pointer(q.rings.device).storeBytes(of: v, toByteOffset: SplitQueueLayout.availEvent(Int(q.size)), as: UInt16.self)
    }
}

func add(_ q: inout SplitQueue, _ segments: [BufferSegment], token: UInt64) throws -> Bool {
    try segments.withUnsafeBufferPointer { try q.add($0, token: token) }
}

let readable = BufferSegment(address: 0x5000_0000, length: 16, deviceWritable: false)
let writable = BufferSegment(address: 0x5000_1000, length: 512, deviceWritable: true)
let status = BufferSegment(address: 0x5000_2000, length: 1, deviceWritable: true)

@Suite("split virtqueue, driver side (spec 2.7)")
struct SplitQueueTests {
    @Test func addWritesAChainAndPublishMakesItVisible() throws {
        let f = RingFixture()
        var q = try f.queue()
        let r1 = try add(&q, [readable, writable, status], token: 42)
        #expect(r1)
        #expect(f.availIndex(q) == 0)  // not visible before publish
        do { let published = q.publish(); #expect(published) }
        #expect(f.availIndex(q) == 1 && f.availEntry(q, 0) == 0)
        #expect(f.descriptor(q, 0) == .init(address: 0x5000_0000, length: 16, flags: 1, next: 1))
        #expect(f.descriptor(q, 1) == .init(address: 0x5000_1000, length: 512, flags: 3, next: 2))
        #expect(f.descriptor(q, 2).flags == 2)
        #expect(q.freeCount == 5 && q.inFlight == 1)
        #expect(f.bell.pointee == 0)  // the doorbell got the queue index
    }

    /// VIRTIO_F_NOTIFICATION_DATA (§2.9, §4.1.5.2): one 32-bit write, the queue index and the
    /// next available index (next_off: its low 15 bits, next_wrap: bit 15).
    @Test func notificationDataCarriesTheNextAvailableIndex() throws {
        let f = RingFixture()
        var q = try f.queue(features: [.notificationData])
        for token in 0..<3 { _ = try add(&q, [writable], token: UInt64(token)) }
        do { let rang = q.publish(); #expect(rang) }
        #expect(f.bell32 == 0 | 3 << 16)
        let plain = RingFixture()
        var p = try plain.queue()
        _ = try add(&p, [writable], token: 1)
        p.publish()
        #expect(plain.bell32 == 0xFFFF_0000, "without the feature only the 16-bit queue index is written")
    }

    /// VIRTIO_F_ORDER_PLATFORM (§6): the queue's barriers are chosen from the features, once.
    @Test func theBarriersFollowOrderPlatform() throws {
        let f = RingFixture()
        let platform = try f.queue(features: [.orderPlatform])
        let smp = try f.queue()
        #expect(platform.ordering.platform && !smp.ordering.platform)
    }

    @Test func completionReturnsTokenAndLengthAndFreesTheChain() throws {
        let f = RingFixture()
        var q = try f.queue()
        _ = try add(&q, [readable, writable, status], token: 42)
        q.publish()
        f.complete(q, slot: 0, id: 0, length: 513, index: 1)
        var got: [(UInt64, UInt32)] = []
        do { let drained = try q.drainUsed { got.append(($0, $1)) }; #expect(drained == 1) }
        #expect(got.count == 1 && got[0].0 == 42 && got[0].1 == 513)
        #expect(q.freeCount == 8 && q.inFlight == 0)
        do { let drained = try q.drainUsed { _, _ in }; #expect(drained == 0) }
    }

    @Test func indirectDescriptorsUseOneRingSlot() throws {
        let f = RingFixture()
        var q = try f.queue(features: .ringIndirectDesc, indirectEntries: 4)
        _ = try add(&q, [readable, writable, status], token: 1)
        #expect(q.freeCount == 7)
        let head = f.descriptor(q, 0)
        #expect(head.flags == SplitQueueLayout.flagIndirect && head.length == 48)
        #expect(f.descriptor(q, 1, table: head.address) == .init(address: 0x5000_1000, length: 512, flags: 3, next: 2))
        #expect(f.descriptor(q, 2, table: head.address).flags == 2)
        // One segment never goes indirect.
        _ = try add(&q, [writable], token: 2)
        #expect(f.descriptor(q, 1).flags == 2)
    }

    @Test func aFullQueueSaysSoAndAnOversizedRequestIsRefused() throws {
        let f = RingFixture()
        var q = try f.queue(size: 4)
        let r2 = try add(&q, [readable, writable], token: 1)
        #expect(r2)
        let r3 = try add(&q, [readable, writable], token: 2)
        #expect(r3)
        let full = try add(&q, [writable], token: 3)
        #expect(!full)
        do {
            _ = try add(&q, [writable, writable, writable, writable, writable], token: 4)
            Issue.record("a request larger than the queue was accepted")
        } catch {}
    }

    @Test func readableAfterWritableIsRefused() throws {
        let f = RingFixture()
        var q = try f.queue()
        do {
            _ = try add(&q, [writable, readable], token: 1)
            Issue.record("a readable buffer after a writable one was accepted")
        } catch {}
        #expect(q.freeCount == 8)
    }

    @Test func notificationSuppressionWithoutEventIndex() throws {
        let f = RingFixture()
        var q = try f.queue()
        f.setUsedFlags(q, SplitQueueLayout.usedNoNotify)
        _ = try add(&q, [writable], token: 1)
        do { let published = q.publish(); #expect(!published) }
        #expect(f.bell.pointee == 0xFFFF)
        f.setUsedFlags(q, 0)
        _ = try add(&q, [writable], token: 2)
        do { let published = q.publish(); #expect(published) }
    }

    @Test func notificationSuppressionWithEventIndex() throws {
        let f = RingFixture()
        var q = try f.queue(features: .ringEventIdx)
        f.setAvailEvent(q, 5)  // the device wants to hear when idx passes 5
        _ = try add(&q, [writable], token: 1)
        do { let published = q.publish(); #expect(!published) }          // 0 -> 1 does not pass 5
        for t in 2...5 { _ = try add(&q, [writable], token: UInt64(t)) }
        do { let published = q.publish(); #expect(!published) }          // 1 -> 5 does not pass 5 (needs idx 6)
        _ = try add(&q, [writable], token: 6)
        do { let published = q.publish(); #expect(published) }           // 5 -> 6 passes it
    }

    @Test func interruptSuppressionAndArming() throws {
        let f = RingFixture()
        var q = try f.queue()
        q.suppressInterrupts()
        #expect(f.availFlags(q) == SplitQueueLayout.availNoInterrupt)
        let armed = q.armInterrupts()
        #expect(armed)
        #expect(f.availFlags(q) == 0)
        _ = try add(&q, [writable], token: 1)
        q.publish()
        f.complete(q, slot: 0, id: 0, length: 0, index: 1)
        let armedAgain = q.armInterrupts()
        #expect(!armedAgain)  // already pending: do not sleep

        var e = try f.queue(features: .ringEventIdx)
        e.suppressInterrupts()
        #expect(f.usedEvent(e) == 0x8000)
        let armedE = e.armInterrupts()
        #expect(armedE)
        #expect(f.usedEvent(e) == 0)
    }

    @Test func cancelAllHandsBackEveryRequestInFlight() throws {
        let f = RingFixture()
        var q = try f.queue()
        for t in [7, 8, 9] as [UInt64] { _ = try add(&q, [readable, writable], token: t) }
        q.publish()
        f.complete(q, slot: 0, id: 2, length: 0, index: 1)  // the device finished token 8
        _ = try q.drainUsed { _, _ in }
        var cancelled: [UInt64] = []
        q.cancelAll { cancelled.append($0) }
        #expect(cancelled.sorted() == [7, 9])
    }
}

@Suite("split virtqueue refuses a hostile device (spec 2.7.8)")
struct HostileUsedRingTests {
    func primed(_ f: RingFixture) throws -> SplitQueue {
        var q = try f.queue()
        _ = try add(&q, [readable, writable], token: 1)   // head 0, descriptors 0-1
        _ = try add(&q, [writable], token: 2)             // head 2
        q.publish()
        return q
    }

    func expectBroken(_ f: RingFixture, _ q: inout SplitQueue, _ fragment: String) {
        var delivered = 0
        do {
            _ = try q.drainUsed { _, _ in delivered += 1 }
            Issue.record("the device's \(fragment) was accepted")
        } catch {
            guard case .brokenQueue(0, let why) = error else { Issue.record("wrong error \(error)"); return }
            #expect(why.contains(fragment), "\(why)")
        }
        #expect(delivered == 0)
        // Broken stays broken until a reset: no more adds, no more completions.
        do { _ = try add(&q, [writable], token: 9); Issue.record("add on a broken queue") } catch {}
        do { _ = try q.drainUsed { _, _ in }; Issue.record("drain on a broken queue") } catch {}
    }

    @Test func anIDOutsideTheQueue() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 8, length: 0, index: 1)
        expectBroken(f, &q, "used id 8 is not a descriptor index")
    }

    @Test func anIDThatIsNotInFlight() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 1, length: 0, index: 1)  // descriptor 1 is the tail of chain 0, not a head
        expectBroken(f, &q, "used id 1 is not a request in flight")
    }

    @Test func aDuplicateCompletion() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 2, length: 0, index: 1)
        do { let drained = try q.drainUsed { _, _ in }; #expect(drained == 1) }
        f.complete(q, slot: 1, id: 2, length: 0, index: 2)
        expectBroken(f, &q, "completed twice")
    }

    @Test func aLengthPastTheWritableBuffers() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 0, length: 513, index: 1)  // 512 writable bytes in chain 0
        expectBroken(f, &q, "used length 513 for id 0 is past the 512 device-writable bytes")
    }

    @Test func anIndexJumpLargerThanWhatIsInFlight() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 0, length: 0, index: 3)
        expectBroken(f, &q, "used idx jumped by 3 with only 2 requests in flight")
    }

    @Test func anIndexJumpLargerThanTheQueue() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 0, length: 0, index: 0x8000)
        expectBroken(f, &q, "jumped by 32768")
    }

    @Test func validCompletionsBeforeABadOneAreDelivered() throws {
        let f = RingFixture(); var q = try primed(f)
        f.complete(q, slot: 0, id: 2, length: 1, index: 1)
        f.complete(q, slot: 1, id: 6, length: 0, index: 2)
        var tokens: [UInt64] = []
        do { _ = try q.drainUsed { t, _ in tokens.append(t) }; Issue.record("id 6 accepted") } catch {}
        #expect(tokens == [2])
    }
}

@Suite("split queue regressions found by fuzzing")
struct SplitQueueRegressionTests {
    /// Writable lengths were summed in 32 bits and wrapped past 4 GiB, so a legitimate used length
    /// was refused as "past the writable bytes" (Fuzz/Regressions/FuzzUsedRing).
    @Test func writableBytesBeyondFourGiBDoNotWrap() throws {
        let f = RingFixture()
        var q = try f.queue()
        let huge = BufferSegment(address: 0x6000_0000, length: 0xFFFF_FFFF, deviceWritable: true)
        _ = try add(&q, [huge, huge], token: 5)
        q.publish()
        f.complete(q, slot: 0, id: 0, length: 0xFFFF_FFFF, index: 1)
        var got: UInt32 = 0
        let drained = try q.drainUsed { _, length in got = length }
        #expect(drained == 1 && got == 0xFFFF_FFFF)
    }
}
