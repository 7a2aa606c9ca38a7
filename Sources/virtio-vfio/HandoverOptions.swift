import ArgumentParser
import HotUpgrade
import Logging
import PCI
import Synchronization
import Syscalls
import Upgrade
import VFIO
import Virtio
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `--mode` of `serve --take-over`: a hand-over mode by name. A type of the command line's own
/// because ArgumentParser shows the default of any CaseIterable & RawRepresentable option by its
/// raw value, which for HandoverMessage.Mode is the wire format's number ("default: 3"). With
/// String raw values, help reads "(values: reset, live, auto; default: auto)" and a bad value is
/// refused with those names. The two switches keep it and HandoverMessage.Mode the same set.
enum HandoverModeArgument: String, CaseIterable, ExpressibleByArgument {
    case reset, live, auto

    init(_ mode: HandoverMessage.Mode) {
        switch mode {
        case .reset: self = .reset
        case .live: self = .live
        case .auto: self = .auto
        }
    }

    var mode: HandoverMessage.Mode {
        switch self {
        case .reset: .reset
        case .live: .live
        case .auto: .auto
        }
    }
}

/// Test hooks of the upgrade path (hidden options): a successor that fails on purpose.
enum HandoverFault: String, ExpressibleByArgument {
    /// Dies (SIGKILL) right after it brought the device up, before reporting healthy.
    case crashAfterDeviceUp = "crash-after-device-up"
    /// Reports its first request as failed.
    case firstRequestFails = "first-request-fails"
    /// Hangs right after it brought the device up (the old driver's deadline must end it).
    case hangAfterDeviceUp = "hang-after-device-up"
}


/// The options every `serve` command has for hot upgrades.
struct HandoverOptions: ParsableArguments {
    @Flag(help: "Take the device over from the driver serving it now (a hot upgrade) instead of opening it.")
    var takeOver = false
    @Option(name: .customLong("mode"), help: "With --take-over: reset (reset, renegotiate, rebuild), live (adopt the rings; refused if the features differ) or auto (live when possible).")
    var modeArgument: HandoverModeArgument = .auto
    var mode: HandoverMessage.Mode { modeArgument.mode }
    @Option(help: ArgumentHelp("How long this driver waits for a successor to report healthy before it takes the device back (milliseconds).", valueName: "ms"))
    var handoverTimeout: Int32 = 10_000
    @Option(help: ArgumentHelp("Directory of the control sockets.", valueName: "dir"))
    var controlDirectory = ControlListener.directory
    @Option(help: .hidden) var debugStateFormat: UInt16?
    @Option(help: .hidden) var debugFault: HandoverFault?

    func validate() throws {
        guard handoverTimeout > 0 else { throw ValidationError("--handover-timeout must be positive") }
    }

    func controlPath(_ address: PCIAddress) -> String {
        ControlListener.path(for: "\(address)", directory: controlDirectory)
    }

    /// How this successor takes over, with the test faults acted out at their moments; the
    /// takeover's gap goes to `monitor`.
    func takeOverOptions(_ monitor: ServiceMonitor) -> TakeOverOptions {
        var options = TakeOverOptions(mode: mode, driverVersion: DriverVersion.string)
        options.handoverTimeout = handoverTimeout
        options.tookOver = { live, gap in monitor.tookOver(live: live, gapNanoseconds: gap) }
        switch debugFault {
        case .crashAfterDeviceUp?: options.afterDeviceUp = { kill(getpid(), SIGKILL) }
        case .hangAfterDeviceUp?: options.afterDeviceUp = { while true { sleep(60) } }
        case .firstRequestFails?: options.failFirstRequest = true
        case nil: break
        }
        return options
    }

    /// The control socket of a service running `features` with this process's command line,
    /// its counters and ticks `monitor`'s.
    func controlConfiguration(features: UInt64, wake: Int32?, monitor: ServiceMonitor) -> ControlServiceConfiguration {
        let arguments = CommandLine.arguments
        var configuration = ControlServiceConfiguration { describeThisDriver(features: features, arguments: arguments) }
        configuration.wake = wake
        configuration.counters = { monitor.telemetry.namedCounters }
        configuration.tick = { monitor.tick() }
        configuration.handoverTimeout = handoverTimeout
        configuration.debugStateFormat = debugStateFormat
        return configuration
    }
}

