import ArgumentParser
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

/// The options of hot upgrades on every `serve` command, and the successor's test faults.
extension HandoverMessage.Mode: ExpressibleByArgument {
    public init?(argument: String) {
        guard let mode = Self.allCases.first(where: { $0.description == argument }) else { return nil }
        self = mode
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

extension HandoverFault? {
    /// Acts out the faults that strike once the device is up.
    func strikeAfterDeviceUp() {
        switch self {
        case .crashAfterDeviceUp?: kill(getpid(), SIGKILL)
        case .hangAfterDeviceUp?: while true { sleep(60) }
        default: break
        }
    }
}

/// The options every `serve` command has for hot upgrades.
struct HandoverOptions: ParsableArguments {
    @Flag(help: "Take the device over from the driver serving it now (a hot upgrade) instead of opening it.")
    var takeOver = false
    @Option(help: "With --take-over: reset (reset, renegotiate, rebuild), live (adopt the rings; refused if the features differ) or auto (live when possible).")
    var mode: HandoverMessage.Mode = .auto
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
}
