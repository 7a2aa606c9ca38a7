import Foundation
import Glibc
import HotUpgrade
import Services
import Testing
import Upgrade
import Virtio
import VirtioDevices
import VirtioEmulator

/// The whole hand-over state machine with both sides in this process: the serving driver's
/// control service and serve loop in a thread, the successor's `takeOver` in the test, a control
/// socket in a temporary directory, the emulator as the device (its memory travels as a memfd).
extension HandoverInOneProcess {
@Suite("hot upgrade of serve rng, both sides against the emulator", .serialized)
struct EntropyHandoverTests {
    typealias Feed = EntropyFeed<EmulatedTransport>

    func serving(_ device: EmulatedDevice, at path: String, log: CapturedLog, collected: Collected, wanted: Features = [.ringEventIdx],
                 adjust: (inout ControlServiceConfiguration) -> Void = { _ in }) throws -> ServingDriver<Feed> {
        let rng = try EntropyDevice(transport: EmulatedTransport(device: device), wanted: wanted, mode: .poll)
        let driver = try ServingDriver(Feed(rng: rng, rate: 1 << 20, limit: 0, sink: collected.sink), path: path, version: "old",
                                       log: log, adjust: adjust)
        driver.start()
        return driver
    }

    /// Stops a driver that kept serving (every refusal and rollback ends here) and resets its device.
    func stopServing(_ driver: ServingDriver<Feed>, sourceLocation: SourceLocation = #_sourceLocation) throws {
        guard case .stopped? = driver.end() else {
            Issue.record("the old driver did not stop cleanly", sourceLocation: sourceLocation)
            return
        }
        if let service = driver.service.take() { try service.shutdown() }
    }

    /// A serving rng driver with its own log and sink, fed at least 1 KiB before it returns.
    func running(_ device: EmulatedDevice, at path: String, adjust: (inout ControlServiceConfiguration) -> Void = { _ in })
        throws -> (driver: ServingDriver<Feed>, log: CapturedLog, collected: Collected) {
        let log = CapturedLog(), collected = Collected()
        let driver = try serving(device, at: path, log: log, collected: collected, adjust: adjust)
        #expect(collected.wait(for: 1024), "the old driver feeds")
        return (driver, log, collected)
    }

    func successor(_ device: EmulatedDevice, at path: String, mode: HandoverMessage.Mode, log: CapturedLog,
                   wanted: Features = [.ringEventIdx], type: DeviceType = .entropy, address: String = EmulatedHandover.address,
                   adjust: (inout TakeOverOptions) -> Void = { _ in }) throws(UpgradeError) -> Feed {
        var options = TakeOverOptions(mode: mode, driverVersion: "new")
        options.handoverTimeout = 2000
        adjust(&options)
        let sink = Collected().sink
        return try takeOver(path: path, address: address, type: type, options: options, logger: log.logger,
                            attach: EmulatedHandover.attach(device),
                            adopt: { t, s throws(UpgradeError) in
                                try Feed.adopt(t, &s, wanted: wanted, mode: .poll, rate: 1 << 20, limit: 0, sink: sink)
                            })
    }

