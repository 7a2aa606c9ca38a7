import Testing
import Foundation
import Glibc
import Services
import Synchronization
import Syscalls
import Virtio
import VirtioDevices
import VirtioEmulator

/// The TAP bridge with the device in MSI-X mode: it spins while traffic flows, then sleeps on the
/// device's eventfds (and the TAP, and a wake descriptor), and every frame still gets through.
@Suite("TAP bridge sleeping on MSI-X interrupts", .serialized)
struct TapBridgeInterruptTests {
    typealias F = NetFixture
    typealias Pair = TapBridgeTests.PacketPair

    /// A bridge in MSI-X mode that never spins and never looks at the status on its own, so
    /// only an interrupt, the TAP or `wake` can end one of its sleeps.
    static func sleepingBridge(_ device: EmulatedDevice, _ pair: Pair, wake: Int32,
                               log: @escaping @Sendable (String) -> Void = { _ in }) throws -> TapBridge<EmulatedTransport> {
        let net = try NetDevice(transport: EmulatedTransport(device: device), mode: .msix)
        #expect(net.interruptDescriptors != nil && net.mode == .msix)
        var configuration = TapBridgeConfiguration()
        configuration.busyPoll = .zero
        configuration.statusInterval = .seconds(3600)
        configuration.wakeDescriptor = wake
        configuration.log = log
        return TapBridge(device: net, fd: pair.bridge, vnetHeaderSize: 12, configuration: configuration)
    }

    @Test func framesFromTheDeviceWakeASleepingBridge() throws {
        let device = EmulatedDevice(model: .net())
        let pair = Pair()
        let wakeFD = try EventFD()
        let wake = wakeFD.raw
        var bridge = try Self.sleepingBridge(device, pair, wake: wake)
        interruptTestStop.store(false, ordering: .relaxed)
        // Frames arrive one by one with pauses, so the bridge is asleep when each comes.
        let feeder = JoinedThread {
            for i in 0..<20 {
                usleep(20_000)
                device.injectFrame(F.frame(100 + i, sequence: UInt32(i)))
            }
            usleep(100_000)
            interruptTestStop.store(true, ordering: .relaxed)
            _ = Syscall.write64(wake, 1)
        }
        defer { feeder.join() }
        #expect(try bridge.run(until: interruptTestStop, pauseWhen: { false }) == .stopped)
        let got = pair.drain()
        #expect(got.compactMap { F.sequence(of: Array($0.dropFirst(12))) } == (0..<20).map(UInt32.init))
        // Slept between the frames, and only the receive interrupt could have ended those sleeps.
        #expect(bridge.counters.interruptSleeps >= 10, "\(bridge.counters)")
        #expect(bridge.counters.interruptWakeups >= 10, "\(bridge.counters)")
        _ = try bridge.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func framesFromTheTapAndTheWakeDescriptorEndASleep() throws {
        let device = EmulatedDevice(model: .net())
        let pair = Pair()
        let wakeFD = try EventFD()
        let wake = wakeFD.raw
        var bridge = try Self.sleepingBridge(device, pair, wake: wake)
        interruptTestPause.store(false, ordering: .relaxed)
        interruptTestStop.store(false, ordering: .relaxed)
        let peer = pair.peer
        let sender = JoinedThread {
            for i in 0..<10 {
                usleep(20_000)
                let packet = TapBridgeTests.header() + F.frame(80, sequence: UInt32(i))
                _ = packet.withUnsafeBytes { write(peer, $0.baseAddress, $0.count) }
            }
            usleep(50_000)
            // A hot-upgrade request: the flag, then the eventfd ends the sleep at once.
            interruptTestPause.store(true, ordering: .relaxed)
            _ = Syscall.write64(wake, 1)
        }
        defer { sender.join() }
        #expect(try bridge.run(until: interruptTestStop, pauseWhen: { interruptTestPause.load(ordering: .relaxed) }) == .paused)
        // Each frame was read from the TAP while the bridge slept: the TAP ended those sleeps.
        let sent = F.transmitted(device, count: 10)
        #expect(sent.compactMap { F.sequence(of: $0.frame) } == (0..<10).map(UInt32.init))
        #expect(bridge.counters.interruptSleeps >= 5)
        _ = try bridge.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func aLinkChangeIsReportedThroughTheConfigurationVector() throws {
        let device = EmulatedDevice(model: .net())
        let pair = Pair()
        let lines = LogLines()
        let wakeFD = try EventFD()
        let wake = wakeFD.raw
        var bridge = try Self.sleepingBridge(device, pair, wake: wake, log: { lines.append($0) })
        interruptTestStop.store(false, ordering: .relaxed)
        let changer = JoinedThread {
            usleep(100_000)
            device.setLink(up: false)
            let deadline = ContinuousClock.now + .seconds(10)
            while lines.all.isEmpty && ContinuousClock.now < deadline { usleep(1000) }
            interruptTestStop.store(true, ordering: .relaxed)
            _ = Syscall.write64(wake, 1)
        }
        defer { changer.join() }
        #expect(try bridge.run(until: interruptTestStop, pauseWhen: { false }) == .stopped)
        // No status look was due: the configuration interrupt woke the bridge and it read the link.
        #expect(lines.all == ["link down (change 1)"])
        #expect(bridge.device.linkStatus == [])
        _ = try bridge.shutdown()
    }

    @Test func liveAdoptionKeepsTheVectorsOrIsRefused() throws {
        let device = EmulatedDevice(model: .net(queueSize: 32))
        var old = try NetDevice(transport: EmulatedTransport(device: device), mode: .msix)
        for i in 0..<5 { device.injectFrame(F.frame(70, sequence: UInt32(i))) }
        let snapshots = try old.handoverSnapshots()
        let features = old.negotiation.accepted
        let transport = old.detach()
        var net = try NetDevice(adopting: EmulatedTransport(sharing: transport), features: features, queues: snapshots, mode: .msix)
        #expect(net.interruptDescriptors != nil)
        #expect(try F.receive(&net, count: 5).compactMap { F.sequence(of: $0.frame) } == (0..<5).map(UInt32.init))
        _ = try net.shutdown()

        // A device set up for polling cannot be adopted in MSI-X mode: its queues signal no vector.
        let polled = EmulatedDevice(model: .net(queueSize: 32))
        var first = try NetDevice(transport: EmulatedTransport(device: polled))
        let s2 = try first.handoverSnapshots()
        let f2 = first.negotiation.accepted
        let t2 = first.detach()
        #expect { _ = try NetDevice(adopting: EmulatedTransport(sharing: t2), features: f2, queues: s2, mode: .msix).detach() } throws: {
            "\($0)".contains("interrupt mode needs 0")
        }
        #expect(polled.violations.isEmpty && device.violations.isEmpty)
    }
}

let interruptTestStop = Atomic<Bool>(false)
let interruptTestPause = Atomic<Bool>(false)
