/// Feature bits (virtio 1.2 §2.2, §6 "Reserved Feature Bits", and each device's section of §5).
public struct Features: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(bit: Int) { self.rawValue = UInt64(1) << UInt64(bit) }

    // Device-independent bits (§6).
    public static let notifyOnEmpty = Features(bit: 24)
    public static let anyLayout = Features(bit: 27)
    public static let ringIndirectDesc = Features(bit: 28)
    public static let ringEventIdx = Features(bit: 29)
    public static let version1 = Features(bit: 32)
    public static let accessPlatform = Features(bit: 33)
    public static let ringPacked = Features(bit: 34)
    public static let inOrder = Features(bit: 35)
    public static let orderPlatform = Features(bit: 36)
    public static let srIOV = Features(bit: 37)
    public static let notificationData = Features(bit: 38)
    public static let notifConfigData = Features(bit: 39)
    public static let ringReset = Features(bit: 40)
    public static let adminVQ = Features(bit: 41)

    // virtio-net bits (§5.1.3); device-specific bits overlap between device types, hence `net`.
    public static let netChecksum = Features(bit: 0)            // CSUM: device checksums partial tx packets
    public static let netGuestChecksum = Features(bit: 1)       // GUEST_CSUM: driver takes partial rx checksums
    public static let netMTU = Features(bit: 3)                 // MTU: config `mtu` is valid
    public static let netMAC = Features(bit: 5)                 // MAC: config `mac` is valid
    public static let netGuestTSO4 = Features(bit: 7)
    public static let netGuestTSO6 = Features(bit: 8)
    public static let netHostTSO4 = Features(bit: 11)
    public static let netHostTSO6 = Features(bit: 12)
    public static let netMergeableRxBuffers = Features(bit: 15) // MRG_RXBUF: a packet may span rx buffers
    public static let netStatus = Features(bit: 16)             // STATUS: config `status` is valid
    public static let netControlQueue = Features(bit: 17)       // CTRL_VQ
    public static let netControlRx = Features(bit: 18)          // CTRL_RX: promiscuous / all-multicast
    public static let netGuestAnnounce = Features(bit: 21)
    public static let netMultiQueue = Features(bit: 22)         // MQ: config `max_virtqueue_pairs` is valid

    static let transportNames: [Int: String] = [
        24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX",
        32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM",
        37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET", 41: "ADMIN_VQ",
    ]

    // Device-specific bits, by device type (§5.1.3 net, §5.2.3 blk; rng has none, §5.4.3).
    static let deviceNames: [DeviceType: [Int: String]] = [
        .net: [
            0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 6: "GSO",
            7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
            12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ",
            18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA", 21: "GUEST_ANNOUNCE", 22: "MQ",
            23: "CTRL_MAC_ADDR", 52: "DEVICE_STATS", 53: "VQ_NOTF_COAL", 54: "GUEST_USO4",
            55: "GUEST_USO6", 56: "HOST_USO", 57: "HASH_REPORT", 59: "GUEST_HDRLEN", 60: "RSS",
            61: "RSC_EXT", 62: "STANDBY", 63: "SPEED_DUPLEX",
        ],
        .block: [
            0: "BARRIER", 1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 7: "SCSI",
            9: "FLUSH", 10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES",
            15: "LIFETIME", 16: "SECURE_ERASE", 17: "ZONED",
        ],
        .console: [0: "SIZE", 1: "MULTIPORT", 2: "EMERG_WRITE"],
        .balloon: [0: "MUST_TELL_HOST", 1: "STATS_VQ", 2: "DEFLATE_ON_OOM", 3: "FREE_PAGE_HINT",
                   4: "PAGE_POISON", 5: "PAGE_REPORTING"],
    ]

    /// The bit numbers set, ascending.
    public var bits: [Int] { (0..<64).filter { rawValue & (UInt64(1) << UInt64($0)) != 0 } }

    /// The name of one bit for a device type: a transport name, a device-specific name,
    /// or `bit N` when the bit is unknown to this driver.
    public static func name(ofBit bit: Int, for type: DeviceType?) -> String {
        if let name = transportNames[bit] { return name }
        if let type, let name = deviceNames[type]?[bit] { return name }
        return "bit \(bit)"
    }

    /// Names of every set bit, ascending by bit number.
    public func names(for type: DeviceType?) -> [String] {
        bits.map { Features.name(ofBit: $0, for: type) }
    }

    /// Parses names or bit numbers (`VERSION_1`, `RING_EVENT_IDX`, `bit 29`, `29`).
    public static func parse(_ name: String, for type: DeviceType?) -> Features? {
        let upper = name.uppercased()
        if let bit = Int(upper.hasPrefix("BIT ") ? String(upper.dropFirst(4)) : upper), (0..<64).contains(bit) {
            return Features(bit: bit)
        }
        if let (bit, _) = transportNames.first(where: { $0.value == upper }) { return Features(bit: bit) }
        if let type, let (bit, _) = deviceNames[type]?.first(where: { $0.value == upper }) { return Features(bit: bit) }
        return nil
    }
}
