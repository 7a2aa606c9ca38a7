import ArgumentParser
import HotUpgrade
import NBD
import PCI
import Services
import Syscalls
import UBlk
import Upgrade
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `virtio-vfio serve blk BDF [--nbd unix:PATH [--tcp 127.0.0.1:PORT]] [--ublk [--ublk-id N] [--recover]]`:
/// the device as an NBD export, a ublk block device, or both.
struct ServeBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Export a virtio-blk device over NBD (UNIX socket, and optionally TCP on loopback), as a ublk block device, or both.",
        discussion: """
            Clients: nbd-client (-unix PATH), qemu-img/qemu-nbd (nbd+unix:///?socket=PATH), nbdinfo, \
            nbdcopy, fio's nbd engine. Fixed newstyle handshake; READ, WRITE (FUA), FLUSH, TRIM and \
            WRITE_ZEROES as the device supports them; several clients at once, requests in flight up \
            to the queue depth. Runs until SIGINT/SIGTERM, finishes what is in flight, then resets \
            the device.

            --ublk adds /dev/ublkbN (Linux's ublk, the ublk_drv module; Linux 6.0 or later) served \
            from the same device: the kernel copies data straight to and from the device's DMA \
            memory. The ublk device survives this driver: if it dies, the kernel holds its I/O and \
            the next `serve blk BDF --ublk` for the same device recovers it, with the requests that \
            were in flight (--recover insists on that). A clean stop removes it.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @OptionGroup var ring: RingOption
    @Option(help: ArgumentHelp("Listen on a UNIX socket: unix:PATH.", valueName: "unix:PATH")) var nbd: String?
    @Option(help: ArgumentHelp("Also listen on TCP, loopback only: 127.0.0.1:PORT or [::1]:PORT.", valueName: "ADDR:PORT"))
    var tcp: String?
    @Option(help: "Completion mode: poll, msix or hybrid.") var irq: CompletionMode = .msix
    @Option(help: "Export name clients ask for.") var exportName = ""
    @Option(help: ArgumentHelp("NBD clients served at once (1-4096); a client past the limit is told why during option haggling (NBD_REP_ERR_POLICY) and its refusal logged.", valueName: "N"))
    var maxClients = 16
    @Option(help: ArgumentHelp("Requests of one NBD client in flight at once (1-1024); its connection is not read while all are taken.", valueName: "N"))
    var requestsPerClient = 64
    @Flag(help: "Serve the device as a ublk block device, /dev/ublkbN (needs the ublk_drv module).") var ublk = false
    @Option(help: ArgumentHelp("The ublk device id N (/dev/ublkbN); default: the one left by an earlier driver of this device, else the kernel's choice.", valueName: "N"))
    var ublkId: UInt32?
    @Flag(help: "Only recover the ublk device an earlier driver of this device left behind (its I/O held by the kernel); refuse if there is none.")
    var recover = false
    @OptionGroup var handover: HandoverOptions
    @OptionGroup var monitoring: MonitorOptions
    @OptionGroup var store: DescriptorStoreOptions

    func validate() throws {
        guard nbd != nil || ublk else { throw ValidationError("say how to export the device: --nbd unix:PATH, --ublk, or both") }
        if let nbd, !(nbd.hasPrefix("unix:") && nbd.count > 5) { throw ValidationError("--nbd takes unix:PATH") }
        if tcp != nil && nbd == nil { throw ValidationError("--tcp is a second NBD listener: give --nbd unix:PATH too") }
        if (ublkId != nil || recover) && !ublk { throw ValidationError("--ublk-id and --recover go with --ublk") }
        if let ublkId, ublkId >= 1 << 20 { throw ValidationError("--ublk-id takes 0 to 1048575") }
        guard (1...4096).contains(maxClients) else { throw ValidationError("--max-clients takes 1 to 4096, not \(maxClients)") }
        guard (1...1024).contains(requestsPerClient) else { throw ValidationError("--requests-per-client takes 1 to 1024, not \(requestsPerClient)") }
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
        // What a successor compares with the running device includes RING_PACKED as --ring says.
        let wanted = ring.ring.features(DriverVersion.blockFeatures(BlockDevice<VirtioPCITransport>.supported))
        let wake: EventFD
        do { wake = try EventFD() } catch {
            printError("virtio-vfio: error: eventfd: \(error)")
            throw ExitCode(Failure.ioError)
        }
        var configuration = NBDServerConfiguration()
        configuration.exportName = exportName
        configuration.maximumClients = maxClients
        configuration.requestsPerClient = requestsPerClient
        configuration.refusalMessage = "server busy: \(maxClients) clients are being served, the most this export takes (virtio-vfio serve blk --max-clients); try again later"
        configuration.exportDescription = "virtio-vfio \(address)"
        configuration.unixSocketPath = nbd.map { String($0.dropFirst(5)) }
        configuration.tcpAddress = try tcp.map(Self.parseTCP)
        configuration.wakeDescriptor = wake.raw
        let verbose = global.verbose
        configuration.log = { line in if verbose { printError(line) } }
        configuration.notice = { line in printError("\(address): \(line)") }
        let monitor = try ServiceMonitor(address: address, options: monitoring)
        // The ublk export, once attached (the status runs on the serving loop's thread, as it does).
        let attached = AttachedUBlk()
        configuration.status = { s in
            var report = ServiceReports.block(s)
            if let u = attached.export {
                let ublk = ServiceReports.ublk(u.statistics, deviceID: u.deviceID, live: u.live)
                report.samples += ublk.samples
                report.summary = (nbd == nil ? "" : report.summary + "; ") + ublk.summary
            }
            monitor.telemetry.publish(report.samples, summary: report.summary, deviceAnswers: s.backend.answering)
        }
        configuration.requestAnswered = Self.latencies(monitor)

        // ublk first: a kernel without it is refused before the device is touched.
        var ublkControl: UBlkControl?
        if ublk {
            do { ublkControl = try UBlkControl() } catch { throw Failure.exit(error) }
        }
        let logger = global.serviceLogger("serve-blk")
        let backendLog: @Sendable (String) -> Void = { printError("\(address): \($0)") }
        var passed = PassedDescriptors(store)
        var export: BlockExport<VirtioPCITransport>
        if handover.takeOver {
            export = try handover.takeOver(address, type: .block, global: global, logger: logger, monitor: monitor) { t, s throws(UpgradeError) in
                try BlockExport.adopt(t, &s, wanted: wanted, ring: ring.ring, mode: irq, configuration: configuration, log: backendLog)
            }
            // The predecessor has been told to go: its ublk device is recovered once it is gone.
            if var control = ublkControl.take() {
                var companion: UBlkExport?
                try export.server.modifyBackend { (backend) throws in
                    companion = try attachUBlk(&control, &backend, address: address, afterHandover: true)
                }
                export.server.attach(companion: companion!)
                attached.export = companion
                ublkControl = consume control
            }
        } else {
            let blk: BlockDevice<VirtioPCITransport>
            if passed.hasDevice {
                blk = try global.recover(address, from: passed, wanted: wanted, mode: irq, queues: 1, afterCrash: store.afterCrash,
                    adopt: { t, features, queues, verified throws(VirtioError) in
                        try BlockDevice(adopting: t, features: features, queues: queues, mode: irq, verified: verified)
                    },
                    start: { t throws(VirtioError) in try BlockDevice(transport: t, wanted: wanted, ring: ring.ring, mode: irq) })
            } else {
                let transport = try global.openTransport(address, dmaBytes: 40 << 20, expecting: .block, announceLeftover: true)
                do { blk = try BlockDevice(transport: transport, wanted: wanted, ring: ring.ring, mode: irq) } catch {
                    throw Failure.exit(VirtioPCIError.virtio(address, error))
                }
            }
            var backend = VirtioBlockBackend(device: blk, log: backendLog)
            if var control = ublkControl.take() {
                let export = try attachUBlk(&control, &backend, address: address, afterHandover: false)
                configuration.companion = export
                attached.export = export
                ublkControl = consume control
            }
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
        // The kept originals are closed now that the device runs on duplicates of them (held for
        // the driver's life they were a second set of its descriptors: the soak counted them).
        _ = consume passed
        let features = export.server.withBackend { $0.device.negotiation.accepted }
        let capacity = export.server.withBackend { $0.size }
        let control = try handover.control(address, for: export, features: features, wake: wake.raw, logger: logger, monitor: monitor)
        let exports = [nbd.map { "NBD at \($0)" + (tcp.map { " and tcp:\($0)" } ?? "") }, attached.export.map { "ublk as /dev/ublkb\($0.deviceID)" }]
        printError("\(address): exporting \(capacity) bytes over \(exports.compactMap { $0 }.joined(separator: " and ")) (\(irq) mode, driver \(DriverVersion.string), features [\(features.names(for: .block).joined(separator: ", "))], control socket \(control.path)\(monitor.endpointDescription))")
        let listener = export.server.unixListenerDescriptor
        let outcome = serveUpgradable(&export, control: control, monitor: monitor, fdStore: store.fdStore,
                                      extra: listener.map { [(name: "nbd-unix", fd: $0)] } ?? [])
        if let ublk = attached.export, var control = ublkControl.take() {
            let stopped = ublk.finished
            ublk.close()
            if case .stopped = outcome, stopped {
                // The disk is gone (STOP_DEV); DEL_DEV frees its id once nothing holds /dev/ublkcN.
                do { try control.delete(ublk.deviceID); printError("\(address): removed /dev/ublkb\(ublk.deviceID)") } catch {
                    printError("virtio-vfio: warning: \(error)")
                }
            } else {
                printError("\(address): /dev/ublkb\(ublk.deviceID) is left to the kernel, its I/O held: `virtio-vfio serve blk \(address) --ublk` recovers it")
            }
        }
        if case .failed(let error) = outcome {
            printError("virtio-vfio: error: \(error)")
            throw ExitCode(Failure.ioError)
        }
        let stats = export.server.statistics
        var summary = nbd == nil ? "" : "; NBD: \(stats.connectionsAccepted) connections, \(stats.reads) reads, \(stats.writes) writes, \(stats.flushes) flushes, \(stats.errorReplies) error replies"
        if let u = attached.export?.statistics {
            summary += "; ublk: \(u.reads) reads, \(u.writes) writes, \(u.flushes) flushes, \(u.discards) discards, \(u.writeZeroes) write-zeroes, \(u.refused) refused, \(u.failed) failed"
        }
        printError("\(address): stopped\(summary)")
    }

    /// Adds the ublk device, or recovers the one an earlier driver of `address` left behind.
    func attachUBlk(_ control: inout UBlkControl, _ backend: inout VirtioBlockBackend<VirtioPCITransport>, address: PCIAddress,
                    afterHandover: Bool) throws -> UBlkExport {
        let started = monotonicNanoseconds()
        var options = UBlkSetup.Options(key: address.ublkKey, name: address.description)
        options.deviceID = ublkId
        options.recoverOnly = recover
        options.afterHandover = afterHandover
        do {
            return try UBlkSetup.attach(control: &control, backend: &backend, config: backend.device.config, options: options,
                                        log: { printError("\(address): \($0)") }, ready: { export in
                printError("\(address): /dev/ublkb\(export.deviceID) serving (\(export.recovered ? "recovered, with the requests the kernel held; the previous driver let go after \(milliseconds(export.letGoAfter))" : "added"), \(export.depth) tags of \(export.export.bufferBytes) bytes; ready \(milliseconds(monotonicNanoseconds() - started)) after attaching, \(milliseconds(monotonicNanoseconds() - export.fetchedAt)) after the \(export.recovered ? "END_USER_RECOVERY" : "START_DEV") command)")
            })
        } catch { throw Failure.exit(error) }
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

/// Where the status callback finds the ublk export, which is attached after the callback is made.
final class AttachedUBlk: @unchecked Sendable {
    var export: UBlkExport?
}
