import HotUpgrade
import Testing
import Virtio
import VirtioDevices
import VirtioEmulator

/// A driver that died without a hand-over, its device and DMA memory kept (the service manager's
/// descriptor store): the next driver adopts the device when its rings settle and check out
/// (`CrashRecovery.bringUp`), and resets it otherwise. A second transport on the same emulated
/// device and memory stands for the kept descriptors.
@Suite("crash recovery from kept descriptors", .serialized)
struct CrashRecoveryTests {
    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    /// A running blk device with `data` at sector 0 and `inFlight` reads published that the dead
    /// driver never collected.
    func crashedBlk(data: [UInt8], inFlight: Int, faults: EmulatedDevice.Faults? = nil) throws -> EmulatedDevice {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        var dead = try BlockDevice(transport: EmulatedTransport(device: device), mode: .poll)
        try data.withUnsafeBytes { try dead.write(sector: 0, from: $0) }
        if let faults { device.faults = faults }
        for _ in 0..<inFlight {
            guard let slot = dead.queue.acquire() else { Issue.record("no slot"); break }
            _ = try dead.queue.submit(.read, sector: 0, bytes: 4096, slot: slot)
        }
        _ = dead.queue.publish()
        _ = dead.detach()  // the process died: nothing reset, nothing collected
        return device
    }

    func recover(_ device: EmulatedDevice, wanted: Features = BlockDevice<EmulatedTransport>.supported,
                 settle: Duration = .seconds(2), outcome: inout CrashRecovery.Outcome) throws -> BlockDevice<EmulatedTransport> {
        try CrashRecovery.bringUp(
            attach: { EmulatedTransport(device: device) }, wanted: wanted, vectors: [nil], queues: 0..<1, settle: settle,
            adopt: { t, features, queues, verified throws(VirtioError) in
                try BlockDevice(adopting: t, features: features, queues: queues, mode: .poll, verified: verified)
            },
            start: { t throws(VirtioError) in try BlockDevice(transport: t, wanted: wanted, mode: .poll) }, outcome: &outcome)
    }

    func readBack(_ blk: inout BlockDevice<EmulatedTransport>, _ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try blk.read(sector: 0, into: $0) }
        return out
    }

    @Test("requests the dead driver left in flight complete; the rings are adopted without a reset")
    func adoptsAfterTheRequestsSettle() throws {
        let data = pattern(64 << 10, seed: 5)
        let device = try crashedBlk(data: data, inFlight: 3)
        let resets = device.resetCount
        var outcome = CrashRecovery.Outcome.reset(why: "not run")
        var blk = try recover(device, outcome: &outcome)
        #expect(outcome == .adopted)
        #expect(device.resetCount == resets, "the device was reset")
        #expect(try readBack(&blk, data.count) == data)
        _ = try blk.shutdown()
    }

    @Test("a request the device never completes: no adoption after the settle time; reset, and the device works")
    func resetsWhenRequestsStayOutstanding() throws {
        var faults = EmulatedDevice.Faults()
        faults.stopCompleting = true
        let data = pattern(16 << 10, seed: 9)
        let device = try crashedBlk(data: data, inFlight: 2, faults: faults)
        var outcome = CrashRecovery.Outcome.adopted
        let resets = device.resetCount
        // The reset takes the stuck requests away (the device uses no buffer after it, §2.4).
        var blk = try recover(device, settle: .milliseconds(50), outcome: &outcome)
        guard case .reset(let why) = outcome else { Issue.record("adopted a device with requests outstanding"); return }
        #expect(why.contains("2 requests of the dead driver still outstanding after"), "\(why)")
        #expect(device.resetCount > resets)
        device.faults = EmulatedDevice.Faults()
        #expect(try readBack(&blk, data.count) == data)
        _ = try blk.shutdown()
    }

    @Test("a driver that would accept other features resets")
    func resetsOnOtherFeatures() throws {
        let data = pattern(8 << 10, seed: 2)
        let device = try crashedBlk(data: data, inFlight: 0)
        var outcome = CrashRecovery.Outcome.adopted
        var blk = try recover(device, wanted: BlockDevice<EmulatedTransport>.supported.subtracting(.ringEventIdx), outcome: &outcome)
        guard case .reset(let why) = outcome else { Issue.record("adopted with other features"); return }
        #expect(why.contains("this driver accepts"), "\(why)")
        #expect(try readBack(&blk, data.count) == data)
        _ = try blk.shutdown()
    }

    @Test("a device the dead driver never started (queue not enabled) resets")
    func resetsANeverStartedDevice() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        var outcome = CrashRecovery.Outcome.adopted
        var blk = try recover(device, outcome: &outcome)
        guard case .reset = outcome else { Issue.record("adopted a device nobody set up"); return }
        #expect(try readBack(&blk, 512).count == 512)
        _ = try blk.shutdown()
    }
}
