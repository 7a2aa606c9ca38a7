import ArgumentParser
import HotUpgrade
import Services
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
    @OptionGroup var ring: RingOption
    @Option(help: "Bytes per second at most.") var rate = 4096
    @Option(help: "Entropy bits credited per byte (0-8).") var credit = 8
    @Option(help: "Stop after this many bytes (0: run until signalled).") var bytes = 0
    @Option(help: "Completion mode: poll, msix or hybrid.") var irq: CompletionMode = .msix
    @OptionGroup var handover: HandoverOptions
    @OptionGroup var monitoring: MonitorOptions
    @OptionGroup var store: DescriptorStoreOptions

    func validate() throws {
        guard rate > 0 else { throw ValidationError("--rate must be positive") }
        guard (0...8).contains(credit) else { throw ValidationError("--credit must be 0 to 8 bits per byte") }
        guard bytes >= 0 else { throw ValidationError("--bytes must not be negative") }
    }

    func run() throws {
        let address = try device.address()
        let logger = global.serviceLogger("serve-rng")
        let pool = open("/dev/random", O_WRONLY | O_CLOEXEC)
        guard pool >= 0 else {
            printError("virtio-vfio: error: cannot open /dev/random for writing: \(describeErrno(errno))")
            throw ExitCode(errno == EACCES ? Failure.permission : Failure.ioError)
        }
        let poolFD = OwnedFD(adopting: pool)
        let sink = Self.pool(poolFD.raw, credit: credit)
        // What a successor compares with the running device includes RING_PACKED as --ring says.
        let wanted = ring.ring.features(DriverVersion.ringFeatures)
        let monitor = try ServiceMonitor(address: address, options: monitoring)
        let passed = PassedDescriptors(store)
        var feed: EntropyFeed<VirtioPCITransport>
        if handover.takeOver {
            feed = try handover.takeOver(address, type: .entropy, global: global, logger: logger, monitor: monitor) { t, s throws(UpgradeError) in
                try EntropyFeed.adopt(t, &s, wanted: wanted, ring: ring.ring, mode: irq, rate: rate, limit: bytes, sink: sink)
            }
        } else if passed.hasDevice {
            let rng = try global.recover(address, from: passed, wanted: wanted, mode: irq, queues: 1, afterCrash: store.afterCrash,
                adopt: { t, features, queues, verified throws(VirtioError) in
                    try EntropyDevice(adopting: t, features: features, queue: queues[0], mode: irq, verified: verified)
                },
                start: { t throws(VirtioError) in try EntropyDevice(transport: t, wanted: wanted, ring: ring.ring, mode: irq) })
            feed = EntropyFeed(rng: rng, rate: rate, limit: bytes, sink: sink)
        } else {
            let transport = try global.openTransport(address, dmaBytes: 2 << 20, expecting: .entropy, announceLeftover: true)
            do {
                feed = EntropyFeed(rng: try EntropyDevice(transport: transport, wanted: wanted, ring: ring.ring, mode: irq), rate: rate, limit: bytes, sink: sink)
            } catch { throw Failure.exit(VirtioPCIError.virtio(address, error)) }
        }
        // The kept originals are closed now that the device runs on duplicates of them.
        _ = consume passed
        feed.status = { fed, reads, recoveries in
            let report = ServiceReports.entropy(fed: fed, reads: reads, recoveries: recoveries)
            monitor.telemetry.publish(report.samples, summary: report.summary, deviceAnswers: true)
        }
        feed.readAnswered = monitor.latency("rng_request_duration", labels: [("queue", "0")],
                                            help: "Time from an entropy request to the device's answer")
        let features = feed.rng.negotiation.accepted
        let control = try handover.control(address, for: feed, features: features, wake: nil, logger: logger, monitor: monitor)
        printError("\(address): feeding the kernel entropy pool at up to \(rate) bytes/s, \(credit) bits credited per byte (driver \(DriverVersion.string), features [\(features.names(for: .entropy).joined(separator: ", "))], control socket \(control.path)\(monitor.endpointDescription))")
        let outcome = serveUpgradable(&feed, control: control, monitor: monitor, fdStore: store.fdStore)
        let recoveries = feed.rng.recoveries, fed = feed.fed
        var shutdownError: VirtioError?
        do throws(VirtioError) { try feed.shutdown() } catch { shutdownError = error }
        printError("\(address): fed \(fed) bytes (\(fed * credit) bits credited) to the kernel pool, \(recoveries) recoveries; device reset")
        if case .failed(let failure) = outcome {
            if let exit = failure as? ExitCode { throw exit }
            if let virtio = failure as? VirtioError { throw Failure.exit(VirtioPCIError.virtio(address, virtio)) }
            throw Failure.exit(failure)
        }
        if let shutdownError { throw Failure.exit(VirtioPCIError.virtio(address, shutdownError)) }
    }

    /// The kernel's entropy pool as a sink: RNDADDENTROPY with `credit` bits per byte.
    static func pool(_ fd: Int32, credit: Int) -> (UnsafeRawBufferPointer) throws -> Void {
        { bytes in
            // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
            try withUnsafeTemporaryAllocation(byteCount: 8 + bytes.count, alignment: 8) { request in
                request.storeBytes(of: Int32(bytes.count * credit), toByteOffset: 0, as: Int32.self)
                request.storeBytes(of: Int32(bytes.count), toByteOffset: 4, as: Int32.self)
                (request.baseAddress! + 8).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
                if case .failure(let e) = Syscall.ioctl(fd, CVirtioShim_RNDADDENTROPY, request.baseAddress!) {
                    printError("virtio-vfio: error: RNDADDENTROPY on /dev/random: \(e) (needs CAP_SYS_ADMIN)")
                    throw ExitCode(e.rawValue == EPERM ? Failure.permission : Failure.ioError)
                }
            }
        }
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
