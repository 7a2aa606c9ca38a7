import ArgumentParser
import PCI
import Synchronization
import Syscalls
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
        subcommands: [ServeRngCommand.self, ServeBlkCommand.self])
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
        let transport = try global.openTransport(address, dmaBytes: 2 << 20, expecting: .entropy)
        var rng: EntropyDevice<VirtioPCITransport>
        do { rng = try EntropyDevice(transport: transport, mode: irq) } catch { throw Failure.exit(VirtioPCIError.virtio(address, error)) }
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        printError("\(address): feeding the kernel entropy pool at up to \(rate) bytes/s, \(credit) bits credited per byte")

        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; } with room for one chunk.
        let chunk = min(rate, 512)
        let request = UnsafeMutableRawPointer.allocate(byteCount: 8 + chunk, alignment: 8)
        defer { request.deallocate() }
        var fed = 0
        var failure: Error?
        let clock = ContinuousClock()
        let start = clock.now
        while !stopRequested.load(ordering: .relaxed) && (bytes == 0 || fed < bytes) {
            let n = bytes == 0 ? chunk : min(chunk, bytes - fed)
            var filled = 0
            do {
                // A misbehaving device is reset and brought back (up to 5 times in a row): the
                // kernel pool sees a pause, not an end of supply.
                try rng.read(n, recoveries: 5) { piece in
                    (request + 8 + filled).copyMemory(from: piece.baseAddress!, byteCount: piece.count)
                    filled += piece.count
                }
            } catch let error as VirtioError { failure = VirtioPCIError.virtio(address, error); break } catch { failure = error; break }
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
        let recoveries = rng.recoveries
        var shutdownError: VirtioError?
        do throws(VirtioError) { _ = try rng.shutdown() } catch { shutdownError = error }
        printError("\(address): fed \(fed) bytes (\(fed * credit) bits credited) to the kernel pool, \(recoveries) recoveries; device reset")
        if let failure { throw failure is ExitCode ? failure : Failure.exit(failure) }
        if let shutdownError { throw Failure.exit(VirtioPCIError.virtio(address, shutdownError)) }
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
