import ArgumentParser
import Foundation
import HotUpgrade
import PCI
import Syscalls
import Upgrade
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// `virtio-vfio upgrade BDF --binary PATH --mode reset|live|auto`: replaces the driver serving BDF
/// with another build, without stopping the service.
struct UpgradeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upgrade",
        abstract: "Hand a served device to another driver build without stopping its clients.",
        discussion: """
            Asks the driver serving BDF (through /run/virtio-vfio/BDF.sock) to start BINARY with its \
            own arguments plus --take-over --mode MODE (and anything after --): the new driver runs \
            as its child, in a session of its own, and logs where the serving driver logs (its \
            terminal, file or journal; under a service manager it stays in the service). The new driver receives the device, the DMA memory, the \
            interrupts and the clients' connections, brings the device up (reset mode: reset, \
            renegotiate, rebuild; live mode: adopt the rings as they are) and completes a first \
            request; only then does the old driver end. If the new one fails, exits, or is not \
            healthy within the old one's --handover-timeout, the old one keeps serving (rollback). \
            Exit status: 0 upgraded, 1 rolled back, 69 nothing serves BDF.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: ArgumentHelp("The driver build to start.", valueName: "path")) var binary: String
    @Option(name: .customLong("mode"), help: "reset, live (refused unless the features match) or auto.")
    var modeArgument: HandoverModeArgument = .auto
    var mode: HandoverMessage.Mode { modeArgument.mode }
    @Option(help: ArgumentHelp("Directory of the control sockets.", valueName: "dir"))
    var controlDirectory = ControlListener.directory
    @Option(help: ArgumentHelp("Give up waiting for the outcome after this long (ms).", valueName: "ms"))
    var timeout: Int32 = 60_000
    @Argument(parsing: .postTerminator, help: "Extra arguments for the new driver (after --).")
    var extra: [String] = []

    func run() throws {
        let address = try device.address()
        let path = ControlListener.path(for: "\(address)", directory: controlDirectory)
        // A driver busy on a loaded machine may miss one 2 s answer deadline: ask three times.
        var answer = askServingDriver(path)
        for _ in 0..<2 where answer == nil {
            usleep(200_000)
            answer = askServingDriver(path)
        }
        guard let old = answer else {
            printError("virtio-vfio: error: no driver serves \(address) (no answer on \(path) in three tries); start `virtio-vfio serve ...` first")
            throw ExitCode(Failure.unavailable)
        }
        // The serving driver starts the binary: it needs a path that does not depend on our directory.
        let binary = self.binary.hasPrefix("/") ? self.binary : FileManager.default.currentDirectoryPath + "/" + self.binary
        guard case .success = Syscall.access(binary, X_OK) else {
            printError("virtio-vfio: error: \(binary) is not an executable file")
            throw ExitCode(Failure.noInput)
        }
        print("before: pid \(old.pid), driver \(old.version), features \(describeFeatures(old.features))")
        let child: pid_t
        let connection = try ask(path, .upgrade(binary: binary, mode: mode, arguments: extra), about: "\(address)")
        switch try? connection.receiveMessage(timeoutMilliseconds: 5000) {
        case .started(let pid)?:
            child = pid
            printError("virtio-vfio: the serving driver started \(binary) as pid \(pid) (it logs where the serving driver logs)")
        case .refused(let why)?:
            printError("virtio-vfio: error: the driver serving \(address) refused to upgrade: \(why)")
            throw ExitCode(Failure.busy)
        default:
            // A build before `upgrade` existed closes the connection: start the successor from here.
            printError("virtio-vfio: warning: the driver serving \(address) (driver \(old.version)) cannot start its successor itself; starting it from here, its log goes to this command's stderr")
            let arguments = [binary] + SuccessorLaunch.arguments(replacing: old.arguments, mode: mode) + extra
            return try awaitLocal(spawnHere(arguments), old: old, path: path)
        }
        // nil: the serving driver ended without a word (it had handed over, or died).
        let outcome: HandoverMessage?
        do { outcome = try connection.receiveMessage(timeoutMilliseconds: timeout) } catch {
            printError("virtio-vfio: error: no outcome after \(timeout) ms (new driver pid \(child)): \(error)")
            throw ExitCode(Failure.ioError)
        }
        switch outcome {
        case .upgradeOutcome(true, _)?, nil:
            // The new driver answers on the socket once it has renamed its own over the path,
            // right after the old one said `go`.
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(10)
            while clock.now < deadline {
                if let now = askServingDriver(path), now.pid == child {
                    return reportUpgraded(from: old.version, now)
                }
                if kill(child, 0) != 0 { break }
                usleep(20_000)
            }
            if outcome != nil {
                printError("virtio-vfio: error: the old driver reported the upgrade done, but pid \(child) does not answer on \(path)")
                throw ExitCode(Failure.ioError)
            }
            let now = askServingDriver(path)
            print("rolled back: the old driver ended without reporting; \(now.map { "pid \($0.pid) (driver \($0.version)) serves" } ?? "nothing serves \(address) now")")
            throw ExitCode(1)
        case .upgradeOutcome(false, let summary)?:
            print("rolled back: \(summary)")
            throw ExitCode(1)
        case let other?:
            printError("virtio-vfio: error: the serving driver answered \(other), not the upgrade's outcome")
            throw ExitCode(Failure.protocolError)
        }
    }

    /// The two lines of a successful upgrade, from what the new driver says about itself.
    func reportUpgraded(from oldVersion: String, _ now: (pid: Int32, version: String, features: UInt64, arguments: [String])) {
        print("after: pid \(now.pid), driver \(now.version), features \(describeFeatures(now.features))")
        print("upgraded: \(oldVersion) -> \(now.version) (\(mode) mode requested)")
    }

    /// Connects to the control socket and sends `message`.
    func ask(_ path: String, _ message: HandoverMessage, about address: String) throws -> ControlConnection {
        do {
            let connection = try ControlConnection(connectingTo: path, timeoutMilliseconds: 2000)
            try connection.send(message)
            return connection
        } catch {
            printError("virtio-vfio: error: asking the driver serving \(address) to upgrade: \(error)")
            throw ExitCode(Failure.ioError)
        }
    }

    /// The upgrade of a driver too old to start its successor: wait for `child` to serve (or end).
    func awaitLocal(_ child: pid_t, old: (pid: Int32, version: String, features: UInt64, arguments: [String]), path: String) throws {
        let clock = ContinuousClock()
        let deadline = clock.now + .milliseconds(Int(timeout))
        while clock.now < deadline {
            if case .success(let exit?) = Syscall.reap(child) {
                let now = askServingDriver(path)
                print("rolled back: the new driver (pid \(child)) \(exit); pid \(now?.pid ?? old.pid) (driver \(now?.version ?? old.version)) keeps serving")
                throw ExitCode(1)
            }
            if let now = askServingDriver(path), now.pid == child {
                return reportUpgraded(from: old.version, now)
            }
            usleep(20_000)
        }
        printError("virtio-vfio: error: no outcome after \(timeout) ms (new driver pid \(child) still running)")
        throw ExitCode(Failure.ioError)
    }

    /// "0x... [NAMES]", device-specific bits named for the device's type (from sysfs).
    func describeFeatures(_ raw: UInt64) -> String {
        "0x\(String(raw, radix: 16)) [\(Features(rawValue: raw).names(for: deviceType).joined(separator: ", "))]"
    }

    /// The served device's virtio type from its PCI ids, nil if sysfs does not say.
    var deviceType: DeviceType? {
        guard let address = try? device.address(),
              let f = try? SysfsPCI(root: global.sysfsRoot).function(at: address) else { return nil }
        return DeviceType(pciVendor: f.vendorID, pciDevice: f.deviceID, subsystemDevice: f.subsystemDeviceID)
    }

    /// Starts `arguments` in a new session (it outlives this command), stdin from /dev/null,
    /// stdout and stderr to our stderr (its log): only for a serving driver too old to start it.
    func spawnHere(_ arguments: [String]) throws -> pid_t {
        // Its stdout is our stderr: the new driver outlives this command, and must not hold
        // open a pipe a caller reads our stdout from (`out=$(virtio-vfio upgrade ...)`).
        let pid: pid_t
        switch Syscall.spawn(arguments, stdoutToStderr: true) {
        case .success(let p): pid = p
        case .failure(let e):
            printError("virtio-vfio: error: starting \(arguments[0]): \(e)")
            throw ExitCode(Failure.ioError)
        }
        printError("virtio-vfio: started \(arguments.joined(separator: " ")) as pid \(pid)")
        return pid
    }
}
