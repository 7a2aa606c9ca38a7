import ArgumentParser
import HotUpgrade
import Logging
import PCI
import Services
import Synchronization
import Syscalls
import Upgrade
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// Set by SIGUSR1: the bridge pauses, the counters are printed, the bridge goes on.
let countersRequested = Atomic<Bool>(false)

/// `virtio-vfio serve net BDF --tap NAME`: the device bridged to a TAP interface.
struct ServeNetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Bridge a virtio-net device to a TAP interface, so the kernel's network stack uses it.",
        discussion: """
            Creates (or attaches to) the TAP interface NAME, gives it the device's MAC address and \
            moves frames both ways: every frame the device receives is written to the TAP, every \
            frame the stack sends on the TAP goes to the device's transmit queue. With CSUM or \
            GUEST_CSUM negotiated the TAP carries a 12-byte virtio-net header and partial \
            checksums pass through; otherwise plain frames. The interface may be moved to another \
            network namespace after it appears (ip link set NAME netns NS). Completions are \
            polled (one core busy while traffic flows, short sleeps when idle), or with --irq msix \
            polled while traffic flows and waited for on MSI-X interrupts when idle. SIGUSR1 prints the \
            counters; SIGINT/SIGTERM stops, prints them and resets the device. Needs CAP_NET_ADMIN \
            (or a persistent TAP owned by the user).
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: ArgumentHelp("TAP interface to create or attach to.", valueName: "NAME")) var tap: String
    @Option(help: "Completion mode: poll (spin, then short sleeps) or msix (spin for --busy-poll, then sleep on the device's MSI-X interrupts).")
    var irq: CompletionMode = .poll
    @Flag(help: "Ask the device for every frame (VIRTIO_NET_CTRL_RX_PROMISC), e.g. when the TAP is in a bridge.")
    var promiscuous = false
    @Option(help: "Microseconds to keep polling without sleeping after a frame moved (a reply within it is seen at once; under QEMU TCG round trips take 1-2 ms).")
    var busyPoll = 2000
    @Option(help: "Longest sleep between polls when idle, in microseconds.") var maxSleep = 1000
    @Option(help: ArgumentHelp("Frames moved each way per pass of the loop (1-1024) before the other direction and the completions get their turn; the rings' sizes (the device's queue sizes, in `info`) bound it too.", valueName: "N"))
    var batch = 64
    @OptionGroup var handover: HandoverOptions
    @OptionGroup var monitoring: MonitorOptions

    func validate() throws {
        guard irq != .hybrid else { throw ValidationError("serve net takes --irq poll or msix (msix already polls for --busy-poll before it sleeps)") }
        guard TapBridgeHandoverState.isInterfaceName(tap) else {
            throw ValidationError("--tap takes an interface name: 1 to 15 bytes, not . or .., without /, : or whitespace")
        }
        guard busyPoll >= 0, maxSleep > 0 else { throw ValidationError("--busy-poll must not be negative and --max-sleep must be positive") }
        guard (1...1024).contains(batch) else { throw ValidationError("--batch must be 1 to 1024 frames") }
    }

    func run() throws {
        let address = try device.address()
        let wanted = NetDevice<VirtioPCITransport>.supported.subtracting(.ringEventIdx).union(DriverVersion.ringFeatures)
        let monitor = try ServiceMonitor(address: address, options: monitoring)
        let wake: EventFD
        do { wake = try EventFD() } catch {
            printError("virtio-vfio: error: eventfd: \(error)")
            throw ExitCode(Failure.ioError)
        }
        let configuration = bridgeConfiguration(address, monitor: monitor, wake: wake.raw)
        let logger = global.serviceLogger("serve-net")
        let counters: @Sendable () -> Bool = { countersRequested.exchange(false, ordering: .relaxed) }
        var service: NetBridgeService<VirtioPCITransport>
        if handover.takeOver {
            let tapName = tap
            service = try handover.takeOver(address, type: .net, global: global, logger: logger, monitor: monitor) { t, s throws(UpgradeError) in
                try NetBridgeService.adopt(t, &s, wanted: wanted, mode: irq, tapName: tapName, configuration: configuration,
                                           countersRequested: counters)
            }
        } else {
            let transport = try global.openTransport(address, dmaBytes: 4 << 20, expecting: .net, announceLeftover: true)
            let net: NetDevice<VirtioPCITransport>
            do { net = try NetDevice(transport: transport, wanted: wanted, mode: irq) } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
            service = try start(net, address: address, configuration: configuration, countersRequested: counters)
        }
        try serve(service, address: address, monitor: monitor, logger: logger)
    }

    /// How the bridge runs: polling as the options say, logging with the device's address, the
    /// counters published to `monitor` at each status look, a sleep ended by `wake` (the control
    /// socket's handover requests).
    func bridgeConfiguration(_ address: PCIAddress, monitor: ServiceMonitor, wake: Int32) -> TapBridgeConfiguration {
        var configuration = TapBridgeConfiguration()
        configuration.wakeDescriptor = wake
        configuration.busyPoll = .microseconds(busyPoll)
        configuration.maxSleep = .microseconds(maxSleep)
        configuration.batch = batch
        configuration.log = { line in printError("\(address): \(line)") }
        configuration.publishStatus = { device, bridge in monitor.publishNet(device, bridge) }
        return configuration
    }

    /// A freshly started device: the TAP created (or attached to) with the device's MAC, the
    /// receive modes asked for, the bridge between them.
    func start(_ net: consuming NetDevice<VirtioPCITransport>, address: PCIAddress,
               configuration: TapBridgeConfiguration, countersRequested: @escaping @Sendable () -> Bool) throws
        -> NetBridgeService<VirtioPCITransport> {
        let features = net.negotiation.accepted
        let headerSize = TapBridge<VirtioPCITransport>.vnetHeaderSize(for: features)
        let tapInterface: TapInterface
        do {
            tapInterface = try TapInterface(name: tap, vnetHeaderSize: headerSize,
                                            offloads: TapBridge<VirtioPCITransport>.tapOffloads(for: features))
        } catch {
            printError("virtio-vfio: error: \(error)")
            _ = try? net.shutdown()
            throw ExitCode(error.errno.rawValue == EPERM || error.errno.rawValue == EACCES ? Failure.permission : Failure.unavailable)
        }
        if let mac = net.config.mac {
            // Frames the device filters for its own address reach the stack behind the TAP.
            do { try tapInterface.setHardwareAddress(mac.array) } catch {
                printError("virtio-vfio: warning: \(error); the TAP keeps its own address")
            }
        }
        if promiscuous {
            do { try net.setPromiscuous(true) } catch {
                printError("virtio-vfio: error: \(address): promiscuous mode: \(error)")
                _ = try? net.shutdown()
                throw ExitCode(Failure.protocolError)
            }
        }
        let bridge = TapBridge(device: net, fd: tapInterface.raw, vnetHeaderSize: headerSize, configuration: configuration)
        return NetBridgeService(bridge: bridge, tap: tapInterface, countersRequested: countersRequested)
    }

    func serve(_ service: consuming NetBridgeService<VirtioPCITransport>, address: PCIAddress, monitor: ServiceMonitor,
               logger: Logger) throws {
        let features = service.bridge.device.negotiation.accepted
        let control = try handover.control(address, for: service, features: features,
                                           wake: service.bridge.configuration.wakeDescriptor, logger: logger, monitor: monitor)
        monitor.publishNet(service.bridge.device.counters, service.bridge.counters)
        signal(SIGUSR1) { _ in countersRequested.store(true, ordering: .relaxed) }
        let device = service.bridge.device.config
        let headerSize = service.bridge.vnetHeaderSize
        printError("\(address): bridged to TAP \(service.tap.name) (mac \(device.mac.map { "\($0)" } ?? "none"), mtu \(device.mtu), link \(service.bridge.device.linkStatus), \(headerSize > 0 ? "\(headerSize)-byte virtio-net header" : "plain frames"), queues \(service.bridge.device.receiveQueueSize)/\(service.bridge.device.transmitQueueSize), \(irq) mode, driver \(DriverVersion.string), features [\(features.names(for: .net).joined(separator: ", "))], control socket \(control.path)\(monitor.endpointDescription))")
        if device.mtu != NetConfig.defaultMTU {
            printError("\(address): the device's MTU is \(device.mtu): set the TAP's to match (ip link set \(service.tap.name) mtu \(device.mtu)); longer frames are dropped")
        }
        let outcome = serveUpgradable(&service, control: control, monitor: monitor, fdStore: false)
        var failure: NetError?
        if case .failed(let error) = outcome { failure = error as? NetError ?? .virtio(.deviceFailed(status: 0, during: "\(error)")) }
        let summary = service.bridge.summary
        var shutdownError: VirtioError?
        do throws(VirtioError) { try service.shutdown() } catch { shutdownError = error }
        printError("\(address): stopped\(failure == nil ? "" : " after an unrecoverable device error"); device reset\n\(summary)")
        if let failure { throw Failure.exit(VirtioPCIError.virtio(address, Self.virtioError(failure))) }
        if let shutdownError { throw Failure.exit(VirtioPCIError.virtio(address, shutdownError)) }
    }

    static func virtioError(_ error: NetError) -> VirtioError {
        if case .virtio(let e) = error { return e }
        return .deviceFailed(status: 0, during: "\(error)")
    }
}

extension ServiceMonitor {
    /// The bridge's status look: its counters, the device answering (its status was just read).
    func publishNet(_ device: NetCounters, _ bridge: TapBridgeCounters) {
        let report = ServiceReports.net(device: device, bridge: bridge)
        telemetry.publish(report.samples, summary: report.summary, deviceAnswers: true)
    }
}
