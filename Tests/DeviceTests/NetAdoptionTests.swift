import Testing
import Foundation
import Glibc
import Virtio
import VirtioDevices
import VirtioEmulator

/// Live upgrade of virtio-net: a second driver adopts the running device with its receive
/// buffers still posted and transmit frames still in flight, through a second transport on the
/// same emulated device and DMA memory (as a successor process does with the handed-over fds).
@Suite("adopting a running virtio-net device without a reset", .serialized)
struct NetAdoptionTests {
    typealias F = NetFixture

    /// 64 KiB of zeroed memory standing in for DMA memory at 0x200000, an 8-entry queue's rings
    /// at its start and a doorbell that rings into a private word.
    final class RingMemory {
        let block = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 4096)
        let bell = UnsafeMutablePointer<UInt16>.allocate(capacity: 1)
        let memory: SplitQueueMemory
        var doorbell: Doorbell { Doorbell(address: UnsafeMutableRawPointer(bell), value: 0) }

        init() throws {
            block.initializeMemory(as: UInt8.self, repeating: 0, count: 1 << 16)
            memory = try SplitQueueMemory(arena: DMAArena(memory: DMASlice(pointer: block, deviceAddress: 0x20_0000, size: 1 << 16)), size: 8)
        }

        deinit { block.deallocate(); bell.deallocate() }
    }

    @Test func aQueueWithRequestsOutstandingIsAdoptedAsItIs() throws {
        let ring = try RingMemory()
        defer { withExtendedLifetime(ring) {} }
        let memory = ring.memory, doorbell = ring.doorbell
        var old = SplitQueue(index: 0, memory: memory, features: [], doorbell: doorbell)
        var segment = BufferSegment(address: 0x20_8000, length: 100, deviceWritable: true)
        for token in 0..<5 as Range<UInt64> {
            #expect(try withUnsafePointer(to: &segment) { try old.add(UnsafeBufferPointer(start: $0, count: 1), token: 100 + token) })
        }
        #expect(throws: VirtioError.self) { _ = try old.handoverSnapshot() }  // added, not published
        old.publish()
        let snapshot = try old.handoverSnapshot()
        #expect(snapshot.outstanding.map(\.head) == [0, 1, 2, 3, 4])
        #expect(snapshot.outstanding.map(\.token) == [100, 101, 102, 103, 104])
        #expect(snapshot.outstanding.allSatisfy { $0.writableBytes == 100 })
        // The device used heads 3 and 1 (in that order) after the old driver stopped looking.
        let used = memory.used.pointer
        used.storeBytes(of: UInt32(3).littleEndian, toByteOffset: SplitQueueLayout.usedElement(0) + SplitQueueLayout.usedElementID, as: UInt32.self)
        used.storeBytes(of: UInt32(60).littleEndian, toByteOffset: SplitQueueLayout.usedElement(0) + SplitQueueLayout.usedElementLength, as: UInt32.self)
        used.storeBytes(of: UInt32(1).littleEndian, toByteOffset: SplitQueueLayout.usedElement(1) + SplitQueueLayout.usedElementID, as: UInt32.self)
        used.storeBytes(of: UInt32(99).littleEndian, toByteOffset: SplitQueueLayout.usedElement(1) + SplitQueueLayout.usedElementLength, as: UInt32.self)
        used.storeBytes(of: UInt16(2).littleEndian, toByteOffset: SplitQueueLayout.usedIndex, as: UInt16.self)

        var queue = try SplitQueue(adopting: memory, features: [], doorbell: doorbell, index: 0,
                                   availIndex: snapshot.availIndex, usedIndex: snapshot.usedIndex,
                                   outstanding: snapshot.outstanding)
        #expect(queue.inFlight == 5 && queue.freeCount == 3)
        var completed: [(UInt64, UInt32)] = []
        #expect(try queue.drainUsed { completed.append(($0, $1)) } == 2)
        #expect(completed.map(\.0) == [103, 101] && completed.map(\.1) == [60, 99])
        // The free list holds the three never used and the two completed: eight adds fit, no ninth.
        for token in 0..<5 as Range<UInt64> {
            #expect(try withUnsafePointer(to: &segment) { try queue.add(UnsafeBufferPointer(start: $0, count: 1), token: token) })
        }
        #expect(try withUnsafePointer(to: &segment) { try queue.add(UnsafeBufferPointer(start: $0, count: 1), token: 9) } == false)
        // A used element for a head that was not outstanding is refused as usual.
        used.storeBytes(of: UInt32(3).littleEndian, toByteOffset: SplitQueueLayout.usedElement(2) + SplitQueueLayout.usedElementID, as: UInt32.self)
        used.storeBytes(of: UInt32(0).littleEndian, toByteOffset: SplitQueueLayout.usedElement(2) + SplitQueueLayout.usedElementLength, as: UInt32.self)
        used.storeBytes(of: UInt16(3).littleEndian, toByteOffset: SplitQueueLayout.usedIndex, as: UInt16.self)
        _ = try queue.drainUsed { _, _ in }  // head 3 was re-added above: a legal completion
        _ = queue.cancelAll { _ in }
        _ = old.cancelAll { _ in }
    }

    @Test func outstandingRequestsThatDoNotAddUpAreRefused() throws {
        let ring = try RingMemory()
        defer { withExtendedLifetime(ring) {} }
        let memory = ring.memory
        // The device used one of the two outstanding since the old driver looked.
        memory.used.pointer.storeBytes(of: UInt16(11).littleEndian, toByteOffset: SplitQueueLayout.usedIndex, as: UInt16.self)
        let doorbell = ring.doorbell
        func adopt(avail: UInt16, used: UInt16, _ heads: [UInt16]) -> String? {
            do {
                _ = try SplitQueue(adopting: memory, features: [], doorbell: doorbell, index: 0, availIndex: avail, usedIndex: used,
                                   outstanding: heads.map { .init(head: $0, token: UInt64($0), writableBytes: 10) })
                return nil
            } catch { return "\(error)" }
        }
        #expect(adopt(avail: 12, used: 10, [1, 2]) == nil)
        #expect(adopt(avail: 12, used: 10, [1])?.contains("1 requests handed over, but the indices say 2") == true)
        #expect(adopt(avail: 12, used: 10, [1, 1])?.contains("head 1 is handed over twice") == true)
        #expect(adopt(avail: 12, used: 10, [1, 8])?.contains("head 8 is not a descriptor") == true)
        // used.idx reads 13: three past 10 with only two outstanding.
        memory.used.pointer.storeBytes(of: UInt16(13).littleEndian, toByteOffset: SplitQueueLayout.usedIndex, as: UInt16.self)
        #expect(adopt(avail: 12, used: 10, [1, 2])?.contains("used idx is 13 in the ring, more than the 2 outstanding") == true)
    }

    /// A running device, as a previous driver leaves it for its successor.
    struct Handover: ~Copyable {
        let device: EmulatedDevice
        let features: Features
        let snapshots: [QueueSnapshot]
        let counters: NetCounters
        let transport: EmulatedTransport
    }

    func handOver(_ net: consuming NetDevice<EmulatedTransport>, device: EmulatedDevice) throws -> Handover {
        let snapshots = try net.handoverSnapshots()
        let features = net.negotiation.accepted, counters = net.counters
        return Handover(device: device, features: features, snapshots: snapshots, counters: counters, transport: net.detach())
    }

    @Test func framesArrivingDuringTheHandoverAreDeliveredByTheSuccessor() throws {
        let device = EmulatedDevice(model: .net(queueSize: 64))
        var old = try NetDevice(transport: EmulatedTransport(device: device))
        try old.setPromiscuous(true)
        for i in 0..<10 { #expect(device.injectFrame(F.frame(200 + i, sequence: UInt32(i)))) }
        #expect(try F.receive(&old, count: 10).count == 10)
        let resets = device.resetCount, enables = device.queueEnableWrites
        let h = try handOver(old, device: device)
        #expect(h.snapshots.map(\.index) == [0, 1, 2])
        #expect(h.snapshots[0].outstanding.count == 64, "every receive buffer stays posted")
        #expect(h.snapshots[1].outstanding.isEmpty && h.snapshots[2].outstanding.isEmpty)
        // The gap: 40 frames arrive while no driver looks; the device puts them in posted buffers.
        for i in 10..<50 { #expect(device.injectFrame(F.frame(60 + i * 20, sequence: UInt32(i)))) }
        let deadline = ContinuousClock.now + .seconds(5)
        while device.netStatistics.framesDelivered < 50 && ContinuousClock.now < deadline { usleep(100) }

        var net = try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features, queues: h.snapshots,
                                counters: h.counters, promiscuous: true)
        #expect(net.negotiation.transitions.isEmpty && net.counters.rxPackets == 10 && net.promiscuous == true)
        let got = try F.receive(&net, count: 40)
        #expect(got.compactMap { F.sequence(of: $0.frame) } == (10..<50).map(UInt32.init), "frames lost or reordered across the handover")
        #expect(got.map(\.frame) == (10..<50).map { F.frame(60 + $0 * 20, sequence: UInt32($0)) })
        #expect(net.counters.rxPackets == 50 && net.receivePosted == 64)
        // The successor drives every queue: transmit, and a control command.
        #expect(try F.frame(100, sequence: 77).withUnsafeBytes { try net.transmit(frame: $0) })
        #expect(F.transmitted(device, count: 1).compactMap { F.sequence(of: $0.frame) } == [77])
        try net.setAllMulticast(true)
        #expect(device.netStatistics.allMulticast)
        #expect(device.resetCount == resets, "adoption reset the device")
        #expect(device.queueEnableWrites == enables, "adoption wrote queue_enable again")
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func transmitFramesInFlightAreCompletedUnderTheSuccessor() throws {
        let device = EmulatedDevice(model: .net(queueSize: 16))
        var old = try NetDevice(transport: EmulatedTransport(device: device))
        var faults = EmulatedDevice.Faults()
        faults.stopCompleting = true
        device.faults = faults
        for i in 0..<6 { #expect(try F.frame(100, sequence: UInt32(i)).withUnsafeBytes { try old.transmit(frame: $0, publish: false) }) }
        let h = try handOver(old, device: device)
        #expect(h.snapshots[1].outstanding.count == 6 && h.snapshots[1].outstanding.allSatisfy { $0.writableBytes == 0 })
        var net = try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features, queues: h.snapshots,
                                counters: h.counters)
        #expect(net.transmitInFlight == 6)
        device.faults = .init()
        // Published by the old driver before the snapshot: the device sends them, in order.
        #expect(F.transmitted(device, count: 6).compactMap { F.sequence(of: $0.frame) } == (0..<6).map(UInt32.init))
        var reclaimed = 0
        let deadline = ContinuousClock.now + .seconds(5)
        while reclaimed < 6 && ContinuousClock.now < deadline { reclaimed += try net.reclaimTransmitted(); usleep(100) }
        #expect(reclaimed == 6 && net.transmitInFlight == 0 && net.counters.txCompleted == 6 && net.counters.txPackets == 6)
        // Every slot is usable again: a full ring's worth goes out.
        for i in 0..<16 { #expect(try F.frame(80, sequence: UInt32(100 + i)).withUnsafeBytes { try net.transmit(frame: $0) }) }
        #expect(F.transmitted(device, count: 16).count == 16)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func aSuccessorThatLaysOutMemoryDifferentlyIsRefusedBeforeWriting() throws {
        let device = EmulatedDevice(model: .net(queueSize: 32))
        let old = try NetDevice(transport: EmulatedTransport(device: device))
        let h = try handOver(old, device: device)
        func refusal(_ body: () throws -> NetDevice<EmulatedTransport>) -> String? {
            do { _ = try body().detach(); return nil } catch { return "\(error)" }
        }
        // Another receive buffer size moves everything after the receive buffers.
        #expect(refusal { try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features, queues: h.snapshots,
                                        rxBufferSize: 512) }?.contains("offers 1530 device-writable bytes, this version posts 512") == true)
        #expect(refusal { try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features,
                                        queues: Array(h.snapshots.prefix(2))) }?.contains("the negotiated features need [0, 1, 2]") == true)
        #expect(refusal { try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features.subtracting(.netChecksum),
                                        queues: h.snapshots) }?.contains("the handed-over state says") == true)
        var lying = h.snapshots
        lying[0].outstanding[3].token = 999
        #expect(refusal { try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features,
                                        queues: lying) }?.contains("slot 999") == true)
        // Nothing was written: the right successor still adopts it and receives.
        var net = try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features, queues: h.snapshots)
        #expect(device.injectFrame(F.frame(90, sequence: 5)))
        #expect(try F.receive(&net, count: 1).compactMap { F.sequence(of: $0.frame) } == [5])
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func twentyHandoversUnderTrafficLoseNoFrame() throws {
        let device = EmulatedDevice(model: .net(queueSize: 32))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        var expected: [UInt32] = []
        var received: [UInt32] = []
        var sequence: UInt32 = 0
        for _ in 0..<20 {
            for _ in 0..<12 {
                #expect(device.injectFrame(F.frame(64 + Int(sequence % 900), sequence: sequence)))
                expected.append(sequence)
                sequence += 1
            }
            // Take some, leave some in the ring for the successor.
            received += try F.receive(&net, count: 5).compactMap { F.sequence(of: $0.frame) }
            let h = try handOver(net, device: device)
            net = try NetDevice(adopting: EmulatedTransport(sharing: h.transport), features: h.features, queues: h.snapshots,
                                counters: h.counters)
        }
        received += try F.receive(&net, count: expected.count - received.count).compactMap { F.sequence(of: $0.frame) }
        #expect(received == expected)
        #expect(net.counters.rxPackets == expected.count && device.resetCount == 1)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
