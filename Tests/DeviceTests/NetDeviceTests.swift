import Testing
import Foundation
import Glibc
import Virtio
import VirtioDevices
import VirtioEmulator

/// Helpers shared by the virtio-net tests: frames with a recognisable content, and a bounded
/// receive loop (the driver's `receive` never blocks).
enum NetFixture {
    static let peer: [UInt8] = [0x52, 0x54, 0x00, 0xAA, 0xBB, 0xCC]

    /// An Ethernet frame of `count` bytes (at least 18): destination, source, EtherType 0x88B5
    /// (local experimental), a 4-byte sequence number, then a pattern derived from it.
    static func frame(_ count: Int, sequence: UInt32, to destination: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]) -> [UInt8] {
        var f = destination + peer + [0x88, 0xB5]
        withUnsafeBytes(of: sequence.bigEndian) { f += $0 }
        while f.count < count { f.append(UInt8(truncatingIfNeeded: f.count &* 7 &+ Int(sequence))) }
        return Array(f.prefix(count))
    }

    static func sequence(of frame: [UInt8]) -> UInt32? {
        guard frame.count >= 18 else { return nil }
        return frame[14..<18].reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// Receives until `count` frames arrived or `timeout` passed.
    static func receive(_ net: inout NetDevice<EmulatedTransport>, count: Int, timeout: Duration = .seconds(10),
                        checkRefill: Bool = false) throws -> [(frame: [UInt8], header: NetHeader)] {
        var out: [(frame: [UInt8], header: NetHeader)] = []
        let deadline = ContinuousClock.now + timeout
        while out.count < count && ContinuousClock.now < deadline {
            let n = try net.receive { frame, header in out.append((Array(frame), header)) }
            if checkRefill {
                // Every buffer taken was posted again before `receive` returned.
                #expect(net.receivePosted == net.receiveQueueSize)
            }
            if n == 0 { usleep(50) }
        }
        return out
    }

    /// Polls `receive` until `condition` holds on the counters (frames delivered meanwhile are
    /// returned) or `timeout` passes.
    static func receive(_ net: inout NetDevice<EmulatedTransport>, until condition: (NetCounters) -> Bool,
                        timeout: Duration = .seconds(10)) throws -> [[UInt8]] {
        var out: [[UInt8]] = []
        let deadline = ContinuousClock.now + timeout
        while !condition(net.counters) && ContinuousClock.now < deadline {
            if try net.receive({ frame, _ in out.append(Array(frame)) }) == 0 { usleep(50) }
        }
        return out
    }

    /// Collects transmitted frames from the device until `count` arrived or `timeout` passed.
    static func transmitted(_ device: EmulatedDevice, count: Int, timeout: Duration = .seconds(10)) -> [EmulatedDevice.TransmittedFrame] {
        var out: [EmulatedDevice.TransmittedFrame] = []
        let deadline = ContinuousClock.now + timeout
        while out.count < count && ContinuousClock.now < deadline {
            out += device.takeTransmitted()
            if out.count < count { usleep(100) }
        }
        return out
    }
}

@Suite("virtio-net driver against the emulator", .serialized)
struct NetDeviceTests {
    typealias F = NetFixture

