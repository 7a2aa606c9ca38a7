import Virtio

/// An Ethernet address (6 bytes, as in the device configuration, §5.1.4).
public struct MACAddress: Sendable, Hashable, CustomStringConvertible {
    public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)

    public init(_ b0: UInt8, _ b1: UInt8, _ b2: UInt8, _ b3: UInt8, _ b4: UInt8, _ b5: UInt8) {
        bytes = (b0, b1, b2, b3, b4, b5)
    }

    public init?(_ array: [UInt8]) {
        guard array.count == 6 else { return nil }
        self.init(array[0], array[1], array[2], array[3], array[4], array[5])
    }

    public var array: [UInt8] { [bytes.0, bytes.1, bytes.2, bytes.3, bytes.4, bytes.5] }
    /// The group bit (I/G, bit 0 of the first byte): a multicast address cannot be a station's.
    public var isMulticast: Bool { bytes.0 & 1 != 0 }
    public var isZero: Bool { array.allSatisfy { $0 == 0 } }

    public static func == (a: MACAddress, b: MACAddress) -> Bool { a.array == b.array }
    public func hash(into h: inout Hasher) { h.combine(array) }

    public var description: String {
        array.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}

/// The `status` field of virtio-net's configuration (§5.1.4).
public struct NetLinkStatus: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// VIRTIO_NET_S_LINK_UP
    public static let linkUp = NetLinkStatus(rawValue: 1)
    /// VIRTIO_NET_S_ANNOUNCE (meaningful with GUEST_ANNOUNCE only)
    public static let announce = NetLinkStatus(rawValue: 2)

    public var description: String { contains(.linkUp) ? "up" : "down" }
}

/// The device configuration of a virtio-net device (§5.1.4), read consistently
/// (config_generation loop, §2.5.1) and validated: nonsense is refused here, not trusted later.
///
/// `struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; ... }`
public struct NetConfig: Sendable, Equatable {
    /// The device's address with VIRTIO_NET_F_MAC, else nil (§5.1.5: the driver then picks one).
    public var mac: MACAddress?
    /// With VIRTIO_NET_F_STATUS the device's `status`; without it the link is up (§5.1.5 step 6).
    public var status: NetLinkStatus
    /// With VIRTIO_NET_F_MQ `max_virtqueue_pairs` (1...0x8000, §5.1.4.1), else 1.
    public var maxQueuePairs: UInt16
    /// With VIRTIO_NET_F_MTU the device's `mtu` (68...65535, §5.1.4.1), else 1500.
    public var mtu: UInt16

    /// Ethernet header plus one VLAN tag: what a frame carries on top of the MTU (§5.1.4.2's
    /// "plus low level ethernet header length").
    public static let linkHeaderBytes = 18
    public static let defaultMTU: UInt16 = 1500
    public static let minimumMTU: UInt16 = 68
    public static let maximumQueuePairs: UInt16 = 0x8000

    /// The longest frame (without the virtio header) either side may send: MTU + link header.
    public var maxFrameBytes: Int { Int(mtu) + NetConfig.linkHeaderBytes }

    // Offsets in struct virtio_net_config (§5.1.4).
    enum Offset {
        static let mac = 0, status = 6, maxQueuePairs = 8, mtu = 10
    }

    public init(mac: MACAddress?, status: NetLinkStatus, maxQueuePairs: UInt16, mtu: UInt16) {
        self.mac = mac
        self.status = status
        self.maxQueuePairs = maxQueuePairs
        self.mtu = mtu
    }

    public init<T: Transport & ~Copyable>(reading transport: borrowing T, features: Features) throws(VirtioError) {
        func read(_ offset: Int, _ width: Int) throws(VirtioError) -> UInt32 {
            guard let v = transport.readDeviceConfig(offset, width: width) else {
                throw .deviceFailed(status: transport.readStatus().rawValue,
                                    during: "reading net config at offset \(offset): outside the device configuration")
            }
            return v
        }
        let raw = try Lifecycle.readConfig(transport) { () throws(VirtioError) in
            var mac: [UInt8]?
            if features.contains(.netMAC) {
                // Byte reads: mac is a byte array at offset 0 (§4.1.3.1 allows any width for a u8).
                var bytes: [UInt8] = []
                for i in 0..<6 { bytes.append(UInt8(truncatingIfNeeded: try read(Offset.mac + i, 1))) }
                mac = bytes
            }
            return (mac: mac,
                    status: features.contains(.netStatus) ? UInt16(truncatingIfNeeded: try read(Offset.status, 2)) : nil,
                    pairs: features.contains(.netMultiQueue) ? UInt16(truncatingIfNeeded: try read(Offset.maxQueuePairs, 2)) : nil,
                    mtu: features.contains(.netMTU) ? UInt16(truncatingIfNeeded: try read(Offset.mtu, 2)) : nil)
        }
        func bad(_ why: String) -> VirtioError { .deviceFailed(status: transport.readStatus().rawValue, during: "net configuration: \(why)") }
        var address: MACAddress?
        if let bytes = raw.mac, let m = MACAddress(bytes) {
            guard !m.isMulticast else { throw bad("mac \(m) is a multicast address, not a station's") }
            guard !m.isZero else { throw bad("mac 00:00:00:00:00:00") }
            address = m
        }
        if let pairs = raw.pairs {
            guard pairs >= 1, pairs <= NetConfig.maximumQueuePairs else {
                throw bad("max_virtqueue_pairs \(pairs) is outside 1...0x8000 (§5.1.4.1)")
            }
        }
        if let mtu = raw.mtu {
            guard mtu >= NetConfig.minimumMTU else { throw bad("mtu \(mtu) is below 68 (§5.1.4.1)") }
        }
        // Only the bits defined in §5.1.4 are kept; ANNOUNCE only means something with GUEST_ANNOUNCE.
        var status: NetLinkStatus = .linkUp
        if let s = raw.status {
            status = NetLinkStatus(rawValue: s).intersection(features.contains(.netGuestAnnounce) ? [.linkUp, .announce] : .linkUp)
        }
        self.init(mac: address, status: status, maxQueuePairs: raw.pairs ?? 1, mtu: raw.mtu ?? NetConfig.defaultMTU)
    }

    /// Reads only `status` (one 16-bit configuration read in the generation loop): the poll
    /// loop's check of the link. Without VIRTIO_NET_F_STATUS the link is always up.
    public static func readStatus<T: Transport & ~Copyable>(_ transport: borrowing T, features: Features) throws(VirtioError) -> NetLinkStatus {
        guard features.contains(.netStatus) else { return .linkUp }
        let raw = try Lifecycle.readConfig(transport) { () throws(VirtioError) -> UInt16 in
            guard let v = transport.readDeviceConfig(Offset.status, width: 2) else {
                throw .deviceFailed(status: transport.readStatus().rawValue, during: "reading net config status")
            }
            return UInt16(truncatingIfNeeded: v)
        }
        return NetLinkStatus(rawValue: raw).intersection(features.contains(.netGuestAnnounce) ? [.linkUp, .announce] : .linkUp)
    }
}
