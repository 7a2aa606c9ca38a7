import ArgumentParser
import PCI
import Syscalls
import SystemPackage
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

extension CompletionMode: ExpressibleByArgument {}

/// `virtio-vfio rng BDF --bytes N`: entropy from a virtio-rng device to stdout.
struct RngCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rng",
        abstract: "Read entropy from a virtio-rng device and write it to stdout.",
        discussion: """
            Resets the device, negotiates, builds its queue with every buffer posted and reads \
            --bytes bytes. --irq chooses how completions are noticed: poll (spin on the used \
            ring), msix (sleep on the MSI-X eventfd) or hybrid (poll briefly, then sleep). A \
            summary goes to stderr. The device is reset again at the end.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @OptionGroup var ring: RingOption
    @Option(help: "How many bytes to write.") var bytes: Int
    @Option(help: "Completion mode: poll, msix or hybrid.") var irq: CompletionMode = .poll
    @Option(name: .customLong("feature"), help: "Also accept this feature if offered (repeatable).")
    var features: [String] = []
    @Option(help: "Bytes per device buffer.") var bufferSize = 4096
    @Flag(help: "No summary on stderr.") var quiet = false

    func validate() throws {
        guard bytes >= 0 else { throw ValidationError("--bytes must not be negative") }
        guard (64...(1 << 20)).contains(bufferSize) else { throw ValidationError("--buffer-size must be 64 bytes to 1 MiB") }
    }

    func run() throws {
        let address = try device.address()
        let transport = try global.openTransport(address, dmaBytes: 1 << 20 + 256 * bufferSize, expecting: .entropy)
        let wanted = try parseFeatures(features, for: transport.deviceType)
        let clock = ContinuousClock()
        let start = clock.now
        var rng: EntropyDevice<VirtioPCITransport>
        do { rng = try EntropyDevice(transport: transport, wanted: wanted, ring: ring.ring, mode: irq, bufferSize: bufferSize) } catch {
            throw Failure.exit(VirtioPCIError.virtio(address, error))
        }
        var writeError: Int32 = 0
        do throws(VirtioError) {
            try rng.read(bytes) { chunk in
                guard writeError == 0 else { return }
                if case .failure(let e) = writeAll(1, chunk) { writeError = e.rawValue }
            }
        } catch {
            throw Failure.exit(VirtioPCIError.virtio(address, error))
        }
        let elapsed = clock.now - start
        let negotiated = rng.negotiation.accepted.names(for: .entropy).joined(separator: " ")
        let completions = rng.completions
        let format = RingFormat(rng.negotiation.accepted)
        let wakes = rng.wakes
        do { _ = try rng.shutdown() } catch { throw Failure.exit(VirtioPCIError.virtio(address, error)) }
        if writeError != 0 {
            printError("virtio-vfio: error: writing to stdout: \(describeErrno(writeError))")
            throw ExitCode(Failure.ioError)
        }
        if !quiet {
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            printError("\(address): \(bytes) bytes in \(completions) completions, \(irq) mode, "
                       + "\(format) ring, "
                       + "\(String(format2(Double(bytes) / seconds / 1e6))) MB/s; waits: \(wakes.interrupts) interrupts, "
                       + "\(wakes.polled) polled, \(wakes.rechecks) rechecks, \(wakes.ready) ready; features [\(negotiated)]")
        }
    }
}

/// Writes all of `chunk` to `fd`, retrying on EINTR and short writes.
func writeAll(_ fd: Int32, _ chunk: UnsafeRawBufferPointer) -> Result<Void, Errno> {
    var offset = 0
    while offset < chunk.count {
        let n = write(fd, chunk.baseAddress! + offset, chunk.count - offset)
        if n < 0 { if errno == EINTR { continue }; return .failure(Errno(rawValue: errno)) }
        offset += n
    }
    return .success(())
}

/// Two decimals without Foundation.
func format2(_ value: Double) -> String {
    guard value.isFinite else { return "-" }
    let hundredths = Int((value * 100).rounded())
    let fraction = hundredths % 100
    return "\(hundredths / 100)." + (fraction < 10 ? "0\(fraction)" : "\(fraction)")
}

/// `--feature` names for a device type; unknown names are a usage error.
func parseFeatures(_ names: [String], for type: DeviceType) throws -> Features {
    var wanted: Features = []
    for name in names {
        guard let feature = Features.parse(name, for: type) else {
            throw Failure.exit(ValidationError("unknown feature '\(name)' for virtio-\(type)"))
        }
        wanted.formUnion(feature)
    }
    return wanted
}
