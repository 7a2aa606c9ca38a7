/// The one codec for state that crosses a hot upgrade: little-endian byte writing, bounds-checked
/// reading that names the field that failed, and the header every versioned handover blob starts
/// with. The upgrade `StateRecord`, the control socket's `HandoverMessage` and each service's own
/// state (`NBDHandoverState`, `TapBridgeHandoverState`) are written and read with it.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 256) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func raw<Bytes: Collection<UInt8>>(_ b: Bytes) { bytes.append(contentsOf: b) }
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8)
        u16(UInt16(min(utf8.count, Int(UInt16.max))))
        raw(utf8.prefix(Int(UInt16.max)))
    }

    /// A versioned blob's magic and format version. `version` other than the format's is for
    /// tests of the refusal path only.
    public mutating func header(_ format: BlobFormat, version: UInt16? = nil) {
        raw(format.magic)
        u16(version ?? format.version)
    }

    /// A u32 length, then what `body` writes: the length counts those bytes.
    public mutating func lengthPrefixed(_ body: (inout ByteWriter) -> Void) {
        let at = bytes.count
        u32(0)
        body(&self)
        let length = UInt32(bytes.count - at - 4)
        withUnsafeBytes(of: length.littleEndian) { bytes.replaceSubrange(at..<(at + 4), with: $0) }
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

    /// A versioned blob's header, checked before anything else in it is read: the magic must be
    /// the format's and the version the one this build reads, so a blob from an incompatible
    /// version is refused by number, not misread.
    public mutating func header(_ format: BlobFormat) throws(StateRecordError) {
        let magic = Array(try take(format.magic.count, "\(format.name) magic"))
        guard magic == format.magic else { throw .badMagic(blob: format.name, found: magic) }
        let version = try u16("\(format.name) version")
        guard version == format.version else { throw .unsupportedVersion(found: version, supported: format.version) }
    }

    /// A u32 length that must announce exactly the bytes left but `trailer` (a checksum after
    /// the body, say): the length.
    public mutating func length(_ field: String, leaving trailer: Int = 0) throws(StateRecordError) -> Int {
        let length = Int(try u32(field))
        let present = max(0, remaining - trailer)
        guard length == present else { throw .lengthMismatch(field: field, declared: length, actual: present) }
        return length
    }
}

/// What a versioned handover blob is: its name (in errors), the magic bytes it starts with, and
/// the one format version this build writes and reads. Every blob starts with the magic and the
/// version (u16); those with a length put it (u32, the bytes that follow) right after.
public struct BlobFormat: Sendable, Equatable {
    public let name: String
    public let magic: [UInt8]
    public let version: UInt16

    public init(name: String, magic: [UInt8], version: UInt16) {
        self.name = name
        self.magic = magic
        self.version = version
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
