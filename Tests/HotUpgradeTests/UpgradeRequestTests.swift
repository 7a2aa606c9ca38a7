import Foundation
import Glibc
import HotUpgrade
import Services
import Testing
import Upgrade
import VirtioEmulator

/// `virtio-vfio upgrade` asks the serving driver to start the new build itself (so it logs where
/// the driver logs): the driver starts it with its own arguments, answers `started(pid)`, and
/// reports how the upgrade ended. Here the "new builds" are scripts that never take over.
extension HandoverInOneProcess {
@Suite("upgrade requests: the serving driver starts its successor", .serialized)
struct UpgradeRequestTests {
    let rng = EntropyHandoverTests()

    /// A script in `dir` that writes its arguments, one per line, to `argv` and then runs `then`.
    func script(in dir: borrowing TemporaryDirectory, _ name: String, then: String) throws -> String {
        let path = dir.file(name)
        try "#!/bin/sh\nprintf '%s\\n' \"$@\" > \(dir.file(name + ".argv"))\n\(then)\n".write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
        return path
    }

    /// Sends `upgrade` and returns the first answer and, after `started`, the outcome.
    func upgrade(_ path: String, binary: String, mode: HandoverMessage.Mode = .live, extra: [String] = [])
        throws -> (first: HandoverMessage?, outcome: HandoverMessage?) {
        let connection = try ControlConnection(connectingTo: path)
        try connection.send(.upgrade(binary: binary, mode: mode, arguments: extra))
        let first = try connection.receiveMessage(timeoutMilliseconds: 5000)
        guard case .started? = first else { return (first, nil) }
        return (first, try connection.receiveMessage(timeoutMilliseconds: 10_000))
    }

    @Test func aSuccessorThatExitsIsReportedWithItsArgumentsAndStatus() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let (old, log, collected) = try rng.running(device, at: dir.file("rng.sock"))
            let binary = try script(in: dir, "exits", then: "exit 3")
            let (first, outcome) = try upgrade(dir.file("rng.sock"), binary: binary, extra: ["--handover-timeout", "500"])
            guard case .started(let pid)? = first else { Issue.record("not started: \(String(describing: first))"); return }
            guard case .upgradeOutcome(let upgraded, let summary)? = outcome else { Issue.record("no outcome: \(String(describing: outcome))"); return }
            #expect(!upgraded)
            #expect(summary == "the new driver (pid \(pid)) exited with status 3 before taking the device over; driver old keeps serving")
            // Its arguments: the serving driver's own (the harness's describe says ["test"], so
            // none after the program name), --take-over --mode MODE, then the extra ones.
            let argv = try String(contentsOfFile: dir.file("exits.argv"), encoding: .utf8)
            #expect(argv == "--take-over\n--mode\nlive\n--handover-timeout\n500\n")
            #expect(log.contains("upgrade: started \(binary) --take-over --mode live --handover-timeout 500 as pid \(pid)"), "\(log.lines)")
            let fed = collected.count
            #expect(collected.wait(for: fed + 4096), "the old driver serves on")
            try rng.stopServing(old)
        }
    }

    @Test func aSuccessorThatNeverAsksIsKilledAtItsDeadline() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let (old, _, _) = try rng.running(device, at: dir.file("rng.sock")) { $0.successorStartTimeout = 300 }
            let binary = try script(in: dir, "hangs", then: "exec sleep 60")
            let connection = try ControlConnection(connectingTo: dir.file("rng.sock"))
            try connection.send(.upgrade(binary: binary, mode: .live, arguments: []))
            let first = try connection.receiveMessage(timeoutMilliseconds: 5000)
            guard case .started(let pid)? = first else { Issue.record("not started: \(String(describing: first))"); return }
            // While it is pending, a second upgrade is refused.
            let (second, _) = try upgrade(dir.file("rng.sock"), binary: binary)
            #expect(second == .refused("another upgrade is in progress"))
            let outcome = try connection.receiveMessage(timeoutMilliseconds: 10_000)
            guard case .upgradeOutcome(false, let summary)? = outcome else { Issue.record("no outcome: \(String(describing: outcome))"); return }
            #expect(summary.contains("the new driver (pid \(pid)) did not ask for the device within 300 ms; killed it"))
            // Reaped by the driver: no zombie is left (kill(pid, 0) fails once it is gone).
            var gone = false
            for _ in 0..<2000 where !gone { gone = kill(pid, 0) != 0; if !gone { usleep(1000) } }
            #expect(gone, "the killed successor was reaped")
            try rng.stopServing(old)
        }
    }

    @Test func whatCannotBeStartedIsRefusedByName() throws {
        try withoutLeaks {
            let dir = TemporaryDirectory()
            let device = EmulatedDevice(model: .rng)
            let (old, _, _) = try rng.running(device, at: dir.file("rng.sock"))
            let (relative, _) = try upgrade(dir.file("rng.sock"), binary: "virtio-vfio")
            #expect(relative == .refused("virtio-vfio is not an executable file given by its absolute path"))
            let notExecutable = dir.file("plain")
            try "".write(toFile: notExecutable, atomically: true, encoding: .utf8)
            let (plain, _) = try upgrade(dir.file("rng.sock"), binary: notExecutable)
            #expect(plain == .refused("\(notExecutable) is not an executable file given by its absolute path"))
            try rng.stopServing(old)
        }
    }
}
}
