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
        let server = try NBDServer(backend: VirtioBlockBackend(device: blk, log: { log.append($0) }), configuration: configuration(dir))
        let driver = try ServingDriver(Export(server: server), path: dir.file("control.sock"), version: "old", log: log)
        driver.start()
        return driver
    }

    /// The successor: takes `device` over from the driver serving in `dir`, with `configuration`
    /// (the same export in `dir` unless given).
    func successor(_ device: EmulatedDevice, in dir: borrowing TemporaryDirectory, options: TakeOverOptions, log: CapturedLog,
                   configuration given: NBDServerConfiguration? = nil) throws(UpgradeError) -> Export {
        let configuration = given ?? configuration(dir)
        return try takeOver(path: dir.file("control.sock"), address: EmulatedHandover.address, type: .block, options: options,
                            logger: log.logger, attach: EmulatedHandover.attach(device),
                            adopt: { t, s throws(UpgradeError) -> Export in
                                try Export.adopt(t, &s, wanted: BlockDevice<EmulatedTransport>.supported, mode: .poll,
                                                 configuration: configuration, log: { _ in })
                            })
    }

    /// A client of the export in `dir` that finished its handshake (the export's size checked);
    /// nil, with the issue recorded, if it did not.
    func inTransmission(_ dir: borrowing TemporaryDirectory, sourceLocation: SourceLocation = #_sourceLocation) -> MiniNBDClient? {
        guard let client = MiniNBDClient(path: dir.file("nbd.sock")), client.greeting() else {
            Issue.record("no greeting", sourceLocation: sourceLocation)
            return nil
        }
        let size = client.enterTransmission()
        #expect(size == 8192 * 512, "the export's size", sourceLocation: sourceLocation)
        guard size == 8192 * 512 else { return nil }
        return client
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
            guard let client = inTransmission(dir) else { return }
            let data = pattern(8192, seed: 7)
            let got2 = client.request(1, handle: 1, offset: 4096, length: 8192, payload: data).error
            #expect(got2 == 0)
            guard let late = MiniNBDClient(path: dir.file("nbd.sock")), late.greeting() else { Issue.record("no greeting"); return }

            var options = TakeOverOptions(mode: mode, driverVersion: "new")
            options.handoverTimeout = 2000
            let export = try successor(device, in: dir, options: options, log: newLog)
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
            guard let client = inTransmission(dir) else { return }
            var options = TakeOverOptions(mode: .live, driverVersion: "new")
            options.handoverTimeout = 2000
            // A successor whose export is smaller than what the clients were told.
            var small = configuration(dir)
            small.maximumClients = 0
            #expect {
                _ = try successor(device, in: dir, options: options, log: newLog, configuration: small)
            } throws: { "\($0)".contains("adopting the NBD connections") }
            // The old driver resumes (after a reset: the successor had adopted the device) and answers.
            let got8 = client.request(0, handle: 9, offset: 0, length: 512).error
            #expect(got8 == 0)
            #expect(oldLog.contains("device reset and rebuilt after the failed upgrade"), "\(oldLog.lines)")
            guard case .stopped? = old.end() else { Issue.record("the old driver did not stop cleanly"); return }
            _ = old.service.take()
        }
    }

    /// The device's available index on queue 0, as the driver last published it.
    func published(_ device: EmulatedDevice) -> UInt16 {
        guard let rings = device.queueState(0)?.rings else { return 0 }
        let memory = device.memory
        let p = memory.pointer + Int(rings.driver - memory.deviceAddress) + SplitQueueLayout.availIndex
        return UInt16(littleEndian: p.loadUnaligned(as: UInt16.self))
    }

    /// Sends `writes` WRITEs and `reads` READs (8 KiB each, at distinct offsets) to a device that
    /// does not complete them, and waits until the old driver gave them all to the device.
    /// Returns the data each write carries and the read lengths by handle.
    func requestsLeftInTheDevice(_ client: borrowing MiniNBDClient, _ device: EmulatedDevice, writes: Int, reads: Int)
        -> (written: [UInt64: [UInt8]], readLengths: [UInt64: Int])? {
        let before = published(device)
        device.faults.stopCompleting = true
        var written: [UInt64: [UInt8]] = [:], readLengths: [UInt64: Int] = [:]
        for k in 0..<writes {
            let data = pattern(8192, seed: UInt8(k + 1))
            written[UInt64(100 + k)] = data
            guard client.send(1, handle: UInt64(100 + k), offset: UInt64(k) * 8192, length: 8192, payload: data) else { return nil }
        }
        for k in 0..<reads {
            // What the first `reads` writes of the test before wrote (sectors past the writes above).
            readLengths[UInt64(200 + k)] = 8192
            guard client.send(0, handle: UInt64(200 + k), offset: UInt64(64 + k) * 8192, length: 8192) else { return nil }
        }
        let deadline = Date().addingTimeInterval(10)
        while published(device) &- before < UInt16(writes + reads) && Date() < deadline { usleep(1000) }
        return published(device) &- before == UInt16(writes + reads) ? (written, readLengths) : nil
    }

    /// Requests the device still holds at the handover are carried to the successor (each is one
    /// indirect descriptor): live, it collects their completions; reset, it gives them to the
    /// device again. Every request is answered once, with the right data; nothing is drained first.
    @Test(arguments: [HandoverMessage.Mode.live, .reset])
    func requestsInFlightAreCarriedAndAnsweredOnce(_ mode: HandoverMessage.Mode) throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
            let oldLog = CapturedLog(), newLog = CapturedLog()
            let old = try serving(device, in: dir, log: oldLog)
            guard let client = inTransmission(dir) else { return }
            let earlier = (0..<3).map { pattern(8192, seed: UInt8(50 + $0)) }
            for (k, data) in earlier.enumerated() {
                let e = client.request(1, handle: UInt64(k), offset: UInt64(64 + k) * 8192, length: 8192, payload: data).error
                #expect(e == 0)
            }
            guard let (written, readLengths) = requestsLeftInTheDevice(client, device, writes: 4, reads: 3) else {
                Issue.record("the old driver did not give the device every request"); return
            }
            var options = TakeOverOptions(mode: mode, driverVersion: "new")
            options.handoverTimeout = 2000
            // The device answers again once the successor has it (after its reset, in reset mode).
            options.afterDeviceUp = { device.faults.stopCompleting = false }
            let export = try successor(device, in: dir, options: options, log: newLog)
            guard case .handedOver? = old.outcome() else { Issue.record("no handover"); return }
            old.control.stop()
            if let service = old.service.take() { service.relinquish() }
            #expect(oldLog.contains("handed over 1 NBD connections with 7 requests in flight"), "\(oldLog.lines)")
            #expect(newLog.contains("in \(mode) mode with 1 NBD connections, 7 requests in flight carried in"), "\(newLog.lines)")
            let new = try ServingDriver(export, path: dir.file("control.sock"), version: "new", log: newLog, replacing: true)
            new.start()
            var answered: [UInt64: Int] = [:]
            for _ in 0..<7 {
                guard let reply = client.nextReply(readLengths: readLengths) else { Issue.record("a reply is missing"); break }
                answered[reply.handle] = (answered[reply.handle] ?? 0) + 1
                #expect(reply.error == 0, "handle \(reply.handle)")
                if reply.handle >= 200 {
                    let same = reply.data == earlier[Int(reply.handle) - 200]
                    #expect(same, "read \(reply.handle) returns what was written before")
                }
            }
            #expect(answered == Dictionary(uniqueKeysWithValues: (Array(written.keys) + Array(readLengths.keys)).map { ($0, 1) }))
            for (handle, data) in written {
                let same = client.request(0, handle: 300 + handle, offset: (handle - 100) * 8192, length: 8192).data == data
                #expect(same, "write \(handle) reads back")
            }
            guard case .stopped? = new.end() else { Issue.record("the successor did not stop cleanly"); return }
            _ = new.service.take()
            #expect(device.violations.isEmpty, "\(device.violations)")
        }
    }

    /// A successor that took the requests in flight, collected some of their completions and then
    /// failed its first request: the old driver resets the device and gives it every request again.
    /// The client gets each answer once, from the old driver, and the writes are on the disk.
    @Test func requestsInFlightSurviveARollback() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
            let oldLog = CapturedLog(), newLog = CapturedLog()
            let old = try serving(device, in: dir, log: oldLog)
            guard let client = inTransmission(dir) else { return }
            guard let (written, _) = requestsLeftInTheDevice(client, device, writes: 5, reads: 0) else {
                Issue.record("the old driver did not give the device every request"); return
            }
            var options = TakeOverOptions(mode: .live, driverVersion: "new")
            options.handoverTimeout = 2000
            options.afterDeviceUp = { device.faults.stopCompleting = false }
            options.failFirstRequest = true
            let resets = device.resetCount
            #expect {
                _ = try successor(device, in: dir, options: options, log: newLog)
            } throws: { "\($0)".contains("driver old serves again (device reset and rebuilt)") }
            #expect(device.resetCount == resets + 1, "the old driver's reset")
            var answered: [UInt64: Int] = [:]
            for _ in 0..<5 {
                guard let reply = client.nextReply(readLengths: [:]) else { Issue.record("a reply is missing"); break }
                answered[reply.handle] = (answered[reply.handle] ?? 0) + 1
                #expect(reply.error == 0)
            }
            #expect(answered == Dictionary(uniqueKeysWithValues: written.keys.map { ($0, 1) }))
            for (handle, data) in written {
                let same = device.readDisk(offset: (handle - 100) * 8192, count: 8192) == data
                #expect(same, "write \(handle) is on the disk")
            }
            #expect(oldLog.contains("resubmitting 5 requests"), "\(oldLog.lines)")
            guard case .stopped? = old.end() else { Issue.record("the old driver did not stop cleanly"); return }
            _ = old.service.take()
            #expect(device.violations.isEmpty, "\(device.violations)")
        }
    }
}
}