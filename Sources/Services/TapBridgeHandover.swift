import Upgrade
import VirtioDevices

/// What `serve net` hands to its successor besides the device and the queues (driver hot
/// upgrade): the TAP it bridges (its descriptor travels beside the record), how frames cross it,
/// the receive modes set on the device and every counter, so the successor continues them.
/// A plain value; `encoded()` is the service-state blob of the upgrade record and
/// `init(decoding:)` trusts nothing in it.
///
/// Encoding (little-endian, Upgrade's codec; no length of its own: the state record's service
/// state length frames it), version 1:
///
///     magic "TAPH", version u16,
///     TAP name (u16 length, UTF-8, 1-15 bytes), vnet header size u8 (0 or 12),
///     receive buffer size u32, promiscuous u8, all-multicast u8 (0 unset, 1 off, 2 on),
///     counter count u16, per counter: name (u16 length, UTF-8), value u64
///
/// Counters travel by name: a successor takes the ones it knows and starts the others at 0, so a
/// version that counts something new can still take over. Counts, not safety: nothing the
/// successor does depends on them.
public struct TapBridgeHandoverState: Sendable, Equatable {
    public static let magic = Array("TAPH".utf8)
    public static let version: UInt16 = 1
    /// Magic and version as the codec checks them (Upgrade's ByteCoding.swift).
    public static let format = BlobFormat(name: "serve net state", magic: magic, version: version)
    public static let maxCounters = 256

    public var tapName: String
    public var vnetHeaderSize: Int
    public var receiveBufferSize: Int
    public var promiscuous: Bool?
    public var allMulticast: Bool?
    public var deviceCounters: NetCounters
    public var bridgeCounters: TapBridgeCounters

    public init(tapName: String, vnetHeaderSize: Int, receiveBufferSize: Int, promiscuous: Bool?, allMulticast: Bool?,
                deviceCounters: NetCounters, bridgeCounters: TapBridgeCounters) {
        self.tapName = tapName
        self.vnetHeaderSize = vnetHeaderSize
        self.receiveBufferSize = receiveBufferSize
        self.promiscuous = promiscuous
        self.allMulticast = allMulticast
        self.deviceCounters = deviceCounters
        self.bridgeCounters = bridgeCounters
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.header(Self.format)
        w.string(tapName)
        w.u8(UInt8(vnetHeaderSize))
        w.u32(UInt32(receiveBufferSize))
        w.u8(Self.tristate(promiscuous))
        w.u8(Self.tristate(allMulticast))
        let counters = TapBridgeCounters.named(device: deviceCounters, bridge: bridgeCounters)
        w.u16(UInt16(counters.count))
        for (name, value) in counters {
            w.string(name)
            w.u64(UInt64(max(value, 0)))
        }
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(StateRecordError) {
        var r = ByteReader(bytes)
        try r.header(Self.format)
        let name = try r.string("TAP name", max: 15)
        guard Self.isInterfaceName(name) else { throw .invalid(field: "TAP name", "\"\(name)\" is not an interface name") }
        let header = Int(try r.u8("vnet header size"))
        guard header == 0 || header == NetHeader.size else {
            throw .invalid(field: "vnet header size", "\(header) bytes (0 or \(NetHeader.size))")
        }
        let buffer = Int(try r.u32("receive buffer size"))
        guard buffer >= NetHeader.size + 14, buffer <= 1 << 20 else {
            throw .invalid(field: "receive buffer size", "\(buffer) bytes")
        }
        let promiscuous = try Self.tristate(try r.u8("promiscuous"), "promiscuous")
        let allMulticast = try Self.tristate(try r.u8("all-multicast"), "all-multicast")
        let count = Int(try r.u16("counter count"))
        guard count <= Self.maxCounters else { throw .invalid(field: "counter count", "\(count) (at most \(Self.maxCounters))") }
        var device = NetCounters(), bridge = TapBridgeCounters()
        var seen = Set<String>()
        for i in 0..<count {
            let counter = try r.string("counter \(i) name", max: 64)
            let raw = try r.u64("counter \(counter)")
            guard seen.insert(counter).inserted else { throw .invalid(field: "counter \(counter)", "appears twice") }
            guard raw <= UInt64(Int.max) else { throw .invalid(field: "counter \(counter)", "\(raw) is out of range") }
            if let field = NetCounters.fields.first(where: { $0.name == counter }) {
                device[keyPath: field.path] = Int(raw)
            } else if let field = TapBridgeCounters.fields.first(where: { $0.name == counter }) {
                bridge[keyPath: field.path] = Int(raw)
            }
        }
        guard r.remaining == 0 else { throw .invalid(field: "TAP state", "\(r.remaining) unexpected bytes at the end") }
        self.init(tapName: name, vnetHeaderSize: header, receiveBufferSize: buffer, promiscuous: promiscuous,
                  allMulticast: allMulticast, deviceCounters: device, bridgeCounters: bridge)
    }

    /// Linux's rule for an interface name (`dev_valid_name`), on bytes: 1-15 bytes, not "." or
    /// "..", no "/", ":" or whitespace (and no NUL). Bytes, not characters: "/" followed by a
    /// combining mark is one Swift character that is not "/", but still a "/" to the kernel.
    public static func isInterfaceName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...15).contains(bytes.count), name != ".", name != ".." else { return false }
        return !bytes.contains { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 == 0 || $0 == 0x20 || (0x09...0x0D).contains($0) }
    }

    static func tristate(_ value: Bool?) -> UInt8 { value.map { $0 ? 2 : 1 } ?? 0 }

    static func tristate(_ raw: UInt8, _ field: String) throws(StateRecordError) -> Bool? {
        switch raw {
        case 0: return nil
        case 1: return false
        case 2: return true
        default: throw .invalid(field: field, "\(raw) is not 0 (unset), 1 (off) or 2 (on)")
        }
    }
}
