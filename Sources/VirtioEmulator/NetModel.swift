import Virtio

extension EmulatedDevice {
    /// `struct virtio_net_config` (spec 5.1.4) as the device reports it. Every value is reported
    /// as set, nonsense included (a multicast MAC, mtu below 68, 0 queue pairs), for hardening tests.
    public struct NetConfig: Sendable, Equatable {
        public var mac: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        /// `status` at DRIVER_OK time: VIRTIO_NET_S_LINK_UP (1) | VIRTIO_NET_S_ANNOUNCE (2).
        /// `setLink(up:)` changes it at run time.
        public var status: UInt16 = 1
        public var maxQueuePairs: UInt16 = 1
        public var mtu: UInt16 = 1500

        public init() {}
    }

    /// Frames the device keeps for the driver until receive buffers are posted (a NIC's FIFO);
    /// `injectFrame` refuses more.
    public static let netPendingLimit = 4096
    /// Transmitted frames kept for `takeTransmitted`; older ones are dropped past this.
    public static let netCaptureLimit = 65536
}

extension EmulatedDevice.Model {
    /// Like QEMU's virtio-net-pci (spec 5.1): `pairs` queue pairs and, with CTRL_VQ offered, a
    /// control queue after them; the device side is a frame pipe (`injectFrame`,
    /// `takeTransmitted`). `features` are the net bits offered (spec 5.1.3); the transport bits
    /// (INDIRECT_DESC, EVENT_IDX, VERSION_1, ACCESS_PLATFORM, RING_RESET) are always added. MQ is
    /// offered when `pairs` > 1.
    public static func net(mac: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
                           features: Features = EmulatedDevice.Model.netDefaultFeatures,
                           mtu: UInt16 = 1500, pairs: UInt16 = 1, queueSize: UInt16 = 256) -> EmulatedDevice.Model {
        var offered = features.union([.ringIndirectDesc, .ringEventIdx, .version1, .accessPlatform, .ringReset])
        if pairs > 1 { offered.insert(NetFeature.mq) }
        let control = offered.contains(NetFeature.ctrlVQ)
        var sizes = Array(repeating: queueSize, count: 2 * Int(max(pairs, 1)))
        if control { sizes.append(64) }
        var m = EmulatedDevice.Model(type: .net, offeredFeatures: offered, queueMaxSizes: sizes)
        m.net.mac = mac
        m.net.mtu = mtu
        m.net.maxQueuePairs = pairs
        // Room for full rings of frames of the largest MTU (memory is mapped lazily).
        m.memorySize = 32 << 20
        return m
    }

    /// MAC, STATUS, MRG_RXBUF, CSUM, GUEST_CSUM, CTRL_VQ, CTRL_RX and MTU.
    public static let netDefaultFeatures: Features = [
        NetFeature.mac, NetFeature.status, NetFeature.mrgRxbuf, NetFeature.csum, NetFeature.guestCsum,
        NetFeature.ctrlVQ, NetFeature.ctrlRx, NetFeature.mtu,
    ]
}

/// Network device feature bits (spec 5.1.3), named here for the emulator's own use.
public enum NetFeature {
    public static let csum = Features(bit: 0)
    public static let guestCsum = Features(bit: 1)
    public static let mtu = Features(bit: 3)
    public static let mac = Features(bit: 5)
    public static let hostTSO4 = Features(bit: 11)
    public static let hostTSO6 = Features(bit: 12)
    public static let mrgRxbuf = Features(bit: 15)
    public static let status = Features(bit: 16)
    public static let ctrlVQ = Features(bit: 17)
    public static let ctrlRx = Features(bit: 18)
    public static let mq = Features(bit: 22)
}

extension EmulatedDevice {
    /// The header fields of a frame injected for the driver to receive (`struct virtio_net_hdr`,
    /// spec 5.1.6); `num_buffers` is the device's to set. The default is a plain frame.
    public struct NetHeaderFields: Sendable, Equatable {
        public var flags: UInt8 = 0
        public var gsoType: UInt8 = 0
        public var headerLength: UInt16 = 0
        public var gsoSize: UInt16 = 0
        public var checksumStart: UInt16 = 0
        public var checksumOffset: UInt16 = 0
        public var numBuffers: UInt16 = 0

