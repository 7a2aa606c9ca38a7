import Glibc
import Testing
import HotUpgrade
import Logging
import Syscalls
import Upgrade
import Virtio
import VirtioEmulator

/// The emulator as a device that can be handed over: its memory travels as the DMA memfd (the
/// only descriptor a successor needs: the emulated device itself is found in this process), as
/// a VFIO device's memfd does with its container, group and device descriptors.
extension EmulatedTransport: HandoverTransport {
    public var handoverAddress: String { EmulatedHandover.address }
    public var lentDescriptors: [LentDescriptor] { [LentDescriptor(.dmaMemory, device.memoryDescriptor)] }
    public static var requiredDeviceRoles: [StateRecord.DescriptorRole] { [.dmaMemory] }
}

enum EmulatedHandover {
    static let address = "emulated:0"

    /// The `attach` step for `device`: the received memfd must be the device's memory (same
    /// inode), and the DMA range the record names its range.
    static func attach(_ device: EmulatedDevice) -> (inout Successor) throws(UpgradeError) -> EmulatedTransport {
        { successor throws(UpgradeError) in
            guard let memory = successor.descriptors.take(.dmaMemory) else {
                throw UpgradeError(.protocolError, "no DMA memory descriptor")
            }
            var received = stat(), own = stat()
            guard fstat(memory.raw, &received) == 0, fstat(device.memoryDescriptor, &own) == 0,
                  received.st_ino == own.st_ino, received.st_dev == own.st_dev else {
                throw UpgradeError(.protocolError, "the DMA memfd is not the device's memory")
            }
            guard successor.record.dmaIOVA == device.memory.deviceAddress, successor.record.dmaSize == UInt64(device.memory.size) else {
                throw UpgradeError(.protocolError, "DMA range 0x\(String(successor.record.dmaIOVA, radix: 16))+\(successor.record.dmaSize) is not the device's")
            }
            return EmulatedTransport(device: device)
        }
    }
}

/// Log lines kept for assertions (and nothing printed).
final class CapturedLog: @unchecked Sendable {
    private let lock = NSLockLike()
    private var stored: [String] = []
    var lines: [String] { lock.run { stored } }
    func append(_ line: String) { lock.run { stored.append(line) } }
    func contains(_ fragment: String) -> Bool { lines.contains { $0.contains(fragment) } }
    /// How many lines hold `fragment` once `count` of them are there, or after 10 s (another
    /// thread logs them: the serving driver's control thread).
    func count(_ fragment: String, reaching count: Int) -> Int {
        for _ in 0..<10_000 {
            let n = lines.filter { $0.contains(fragment) }.count
            if n >= count { return n }
            usleep(1000)
        }
        return lines.filter { $0.contains(fragment) }.count
    }

    var logger: Logger {
        var logger = Logger(label: "test") { _ in CapturingHandler(log: self) }
        logger.logLevel = .debug
        return logger
    }
}

struct CapturingHandler: LogHandler {
    let log: CapturedLog
    var logLevel: Logger.Level = .debug
    var metadata: Logger.Metadata = [:]
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { log.append("\(event.level): \(event.message)") }
}

/// A pthread mutex (the tests avoid Foundation's locks to keep the descriptor counts exact).
final class NSLockLike: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }
    func run<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}

/// Open descriptors of this process (from /proc/self/fd), to prove nothing leaks.
func openDescriptorCount() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { n += 1 }
    }
    return n - 1  // the directory stream's own descriptor
}

/// What each open descriptor is (readlink of /proc/self/fd/N), for a leak's message.
func openDescriptors() -> [String] {
    guard let dir = opendir("/proc/self/fd") else { return [] }
    defer { closedir(dir) }
    var result: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard name != "." && name != ".." else { continue }
        var target = [UInt8](repeating: 0, count: 256)
        let n = target.withUnsafeMutableBytes { readlink("/proc/self/fd/\(name)", $0.baseAddress!.assumingMemoryBound(to: CChar.self), 255) }
        result.append("\(name) -> \(n > 0 ? String(decoding: target.prefix(n), as: UTF8.self) : "?")")
    }
    return result
}

/// Runs `body` and, when no other test runs at the same time (tools/test runs `swift test
/// --no-parallel` with VIRTIO_VFIO_ISOLATED=1; descriptors are counted for the whole process),
/// checks that this process has the same descriptors open afterwards.
func withoutLeaks(_ body: () throws -> Void) rethrows {
    let before = openDescriptors()
    try body()
    let after = openDescriptors()
    if getenv("VIRTIO_VFIO_ISOLATED") != nil {
        #expect(after.count == before.count, "descriptors leaked: \(Set(after).subtracting(before).sorted())")
    }
}

/// The two suites share the process's descriptor table: never at the same time.
@Suite("hot upgrade, both sides in one process", .serialized) enum HandoverInOneProcess {}
