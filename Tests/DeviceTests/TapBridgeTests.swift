import Testing
import Foundation
import Glibc
import Services
import Synchronization
import Virtio
import VirtioDevices
import VirtioEmulator

/// The TAP bridge against the emulator, with a SOCK_SEQPACKET socket pair standing in for the TAP
/// (one frame per read and write, non-blocking, as a TAP is): the test holds the "kernel" end.
@Suite("TAP bridge: NetDevice <-> packet descriptor", .serialized)
struct TapBridgeTests {
    typealias F = NetFixture

    /// A non-blocking SOCK_SEQPACKET pair: [0] for the bridge, [1] for the test.
    final class PacketPair {
        let bridge: Int32, peer: Int32
        init() {
            var fds: [Int32] = [-1, -1]
            precondition(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &fds) == 0)
            bridge = fds[0]
            peer = fds[1]
        }
        deinit { close(bridge); close(peer) }

        func send(_ bytes: [UInt8]) { #expect(bytes.withUnsafeBytes { write(peer, $0.baseAddress, $0.count) } == bytes.count) }

        /// Every packet waiting on the test's end.
        func drain() -> [[UInt8]] {
            var out: [[UInt8]] = []
            var buffer = [UInt8](repeating: 0, count: 70000)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(peer, $0.baseAddress, $0.count) }
                if n <= 0 { return out }
                out.append(Array(buffer[0..<n]))
            }
        }
    }

    static func header(flags: UInt8 = 0, gsoType: UInt8 = 0, start: UInt16 = 0, offset: UInt16 = 0) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 12)
        h[0] = flags
        h[1] = gsoType
        h[6] = UInt8(start & 0xFF); h[7] = UInt8(start >> 8)
        h[8] = UInt8(offset & 0xFF); h[9] = UInt8(offset >> 8)
        return h
    }

    /// Runs bridge rounds until `done` or 10 s.
    static func pump(_ bridge: inout TapBridge<EmulatedTransport>, until done: (borrowing TapBridge<EmulatedTransport>) -> Bool) throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while !done(bridge) && ContinuousClock.now < deadline {
            if try !bridge.step().progress { usleep(50) }
        }
    }

    @Test func headerSizeFollowsTheChecksumFeatures() throws {
        #expect(TapBridge<EmulatedTransport>.vnetHeaderSize(for: [.netChecksum]) == 12)
        #expect(TapBridge<EmulatedTransport>.vnetHeaderSize(for: [.netGuestChecksum]) == 12)
        #expect(TapBridge<EmulatedTransport>.vnetHeaderSize(for: [.netMAC, .netMergeableRxBuffers]) == 0)
        #expect(TapBridge<EmulatedTransport>.tapOffloads(for: [.netChecksum]) == 1)
        #expect(TapBridge<EmulatedTransport>.tapOffloads(for: [.netGuestChecksum]) == 0)
    }

    @Test func plainFramesBothWays() throws {
        let offered = EmulatedDevice.Model.netDefaultFeatures.subtracting([NetFeature.csum, NetFeature.guestCsum])
        let device = EmulatedDevice(model: .net(features: offered))
        let net = try NetDevice(transport: EmulatedTransport(device: device))
        let headerSize = TapBridge<EmulatedTransport>.vnetHeaderSize(for: net.features)
        #expect(headerSize == 0)
        let pair = PacketPair()
        var bridge = TapBridge(device: net, fd: pair.bridge, vnetHeaderSize: headerSize)

        // device -> TAP: every frame, unchanged, no header in front.
        let incoming = (0..<300).map { F.frame(60 + $0 * 4, sequence: UInt32($0)) }
        var seen: [[UInt8]] = []
        for f in incoming { #expect(device.injectFrame(f)) }
        try Self.pump(&bridge) { b in
            seen += pair.drain()
            return seen.count == incoming.count
        }
        let sameIncoming = seen == incoming
        #expect(sameIncoming, "\(seen.count) frames reached the TAP side")
        #expect(bridge.counters.toTapFrames == 300 && bridge.counters.toTapBytes == incoming.reduce(0) { $0 + $1.count })

        // TAP -> device: every frame, with a plain header; runts and oversize frames dropped.
        let outgoing = (0..<600).map { F.frame(1514 - $0 % 1400, sequence: UInt32(1000 + $0)) }
        var sent: [EmulatedDevice.TransmittedFrame] = []
        for (i, f) in outgoing.enumerated() {
            pair.send(f)
            // A socket pair queues far less than a TAP: let the bridge keep up.
            if i % 20 == 19 { try Self.pump(&bridge) { b in b.counters.fromTapFrames == i + 1 } }
        }
        pair.send([UInt8](repeating: 1, count: 13))
        pair.send([UInt8](repeating: 2, count: 1519))
        try Self.pump(&bridge) { b in
            sent += device.takeTransmitted()
            return sent.count == outgoing.count && b.counters.fromTapDroppedSize == 2
        }
        let sameOutgoing = sent.map(\.frame) == outgoing
        #expect(sameOutgoing, "\(sent.count) frames reached the device")
        #expect(sent.allSatisfy { $0.header == .init() })
        #expect(bridge.counters.fromTapDroppedSize == 2)
        #expect(bridge.summary.contains("tap->device: 600 frames"))
        _ = try bridge.shutdown()
    }

    @Test func checksumOffloadsPassThroughTheHeader() throws {
        let device = EmulatedDevice(model: .net())
        let net = try NetDevice(transport: EmulatedTransport(device: device))
        let headerSize = TapBridge<EmulatedTransport>.vnetHeaderSize(for: net.features)
        #expect(headerSize == 12)
        let pair = PacketPair()
        var bridge = TapBridge(device: net, fd: pair.bridge, vnetHeaderSize: headerSize)

        // device -> TAP: the device's flags and checksum offsets go to the kernel; num_buffers not.
        let frame = F.frame(200, sequence: 1)
        device.injectFrame(frame, header: .init(flags: NetHeader.needsChecksum, checksumStart: 34, checksumOffset: 16))
        device.injectFrame(frame, header: .init(flags: NetHeader.dataValid))
        var seen: [[UInt8]] = []
        try Self.pump(&bridge) { _ in seen += pair.drain(); return seen.count == 2 }
        #expect(seen.count == 2)
        if seen.count == 2 {
            #expect(seen[0] == Self.header(flags: NetHeader.needsChecksum, start: 34, offset: 16) + frame)
            #expect(seen[1] == Self.header(flags: NetHeader.dataValid) + frame)
        }

        // TAP -> device: NEEDS_CSUM kept, DATA_VALID (receive-only) cleared, GSO refused.
        pair.send(Self.header(flags: NetHeader.needsChecksum, start: 34, offset: 16) + F.frame(300, sequence: 2))
        pair.send(Self.header(flags: NetHeader.dataValid) + F.frame(301, sequence: 3))
        pair.send(Self.header(gsoType: 1) + F.frame(302, sequence: 4))
        pair.send(Self.header(flags: NetHeader.needsChecksum, start: 290, offset: 16) + F.frame(303, sequence: 5))
        var sent: [EmulatedDevice.TransmittedFrame] = []
        try Self.pump(&bridge) { b in
            sent += device.takeTransmitted()
            return sent.count == 2 && b.counters.fromTapDroppedHeader == 2
        }
        #expect(sent.map { F.sequence(of: $0.frame) } == [2, 3])
        #expect(sent.first?.header == .init(flags: NetHeader.needsChecksum, checksumStart: 34, checksumOffset: 16))
        #expect(sent.last?.header == .init())
        #expect(bridge.counters.fromTapDroppedHeader == 2)
        _ = try bridge.shutdown()
    }

    @Test func fullTapDropsAndCountsMalformedFramesShowInTheSummary() throws {
        let device = EmulatedDevice(model: .net())
        let net = try NetDevice(transport: EmulatedTransport(device: device))
        let pair = PacketPair()
        var bridge = TapBridge(device: net, fd: pair.bridge, vnetHeaderSize: 12)
        // Nobody reads the test's end: the socket fills up and writes say EAGAIN.
        var small: Int32 = 4096
        setsockopt(pair.bridge, SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let total = 2000
        var injected = 0
        try Self.pump(&bridge) { b in
            while injected < total && device.pendingReceiveFrames < 200 {
                device.injectFrame(F.frame(1000, sequence: UInt32(injected)))
                injected += 1
            }
            return b.counters.toTapFrames + b.counters.toTapDroppedFull == total
        }
        #expect(bridge.counters.toTapDroppedFull > 0)
        #expect(bridge.counters.toTapFrames + bridge.counters.toTapDroppedFull == total)
        #expect(pair.drain().count == bridge.counters.toTapFrames)

        // One fault per frame (two on one frame would count once).
        var seen: [[UInt8]] = []
        for (i, fault) in [\EmulatedDevice.NetFaults.rxBadHeader, \.rxUsedLengthShort].enumerated() {
            var faults = EmulatedDevice.NetFaults()
            faults[keyPath: fault] = 1
            device.netFaults = faults
            device.injectFrame(F.frame(100, sequence: UInt32(5000 + i)))
            try Self.pump(&bridge) { b in b.device.counters.rxDropped == i + 1 }
        }
        device.injectFrame(F.frame(100, sequence: 5002))
        try Self.pump(&bridge) { _ in seen += pair.drain(); return seen.count == 1 }
        #expect(seen.count == 1 && F.sequence(of: seen[0].count > 12 ? Array(seen[0].dropFirst(12)) : []) == 5002)
        #expect(bridge.summary.contains("malformed from device: 2 (short used length 1, bad num_buffers 0, bad header 1, bad length 0)"))
        #expect(bridge.summary.contains("tap full \(bridge.counters.toTapDroppedFull)"))
        _ = try bridge.shutdown()
    }

    @Test func linkChangesAreSeenAndTheLoopStops() throws {
        let device = EmulatedDevice(model: .net())
        let net = try NetDevice(transport: EmulatedTransport(device: device))
        let pair = PacketPair()
        let lines = LogLines()
        var configuration = TapBridgeConfiguration()
        configuration.log = { lines.append($0) }
        configuration.statusInterval = .milliseconds(10)
        var bridge = TapBridge(device: net, fd: pair.bridge, vnetHeaderSize: 12, configuration: configuration)
        device.setLink(up: false)
        try bridge.refreshStatus()
        #expect(bridge.device.linkStatus == [])
        #expect(lines.all == ["link down (change 1)"])

        // run() returns .paused when asked, .stopped when stopped; frames move meanwhile.
        tapBridgeTestStop.store(false, ordering: .relaxed)
        tapBridgeTestPause.store(true, ordering: .relaxed)
        #expect(try bridge.run(until: tapBridgeTestStop, pauseWhen: tapBridgeTestPause) == .paused)
        tapBridgeTestPause.store(false, ordering: .relaxed)
        device.setLink(up: true)
        device.injectFrame(F.frame(64, sequence: 9))
        let stopper = JoinedThread { usleep(300_000); tapBridgeTestStop.store(true, ordering: .relaxed) }
        defer { stopper.join() }
        #expect(try bridge.run(until: tapBridgeTestStop, pauseWhen: tapBridgeTestPause) == .stopped)
        #expect(bridge.device.linkStatus == .linkUp)
        #expect(lines.all.last == "link up (change 2)")
        #expect(pair.drain().count == 1)
        _ = try bridge.shutdown()
    }
}

let tapBridgeTestStop = Atomic<Bool>(false)
let tapBridgeTestPause = Atomic<Bool>(false)

