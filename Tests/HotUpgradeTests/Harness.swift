import Foundation
import Glibc
import HotUpgrade
import Logging
import Services
import Synchronization
import Upgrade
import Virtio
import VirtioDevices
import VirtioEmulator

/// One serving driver in a thread of this process: a service behind its control socket, served
/// until stopped or handed over, as `virtio-vfio serve` does in a process of its own.
final class ServingDriver<S: UpgradableService & ~Copyable>: @unchecked Sendable {
    var service: S?
    let control: ControlService
    let stop = Atomic<Bool>(false)
    let log: CapturedLog
    let finished = Atomic<Bool>(false)
    private var result: ServeOutcome?

    init(_ service: consuming S, path: String, version: String, log: CapturedLog, replacing: Bool = false,
         adjust: (inout ControlServiceConfiguration) -> Void = { _ in }) throws {
        var configuration = ControlServiceConfiguration { .described(pid: getpid(), driverVersion: version, features: 0, arguments: ["test"]) }
        configuration.handoverTimeout = 2000
        adjust(&configuration)
        control = try ControlService(path: path, replacing: replacing, devicePart: service.devicePart(driverVersion: version),
                                     configuration: configuration, logger: log.logger)
        self.service = .some(service)
        self.log = log
    }

    func start() {
        // The thread holds the driver until the loop ends (not stored: no cycle keeps it alive).
        Thread { [self] in
            result = control.serve(&service!, until: stop)
            finished.store(true, ordering: .releasing)
        }.start()
    }

    /// Waits for the serving loop to end (stopped, handed over or failed), at most `seconds`.
    func outcome(within seconds: Double = 20) -> ServeOutcome? {
        let deadline = Date().addingTimeInterval(seconds)
        while !finished.load(ordering: .acquiring) && Date() < deadline { usleep(1000) }
        return finished.load(ordering: .acquiring) ? result : nil
    }

    /// Stops serving (if it still does) and ends the control thread.
    func end() -> ServeOutcome? {
        stop.store(true, ordering: .relaxed)
        let outcome = outcome()
        control.stop()
        return outcome
    }
}

/// What an entropy sink received.
final class Collected: @unchecked Sendable {
    private let lock = NSLockLike()
    private var stored: [UInt8] = []
    var bytes: [UInt8] { lock.run { stored } }
    var count: Int { lock.run { stored.count } }
    func append(_ b: UnsafeRawBufferPointer) { lock.run { stored.append(contentsOf: b) } }
    var sink: (UnsafeRawBufferPointer) throws -> Void { { [self] in append($0) } }

    /// Waits until at least `n` bytes arrived, at most `seconds`.
    func wait(for n: Int, seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while count < n && Date() < deadline { usleep(1000) }
        return count >= n
    }
}

/// A fresh directory for control sockets, removed with its contents.
struct TemporaryDirectory: ~Copyable {
    let path: String
    init() {
        var template = Array("/tmp/hot-upgrade-test.XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }
    func file(_ name: String) -> String { "\(path)/\(name)" }
    deinit { _ = try? FileManager.default.removeItem(atPath: path) }
}