    @Test func negotiatesWhatItSupportsAndReadsTheConfiguration() throws {
        let device = EmulatedDevice(model: .net(mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55], mtu: 1400))
        let net = try NetDevice(transport: EmulatedTransport(device: device))
        let accepted = net.negotiation.accepted
        for f: Features in [.netMAC, .netStatus, .netMergeableRxBuffers, .netChecksum, .netGuestChecksum,
                            .netControlQueue, .netControlRx, .netMTU, .ringEventIdx, .version1, .accessPlatform] {
            #expect(accepted.contains(f), "\(f.names(for: .net)) not accepted")
        }
        #expect(!accepted.contains(.netMultiQueue) && !accepted.contains(.ringReset))
        #expect(net.config.mac == MACAddress(0x02, 0x11, 0x22, 0x33, 0x44, 0x55))
        #expect(net.config.mac?.description == "02:11:22:33:44:55")
        #expect(net.config.mtu == 1400 && net.config.maxFrameBytes == 1418 && net.config.maxQueuePairs == 1)
        #expect(net.linkStatus.contains(.linkUp))
        #expect(net.controlQueueIndex == 2)
        // With MRG_RXBUF the 2048 asked for is cut to what one frame can use: header + MTU + 18.
        #expect(net.receivePosted == 256 && net.receiveQueueSize == 256 && net.receiveBufferSize == 12 + 1418)
        #expect(accepted.names(for: .net).contains("MRG_RXBUF"))
        #expect(Features.netMergeableRxBuffers.names(for: .net) == ["MRG_RXBUF"])
        #expect(Features.parse("CTRL_RX", for: .net) == .netControlRx)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func withoutMergeableBuffersEachBufferHoldsAWholeFrame() throws {
        let device = EmulatedDevice(model: .net(features: [NetFeature.mac, NetFeature.status], mtu: 9000))
        let net = try NetDevice(transport: EmulatedTransport(device: device), queueSize: 64)
        #expect(!net.features.contains(.netMergeableRxBuffers) && !net.features.contains(.netMTU))
        // MTU not negotiated: 1500 (§5.1.4); buffers hold the header and 1518 bytes.
        #expect(net.config.mtu == 1500 && net.receiveBufferSize == 12 + 1518)
        #expect(net.controlQueueIndex == nil)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func aDependentFeatureWithoutItsPrerequisiteIsNotAccepted() throws {
        // CTRL_RX offered without CTRL_VQ (a device breaking §2.2.1): not accepted (§5.1.3.1).
        let device = EmulatedDevice(model: .net(features: [NetFeature.mac, NetFeature.ctrlRx]))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        #expect(!net.features.contains(.netControlRx) && !net.features.contains(.netControlQueue))
        #expect(throws: NetError.notNegotiated("VIRTIO_NET_F_CTRL_RX (for VIRTIO_NET_CTRL_RX_PROMISC)")) { try net.setPromiscuous(true) }
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func multiqueueMovesTheControlQueueAfterEveryPair() throws {
        let device = EmulatedDevice(model: .net(pairs: 3, queueSize: 32))
        var net = try NetDevice(transport: EmulatedTransport(device: device), wanted: NetDevice<EmulatedTransport>.supported.union(.netMultiQueue))
        #expect(net.features.contains(.netMultiQueue))
        #expect(net.config.maxQueuePairs == 3 && net.controlQueueIndex == 6)
        try net.setAllMulticast(true)
        #expect(device.netStatistics.allMulticast)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test(arguments: ["mtu", "multicast", "zero-mac", "pairs"])
    func nonsenseConfigurationIsRefused(_ what: String) throws {
        var model = EmulatedDevice.Model.net()
        switch what {
        case "mtu": model.net.mtu = 60
        case "multicast": model.net.mac = [0x01, 0x00, 0x5E, 0x00, 0x00, 0x01]
        case "zero-mac": model.net.mac = [0, 0, 0, 0, 0, 0]
        default: model.offeredFeatures.insert(NetFeature.mq); model.net.maxQueuePairs = 0
        }
        let fragment = ["mtu": "mtu 60", "multicast": "multicast", "zero-mac": "00:00:00:00:00:00", "pairs": "max_virtqueue_pairs 0"][what]!
        let device = EmulatedDevice(model: model)
        #expect { _ = try NetDevice(transport: EmulatedTransport(device: device), wanted: NetDevice<EmulatedTransport>.usable) } throws: {
            "\($0)".contains(fragment)
        }
    }

