import Foundation
import Glibc
import HotUpgrade
import NBD
import Services
import Testing
import Upgrade
import Virtio
import VirtioDevices
import VirtioEmulator

/// serve blk's handover with both sides in this process: the NBD listener and a client in the
/// middle of its handshake or in transmission travel to the successor, which answers them.
/// (The client's answers are taken into a local before `#expect`, and are plain values: see
/// `MiniNBDClient.enterTransmission`.)
extension HandoverInOneProcess {
@Suite("hot upgrade of serve blk, both sides against the emulator", .serialized)
struct BlockHandoverTests {
    typealias Export = BlockExport<EmulatedTransport>

    func configuration(_ dir: borrowing TemporaryDirectory) -> NBDServerConfiguration {
        var c = NBDServerConfiguration()
        c.unixSocketPath = dir.file("nbd.sock")
        return c
    }

    /// The old driver: `device` exported over NBD in `dir`, serving behind its control socket.
    func serving(_ device: EmulatedDevice, in dir: borrowing TemporaryDirectory, log: CapturedLog) throws -> ServingDriver<Export> {
        let blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: .poll)
        let server = try NBDServer(backend: VirtioBlockBackend(device: blk), configuration: configuration(dir))
        let driver = try ServingDriver(Export(server: server), path: dir.file("control.sock"), version: "old", log: log)
        driver.start()
        return driver
    }

    func pattern(_ n: Int, seed: UInt8) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) } }

    @Test(arguments: [HandoverMessage.Mode.live, .reset])
    func aClientKeepsItsConnectionAndItsData(_ mode: HandoverMessage.Mode) throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
            let oldLog = CapturedLog(), newLog = CapturedLog()
            let old = try serving(device, in: dir, log: oldLog)
            // One client in transmission with data written, one still waiting for its flags.
            guard let client = MiniNBDClient(path: dir.file("nbd.sock")), client.greeting() else { Issue.record("no greeting"); return }
            let got1 = client.enterTransmission()
            #expect(got1 == 8192 * 512)
            let data = pattern(8192, seed: 7)
            let got2 = client.request(1, handle: 1, offset: 4096, length: 8192, payload: data).error
            #expect(got2 == 0)
            guard let late = MiniNBDClient(path: dir.file("nbd.sock")), late.greeting() else { Issue.record("no greeting"); return }

            var options = TakeOverOptions(mode: mode, driverVersion: "new")
            options.handoverTimeout = 2000
            let newConfiguration = configuration(dir)
            let export = try takeOver(path: dir.file("control.sock"), address: EmulatedHandover.address, type: .block, options: options,
                                      logger: newLog.logger, attach: EmulatedHandover.attach(device),
                                      adopt: { t, s throws(UpgradeError) in
                                          try Export.adopt(t, &s, wanted: BlockDevice<EmulatedTransport>.supported, mode: .poll,
                                                           configuration: newConfiguration, log: { _ in })
                                      })
            guard case .handedOver? = old.outcome() else { Issue.record("no handover"); return }
            old.control.stop()
            if let service = old.service.take() { service.relinquish() }
            #expect(newLog.contains("in \(mode) mode with 2 NBD connections in"), "\(newLog.lines)")
            #expect(oldLog.contains("handed over 2 NBD connections"), "\(oldLog.lines)")
            let new = try ServingDriver(export, path: dir.file("control.sock"), version: "new", log: newLog, replacing: true)
            new.start()
            // The same connections, answered by the successor: the data written before is there.
            let got3 = client.request(0, handle: 2, offset: 4096, length: 8192).data
            #expect(got3 == data)
            let got4 = late.enterTransmission()
            #expect(got4 == 8192 * 512, "a handshake half done before the handover finishes after it")
            let got5 = late.request(0, handle: 3, offset: 4096, length: 512).data
            #expect(got5 == Array(data.prefix(512)))
            // A new client reaches the successor through the handed-over listener.
            guard let third = MiniNBDClient(path: dir.file("nbd.sock")), third.greeting() else { Issue.record("listener lost"); return }
            let got6 = third.enterTransmission()
            #expect(got6 == 8192 * 512)
            guard case .stopped? = new.end() else { Issue.record("the successor did not stop cleanly"); return }
            _ = new.service.take()
            #expect(device.violations.isEmpty, "\(device.violations)")
        }
    }

    @Test func aSuccessorThatCannotReadTheConnectionsDeclinesAndClosesWhatItReceived() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
            let oldLog = CapturedLog(), newLog = CapturedLog()
            let old = try serving(device, in: dir, log: oldLog)
            guard let client = MiniNBDClient(path: dir.file("nbd.sock")), client.greeting() else { Issue.record("no greeting"); return }
            let got7 = client.enterTransmission()
            #expect(got7 == 8192 * 512)
            var options = TakeOverOptions(mode: .live, driverVersion: "new")
            options.handoverTimeout = 2000
            // A successor whose export is smaller than what the clients were told.
            var small = configuration(dir)
            small.maximumClients = 0
            #expect {
                _ = try takeOver(path: dir.file("control.sock"), address: EmulatedHandover.address, type: .block, options: options,
                                 logger: newLog.logger, attach: EmulatedHandover.attach(device),
                                 adopt: { t, s throws(UpgradeError) -> Export in
                                     try Export.adopt(t, &s, wanted: BlockDevice<EmulatedTransport>.supported, mode: .poll,
                                                      configuration: small, log: { _ in })
                                 })
            } throws: { "\($0)".contains("adopting the NBD connections") }
            // The old driver resumes (after a reset: the successor had adopted the device) and answers.
            let got8 = client.request(0, handle: 9, offset: 0, length: 512).error
            #expect(got8 == 0)
            #expect(oldLog.contains("device reset and rebuilt after the failed upgrade"), "\(oldLog.lines)")
            guard case .stopped? = old.end() else { Issue.record("the old driver did not stop cleanly"); return }
            _ = old.service.take()
        }
    }
}
}