extension HandoverOptions {
    /// The successor's side for a VFIO device: connect, map the device handed over, `adopt`,
    /// first request, healthy. A failure is one line on stderr and the exit status.
    func takeOver<S: UpgradableService & ~Copyable>(
        _ address: PCIAddress, type: DeviceType, global: GlobalOptions, logger: Logger, monitor: ServiceMonitor,
        adopt: (consuming VirtioPCITransport, inout Successor) throws(UpgradeError) -> S
    ) throws -> S {
        let sysfs = SysfsPCI(root: global.sysfsRoot)
        do {
            return try HotUpgrade.takeOver(path: controlPath(address), address: "\(address)", type: type, options: takeOverOptions(monitor),
                                           logger: logger, attach: { s throws(UpgradeError) in try s.attachVFIO(address, sysfs: sysfs) },
                                           adopt: adopt)
        } catch { throw error.exit }
    }

    /// The control socket of `service`, which runs `features` (a successor replaces its
    /// predecessor's socket file).
    func control<S: UpgradableService & ~Copyable>(
        _ address: PCIAddress, for service: borrowing S, features: Features, wake: Int32?, logger: Logger, monitor: ServiceMonitor
    ) throws -> ControlService {
        do {
            return try ControlService(path: controlPath(address), replacing: takeOver,
                                      devicePart: service.devicePart(driverVersion: DriverVersion.string),
                                      configuration: controlConfiguration(features: features.rawValue, wake: wake, monitor: monitor),
                                      logger: logger)
        } catch { throw error.exit }
    }
}

extension UpgradeError {
    /// The exit status the command line gives this failure (one line on stderr first).
    var exit: ExitCode {
        printError("virtio-vfio: error: \(message)")
        switch kind {
        case .unavailable: return ExitCode(Failure.unavailable)
        case .busy: return ExitCode(Failure.busy)
        case .protocolError: return ExitCode(Failure.protocolError)
        case .ioError: return ExitCode(Failure.ioError)
        }
    }
}

/// Serves `service` behind its control socket until SIGINT/SIGTERM, handing it over whenever a
/// successor asks. Returns `.stopped` or the failure; after a completed handover this process
/// ends at once with `_exit(0)`: no deinit runs, so nothing of the device, the clients or the
/// socket files (the successor's now) is touched.
///
/// Under a service manager (`$NOTIFY_SOCKET`, systemd's Type=notify): READY=1 with this pid as
/// the main one and `status` once serving (a successor too, after its takeover); on a handover
/// the new driver's pid becomes the main one before this process ends, so the manager follows
/// the service to it instead of seeing it exit; STOPPING=1 when asked to stop. With `--fd-store`
/// the device's descriptors and `extra` (the service's sockets) go to the manager's store before
/// READY and leave it on a clean stop (`DescriptorStore`).
func serveUpgradable<S: UpgradableService & ~Copyable>(_ service: inout S, control: ControlService, monitor: ServiceMonitor,
                                                       fdStore: Bool, extra: [(name: String, fd: Int32)] = []) -> ServeOutcome {
    signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
    signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
    signal(SIGPIPE, SIG_IGN)
    let stored = fdStore ? StoredSet(service.devicePart(driverVersion: DriverVersion.string), extra: extra) : nil
    if let stored { DescriptorStore.keep(stored) }
    tellServiceManager(["READY=1", "MAINPID=\(getpid())", "STATUS=\(monitor.serving)"])
    let outcome = control.serve(&service, until: stopRequested)
    if case .handedOver(let successor) = outcome {
        // The successor listens on the metrics port already (SO_REUSEPORT): from now on only it.
        monitor.close()
        tellServiceManager(["MAINPID=\(successor)", "STATUS=handed over to pid \(successor)"])
        _exit(0)
    }
    tellServiceManager(["STOPPING=1"])
    // A clean stop gives the device back: the manager must not hold it. After a failure the
    // store stays for the restart.
    if case .stopped = outcome, let stored { DescriptorStore.forget(stored) }
    control.stop()
    monitor.close()
    return outcome
}

/// sd_notify, with a failure logged (the service goes on: the manager's socket is not ours).
func tellServiceManager(_ assignments: [String]) {
    if case .failure(let e) = ServiceManager.notify(assignments) {
        printError("virtio-vfio: warning: telling the service manager \(assignments.first ?? ""): \(e)")
    }
}
