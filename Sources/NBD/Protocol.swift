/// Constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md). All numbers on the wire
/// are big-endian. Section names in comments refer to that document.
public enum NBDProtocol {
    // MARK: Handshake ("Newstyle negotiation", "Fixed newstyle negotiation")
    /// 'NBDMAGIC', the first 8 bytes the server sends.
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943
    /// 'IHAVEOPT': the second 8 bytes of the greeting, and the magic of every option request.
    public static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    /// The magic of every option reply.
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9

    /// Greeting length: NBDMAGIC + IHAVEOPT + 16-bit handshake flags.
    public static let greetingSize = 18
    /// Option request header: IHAVEOPT + option + length.
    public static let optionHeaderSize = 16
    /// Option reply header: magic + option + reply type + length.
    public static let optionReplyHeaderSize = 20
    /// Reply to NBD_OPT_EXPORT_NAME: size + transmission flags (+ 124 zero bytes unless NO_ZEROES).
    public static let exportNameReplySize = 10
    public static let exportNameZeroes = 124

    /// "Handshake flags".
    public struct HandshakeFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
        public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
    }

    /// "Client flags".
    public struct ClientFlags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
        public static let noZeroes = ClientFlags(rawValue: 1 << 1)
    }

    /// "Option types".
    public enum Option {
        public static let exportName: UInt32 = 1
        public static let abort: UInt32 = 2
        public static let list: UInt32 = 3
        public static let peekExport: UInt32 = 4
        public static let startTLS: UInt32 = 5
        public static let info: UInt32 = 6
        public static let go: UInt32 = 7
        public static let structuredReply: UInt32 = 8
        public static let listMetaContext: UInt32 = 9
        public static let setMetaContext: UInt32 = 10
        public static let extendedHeaders: UInt32 = 11
    }

    /// "Option reply types". Errors have bit 31 set.
    public enum Reply {
        public static let ack: UInt32 = 1
        public static let server: UInt32 = 2
        public static let info: UInt32 = 3
        public static let metaContext: UInt32 = 4
        public static let errUnsup: UInt32 = 0x8000_0001
        public static let errPolicy: UInt32 = 0x8000_0002
        public static let errInvalid: UInt32 = 0x8000_0003
        public static let errPlatform: UInt32 = 0x8000_0004
        public static let errTLSReqd: UInt32 = 0x8000_0005
        public static let errUnknown: UInt32 = 0x8000_0006
        public static let errShutdown: UInt32 = 0x8000_0007
        public static let errBlockSizeReqd: UInt32 = 0x8000_0008
        public static let errTooBig: UInt32 = 0x8000_0009
    }

    /// NBD_INFO_* types inside NBD_REP_INFO.
    public enum Info {
        public static let export: UInt16 = 0
        public static let name: UInt16 = 1
        public static let description: UInt16 = 2
        public static let blockSize: UInt16 = 3
    }

    // MARK: Transmission
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    /// Request header: magic, flags, type, cookie, offset, length.
    public static let requestHeaderSize = 28
    /// Simple reply header: magic, error, cookie.
    public static let simpleReplyHeaderSize = 16

    /// "Transmission flags".
    public struct TransmissionFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
        public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
        public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
        public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
        public static let rotational = TransmissionFlags(rawValue: 1 << 4)
        public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
        public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
        public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
        public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
        public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
        public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
        public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    }

    /// "Command flags".
    public struct CommandFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let fua = CommandFlags(rawValue: 1 << 0)
        public static let noHole = CommandFlags(rawValue: 1 << 1)
        public static let dontFragment = CommandFlags(rawValue: 1 << 2)
        public static let reqOne = CommandFlags(rawValue: 1 << 3)
        public static let fastZero = CommandFlags(rawValue: 1 << 4)
    }

    /// "Request types".
    public enum Command {
        public static let read: UInt16 = 0
        public static let write: UInt16 = 1
        public static let disc: UInt16 = 2
        public static let flush: UInt16 = 3
        public static let trim: UInt16 = 4
        public static let cache: UInt16 = 5
        public static let writeZeroes: UInt16 = 6
        public static let blockStatus: UInt16 = 7
    }

    /// "Error values" (the only ones a server may send).
    public enum Error {
        public static let ok: UInt32 = 0
        public static let eperm: UInt32 = 1
        public static let eio: UInt32 = 5
        public static let enomem: UInt32 = 12
        public static let einval: UInt32 = 22
        public static let enospc: UInt32 = 28
        public static let eoverflow: UInt32 = 75
        public static let enotsup: UInt32 = 95
        public static let eshutdown: UInt32 = 108
    }

    /// Strings (export names, descriptions, error messages) MUST be no longer than this ("Conventions").
    public static let maximumStringLength = 4096
    /// "any payload not exceeding 2^25 bytes SHOULD NOT be considered a denial of service attack"
    /// ("Size constraints"): an oversized WRITE up to this length is read and thrown away, longer
    /// ones end the connection.
    public static let denialOfServicePayload = 1 << 25
}