        public init(flags: UInt8 = 0, gsoType: UInt8 = 0, headerLength: UInt16 = 0, gsoSize: UInt16 = 0,
                    checksumStart: UInt16 = 0, checksumOffset: UInt16 = 0, numBuffers: UInt16 = 0) {
            self.flags = flags
            self.gsoType = gsoType
            self.headerLength = headerLength
            self.gsoSize = gsoSize
            self.checksumStart = checksumStart
            self.checksumOffset = checksumOffset
            self.numBuffers = numBuffers
        }

        init(bytes b: [UInt8]) {
            func u16(_ i: Int) -> UInt16 { UInt16(b[i]) | UInt16(b[i + 1]) << 8 }
            self.init(flags: b[0], gsoType: b[1], headerLength: u16(2), gsoSize: u16(4),
                      checksumStart: u16(6), checksumOffset: u16(8), numBuffers: u16(10))
        }

        var bytes: [UInt8] {
            var b: [UInt8] = [flags, gsoType]
            for v in [headerLength, gsoSize, checksumStart, checksumOffset, numBuffers] {
                b.append(UInt8(truncatingIfNeeded: v)); b.append(UInt8(truncatingIfNeeded: v >> 8))
            }
            return b
        }
    }

    /// A frame the driver transmitted, as the device took it from transmitq1.
    public struct TransmittedFrame: Sendable, Equatable {
        public var header: NetHeaderFields
        public var frame: [UInt8]
    }

    /// Receive-side faults, each a count of frames it bends (decremented as applied), so a test
    /// knows exactly which frame was bad. Set with `netFaults`.
    public struct NetFaults: Sendable, Equatable {
        /// The first buffer's used length is one more than the buffer (spec 2.7.8.1 broken).
        public var rxUsedLengthPastBuffer = 0
        /// num_buffers (MRG_RXBUF) is one more than the buffers the driver had posted.
        public var rxNumBuffersPastPosted = 0
        /// The header has a flag bit no feature defines (0x80) and gso_type TCPV4 (1).
        public var rxBadHeader = 0
        /// The first buffer's used length is 11, shorter than the 12-byte header.
        public var rxUsedLengthShort = 0
        /// The next control command is answered with ack 0x7F (neither OK nor ERR).
        public var controlBadAck = 0

        public init() {}
    }

    /// What the net device did since it was made.
    public struct NetStatistics: Sendable, Equatable {
        public var framesDelivered = 0
        /// Injected frames too large for a receive buffer without MRG_RXBUF (dropped, as a NIC does).
        public var framesTooLarge = 0
        public var framesTransmitted = 0
        /// Transmitted frames not kept because `netCaptureLimit` were waiting.
        public var captureOverflow = 0
        public var controlCommands = 0
        public var promiscuous = false
        public var allMulticast = false
    }
}

/// The network device's mutable state, inside the device lock with everything else.
struct NetState {
    var pending: [(header: EmulatedDevice.NetHeaderFields, frame: [UInt8])] = []
    var pendingHead = 0
    var transmitted: [EmulatedDevice.TransmittedFrame] = []
    /// The current `status` once `setLink(up:)` changed it; nil: the model's.
    var status: UInt16?
    var faults = EmulatedDevice.NetFaults()
    var statistics = EmulatedDevice.NetStatistics()

    var pendingCount: Int { pending.count - pendingHead }

    mutating func popPending() {
        pendingHead += 1
        if pendingHead == pending.count {
            pending.removeAll(keepingCapacity: true)
            pendingHead = 0
        } else if pendingHead >= 1024 {
            pending.removeFirst(pendingHead)
            pendingHead = 0
        }
    }

    /// A device reset returns the receive filters to their defaults (the frames on the wire,
    /// like the link, are not the device's to forget).
    mutating func deviceReset() {
        statistics.promiscuous = false
        statistics.allMulticast = false
    }
}
