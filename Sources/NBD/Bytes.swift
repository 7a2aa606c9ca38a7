/// Big-endian reads and writes over raw memory: everything the codec needs, nothing that allocates.

extension UnsafeRawBufferPointer {
    @inline(__always) func be16(_ offset: Int) -> UInt16 {
        UInt16(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
    @inline(__always) func be32(_ offset: Int) -> UInt32 {
        UInt32(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    @inline(__always) func be64(_ offset: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
}

extension UnsafeMutableRawPointer {
    @inline(__always) func storeBE16(_ value: UInt16, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self)
    }
    @inline(__always) func storeBE32(_ value: UInt32, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self)
    }
    @inline(__always) func storeBE64(_ value: UInt64, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt64.self)
    }
}

/// Appends big-endian fields to caller-owned memory. Running out of room is a server bug (the
/// buffers are sized for the largest message), so it traps rather than truncating a message.
public struct ByteWriter {
    public let base: UnsafeMutableRawBufferPointer
    public private(set) var count = 0

    public init(_ base: UnsafeMutableRawBufferPointer) { self.base = base }

    public var remaining: Int { base.count - count }
    public var written: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: base[0..<count]) }

    @inline(__always) mutating func reserve(_ n: Int) -> UnsafeMutableRawPointer {
        precondition(n <= remaining, "ByteWriter: message larger than its buffer")
        let p = base.baseAddress! + count
        count += n
        return p
    }

    public mutating func u16(_ v: UInt16) { reserve(2).storeBE16(v, at: 0) }
    public mutating func u32(_ v: UInt32) { reserve(4).storeBE32(v, at: 0) }
    public mutating func u64(_ v: UInt64) { reserve(8).storeBE64(v, at: 0) }
    public mutating func bytes(_ b: UnsafeRawBufferPointer) {
        guard b.count > 0 else { return }
        reserve(b.count).copyMemory(from: b.baseAddress!, byteCount: b.count)
    }
    public mutating func bytes(_ b: [UInt8]) { b.withUnsafeBytes { bytes($0) } }
    public mutating func zeroes(_ n: Int) {
        guard n > 0 else { return }
        reserve(n).initializeMemory(as: UInt8.self, repeating: 0, count: n)
    }
}
