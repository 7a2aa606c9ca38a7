import ArgumentParser
import NBD
import PCI
import Services
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
        let transport = try global.openTransport(address, dmaBytes: 40 << 20, expecting: .block)
        let blk: BlockDevice<VirtioPCITransport>
        do { blk = try BlockDevice(transport: transport, mode: irq) } catch { throw Failure.exit(VirtioPCIError.virtio(address, error)) }
        var configuration = NBDServerConfiguration()
        configuration.exportName = exportName
        configuration.exportDescription = "virtio-vfio \(DriverVersion.string) \(address)"
        configuration.unixSocketPath = String(nbd.dropFirst(5))
        configuration.tcpAddress = try tcp.map(Self.parseTCP)
        let verbose = global.verbose
        configuration.log = { line in if verbose { printError(line) } }
        let backend = VirtioBlockBackend(device: blk)
        let capacity = backend.size
        var server: NBDServer<VirtioBlockBackend<VirtioPCITransport>>
        do { server = try NBDServer(backend: backend, configuration: configuration) } catch {
            printError("virtio-vfio: error: \(error)")
            throw ExitCode(Failure.ioError)
        }
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        printError("\(address): exporting \(capacity) bytes over NBD at \(nbd)\(tcp.map { " and tcp:\($0)" } ?? "") (\(irq) mode)")
        do { try server.run(until: stopRequested) } catch {
            printError("virtio-vfio: error: \(error)")
            throw ExitCode(Failure.ioError)
        }
        let stats = server.statistics
        printError("\(address): stopped; \(stats.connectionsAccepted) connections, \(stats.reads) reads, \(stats.writes) writes, \(stats.flushes) flushes, \(stats.errorReplies) error replies")
    }
}
