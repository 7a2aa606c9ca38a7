#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What every fuzz target shares: reading structured values out of libFuzzer's bytes, failing
/// loudly on a broken invariant, and writing the target's seed corpus.

/// A cursor over one fuzz input. Past the end every read returns zeros (and `isEmpty` is true),
/// so a target never has to check lengths and short inputs still mean something.
public struct FuzzInput {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var offset = 0

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        bytes = UnsafeRawBufferPointer(start: size > 0 ? data : nil, count: size)
    }

    public var isEmpty: Bool { offset >= bytes.count }
    public var remaining: Int { max(0, bytes.count - offset) }

    public mutating func u8() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }
    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    public mutating func bool() -> Bool { u8() & 1 != 0 }

    /// Up to `n` bytes (fewer at the end of the input).
    public mutating func take(_ n: Int) -> UnsafeRawBufferPointer {
        let count = max(0, min(n, remaining))
        defer { offset += count }
        return UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + count)])
    }
    public mutating func rest() -> UnsafeRawBufferPointer { take(remaining) }
}

/// Stops the run with a message naming the broken invariant. `abort()` raises SIGABRT, which
/// libFuzzer reports as a crash ("deadly signal") and saves the input as crash-<sha1>.
public func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                    file: StaticString = #fileID, line: UInt = #line) {
    if condition() { return }
    printError("FUZZ INVARIANT VIOLATED (\(file):\(line)): \(message())")
    abort()
}

/// Writes a line to standard error (fd 2) in one write(2).
public func printError(_ message: String) {
    var line = message + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// libFuzzer calls `LLVMFuzzerInitialize` once before any input. Each target passes its seeds
/// here: with VIRTIO_FUZZ_WRITE_SEEDS=DIR in the environment they are written to DIR (one file
/// each, named as given) and the process exits 0 instead of fuzzing (`tools/fuzz --write-seeds`).
public func writeSeedsIfAsked(_ seeds: () -> [(name: String, bytes: [UInt8])]) {
    guard let dir = getenv("VIRTIO_FUZZ_WRITE_SEEDS").map({ String(cString: $0) }), !dir.isEmpty else { return }
    var written = 0
    for seed in seeds() {
        let path = dir + "/" + seed.name
        guard let file = fopen(path, "wb") else {
            printError("cannot write \(path): \(String(cString: strerror(errno)))")
            exit(1)
        }
        let ok = seed.bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) == $0.count }
        fclose(file)
        guard ok || seed.bytes.isEmpty else { printError("short write to \(path)"); exit(1) }
        written += 1
    }
    print("wrote \(written) seeds to \(dir)")
    exit(0)
}

/// Little-endian and big-endian byte building for seeds.
public struct SeedBytes {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func le16(_ v: UInt16) { for i in 0..<2 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt16(i)))) } }
    public mutating func le32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
    public mutating func le64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
    public mutating func be16(_ v: UInt16) { for i in (0..<2).reversed() { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt16(i)))) } }
    public mutating func be32(_ v: UInt32) { for i in (0..<4).reversed() { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
    public mutating func be64(_ v: UInt64) { for i in (0..<8).reversed() { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
    public mutating func raw<S: Sequence>(_ b: S) where S.Element == UInt8 { bytes.append(contentsOf: b) }
}

/// With VIRTIO_FUZZ_TRACE set, targets describe each step on standard error: to read what a
/// seed or a crashing input does (`VIRTIO_FUZZ_TRACE=1 .build-fuzz/release/FuzzX FILE`).
public let tracing = getenv("VIRTIO_FUZZ_TRACE") != nil

@inline(__always)
public func trace(_ message: @autoclosure () -> String) {
    if tracing { printError("  " + message()) }
}
