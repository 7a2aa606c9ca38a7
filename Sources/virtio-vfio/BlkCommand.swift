import ArgumentParser
import PCI
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `virtio-vfio blk BDF ...`: scripted block I/O through the driver.
struct BlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Read, write, flush or identify a virtio-blk device.",
        subcommands: [BlkRead.self, BlkWrite.self, BlkFlush.self, BlkID.self])
}

struct BlkOptions: ParsableArguments {
    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: "Completion mode: poll, msix or hybrid.") var irq: CompletionMode = .poll
    @OptionGroup var ring: RingOption

    /// Opens and initialises the device, runs `body`, and always shuts the device down (reset).
    func withDevice(_ body: (inout BlockDevice<VirtioPCITransport>) throws(BlockError) -> Void) throws {
        let address = try device.address()
        let transport = try global.openTransport(address, dmaBytes: 40 << 20, expecting: .block)
        var blk: BlockDevice<VirtioPCITransport>
        do { blk = try BlockDevice(transport: transport, ring: ring.ring, mode: irq) } catch { throw Failure.exit(VirtioPCIError.virtio(address, error)) }
        var failure: BlockError?
        do throws(BlockError) { try body(&blk) } catch { failure = error }
        do { _ = try blk.shutdown() } catch { throw Failure.exit(VirtioPCIError.virtio(address, error)) }
        if let failure {
            printError("virtio-vfio: error: \(address): \(failure)")
            switch failure {
            case .outOfRange, .readOnly, .unsupported: throw ExitCode(Failure.usage)
            case .virtio: throw ExitCode(Failure.protocolError)
            case .ioError: throw ExitCode(Failure.ioError)
            }
        }
    }
}

struct BlkRead: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "read", abstract: "Write sectors of the device to stdout.")
    @OptionGroup var options: BlkOptions
    @Option(help: "First 512-byte sector.") var sector: UInt64 = 0
    @Option(help: "Number of 512-byte sectors.") var count: Int

    func run() throws {
        guard count > 0, count <= (1 << 30) / 512 else { throw Failure.exit(ValidationError("--count must be 1 to 2097152 sectors")) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count * 512, alignment: 4096)
        defer { buffer.deallocate() }
        try options.withDevice { (blk) throws(BlockError) in try blk.read(sector: sector, into: buffer) }
        if case .failure(let e) = writeAll(1, UnsafeRawBufferPointer(buffer)) {
            printError("virtio-vfio: error: writing to stdout: \(e)")
            throw ExitCode(Failure.ioError)
        }
    }
}

struct BlkWrite: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "write",
        abstract: "Write stdin (a whole number of 512-byte sectors) to the device.")
    @OptionGroup var options: BlkOptions
    @Option(help: "First 512-byte sector.") var sector: UInt64 = 0
    @Flag(help: "Flush after writing.") var flush = false

    func run() throws {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; throw Failure.exit(ValidationError("reading stdin: errno \(errno)")) }
            if n == 0 { break }
            data.append(contentsOf: chunk[0..<n])
            if data.count > 1 << 30 { throw Failure.exit(ValidationError("stdin is larger than 1 GiB")) }
        }
        guard !data.isEmpty, data.count % 512 == 0 else {
            throw Failure.exit(ValidationError("stdin has \(data.count) bytes; write whole 512-byte sectors"))
        }
        try options.withDevice { (blk) throws(BlockError) in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
            defer { buffer.deallocate() }
            buffer.copyBytes(from: data)
            try blk.write(sector: sector, from: UnsafeRawBufferPointer(buffer))
            if flush { try blk.flush() }
        }
        printError("wrote \(data.count / 512) sectors at sector \(sector)\(flush ? ", flushed" : "")")
    }
}

struct BlkFlush: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "flush", abstract: "Flush the device's write cache.")
    @OptionGroup var options: BlkOptions
    func run() throws { try options.withDevice { (blk) throws(BlockError) in try blk.flush() } }
}

struct BlkID: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "id",
        abstract: "Print the device's serial (GET_ID) and geometry.")
    @OptionGroup var options: BlkOptions
    func run() throws {
        try options.withDevice { (blk) throws(BlockError) in
            let id = try blk.identify()
            let c = blk.config
            print("serial: \(id)")
            print("capacity: \(c.capacitySectors) sectors (\(c.capacityBytes) bytes), block size \(c.blockSize)")
            print("size_max: \(c.sizeMax.map(String.init) ?? "-"), seg_max: \(c.segMax.map(String.init) ?? "-"), queues: \(c.numQueues), read-only: \(c.readOnly), flush: \(c.flush)")
            print("max transfer per request: \(blk.queue.maxTransfer) bytes, \(blk.queue.slots) request slots")
            print("features: \(blk.negotiation.accepted.names(for: .block).joined(separator: " "))")
            print("ring: \(RingFormat(blk.negotiation.accepted))")
        }
    }
}
