import ArgumentParser
import HotUpgrade
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
    @OptionGroup var monitoring: MonitorOptions
    @OptionGroup var store: DescriptorStoreOptions

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
        let monitor = try ServiceMonitor(address: address, options: monitoring)
        configuration.status = { s in
            let report = ServiceReports.block(s)
            monitor.telemetry.publish(report.samples, summary: report.summary, deviceAnswers: s.backend.answering)
        }
        configuration.requestAnswered = Self.latencies(monitor)

        let logger = global.serviceLogger("serve-blk")
        let backendLog: @Sendable (String) -> Void = { printError("\(address): \($0)") }
        var passed = PassedDescriptors(store)
        var export: BlockExport<VirtioPCITransport>
        if handover.takeOver {
            export = try handover.takeOver(address, type: .block, global: global, logger: logger, monitor: monitor) { t, s throws(UpgradeError) in
                try BlockExport.adopt(t, &s, wanted: wanted, mode: irq, configuration: configuration, log: backendLog)
            }
        } else {
            let blk: BlockDevice<VirtioPCITransport>
            if passed.hasDevice {
                blk = try global.recover(address, from: passed, wanted: wanted, mode: irq, queues: 1, afterCrash: store.afterCrash,
                    adopt: { t, features, queues, verified throws(VirtioError) in
                        try BlockDevice(adopting: t, features: features, queues: queues, mode: irq, verified: verified)
                    },
                    start: { t throws(VirtioError) in try BlockDevice(transport: t, wanted: wanted, mode: irq) })
            } else {
                let transport = try global.openTransport(address, dmaBytes: 40 << 20, expecting: .block, announceLeftover: true)
                do { blk = try BlockDevice(transport: transport, wanted: wanted, mode: irq) } catch {
                    throw Failure.exit(VirtioPCIError.virtio(address, error))
                }
            }
            let backend = VirtioBlockBackend(device: blk, log: backendLog)
            // The kept listener serves only the same socket (the options may have changed).
            let kept = passed.take("nbd-unix").flatMap { fd -> Int32? in
                if configuration.tcpAddress == nil, let path = boundUnixPath(fd), path == configuration.unixSocketPath { return fd }
                printError("virtio-vfio: warning: \(address): the kept NBD listener is on \(boundUnixPath(fd) ?? "?"), the options say \(nbd)\(tcp.map { " and tcp:\($0)" } ?? ""); listening anew")
                Syscall.close(fd)
                return nil
            }
            do {
                if let kept {
                    export = BlockExport(server: try NBDServer(backend: backend, configuration: configuration, keptUnixListener: kept))
                    printError("\(address): listening on the NBD socket the service manager kept (clients that connected meanwhile are served)")
                } else {
                    export = BlockExport(server: try NBDServer(backend: backend, configuration: configuration))
                }
            } catch {
                printError("virtio-vfio: error: \(error)")
                throw ExitCode(Failure.ioError)
            }
        }
        let features = export.server.withBackend { $0.device.negotiation.accepted }
        let capacity = export.server.withBackend { $0.size }
        let control = try handover.control(address, for: export, features: features, wake: wake.raw, logger: logger, monitor: monitor)
        printError("\(address): exporting \(capacity) bytes over NBD at \(nbd)\(tcp.map { " and tcp:\($0)" } ?? "") (\(irq) mode, driver \(DriverVersion.string), features [\(features.names(for: .block).joined(separator: ", "))], control socket \(control.path)\(monitor.endpointDescription))")
        let listener = export.server.unixListenerDescriptor
        let outcome = serveUpgradable(&export, control: control, monitor: monitor, fdStore: store.fdStore,
                                      extra: listener.map { [(name: "nbd-unix", fd: $0)] } ?? [])
        if case .failed(let error) = outcome {
            printError("virtio-vfio: error: \(error)")
            throw ExitCode(Failure.ioError)
        }
        let stats = export.server.statistics
        printError("\(address): stopped; \(stats.connectionsAccepted) connections, \(stats.reads) reads, \(stats.writes) writes, \(stats.flushes) flushes, \(stats.errorReplies) error replies")
    }

    /// One latency histogram per NBD command, recorded as each reply goes out.
    static func latencies(_ monitor: ServiceMonitor) -> @Sendable (UInt16, UInt64) -> Void {
        let help = "Time from an NBD request's header to its reply, by operation"
        func histogram(_ op: String) -> @Sendable (UInt64) -> Void {
            monitor.latency("blk_request_duration", labels: [("queue", "0"), ("op", op)], help: help)
        }
        let read = histogram("read"), write = histogram("write"), flush = histogram("flush"), trim = histogram("trim"),
            zeroes = histogram("write_zeroes")
        return { command, nanoseconds in
            switch command {
            case NBDProtocol.Command.read: read(nanoseconds)
            case NBDProtocol.Command.write: write(nanoseconds)
            case NBDProtocol.Command.flush: flush(nanoseconds)
            case NBDProtocol.Command.trim: trim(nanoseconds)
            case NBDProtocol.Command.writeZeroes: zeroes(nanoseconds)
            default: break
            }
        }
    }
}
