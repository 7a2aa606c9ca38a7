import ArgumentParser
import PCI
import Synchronization
import Syscalls
import Upgrade
import CVirtioShim
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `virtio-vfio serve ...`: long-running services on top of a device.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run a device as a service for real clients.",
        subcommands: [ServeRngCommand.self, ServeBlkCommand.self, ServeNetCommand.self])
}

/// Set by SIGINT/SIGTERM: the service finishes its current step and shuts the device down.
let stopRequested = Atomic<Bool>(false)

/// `virtio-vfio serve rng BDF`: feeds the kernel's entropy pool from the device (RNDADDENTROPY).
struct ServeRngCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rng",
        abstract: "Feed the kernel entropy pool from a virtio-rng device at a bounded rate.",
        discussion: """
            Reads from the device and adds the bytes to the kernel's pool with the RNDADDENTROPY \
            ioctl on /dev/random (needs CAP_SYS_ADMIN), crediting --credit bits of entropy per \
            byte. Runs until SIGINT/SIGTERM or until --bytes were fed, then resets the device.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: "Bytes per second at most.") var rate = 4096
    @Option(help: "Entropy bits credited per byte (0-8).") var credit = 8
    @Option(help: "Stop after this many bytes (0: run until signalled).") var bytes = 0
    @Option(help: "Completion mode: poll, msix or hybrid.") var irq: CompletionMode = .msix
    @OptionGroup var handover: HandoverOptions

    func validate() throws {
        guard rate > 0 else { throw ValidationError("--rate must be positive") }
        guard (0...8).contains(credit) else { throw ValidationError("--credit must be 0 to 8 bits per byte") }
        guard bytes >= 0 else { throw ValidationError("--bytes must not be negative") }
    }

    func run() throws {
        let address = try device.address()
        let logger = global.makeLogger("serve-rng")
        let pool = open("/dev/random", O_WRONLY | O_CLOEXEC)
        guard pool >= 0 else {
            printError("virtio-vfio: error: cannot open /dev/random for writing: \(describeErrno(errno))")
            throw ExitCode(errno == EACCES ? Failure.permission : Failure.ioError)
        }
        let poolFD = OwnedFD(adopting: pool)
        let wanted = DriverVersion.ringFeatures
        var rng: EntropyDevice<VirtioPCITransport>
        if handover.takeOver {
            rng = try takeOver(address, wanted: wanted)
        } else {
            let transport = try global.openTransport(address, dmaBytes: 2 << 20, expecting: .entropy, announceLeftover: true)
            do { rng = try EntropyDevice(transport: transport, wanted: wanted, mode: irq) } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
        }
        let features = rng.negotiation.accepted
        let arguments = CommandLine.arguments
        let control = try ControlService(path: handover.controlPath(address), replacing: handover.takeOver,
                                         deviceState: deviceState(rng.transport, features: rng.negotiation.accepted), options: handover) {
            describeThisDriver(features: features, arguments: arguments)
        }
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        printError("\(address): feeding the kernel entropy pool at up to \(rate) bytes/s, \(credit) bits credited per byte (driver \(DriverVersion.string), features [\(features.names(for: .entropy).joined(separator: ", "))], control socket \(control.path))")

        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; } with room for one chunk.
        let chunk = min(rate, 512)
        let request = UnsafeMutableRawPointer.allocate(byteCount: 8 + chunk, alignment: 8)
        defer { request.deallocate() }
        var fed = 0
        var failure: Error?
        let clock = ContinuousClock()
        var start = clock.now
        while !stopRequested.load(ordering: .relaxed) && (bytes == 0 || fed < bytes) {
            if control.requested, let pending = control.take() {
                // Between two reads nothing is in flight from the pool's side; the snapshot
                // collects the buffers the device still holds (§2.7.14).
                handOver(pending, &rng, address: address, fed: fed, control: control)
                control.finished()
                start = clock.now - .milliseconds(fed * 1000 / rate)
            }
            let n = bytes == 0 ? chunk : min(chunk, bytes - fed)
            var filled = 0
            do {
                // A misbehaving device is reset and brought back (up to 5 times in a row): the
                // kernel pool sees a pause, not an end of supply.
                try rng.read(n, recoveries: 5) { piece in
                    (request + 8 + filled).copyMemory(from: piece.baseAddress!, byteCount: piece.count)
                    filled += piece.count
                }
            } catch { failure = VirtioPCIError.virtio(address, error); break }
            request.storeBytes(of: Int32(n * credit), toByteOffset: 0, as: Int32.self)
            request.storeBytes(of: Int32(n), toByteOffset: 4, as: Int32.self)
            if case .failure(let e) = Syscall.ioctl(poolFD.raw, CVirtioShim_RNDADDENTROPY, request) {
                printError("virtio-vfio: error: RNDADDENTROPY on /dev/random: \(e) (needs CAP_SYS_ADMIN)")
                failure = ExitCode(e.rawValue == EPERM ? Failure.permission : Failure.ioError)
                break
            }
            fed += n
            // Rate limit: sleep until `fed` bytes are due at `rate` bytes per second.
            let due = start + .milliseconds(fed * 1000 / rate)
            if clock.now < due { try? clock.sleepUntilSync(due) }
            logger.debug("fed \(fed) bytes")
        }
        control.stop()
        let recoveries = rng.recoveries
        var shutdownError: VirtioError?
        do throws(VirtioError) { _ = try rng.shutdown() } catch { shutdownError = error }
        printError("\(address): fed \(fed) bytes (\(fed * credit) bits credited) to the kernel pool, \(recoveries) recoveries; device reset")
        if let failure { throw failure is ExitCode ? failure : Failure.exit(failure) }
        if let shutdownError { throw Failure.exit(VirtioPCIError.virtio(address, shutdownError)) }
    }

    /// The serving side of an upgrade: snapshot the idle queue, hand everything over; returns only
    /// if the successor failed (after bringing the device back by reset when it may have touched it).
    func handOver(_ pending: HandoverRequest, _ rng: inout EntropyDevice<VirtioPCITransport>, address: PCIAddress,
                  fed: Int, control: ControlService) {
        let quiesced = monotonicNanoseconds()
        let snapshot: QueueSnapshot
        do { snapshot = try rng.queueSnapshot() } catch {
            printError("virtio-vfio: handover refused: the queue did not drain: \(error)")
            control.refuse("the queue did not drain: \(error)")
            if case .brokenQueue = error { try? rng.recover() }
            return
        }
 
        var record = deviceState(rng.transport, features: rng.negotiation.accepted).record
        record.setQueues([snapshot])
        record.descriptors = []
        record.quiesceStarted = quiesced
        let rollback = handOverDevice(pending, record: record, descriptors: [], 
                                        timeoutMilliseconds: handover.handoverTimeout) {
            printError("\(address): fed \(fed) bytes before the handover")
        }
        printError("virtio-vfio: upgrade rolled back, this driver (\(DriverVersion.string)) keeps serving: \(rollback.reason)")
        if rollback.deviceTouched {
            do { try rng.recover(); printError("\(address): device reset and rebuilt after the failed upgrade") } catch {
                printError("virtio-vfio: error: bringing the device back after the failed upgrade: \(error)")
            }
        }
    }

    /// The successor's side: adopt (live) or reset the device handed over, read once, confirm.
    func takeOver(_ address: PCIAddress, wanted: Features) throws -> EntropyDevice<VirtioPCITransport> {
        var received = try TakeOver(address: address, options: handover, expecting: .entropy)
        let sysfs = SysfsPCI(root: global.sysfsRoot)
        let transport: VirtioPCITransport
        do { transport = try VirtioPCITransport(adopting: try received.vfio(address, sysfs: sysfs), sysfs: sysfs) } catch {
            throw received.decline("\(error)", touched: false)
        }
        try received.prepared()
        let snapshots = received.record.queueSnapshots
        let live = try received.chooseLive(transport, wanted: wanted, snapshots: snapshots, vectors: irq.vectorPerQueue(snapshots.count))
        var rng: EntropyDevice<VirtioPCITransport>
        do {
            if live {
                guard snapshots.count == 1 else { throw VirtioError.adoption(queue: nil, "\(snapshots.count) queues handed over, virtio-rng has 1") }
                rng = try EntropyDevice(adopting: transport, features: Features(rawValue: received.record.features),
                                        queue: snapshots[0], mode: irq)
            } else {
                rng = try EntropyDevice(transport: transport, wanted: wanted, mode: irq)
            }
        } catch { throw received.decline("\(error)", touched: !live) }
        received.mark(live ? "adopt" : "reset+rebuild")
        handover.debugFault.strikeAfterDeviceUp()
        // Healthy: the device answered a first request.
        var got = 0
        do { try rng.read(16) { got += $0.count } } catch { throw received.decline("first read failed: \(error)", touched: true) }
        received.mark("first read")
        if handover.debugFault == .firstRequestFails { throw received.decline("first read failed (--debug-fault first-request-fails)", touched: true) }
        try received.confirm("\(live ? "live" : "reset") mode, driver \(DriverVersion.string), first read \(got) bytes",
                             timeoutMilliseconds: handover.handoverTimeout)
        printError("\(address): took over from driver \(received.record.driverVersion) in \(live ? "live" : "reset") mode in \(received.elapsed); service gap \(received.gap) (\(received.phaseSummary), confirm)")
        return rng
    }
}

extension ContinuousClock {
    /// Blocks the calling thread until `deadline` (the CLI is synchronous; no Task needed).
    func sleepUntilSync(_ deadline: Instant) throws {
        let left = deadline - now
        guard left > .zero else { return }
        let (s, a) = left.components
        var ts = timespec(tv_sec: Int(s), tv_nsec: Int(a / 1_000_000_000))
        var rem = timespec()
        while nanosleep(&ts, &rem) != 0 && errno == EINTR {
            if stopRequested.load(ordering: .relaxed) { return }
            ts = rem
        }
    }
}
