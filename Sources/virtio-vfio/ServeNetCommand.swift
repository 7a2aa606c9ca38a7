import ArgumentParser
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
    @OptionGroup var handover: HandoverOptions

    func validate() throws {
        guard irq != .hybrid else { throw ValidationError("serve net takes --irq poll or msix (msix already polls for --busy-poll before it sleeps)") }
        guard TapBridgeHandoverState.isInterfaceName(tap) else {
            throw ValidationError("--tap takes an interface name: 1 to 15 bytes, not . or .., without /, : or whitespace")
        }
        guard busyPoll >= 0, maxSleep > 0 else { throw ValidationError("--busy-poll must not be negative and --max-sleep must be positive") }
    }

    func run() throws {
        let address = try device.address()
        let wanted = NetDevice<VirtioPCITransport>.supported.subtracting(.ringEventIdx).union(DriverVersion.ringFeatures)
        let published = PublishedCounters()
        let wake: EventFD
        do { wake = try EventFD() } catch {
            printError("virtio-vfio: error: eventfd: \(error)")
            throw ExitCode(Failure.ioError)
        }
        let configuration = bridgeConfiguration(address, published: published, wake: wake.raw)
        var service: NetService
        if handover.takeOver {
            service = try takeOver(address, wanted: wanted, configuration: configuration)
        } else {
            let transport = try global.openTransport(address, dmaBytes: 4 << 20, expecting: .net, announceLeftover: true)
            let net: NetDevice<VirtioPCITransport>
            do { net = try NetDevice(transport: transport, wanted: wanted, mode: irq) } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
            service = try start(net, address: address, configuration: configuration)
        }
        try serve(service, address: address, published: published)
    }

    /// How the bridge runs: polling as the options say, logging with the device's address, the
    /// counters published for the control socket's `statistics` at each status look, a sleep
    /// ended by `wake` (the control socket's handover requests).
    func bridgeConfiguration(_ address: PCIAddress, published: PublishedCounters, wake: Int32) -> TapBridgeConfiguration {
        var configuration = TapBridgeConfiguration()
        configuration.wakeDescriptor = wake
        configuration.busyPoll = .microseconds(busyPoll)
        configuration.maxSleep = .microseconds(maxSleep)
        configuration.log = { line in printError("\(address): \(line)") }
        configuration.publishCounters = { counters in published.latest.withLock { $0 = counters } }
        return configuration
    }

    /// A freshly started device: the TAP created (or attached to) with the device's MAC, the
    /// receive modes asked for, the bridge between them.
    func start(_ net: consuming NetDevice<VirtioPCITransport>, address: PCIAddress,
               configuration: TapBridgeConfiguration) throws -> NetService {
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
        return NetService(bridge: bridge, tap: tapInterface)
    }

    func serve(_ service: consuming NetService, address: PCIAddress, published: PublishedCounters) throws {
        let features = service.bridge.device.negotiation.accepted
        let arguments = CommandLine.arguments
        let control = try ControlService(path: handover.controlPath(address), replacing: handover.takeOver,
                                         wake: service.bridge.configuration.wakeDescriptor,
                                         deviceState: deviceState(service.bridge.device.transport, features: features),
                                         options: handover, counters: { published.latest.withLock { $0 } }) {
            describeThisDriver(features: features, arguments: arguments)
        }
        published.latest.withLock { $0 = service.bridge.namedCounters }
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGUSR1) { _ in countersRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        let device = service.bridge.device.config
        let headerSize = service.bridge.vnetHeaderSize
        printError("\(address): bridged to TAP \(service.tap.name) (mac \(device.mac.map { "\($0)" } ?? "none"), mtu \(device.mtu), link \(service.bridge.device.linkStatus), \(headerSize > 0 ? "\(headerSize)-byte virtio-net header" : "plain frames"), queues \(service.bridge.device.receiveQueueSize)/\(service.bridge.device.transmitQueueSize), \(irq) mode, driver \(DriverVersion.string), features [\(features.names(for: .net).joined(separator: ", "))], control socket \(control.path))")
        if device.mtu != NetConfig.defaultMTU {
            printError("\(address): the device's MTU is \(device.mtu): set the TAP's to match (ip link set \(service.tap.name) mtu \(device.mtu)); longer frames are dropped")
        }
        var failure: NetError?
        while true {
            do throws(NetError) {
                let outcome = try service.bridge.run(until: stopRequested) {
                    countersRequested.load(ordering: .relaxed) || control.quiesce.load(ordering: .relaxed)
                }
                if outcome == .stopped { break }
                if countersRequested.exchange(false, ordering: .relaxed) {
                    printError("\(address): counters\n\(service.bridge.summary)")
                }
                if control.quiesce.load(ordering: .relaxed) {
                    if let pending = control.take() { handOver(pending, &service, address: address, control: control) }
                    control.finished()
                }
            } catch {
                failure = error
                break
            }
        }
        control.stop()
        let summary = service.bridge.summary
        var shutdownError: VirtioError?
        do throws(VirtioError) { _ = try service.bridge.shutdown() } catch { shutdownError = error }
        printError("\(address): stopped\(failure == nil ? "" : " after an unrecoverable device error"); device reset\n\(summary)")
        if let failure { throw Failure.exit(VirtioPCIError.virtio(address, Self.virtioError(failure))) }
        if let shutdownError { throw Failure.exit(VirtioPCIError.virtio(address, shutdownError)) }
    }

    /// The serving side of an upgrade, once the bridge stopped moving frames: in reset (or auto)
    /// mode received frames go to the TAP and transmitted ones are waited for first, so the
    /// successor's reset loses none; in live mode the receive buffers stay posted and transmit
    /// frames in flight are handed over with the rings. Then the device, the TAP descriptor and
    /// the counters go to the successor. Returns only if it failed; the device is then reset and
    /// rebuilt if the successor may have touched it.
    func handOver(_ pending: HandoverRequest, _ service: inout NetService, address: PCIAddress, control: ControlService) {
        let quiesced = monotonicNanoseconds()
        var unsent = 0
        let snapshots: [QueueSnapshot]
        do throws(NetError) {
            if pending.mode != .live { unsent = try service.bridge.drainForReset(timeout: .seconds(1)) }
            do { snapshots = try service.bridge.device.handoverSnapshots() } catch { throw .virtio(error) }
        } catch {
            printError("virtio-vfio: handover refused: \(error)")
            control.refuse("\(error)")
            return
        }
        if unsent > 0 { printError("\(address): \(unsent) transmitted frames not completed within 1 s; a reset loses them") }
        let state = TapBridgeHandoverState(tapName: service.tap.name, vnetHeaderSize: service.bridge.vnetHeaderSize,
                                           receiveBufferSize: service.bridge.device.receiveBufferSize,
                                           promiscuous: service.bridge.device.promiscuous,
                                           allMulticast: service.bridge.device.allMulticast,
                                           deviceCounters: service.bridge.device.counters, bridgeCounters: service.bridge.counters)
        var record = deviceState(service.bridge.device.transport, features: service.bridge.device.negotiation.accepted).record
        record.setQueues(snapshots)
        record.descriptors = [.tap]
        record.quiesceStarted = quiesced
        record.serviceState = state.encoded()
        let held = snapshots[0].outstanding.count, sending = snapshots[1].outstanding.count
        let rollback = handOverDevice(pending, record: record, descriptors: [service.tap.raw],
                                      timeoutMilliseconds: handover.handoverTimeout) {
            printError("\(address): handed over TAP \(service.tap.name) with \(held) receive buffers posted and \(sending) frames in flight\n\(service.bridge.summary)")
        }
        printError("virtio-vfio: upgrade rolled back, this driver (\(DriverVersion.string)) keeps serving: \(rollback.reason)")
        if rollback.deviceTouched {
            do { try service.bridge.device.recover(); printError("\(address): device reset and rebuilt after the failed upgrade") } catch {
                printError("virtio-vfio: error: bringing the device back after the failed upgrade: \(error)")
            }
        }
    }

    /// The successor's side: the TAP descriptor adopted, the device adopted (live: receive
    /// buffers and transmit frames as the old driver left them) or reset and rebuilt, its status
    /// read, then healthy.
    func takeOver(_ address: PCIAddress, wanted: Features, configuration: TapBridgeConfiguration) throws -> NetService {
        var received = try TakeOver(address: address, options: handover, expecting: .net)
        let sysfs = SysfsPCI(root: global.sysfsRoot)
        let transport: VirtioPCITransport
        do { transport = try VirtioPCITransport(adopting: try received.vfio(address, sysfs: sysfs), sysfs: sysfs) } catch {
            throw received.decline("\(error)", touched: false)
        }
        try received.prepared()
        let taps = received.take(.tap)
        guard taps.count == 1 else {
            for fd in taps { Syscall.close(fd) }
            throw received.decline("\(taps.count) TAP descriptors handed over, 1 expected", touched: false)
        }
        let tapFD = OwnedFD(adopting: taps[0])
        let state: TapBridgeHandoverState
        do { state = try TapBridgeHandoverState(decoding: received.record.serviceState) } catch {
            throw received.decline("TAP state: \(error)", touched: false)
        }
        guard state.tapName.utf8.elementsEqual(tap.utf8) else {
            throw received.decline("the serving driver bridges TAP \(state.tapName), this one was started with --tap \(tap)", touched: false)
        }
        let tapInterface: TapInterface
        do { tapInterface = try TapInterface(adopting: tapFD, vnetHeaderSize: state.vnetHeaderSize) } catch {
            throw received.decline("\(error)", touched: false)
        }
        let snapshots = received.record.queueSnapshots
        let live = try received.chooseLive(transport, wanted: wanted, snapshots: snapshots,
                                           vectors: NetDevice<VirtioPCITransport>.queueVectors(mode: irq, count: snapshots.count))
        var net: NetDevice<VirtioPCITransport>
        do {
            if live {
                net = try NetDevice(adopting: transport, features: Features(rawValue: received.record.features), queues: snapshots,
                                    rxBufferSize: state.receiveBufferSize, counters: state.deviceCounters,
                                    promiscuous: state.promiscuous, allMulticast: state.allMulticast, mode: irq)
            } else {
                net = try NetDevice(transport: transport, wanted: wanted, rxBufferSize: state.receiveBufferSize,
                                    counters: state.deviceCounters, mode: irq)
            }
        } catch { throw received.decline("\(error)", touched: !live) }
        received.mark(live ? "adopt" : "reset+rebuild")
        let headerSize = TapBridge<VirtioPCITransport>.vnetHeaderSize(for: net.negotiation.accepted)
        guard headerSize == state.vnetHeaderSize else {
            throw received.decline("the features negotiated now need a \(headerSize)-byte header on the TAP, it carries \(state.vnetHeaderSize) (restart serve net instead)", touched: true)
        }
        if !live {
            // A reset returned the receive modes to the device's defaults.
            do {
                if let on = state.promiscuous { try net.setPromiscuous(on) }
                if let on = state.allMulticast { try net.setAllMulticast(on) }
            } catch { throw received.decline("receive modes after the reset: \(error)", touched: true) }
        }
        handover.debugFault.strikeAfterDeviceUp()
        // Healthy: the device's status and link read back without DEVICE_NEEDS_RESET.
        do throws(NetError) { try net.refreshStatus() } catch {
            throw received.decline("device status: \(error)", touched: true)
        }
        received.mark("status")
        if handover.debugFault == .firstRequestFails {
            throw received.decline("first status look failed (--debug-fault first-request-fails)", touched: true)
        }
        let posted = net.receivePosted, inFlight = net.transmitInFlight
        try received.confirm("\(live ? "live" : "reset") mode, driver \(DriverVersion.string), TAP \(tapInterface.name), \(posted) receive buffers posted, \(inFlight) frames in flight",
                             timeoutMilliseconds: handover.handoverTimeout)
        printError("\(address): took over TAP \(tapInterface.name) from driver \(received.record.driverVersion) in \(live ? "live" : "reset") mode in \(received.elapsed); service gap \(received.gap) (\(received.phaseSummary), confirm)")
        let bridge = TapBridge(device: net, fd: tapInterface.raw, vnetHeaderSize: headerSize, configuration: configuration,
                               counters: state.bridgeCounters)
        return NetService(bridge: bridge, tap: tapInterface)
    }

    static func virtioError(_ error: NetError) -> VirtioError {
        if case .virtio(let e) = error { return e }
        return .deviceFailed(status: 0, during: "\(error)")
    }
}

/// What `serve net` runs: the bridge and the TAP whose descriptor it uses (kept open as long as
/// the bridge is).
struct NetService: ~Copyable {
    var bridge: TapBridge<VirtioPCITransport>
    let tap: TapInterface
}

/// The bridge's counters as it last published them, read by the control socket's thread.
final class PublishedCounters: Sendable {
    let latest = Mutex<[(String, Int)]>([])
}