    @Test(arguments: [HandoverMessage.Mode.live, .reset, .auto])
    func handedOverAndTheSuccessorServes(_ mode: HandoverMessage.Mode) throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let oldLog = CapturedLog(), newLog = CapturedLog(), collected = Collected()
            let old = try serving(device, at: dir.file("rng.sock"), log: oldLog, collected: collected)
            #expect(collected.wait(for: 4096), "the old driver feeds")
            let resets = device.resetCount
            var new = try successor(device, at: dir.file("rng.sock"), mode: mode, log: newLog)
            guard case .handedOver? = old.outcome() else { Issue.record("the old driver did not hand over"); return }
            old.control.stop()
            if let service = old.service.take() { service.relinquish() }
            #expect(device.resetCount == resets + (mode == .reset ? 1 : 0), "live adoption never resets; reset mode resets once")
            #expect(newLog.contains("in \(mode == .reset ? "reset" : "live") mode in"), "\(newLog.lines)")
            // The gap split by phase: the old driver's quiesce, the state transfer, then the successor's steps.
            #expect(newLog.lines.contains { $0.contains("service gap") && $0.contains("(quiesce ") && $0.contains(", state ")
                && (mode == .reset ? $0.contains("reset+rebuild ") : $0.contains(", verify ") && $0.contains(", adopt "))
                && $0.contains("first request ") }, "\(newLog.lines)")
            #expect(oldLog.contains("handed over to pid \(getpid()) (driver new)"), "\(oldLog.lines)")
            #expect(oldLog.contains("fed ") && oldLog.contains("bytes before the handover"))
            // The successor's own request goes through the adopted (or rebuilt) queue.
            let report = try new.probe()
            #expect(report.summary == "first read 16 bytes")
            #expect(device.violations.isEmpty, "\(device.violations)")
            try new.shutdown()
        }
    }

    @Test func anUnknownStateFormatIsRefusedBeforeAnythingPauses() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let oldLog = CapturedLog(), newLog = CapturedLog(), collected = Collected()
            let old = try serving(device, at: dir.file("rng.sock"), log: oldLog, collected: collected) { $0.debugStateFormat = 99 }
            #expect(collected.wait(for: 1024))
            let resets = device.resetCount
            #expect { _ = try successor(device, at: dir.file("rng.sock"), mode: .live, log: newLog) } throws: {
                "\($0)".contains("state record format 99 is not supported") && ($0 as? UpgradeError)?.kind == .protocolError
            }
            // The old driver never paused: it keeps feeding, nothing was reset.
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver goes on serving")
            #expect(device.resetCount == resets)
            #expect(oldLog.count("abandoned before the service paused (nothing was touched)", reaching: 1) == 1, "\(oldLog.lines)")
            try stopServing(old)
        }
    }

    @Test func liveModeIsRefusedWhenTheFeaturesDifferAndAutoFallsBackToReset() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let newLog = CapturedLog()
            let (old, oldLog, collected) = try running(device, at: dir.file("rng.sock"))
            let resets = device.resetCount
            #expect { _ = try successor(device, at: dir.file("rng.sock"), mode: .live, log: newLog, wanted: []) } throws: {
                "\($0)".contains("live mode needs the same features") && "\($0)".contains("driver old serves again")
            }
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver resumed")
            #expect(device.resetCount == resets, "refused before touching the device")
            #expect(oldLog.contains("keeps serving") && oldLog.contains("declined: live mode refused"), "\(oldLog.lines)")
            // auto: the same successor takes over by resetting and accepts its own feature set.
            var new = try successor(device, at: dir.file("rng.sock"), mode: .auto, log: newLog, wanted: [])
            guard case .handedOver? = old.outcome() else { Issue.record("no handover in auto mode"); return }
            old.control.stop()
            if let service = old.service.take() { service.relinquish() }
            #expect(device.resetCount == resets + 1)
            #expect(newLog.contains("live mode not possible") && newLog.contains("in reset mode in"), "\(newLog.lines)")
            #expect(!device.driverFeatures.contains(.ringEventIdx), "the successor negotiated its own features")
            _ = try new.probe()
            try new.shutdown()
        }
    }

    /// A packed ring (§2.8) is not adopted live by this version: live mode is refused before the
    /// device is touched and the old driver serves again; auto takes it over by reset and runs the
    /// packed ring again.
    @Test func aPackedRingIsNotAdoptedLiveAndAutoTakesItOverByReset() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng.offering(.packed))
            let newLog = CapturedLog()
            let (old, oldLog, collected) = try running(device, at: dir.file("rng.sock"))
            #expect(device.driverFeatures.contains(.ringPacked), "the old driver runs the packed ring")
            let resets = device.resetCount
            #expect { _ = try successor(device, at: dir.file("rng.sock"), mode: .live, log: newLog) } throws: {
                "\($0)".contains("packed ring (§2.8) is not handed over live") && "\($0)".contains("driver old serves again")
            }
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver resumed")
            #expect(device.resetCount == resets, "refused before touching the device")
            #expect(oldLog.contains("declined: live mode refused"), "\(oldLog.lines)")
            var new = try successor(device, at: dir.file("rng.sock"), mode: .auto, log: newLog)
            guard case .handedOver? = old.outcome() else { Issue.record("no handover in auto mode"); return }
            old.control.stop()
            if let service = old.service.take() { service.relinquish() }
            #expect(device.resetCount == resets + 1)
            #expect(newLog.contains("live mode not possible") && newLog.contains("in reset mode in"), "\(newLog.lines)")
            #expect(device.driverFeatures.contains(.ringPacked), "the successor runs the packed ring again")
            let report = try new.probe()
            #expect(report.summary == "first read 16 bytes")
            #expect(device.violations.isEmpty, "\(device.violations)")
            try new.shutdown()
        }
    }

    @Test func aSuccessorForAnotherDeviceIsRefusedByName() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let newLog = CapturedLog()
            let (old, oldLog, collected) = try running(device, at: dir.file("rng.sock"))
            #expect { _ = try successor(device, at: dir.file("rng.sock"), mode: .auto, log: newLog, type: .block) } throws: {
                "\($0)".contains("'device type' is invalid")
            }
            #expect { _ = try successor(device, at: dir.file("rng.sock"), mode: .auto, log: newLog, address: "0000:00:04.0") } throws: {
                "\($0)".contains("'device address' is invalid: emulated:0, not 0000:00:04.0")
            }
            #expect(oldLog.count("abandoned before the service paused (nothing was touched)", reaching: 2) == 2,
                    "both declined before the old driver paused: \(oldLog.lines)")
            #expect { _ = try successor(device, at: dir.file("nobody.sock"), mode: .auto, log: newLog) } throws: {
                ($0 as? UpgradeError)?.kind == .unavailable && "\($0)".contains("no driver is serving")
            }
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver goes on serving")
            try stopServing(old)
        }
    }

    @Test(arguments: [false, true])
    func aSuccessorThatFailsAfterTouchingTheDeviceIsRolledBack(hangs: Bool) throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let oldLog = CapturedLog(), newLog = CapturedLog(), collected = Collected()
            let old = try serving(device, at: dir.file("rng.sock"), log: oldLog, collected: collected) { $0.handoverTimeout = 500 }
            #expect(collected.wait(for: 1024))
            let resets = device.resetCount
            #expect {
                _ = try successor(device, at: dir.file("rng.sock"), mode: .reset, log: newLog) {
                    if hangs { $0.afterDeviceUp = { usleep(1_500_000) } } else { $0.failFirstRequest = true }
                }
            } throws: { error in
                hangs ? "\(error)".contains("the old driver took the device back: not healthy within 500 ms")
                      : "\(error)".contains("first request failed") && "\(error)".contains("driver old serves again (device reset and rebuilt)")
            }
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver serves again")
            #expect(device.resetCount >= resets + 2, "the successor's reset, then the old driver's")
            #expect(oldLog.contains("device reset and rebuilt after the failed upgrade"), "\(oldLog.lines)")
            #expect(oldLog.contains(hangs ? "was not healthy within 500 ms" : "declined: first request failed"))
            try stopServing(old)
            #expect(device.violations.isEmpty, "\(device.violations)")
        }
    }

    @Test func twentyHandoversInARowKeepDescriptorsAndData() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            var collected = Collected()
            var current = try serving(device, at: dir.file("rng.sock"), log: CapturedLog(), collected: collected)
            for round in 0..<20 {
                #expect(collected.wait(for: 512))
                let next = Collected()
                let mode: HandoverMessage.Mode = round % 2 == 0 ? .live : .reset
                let log = CapturedLog()
                var options = TakeOverOptions(mode: mode, driverVersion: "v\(round)")
                options.handoverTimeout = 2000
                let feed = try takeOver(path: dir.file("rng.sock"), address: EmulatedHandover.address, type: .entropy, options: options,
                                        logger: log.logger, attach: EmulatedHandover.attach(device),
                                        adopt: { t, s throws(UpgradeError) in
                                            try Feed.adopt(t, &s, wanted: [.ringEventIdx], mode: .poll, rate: 1 << 20, limit: 0, sink: next.sink)
                                        })
                guard case .handedOver? = current.outcome() else { Issue.record("round \(round): no handover"); return }
                current.control.stop()
                if let service = current.service.take() { service.relinquish() }
                // The successor serves behind its own control socket, put in place over the path.
                current = try ServingDriver(feed, path: dir.file("rng.sock"), version: "v\(round)", log: log, replacing: true)
                current.start()
                collected = next
            }
            #expect(collected.wait(for: 4096))
            guard case .stopped? = current.end() else { Issue.record("the last driver did not stop cleanly"); return }
            if let service = current.service.take() { try service.shutdown() }
            #expect(device.violations.isEmpty)
        }
    }

    @Test func aSuccessorThatGoesAwayAfterThePauseIsRolledBack() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let oldLog = CapturedLog(), collected = Collected()
            let old = try serving(device, at: dir.file("rng.sock"), log: oldLog, collected: collected)
            #expect(collected.wait(for: 1024))
            do {
                // The successor's side by hand: device part, prepared (the old driver pauses and sends
                // the service part), then it vanishes as a crashed process would.
                var successor = try Successor(path: dir.file("rng.sock"), address: EmulatedHandover.address, type: .entropy,
                                              requiredDeviceRoles: [.dmaMemory], options: TakeOverOptions(mode: .live, driverVersion: "new"),
                                              logger: CapturedLog().logger)
                #expect(successor.descriptors.count(.dmaMemory) == 1)
                try successor.prepared()
                #expect(successor.record.queues.count == 1 && successor.record.serviceState.isEmpty)
            }
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver serves again")
            #expect(oldLog.contains("went away before reporting healthy"), "\(oldLog.lines)")
            #expect(oldLog.contains("device reset and rebuilt after the failed upgrade"))
            try stopServing(old)
        }
    }

    @Test func theControlSocketDescribesTheDriverAndRefusesStrayMessages() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let log = CapturedLog(), collected = Collected()
            let old = try serving(device, at: dir.file("rng.sock"), log: log, collected: collected) { c in
                c.counters = { [("fed", 7)] }
            }
            let ask = { (message: HandoverMessage) throws -> HandoverMessage? in
                let connection = try ControlConnection(connectingTo: dir.file("rng.sock"))
                try connection.send(message)
                return try connection.receiveMessage(timeoutMilliseconds: 2000)
            }
            #expect(try ask(.describe) == .described(pid: getpid(), driverVersion: "old", features: 0, arguments: ["test"]))
            #expect(try ask(.statistics) == .counters([HandoverMessage.Counter(name: "fed", value: 7)]))
            #expect(try ask(.go) == .refused("expected hello, upgrade, describe or statistics"))
            // A second driver on the same path is refused while this one answers.
            #expect { _ = try ControlService(path: dir.file("rng.sock"), replacing: false, devicePart: old.service!.devicePart(driverVersion: "x"),
                                             configuration: ControlServiceConfiguration { .go }, logger: log.logger) } throws: {
                ($0 as? UpgradeError)?.kind == .busy && "\($0)".contains("control socket of a running driver")
            }
            try stopServing(old)
        }
    }
}
}
