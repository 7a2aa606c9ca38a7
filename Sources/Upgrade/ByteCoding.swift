/// Little-endian byte writing and bounds-checked reading for the upgrade state record.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 256) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8)
        u16(UInt16(min(utf8.count, Int(UInt16.max))))
        raw(Array(utf8.prefix(Int(UInt16.max))))
    }
}

/// Reads what `ByteWriter` wrote; every read is checked against the end, and each failure names
/// the field, so a damaged record is refused with a reason. Field names are built only when a
/// read fails (a record holds hundreds of in-flight entries).
public struct ByteReader {
    let bytes: [UInt8]
    public private(set) var offset = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    public mutating func take(_ n: Int, _ field: @autoclosure () -> String) throws(StateRecordError) -> ArraySlice<UInt8> {
        guard n >= 0, n <= remaining else { throw .truncated(field: field(), at: offset) }
        defer { offset += n }
        return bytes[offset..<(offset + n)]
    }

    /// A little-endian integer of `T`'s size.
    mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: @autoclosure () -> String) throws(StateRecordError) -> T {
        let n = MemoryLayout<T>.size
        guard n <= remaining else { throw .truncated(field: field(), at: offset) }
        defer { offset += n }
        return T(littleEndian: bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) })
    }

    public mutating func u8(_ field: @autoclosure () -> String) throws(StateRecordError) -> UInt8 { try integer(UInt8.self, field()) }
    public mutating func u16(_ field: @autoclosure () -> String) throws(StateRecordError) -> UInt16 { try integer(UInt16.self, field()) }
    public mutating func u32(_ field: @autoclosure () -> String) throws(StateRecordError) -> UInt32 { try integer(UInt32.self, field()) }
    public mutating func u64(_ field: @autoclosure () -> String) throws(StateRecordError) -> UInt64 { try integer(UInt64.self, field()) }
    public mutating func string(_ field: @autoclosure () -> String, max: Int) throws(StateRecordError) -> String {
        let n = Int(try u16(field() + " length"))
        guard n <= max else { throw .invalid(field: field(), "length \(n) is above \(max)") }
        let raw = try take(n, field())
        guard let s = String(validating: raw, as: UTF8.self) else { throw .invalid(field: field(), "not UTF-8") }
        return s
    }
}

/// FNV-1a, 64 bits: detects accidental damage of the record in transit (not an adversary: the
/// control socket already admits only the same user).
func fnv1a(_ bytes: ArraySlice<UInt8>) -> UInt64 {
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    bytes.withUnsafeBufferPointer { p in
        for b in p { hash = (hash ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
    }
    return hash
}