    @Test func transmittedFramesArriveIntactWithTheirHeaders() throws {
        let device = EmulatedDevice(model: .net())
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        let frames = [F.frame(60, sequence: 1), F.frame(1518, sequence: 2), F.frame(54, sequence: 3)]
        let headers: [NetHeader] = [.none, .none, .partialChecksum(start: 34, offset: 16)]
        for (frame, header) in zip(frames, headers) {
            #expect(try frame.withUnsafeBytes { try net.transmit(frame: $0, header: header) })
        }
        let seen = F.transmitted(device, count: 3)
        #expect(seen.map(\.frame) == frames)
        #expect(seen.map(\.header.flags) == [0, 0, NetHeader.needsChecksum])
        #expect(seen[2].header.checksumStart == 34 && seen[2].header.checksumOffset == 16)
        #expect(seen.allSatisfy { $0.header.numBuffers == 0 && $0.header.gsoType == 0 })
        #expect(try net.reclaimTransmitted() == 3)
        #expect(net.counters.txPackets == 3 && net.counters.txBytes == 60 + 1518 + 54 && net.counters.txCompleted == 3)
        // Refused before the device sees them: sizes outside 14...MTU+18, headers the features forbid.
        #expect(throws: NetError.frameSize(1519, maximum: 1518)) { try F.frame(1519, sequence: 4).withUnsafeBytes { _ = try net.transmit(frame: $0) } }
        #expect(throws: NetError.frameSize(13, maximum: 1518)) { try [UInt8](repeating: 0, count: 13).withUnsafeBytes { _ = try net.transmit(frame: $0) } }
        #expect(throws: NetError.self) {
            try F.frame(60, sequence: 5).withUnsafeBytes { _ = try net.transmit(frame: $0, header: .partialChecksum(start: 50, offset: 16)) }
        }
        var gso = NetHeader.none
        gso.gsoType = 1
        #expect(throws: NetError.self) { try F.frame(60, sequence: 6).withUnsafeBytes { _ = try net.transmit(frame: $0, header: gso) } }
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func aFullTransmitRingPushesBackAndDrainsInOrder() throws {
        let device = EmulatedDevice(model: .net(queueSize: 16))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        var faults = EmulatedDevice.Faults()
        faults.stopCompleting = true
        device.faults = faults
        var sent = 0
        while try F.frame(100, sequence: UInt32(sent)).withUnsafeBytes({ try net.transmit(frame: $0) }) {
            sent += 1
            guard sent <= 64 else { break }
        }
        #expect(sent == 16 && net.transmitInFlight == 16)
        #expect(net.counters.txRingFull == 1)
        #expect(try net.reclaimTransmitted() == 0)
        // The device comes back: everything queued goes out, in order, and the ring takes more.
        device.faults = .init()
        let seen = F.transmitted(device, count: 16)
        #expect(seen.compactMap { F.sequence(of: $0.frame) } == (0..<16).map(UInt32.init))
        for i in 16..<40 {
            var accepted = try F.frame(100, sequence: UInt32(i)).withUnsafeBytes { try net.transmit(frame: $0) }
            let deadline = ContinuousClock.now + .seconds(5)
            while !accepted && ContinuousClock.now < deadline {
                usleep(50)
                accepted = try F.frame(100, sequence: UInt32(i)).withUnsafeBytes { try net.transmit(frame: $0) }
            }
            #expect(accepted)
        }
        #expect(F.transmitted(device, count: 24).compactMap { F.sequence(of: $0.frame) } == (16..<40).map(UInt32.init))
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test(arguments: [true, false])
    func receivedFramesArriveIntact(_ mergeable: Bool) throws {
        var features = EmulatedDevice.Model.netDefaultFeatures
        if !mergeable { features.remove(NetFeature.mrgRxbuf) }
        let device = EmulatedDevice(model: .net(features: features))
        // With MRG_RXBUF, 512-byte buffers: an MTU-sized frame spreads over 3 of them.
        var net = try NetDevice(transport: EmulatedTransport(device: device), rxBufferSize: 512)
        #expect(net.features.contains(.netMergeableRxBuffers) == mergeable)
        let frames = [F.frame(60, sequence: 1), F.frame(1518, sequence: 2), F.frame(500, sequence: 3), F.frame(14 + 4, sequence: 4)]
        for f in frames { #expect(device.injectFrame(f)) }
        // GUEST_CSUM: a header the device may write (DATA_VALID) comes through as written.
        #expect(device.injectFrame(F.frame(80, sequence: 5), header: .init(flags: NetHeader.dataValid)))
        let got = try F.receive(&net, count: 5)
        #expect(got.map(\.frame) == frames + [F.frame(80, sequence: 5)])
        #expect(got.map(\.header.numBuffers) == (mergeable ? [1, 3, 1, 1, 1] : [1, 1, 1, 1, 1]))
        #expect(got[4].header.flags == NetHeader.dataValid)
        #expect(net.counters.rxPackets == 5 && net.counters.rxBytes == frames.map(\.count).reduce(80, +))
        #expect(net.counters.rxDropped == 0)
        #expect(net.receivePosted == net.receiveQueueSize)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func theReceiveRingStaysFullOverTenThousandFrames() throws {
        let device = EmulatedDevice(model: .net(queueSize: 64))
        var net = try NetDevice(transport: EmulatedTransport(device: device), rxBufferSize: 1024)
        var next: UInt32 = 0
        var received = 0
        var sizes = 0
        while received < 10_000 {
            // Batches larger than the ring, so the device waits for refills mid-batch.
            let batch = min(150, 10_000 - received)
            for i in 0..<batch {
                let size = [60, 1518, 300, 1024, 1100][(Int(next) + i) % 5]
                #expect(device.injectFrame(F.frame(size, sequence: next + UInt32(i))))
            }
            let got = try F.receive(&net, count: batch, checkRefill: true)
            #expect(got.count == batch)
            for (i, r) in got.enumerated() where F.sequence(of: r.frame) != next + UInt32(i) || r.frame != F.frame(r.frame.count, sequence: next + UInt32(i)) {
                Issue.record("frame \(next + UInt32(i)) arrived damaged or out of order")
                break
            }
            sizes += got.map(\.frame.count).reduce(0, +)
            next += UInt32(batch)
            received += got.count
            if got.count < batch { break }
        }
        #expect(received == 10_000)
        #expect(net.counters.rxPackets == 10_000 && net.counters.rxBytes == sizes && net.counters.rxDropped == 0)
        #expect(net.receivePosted == 64)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    /// One bad frame between good ones: the bad one is never delivered and is counted under
    /// `reason`; the good ones before and after arrive.
    func expectDropped(_ reason: NetDropReason, features: Features = EmulatedDevice.Model.netDefaultFeatures,
                       fault: (inout EmulatedDevice.NetFaults) -> Void = { _ in },
                       bad: [UInt8] = F.frame(200, sequence: 999), header: EmulatedDevice.NetHeaderFields = .init()) throws {
        let device = EmulatedDevice(model: .net(features: features, queueSize: 32))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        device.injectFrame(F.frame(100, sequence: 1))
        #expect(try F.receive(&net, count: 1).map(\.frame) == [F.frame(100, sequence: 1)])
        var faults = device.netFaults
        fault(&faults)
        device.netFaults = faults
        device.injectFrame(bad, header: header)
        let during = try F.receive(&net, until: { $0.drops(reason) == 1 })
        #expect(during.isEmpty, "the malformed frame was delivered")
        #expect(net.counters.drops(reason) == 1 && net.counters.rxDropped == 1)
        for i in 2..<7 { device.injectFrame(F.frame(100 * i, sequence: UInt32(i))) }
        let after = try F.receive(&net, count: 5)
        #expect(after.map(\.frame) == (2..<7).map { F.frame(100 * $0, sequence: UInt32($0)) })
        #expect(net.receivePosted == net.receiveQueueSize && net.counters.brokenRings == 0)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func aUsedLengthShorterThanTheHeaderIsDropped() throws {
        try expectDropped(.shortUsedLength, fault: { $0.rxUsedLengthShort = 1 })
    }
    @Test func numBuffersPastWhatWasPostedIsDropped() throws {
        try expectDropped(.badNumBuffers, fault: { $0.rxNumBuffersPastPosted = 1 })
    }
    @Test func aHeaderWithUndefinedFieldsIsDropped() throws {
        try expectDropped(.badHeader, fault: { $0.rxBadHeader = 1 })
    }
    @Test func aChecksumOutsideTheFrameIsDropped() throws {
        try expectDropped(.badHeader, header: .init(flags: NetHeader.needsChecksum, checksumStart: 190, checksumOffset: 16))
    }
    @Test func checksumFlagsWithoutGuestChecksumAreDropped() throws {
        var features = EmulatedDevice.Model.netDefaultFeatures
        features.remove(NetFeature.guestCsum)
        try expectDropped(.badHeader, features: features, header: .init(flags: NetHeader.dataValid))
    }
    @Test func aFrameLongerThanTheMTUIsDropped() throws {
        try expectDropped(.badLength, bad: F.frame(1519, sequence: 999))
    }
    @Test func aFrameShorterThanAnEthernetHeaderIsDropped() throws {
        try expectDropped(.badLength, bad: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    }

    @Test func aUsedLengthPastTheBufferBreaksTheRingAndIsRecoveredByReset() throws {
        let device = EmulatedDevice(model: .net(queueSize: 32))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        var faults = device.netFaults
        faults.rxUsedLengthPastBuffer = 1
        device.netFaults = faults
        let resets = device.resetCount
        device.injectFrame(F.frame(100, sequence: 1))
        let during = try F.receive(&net, until: { $0.recoveries == 1 })
        #expect(during.isEmpty)
        // The split queue refused the element (§2.7.8.1); the device was reset and rebuilt.
        #expect(net.counters.brokenRings == 1 && net.counters.recoveries == 1 && device.resetCount > resets)
        #expect(net.receivePosted == 32)
        for i in 2..<7 { device.injectFrame(F.frame(100, sequence: UInt32(i))) }
        #expect(try F.receive(&net, count: 5).compactMap { F.sequence(of: $0.frame) } == [2, 3, 4, 5, 6])
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func aDeviceThatKeepsBreakingTheRingIsGivenUpOn() throws {
        let device = EmulatedDevice(model: .net(queueSize: 32))
        var net = try NetDevice(transport: EmulatedTransport(device: device), maxConsecutiveRecoveries: 2)
        var faults = device.netFaults
        faults.rxUsedLengthPastBuffer = 1000
        device.netFaults = faults
        for i in 0..<200 { device.injectFrame(F.frame(100, sequence: UInt32(i))) }
        #expect(throws: NetError.self) { _ = try F.receive(&net, count: 200, timeout: .seconds(5)) }
        #expect(net.counters.recoveries == 2 && net.counters.rxPackets == 0)
    }

    @Test func aLinkStatusChangeIsSeen() throws {
        let device = EmulatedDevice(model: .net())
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        #expect(try net.refreshStatus() == false)
        device.setLink(up: false)
        #expect(try net.refreshStatus() == true)
        #expect(!net.linkStatus.contains(.linkUp) && net.linkStatus.description == "down")
        #expect(try net.refreshStatus() == false)
        device.setLink(up: true)
        #expect(try net.refreshStatus() == true && net.linkStatus.contains(.linkUp))
        #expect(net.counters.linkChanges == 2)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func receiveModesGoThroughTheControlQueueWithTheAckChecked() throws {
        let device = EmulatedDevice(model: .net())
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        try net.setPromiscuous(true)
        try net.setAllMulticast(true)
        #expect(device.netStatistics.promiscuous && device.netStatistics.allMulticast)
        try net.setAllMulticast(false)
        #expect(!device.netStatistics.allMulticast)
        var faults = device.netFaults
        faults.controlBadAck = 1
        device.netFaults = faults
        #expect { try net.setPromiscuous(false) } throws: { "\($0)".contains("neither VIRTIO_NET_OK nor VIRTIO_NET_ERR") }
        // A reset returns the device's filters to their defaults; recovery sets them again.
        try net.recover()
        #expect(device.netStatistics.promiscuous && !device.netStatistics.allMulticast)
        #expect(device.netStatistics.controlCommands == 6)
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func resetRecoverRebuildsAndTrafficFlowsAgain() throws {
        let device = EmulatedDevice(model: .net(queueSize: 32))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        device.injectFrame(F.frame(100, sequence: 1))
        #expect(try F.receive(&net, count: 1).count == 1)
        // Frames queued while the device does nothing are lost to the reset, and counted.
        var faults = EmulatedDevice.Faults()
        faults.stopCompleting = true
        device.faults = faults
        for i in 0..<3 { _ = try F.frame(100, sequence: UInt32(i)).withUnsafeBytes { try net.transmit(frame: $0) } }
        try net.recover()
        device.faults = .init()
        #expect(net.counters.recoveries == 1 && net.counters.txLostToReset == 3 && net.transmitInFlight == 0)
        #expect(net.receivePosted == 32)
        device.injectFrame(F.frame(100, sequence: 2))
        #expect(try F.receive(&net, count: 1).map(\.frame) == [F.frame(100, sequence: 2)])
        _ = try F.frame(100, sequence: 7).withUnsafeBytes { try net.transmit(frame: $0) }
        #expect(F.transmitted(device, count: 1).map(\.frame) == [F.frame(100, sequence: 7)])
        // DEVICE_NEEDS_RESET (§2.1.2) is found by refreshStatus and recovered the same way.
        device.setNeedsReset()
        _ = try net.refreshStatus()
        #expect(net.counters.recoveries == 2)
        device.injectFrame(F.frame(100, sequence: 3))
        #expect(try F.receive(&net, count: 1).map(\.frame) == [F.frame(100, sequence: 3)])
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    /// Like the rng cycle test: meaningful counts only when no other test runs (VIRTIO_VFIO_ISOLATED).
    @Test func openCloseCyclesLeakNothing() throws {
        let device = EmulatedDevice(model: .net(queueSize: 16))
        var transport = EmulatedTransport(device: device)
        var before = ProcessResources.now()
        for cycle in 0..<300 {
            if cycle == 50 { before = ProcessResources.now() }
            var net = try NetDevice(transport: transport, wanted: cycle % 2 == 0 ? NetDevice<EmulatedTransport>.supported : [.netMAC])
            device.injectFrame(F.frame(64, sequence: UInt32(cycle)))
            #expect(try F.receive(&net, count: 1).count == 1)
            _ = try F.frame(64, sequence: UInt32(cycle)).withUnsafeBytes { try net.transmit(frame: $0) }
            transport = try net.shutdown()
        }
        if getenv("VIRTIO_VFIO_ISOLATED") != nil {
            let after = ProcessResources.now()
            #expect(after.descriptors <= before.descriptors && after.mappings <= before.mappings
                    && after.threads <= before.threads, "before \(before), after \(after)")
        }
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
