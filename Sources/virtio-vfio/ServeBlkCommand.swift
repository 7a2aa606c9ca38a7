import ArgumentParser
import NBD
import PCI
import Services
import Syscalls
import Upgrade
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `virtio-vfio serve blk BDF --nbd unix:PATH [--tcp 127.0.0.1:PORT]`: the device as an NBD export.
struct ServeBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Export a virtio-blk device over NBD (UNIX socket, and optionally TCP on loopback).",
        discussion: """
            Clients: nbd-client (-unix PATH), qemu-img/qemu-nbd (nbd+unix:///?socket=PATH), nbdinfo, \
            nbdcopy, fio's nbd engine. Fixed newstyle handshake; READ, WRITE (FUA), FLUSH, TRIM and \
            WRITE_ZEROES as the device supports them; several clients at once, requests in flight up \
            to the queue depth. Runs until SIGINT/SIGTERM, finishes what is in flight, then resets \
            the device.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: ArgumentHelp("Listen on a UNIX socket: unix:PATH.", valueName: "unix:PATH")) var nbd: String
    @Option(help: ArgumentHelp("Also listen on TCP, loopback only: 127.0.0.1:PORT or [::1]:PORT.", valueName: "ADDR:PORT"))
    var tcp: String?
    @Option(help: "Completion mode: poll, msix or hybrid.") var irq: CompletionMode = .msix
    @Option(help: "Export name clients ask for.") var exportName = ""
    @OptionGroup var handover: HandoverOptions

    func validate() throws {
        guard nbd.hasPrefix("unix:"), nbd.count > 5 else { throw ValidationError("--nbd takes unix:PATH") }
        if let tcp { _ = try Self.parseTCP(tcp) }
    }

    static func parseTCP(_ text: String) throws -> NBDTCPAddress {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]), port > 0 else {
            throw ValidationError("--tcp takes 127.0.0.1:PORT or [::1]:PORT")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard host == "127.0.0.1" || host == "::1" || host == "localhost" else {
            throw ValidationError("--tcp listens on loopback only (127.0.0.1 or [::1]), not \(host)")
        }
        return NBDTCPAddress(host: host == "localhost" ? "127.0.0.1" : host, port: port)
    }

    func run() throws {
        let address = try device.address()
        let wanted = DriverVersion.blockFeatures(BlockDevice<VirtioPCITransport>.supported)
        let wake: EventFD
        do { wake = try EventFD() } catch {
            printError("virtio-vfio: error: eventfd: \(error)")
            throw ExitCode(Failure.ioError)
        }
        var configuration = NBDServerConfiguration()
        configuration.exportName = exportName
        configuration.exportDescription = "virtio-vfio \(address)"
        configuration.unixSocketPath = String(nbd.dropFirst(5))
        configuration.tcpAddress = try tcp.map(Self.parseTCP)
        configuration.wakeDescriptor = wake.raw
        let verbose = global.verbose
        configuration.log = { line in if verbose { printError(line) } }

        var server: NBDServer<VirtioBlockBackend<VirtioPCITransport>>
        if handover.takeOver {
            server = try takeOver(address, wanted: wanted, configuration: configuration)
        } else {
            let transport = try global.openTransport(address, dmaBytes: 40 << 20, expecting: .block, announceLeftover: true)
            let blk: BlockDevice<VirtioPCITransport>
            do { blk = try BlockDevice(transport: transport, wanted: wanted, mode: irq) } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
            do { server = try NBDServer(backend: VirtioBlockBackend(device: blk, log: { printError("\(address): \($0)") }), configuration: configuration) } catch {
                printError("virtio-vfio: error: \(error)")
                throw ExitCode(Failure.ioError)
            }
        }
        let features = server.withBackend { $0.device.negotiation.accepted }
        let capacity = server.withBackend { $0.size }
        let arguments = CommandLine.arguments
        let device = server.withBackend { deviceState($0.device.transport, features: $0.device.negotiation.accepted) }
        let control = try ControlService(path: handover.controlPath(address), replacing: handover.takeOver, wake: wake.raw,
                                         deviceState: device, options: handover) {
            describeThisDriver(features: features, arguments: arguments)
        }
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        printError("\(address): exporting \(capacity) bytes over NBD at \(nbd)\(tcp.map { " and tcp:\($0)" } ?? "") (\(irq) mode, driver \(DriverVersion.string), features [\(features.names(for: .block).joined(separator: ", "))], control socket \(control.path))")
        serving: while true {
            let outcome: NBDRunOutcome
            do { outcome = try server.run(until: stopRequested, quiesceWhen: control.quiesce) } catch {
                printError("virtio-vfio: error: \(error)")
                throw ExitCode(Failure.ioError)
            }
            switch outcome {
            case .stopped:
                break serving
            case .quiesceFailed(let failure):
                printError("virtio-vfio: handover refused: \(failure)")
                control.refuse("\(failure)")
            case .quiesced:
                guard let pending = control.take() else { control.finished(); continue }
                handOver(pending, &server, address: address, control: control)
                control.finished()
            }
        }
        control.stop()
        let stats = server.statistics
        printError("\(address): stopped; \(stats.connectionsAccepted) connections, \(stats.reads) reads, \(stats.writes) writes, \(stats.flushes) flushes, \(stats.errorReplies) error replies")
    }

    /// The serving side of an upgrade, once the NBD server quiesced (no request in flight, every
    /// reply sent): hands the device and the connections over. Returns only if the successor
    /// failed; the device is then reset and rebuilt if the successor may have touched it.
    func handOver(_ pending: HandoverRequest, _ server: inout NBDServer<VirtioBlockBackend<VirtioPCITransport>>,
                  address: PCIAddress, control: ControlService) {
        let quiesced = monotonicNanoseconds()
        let result: Result<[QueueSnapshot], VirtioError> = server.withBackend { backend in
            do throws(VirtioError) { return .success(try backend.device.queueSnapshots()) } catch { return .failure(error) }
        }
        guard case .success(let snapshots) = result else {
            printError("virtio-vfio: handover refused: \(result)")
            control.refuse("\(result)")
            return
        }
        let connections = server.handoverState()
        var record = server.withBackend { deviceState($0.device.transport, features: $0.device.negotiation.accepted) }.record
        record.setQueues(snapshots)
        record.descriptors = connections.descriptors.map {
            $0 == connections.unixListener?.fd || $0 == connections.tcpListener?.fd ? .listener : .client
        }
        record.quiesceStarted = quiesced
        record.serviceState = connections.encoded()
        let fds = connections.descriptors
        let rollback = handOverDevice(pending, record: record, descriptors: fds, 
                                      timeoutMilliseconds: handover.handoverTimeout) {
            printError("\(address): handed over \(connections.clients.count) NBD connections")
        }
        printError("virtio-vfio: upgrade rolled back, this driver (\(DriverVersion.string)) keeps serving: \(rollback.reason)")
        if rollback.deviceTouched {
            do throws(VirtioError) {
                try server.modifyBackend { backend throws(VirtioError) in try backend.device.recover() }
                printError("\(address): device reset and rebuilt after the failed upgrade")
            } catch {
                printError("virtio-vfio: error: bringing the device back after the failed upgrade: \(error)")
            }
        }
    }

    /// The successor's side: the device (adopted live, or reset), a first read, the NBD
    /// connections adopted, then healthy.
    func takeOver(_ address: PCIAddress, wanted: Features, configuration: NBDServerConfiguration) throws
        -> NBDServer<VirtioBlockBackend<VirtioPCITransport>> {
        var received = try TakeOver(address: address, options: handover, expecting: .block)
        let sysfs = SysfsPCI(root: global.sysfsRoot)
        let transport: VirtioPCITransport
        do { transport = try VirtioPCITransport(adopting: try received.vfio(address, sysfs: sysfs), sysfs: sysfs) } catch {
            throw received.decline("\(error)", touched: false)
        }
        try received.prepared()
        var sockets = received.take(.listener) + received.take(.client)
        let connections: NBDHandoverState
        do { connections = try NBDHandoverState(decoding: received.record.serviceState, descriptors: sockets) } catch {
            for fd in sockets { Syscall.close(fd) }
            throw received.decline("NBD connection state: \(error)", touched: false)
        }
        sockets = []
        let snapshots = received.record.queueSnapshots
        let live = try received.chooseLive(transport, wanted: wanted, snapshots: snapshots, vectors: irq.vectorPerQueue(snapshots.count))
        var blk: BlockDevice<VirtioPCITransport>
        do {
            if live {
                blk = try BlockDevice(adopting: transport, features: Features(rawValue: received.record.features),
                                      queues: snapshots, mode: irq)
            } else {
                blk = try BlockDevice(transport: transport, wanted: wanted, mode: irq)
            }
        } catch { throw received.decline("\(error)", touched: !live) }
        received.mark(live ? "adopt" : "reset+rebuild")
        handover.debugFault.strikeAfterDeviceUp()
        // Healthy: the device answered a first request (sector 0 read).
        let probe = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { probe.deallocate() }
        do throws(BlockError) { try blk.read(sector: 0, into: probe) } catch {
            throw received.decline("first read failed: \(error)", touched: true)
        }
        received.mark("first read")
        if handover.debugFault == .firstRequestFails {
            throw received.decline("first read failed (--debug-fault first-request-fails)", touched: true)
        }
        let server: NBDServer<VirtioBlockBackend<VirtioPCITransport>>
        do { server = try NBDServer(backend: VirtioBlockBackend(device: blk, log: { printError("\(address): \($0)") }), configuration: configuration, adopting: connections) } catch {
            throw received.decline("adopting the NBD connections: \(error)", touched: true)
        }
        received.mark("nbd")
        try received.confirm("\(live ? "live" : "reset") mode, driver \(DriverVersion.string), \(connections.clients.count) NBD connections, first read ok",
                             timeoutMilliseconds: handover.handoverTimeout)
        printError("\(address): took over from driver \(received.record.driverVersion) in \(live ? "live" : "reset") mode with \(connections.clients.count) NBD connections in \(received.elapsed); service gap \(received.gap) (\(received.phaseSummary), confirm)")
        return server
    }
}
