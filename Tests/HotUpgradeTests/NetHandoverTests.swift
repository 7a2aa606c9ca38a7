import Foundation
import Glibc
import HotUpgrade
import Services
import Syscalls
import Testing
import Upgrade
import Virtio
import VirtioDevices
import VirtioEmulator

extension HandoverInOneProcess {
/// serve net's handover with both sides in this process: a real TAP interface (its descriptor
/// travels and is checked by name and header size), the emulator's virtio-net as the device.
@Suite("hot upgrade of serve net, both sides against the emulator", .serialized)
struct NetHandoverTests {
    typealias Service = NetBridgeService<EmulatedTransport>

    @Test(arguments: [HandoverMessage.Mode.live, .reset])
    func theTapAndTheCountersTravel(_ mode: HandoverMessage.Mode) throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let name = "vvho\(getpid() % 10000)"
            let device = EmulatedDevice(model: .net())
            let oldLog = CapturedLog(), newLog = CapturedLog()
            let net = try NetDevice(transport: EmulatedTransport(device: device), mode: .poll)
            let header = TapBridge<EmulatedTransport>.vnetHeaderSize(for: net.negotiation.accepted)
            let tap = try TapInterface(name: name, vnetHeaderSize: header)
            var counters = TapBridgeCounters()
            counters.toTapFrames = 41
            let bridge = TapBridge(device: net, fd: tap.raw, vnetHeaderSize: header, counters: counters)
            let old = try ServingDriver(Service(bridge: bridge, tap: tap), path: dir.file("net.sock"), version: "old", log: oldLog)
            old.start()
            var options = TakeOverOptions(mode: mode, driverVersion: "new")
            options.handoverTimeout = 2000
            #expect {
                _ = try takeOver(path: dir.file("net.sock"), address: EmulatedHandover.address, type: .net, options: options,
                                 logger: newLog.logger, attach: EmulatedHandover.attach(device),
                                 adopt: { t, s throws(UpgradeError) -> Service in
                                     try Service.adopt(t, &s, wanted: NetDevice<EmulatedTransport>.supported, mode: .poll,
                                                       tapName: name + "x", configuration: TapBridgeConfiguration())
                                 })
            } throws: { "\($0)".contains("the serving driver bridges TAP \(name), this one was started with --tap \(name)x") }
            var new = try takeOver(path: dir.file("net.sock"), address: EmulatedHandover.address, type: .net, options: options,
                                   logger: newLog.logger, attach: EmulatedHandover.attach(device),
                                   adopt: { t, s throws(UpgradeError) -> Service in
                                       try Service.adopt(t, &s, wanted: NetDevice<EmulatedTransport>.supported, mode: .poll,
                                                         tapName: name, configuration: TapBridgeConfiguration())
                                   })
            guard case .handedOver? = old.outcome() else { Issue.record("no handover"); return }
            old.control.stop()
            if let service = old.service.take() { service.relinquish() }
            #expect(newLog.contains("took over TAP \(name) from driver old in \(mode) mode in"), "\(newLog.lines)")
            #expect(oldLog.contains("handed over TAP \(name) with 256 receive buffers posted"), "\(oldLog.lines)")
            #expect(new.bridge.counters.toTapFrames == 41, "the counters continue")
            #expect(new.tap.name == name)
            _ = try new.probe()
            try new.shutdown()
            #expect(device.violations.isEmpty, "\(device.violations)")
        }
    }
}
}
