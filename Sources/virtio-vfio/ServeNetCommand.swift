import ArgumentParser
import PCI
import Services
import Synchronization
import Syscalls
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
            polled (one core busy while traffic flows, short sleeps when idle). SIGUSR1 prints the \
            counters; SIGINT/SIGTERM stops, prints them and resets the device. Needs CAP_NET_ADMIN \
            (or a persistent TAP owned by the user).
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: ArgumentHelp("TAP interface to create or attach to.", valueName: "NAME")) var tap: String
    @Option(help: "Completion mode (only poll for now).") var irq: CompletionMode = .poll
    @Flag(help: "Ask the device for every frame (VIRTIO_NET_CTRL_RX_PROMISC), e.g. when the TAP is in a bridge.")
    var promiscuous = false
    @Option(help: "Microseconds to keep polling without sleeping after a frame moved (a reply within it is seen at once; under QEMU TCG round trips take 1-2 ms).")
    var busyPoll = 2000
    @Option(help: "Longest sleep between polls when idle, in microseconds.") var maxSleep = 1000

    func validate() throws {
        guard irq == .poll else { throw ValidationError("serve net polls the device: --irq \(irq) is not supported yet (use --irq poll)") }
        guard !tap.isEmpty, tap.utf8.count < 16, !tap.contains("/"), !tap.contains(" ") else {
            throw ValidationError("--tap takes an interface name of 1 to 15 characters")
        }
        guard busyPoll >= 0, maxSleep > 0 else { throw ValidationError("--busy-poll must not be negative and --max-sleep must be positive") }
    }

    func run() throws {
        let address = try device.address()
        let wanted = NetDevice<VirtioPCITransport>.supported.subtracting(.ringEventIdx).union(DriverVersion.ringFeatures)
        let transport = try global.openTransport(address, dmaBytes: 4 << 20, expecting: .net, announceLeftover: true)
        let net: NetDevice<VirtioPCITransport>
        do { net = try NetDevice(transport: transport, wanted: wanted) } catch {
            throw Failure.exit(VirtioPCIError.virtio(address, error))
        }
        try serve(net, address: address)
    }

    func serve(_ net: consuming NetDevice<VirtioPCITransport>, address: PCIAddress) throws {
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
        var configuration = TapBridgeConfiguration()
        configuration.busyPoll = .microseconds(busyPoll)
        configuration.maxSleep = .microseconds(maxSleep)
        configuration.log = { line in printError("\(address): \(line)") }
        var bridge = TapBridge(device: net, fd: tapInterface.raw, vnetHeaderSize: headerSize, configuration: configuration)

        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGUSR1) { _ in countersRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        let mtu = bridge.device.config.mtu
        printError("\(address): bridged to TAP \(tapInterface.name) (mac \(bridge.device.config.mac.map { "\($0)" } ?? "none"), mtu \(mtu), link \(bridge.device.linkStatus), \(headerSize > 0 ? "\(headerSize)-byte virtio-net header" : "plain frames"), queues \(bridge.device.receiveQueueSize)/\(bridge.device.transmitQueueSize), \(irq) mode, driver \(DriverVersion.string), features [\(features.names(for: .net).joined(separator: ", "))])")
        if mtu != NetConfig.defaultMTU {
            printError("\(address): the device's MTU is \(mtu): set the TAP's to match (ip link set \(tapInterface.name) mtu \(mtu)); longer frames are dropped")
        }
        var failure: NetError?
        while true {
            do throws(NetError) {
                let outcome = try bridge.run(until: stopRequested, pauseWhen: countersRequested)
                if outcome == .stopped { break }
                countersRequested.store(false, ordering: .relaxed)
                printError("\(address): counters\n\(bridge.summary)")
            } catch {
                failure = error
                break
            }
        }
        let summary = bridge.summary
        var shutdownError: VirtioError?
        do throws(VirtioError) { _ = try bridge.shutdown() } catch { shutdownError = error }
        printError("\(address): stopped\(failure == nil ? "" : " after an unrecoverable device error"); device reset\n\(summary)")
        if let failure { throw Failure.exit(VirtioPCIError.virtio(address, Self.virtioError(failure))) }
        if let shutdownError { throw Failure.exit(VirtioPCIError.virtio(address, shutdownError)) }
    }

    static func virtioError(_ error: NetError) -> VirtioError {
        if case .virtio(let e) = error { return e }
        return .deviceFailed(status: 0, during: "\(error)")
    }
}
