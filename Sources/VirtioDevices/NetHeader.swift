import Virtio

/// `struct virtio_net_hdr` (§5.1.6): 12 bytes in front of every frame in both directions. With
/// VERSION_1 the header always has the `num_buffers` field (§5.1.6: "the header is 12 bytes"),
/// whether or not MRG_RXBUF was negotiated.
///
/// `{ u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start; le16 csum_offset; le16 num_buffers; }`
public struct NetHeader: Sendable, Equatable {
    public var flags: UInt8
    public var gsoType: UInt8
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var checksumStart: UInt16
    public var checksumOffset: UInt16
    /// Receive with MRG_RXBUF: buffers the packet spans. Transmit: 0 (§5.1.6.2).
    public var numBuffers: UInt16

    public static let size = 12

    // flags (§5.1.6)
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM: the checksum at csum_start + csum_offset is partial.
    public static let needsChecksum: UInt8 = 1
    /// VIRTIO_NET_HDR_F_DATA_VALID: the device validated the checksum (receive only).
    public static let dataValid: UInt8 = 2
    /// VIRTIO_NET_HDR_F_RSC_INFO (receive only, with VIRTIO_NET_F_RSC_EXT).
    public static let rscInfo: UInt8 = 4
    // gso_type (§5.1.6)
    public static let gsoNone: UInt8 = 0

    /// No offload: a fully checksummed frame, no segmentation.
    public static let none = NetHeader(flags: 0, gsoType: NetHeader.gsoNone, headerLength: 0, gsoSize: 0,
                                       checksumStart: 0, checksumOffset: 0, numBuffers: 0)

    public init(flags: UInt8, gsoType: UInt8, headerLength: UInt16, gsoSize: UInt16,
                checksumStart: UInt16, checksumOffset: UInt16, numBuffers: UInt16) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
        self.numBuffers = numBuffers
    }

    /// A transmit header asking the device to checksum (VIRTIO_NET_F_CSUM): the 16-bit checksum
    /// of bytes `start...` goes at `start + offset` (for TCP over IPv4: start 34, offset 16).
    public static func partialChecksum(start: UInt16, offset: UInt16) -> NetHeader {
        NetHeader(flags: needsChecksum, gsoType: gsoNone, headerLength: 0, gsoSize: 0,
                  checksumStart: start, checksumOffset: offset, numBuffers: 0)
    }

    /// Reads a header the device wrote: each field once, little-endian (a copy; validate it).
    @inline(__always)
    public init(loading p: UnsafeRawPointer) {
        flags = p.load(fromByteOffset: 0, as: UInt8.self)
        gsoType = p.load(fromByteOffset: 1, as: UInt8.self)
        headerLength = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        gsoSize = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        checksumStart = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        checksumOffset = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        numBuffers = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 10, as: UInt16.self))
    }

    @inline(__always)
    public func store(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: flags, toByteOffset: 0, as: UInt8.self)
        p.storeBytes(of: gsoType, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: headerLength.littleEndian, toByteOffset: 2, as: UInt16.self)
        p.storeBytes(of: gsoSize.littleEndian, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: checksumStart.littleEndian, toByteOffset: 6, as: UInt16.self)
        p.storeBytes(of: checksumOffset.littleEndian, toByteOffset: 8, as: UInt16.self)
        p.storeBytes(of: numBuffers.littleEndian, toByteOffset: 10, as: UInt16.self)
    }

    /// Whether a partial checksum's 2-byte field lies inside a frame of `frameBytes` bytes.
    @inline(__always)
    func checksumFits(frameBytes: Int) -> Bool {
        Int(checksumStart) + Int(checksumOffset) + 2 <= frameBytes
    }

    /// Why a header the device wrote for a received frame of `frameBytes` bytes is malformed, or
    /// nil. §5.1.6.4.1: without GUEST_CSUM the device sets flags to 0; without GUEST_TSO4/6
    /// (never negotiated by this driver) gso_type is NONE; RSC_INFO needs RSC_EXT (not negotiated).
    @inline(__always)
    func receiveProblem(frameBytes: Int, guestChecksum: Bool) -> NetDropReason? {
        let allowed: UInt8 = guestChecksum ? NetHeader.needsChecksum | NetHeader.dataValid : 0
        if flags & ~allowed != 0 { return .badHeader }
        if gsoType != NetHeader.gsoNone { return .badHeader }
        if flags & NetHeader.needsChecksum != 0 && !checksumFits(frameBytes: frameBytes) { return .badHeader }
        return nil
    }
}

/// Why a received frame was dropped instead of delivered.
public enum NetDropReason: Sendable, Equatable, CaseIterable {
    /// The first buffer's used length is shorter than the 12-byte header.
    case shortUsedLength
    /// num_buffers (MRG_RXBUF) is 0 or more than the buffers the device has returned.
    case badNumBuffers
    /// A header field the negotiated features do not allow (flags, gso_type, checksum range).
    case badHeader
    /// The frame is shorter than an Ethernet header or longer than MTU + link header.
    case badLength
}

/// What a net operation can fail with, beyond a broken device.
public enum NetError: Error, Equatable, CustomStringConvertible {
    case virtio(VirtioError)
    /// A frame to transmit outside 14...MTU + 18 bytes.
    case frameSize(Int, maximum: Int)
    /// A transmit header the negotiated features do not allow.
    case badHeader(String)
    /// A control command needs a feature that was not negotiated.
    case notNegotiated(String)
    /// The device answered a control command with VIRTIO_NET_ERR.
    case commandRejected(String)

    public var description: String {
        switch self {
        case .virtio(let e): return e.description
        case .frameSize(let n, let maximum): return "frame of \(n) bytes: a frame is 14 to \(maximum) bytes (MTU + 18)"
        case .badHeader(let why): return "transmit header: \(why)"
        case .notNegotiated(let what): return "\(what) was not negotiated with the device"
        case .commandRejected(let what): return "the device refused \(what) (VIRTIO_NET_ERR)"
        }
    }
}
