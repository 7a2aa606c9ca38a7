/// The fixed newstyle handshake as pure functions over bytes ("Handshake" in proto.md): the
/// greeting, the client flags, option headers, and the server's answer to each option. No I/O, so
/// the server loop and a fuzzer drive the same code.

/// The one export the server offers, as the handshake describes it.
public struct NBDExport: Sendable, Equatable {
    /// UTF-8 bytes of the export's name. The empty name ("default export") also selects it.
    public let name: [UInt8]
    public let description: [UInt8]
    public let size: UInt64
    public let flags: NBDProtocol.TransmissionFlags
    /// NBD_INFO_BLOCK_SIZE: minimum block (power of 2, 1...64 KiB), preferred block (power of 2,
    /// at least max(minimum, 512)), maximum payload (at least the preferred block).
    public let minimumBlockSize: UInt32
    public let preferredBlockSize: UInt32
    public let maximumPayload: UInt32

    /// Checks the values against "Size constraints" and "Conventions" (string lengths); returns
    /// why they are unusable, or nil.
    public static func problem(name: String, description: String, minimumBlockSize: Int, preferredBlockSize: Int,
                               maximumPayload: Int) -> String? {
        if name.utf8.count > NBDProtocol.maximumStringLength { return "the export name is longer than 4096 bytes" }
        if description.utf8.count > NBDProtocol.maximumStringLength { return "the export description is longer than 4096 bytes" }
        if name.utf8.contains(0) || description.utf8.contains(0) { return "the export name or description contains NUL" }
        let minimum = minimumBlockSize, preferred = preferredBlockSize
        if minimum < 1 || minimum > 65536 || minimum & (minimum - 1) != 0 {
            return "minimum block size \(minimum) is not a power of 2 between 1 and 65536"
        }
        if preferred < max(minimum, 512) || preferred & (preferred - 1) != 0 || preferred > Int(UInt32.max) {
            return "preferred block size \(preferred) is not a power of 2 of at least max(minimum block size, 512)"
        }
        if maximumPayload < preferred { return "maximum payload \(maximumPayload) is below the preferred block size \(preferred)" }
        return nil
    }

    /// Builds an export; `maximumPayload` above 2^32 - 1 is advertised as 2^32 - 1 (no fixed limit).
    /// Precondition: `problem(...)` returned nil for these values.
    public init(name: String, description: String = "", size: UInt64, flags: NBDProtocol.TransmissionFlags,
                minimumBlockSize: Int, preferredBlockSize: Int, maximumPayload: Int) {
        precondition(NBDExport.problem(name: name, description: description, minimumBlockSize: minimumBlockSize,
                                       preferredBlockSize: preferredBlockSize, maximumPayload: maximumPayload) == nil)
        self.name = Array(name.utf8)
        self.description = Array(description.utf8)
        self.size = size
        self.flags = flags.union(.hasFlags)
        self.minimumBlockSize = UInt32(minimumBlockSize)
        self.preferredBlockSize = UInt32(preferredBlockSize)
        self.maximumPayload = UInt32(clamping: maximumPayload)
    }

    /// Whether `requested` names this export: its own name, or "" (the default export).
    public func isNamed(_ requested: UnsafeRawBufferPointer) -> Bool {
        requested.count == 0 || name.withUnsafeBytes { $0.elementsEqual(requested) }
    }
}

/// What the connection does after the server answered one option.
public enum NBDOptionOutcome: Equatable, Sendable {
    /// Wait for the next option.
    case continueHaggling
    /// Send the replies written, then start the transmission phase (EXPORT_NAME, or GO acknowledged).
    case enterTransmission
    /// Send the replies written, then close (NBD_OPT_ABORT: a soft disconnect).
    case closeAfterReplies
    /// Close at once without sending anything (EXPORT_NAME for a name we do not export: the spec's
    /// mandatory hard disconnect).
    case disconnect
}

public enum NBDHandshake {
    /// What the server offers: fixed newstyle and dropping the 124 zero bytes.
    public static let serverFlags: NBDProtocol.HandshakeFlags = [.fixedNewstyle, .noZeroes]
    /// Option data the server keeps to parse (a GO with a 4096-byte name and about 2000 info
    /// requests). Longer options are read and thrown away and answered NBD_REP_ERR_TOO_BIG (or
    /// NBD_REP_ERR_UNSUP if unknown), as the spec requires a server to keep parsing.
    public static let maximumOptionData = 8192
    /// Longer option data than this is taken as a denial of service: the server hangs up.
    public static let maximumDiscardedOptionData = 1 << 20
    /// Room for the longest answer to one option (GO with name and description of 4096 bytes).
    public static let maximumReplyBytes = 4 * NBDProtocol.optionReplyHeaderSize + 12 + 14 + 2 * (2 + NBDProtocol.maximumStringLength)
        + NBDProtocol.optionReplyHeaderSize + 256

    /// S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes).
    public static func writeGreeting(into out: inout ByteWriter) {
        out.u64(NBDProtocol.initMagic)
        out.u64(NBDProtocol.optionMagic)
        out.u16(serverFlags.rawValue)
    }

    /// C: 32-bit client flags. Nil for any bit we did not offer: the server "MUST drop the TCP
    /// connection if the client sets an unknown flag, or a flag that does not match something
    /// advertised by the server". A client without FIXED_NEWSTYLE is served as fixed newstyle
    /// anyway (the spec allows it; such a client only ever sends EXPORT_NAME).
    public static func parseClientFlags(_ bytes: UnsafeRawBufferPointer) -> NBDProtocol.ClientFlags? {
        precondition(bytes.count >= 4)
        let raw = bytes.be32(0)
        let known = NBDProtocol.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue
        return raw & ~known == 0 ? NBDProtocol.ClientFlags(rawValue: raw) : nil
    }

    /// C: IHAVEOPT, 32-bit option, 32-bit data length. Nil on a wrong magic (the stream is
    /// garbage; the server hangs up since it cannot find the next option).
    public static func parseOptionHeader(_ bytes: UnsafeRawBufferPointer) -> (option: UInt32, length: UInt32)? {
        precondition(bytes.count >= NBDProtocol.optionHeaderSize)
        guard bytes.be64(0) == NBDProtocol.optionMagic else { return nil }
        return (bytes.be32(8), bytes.be32(12))
    }

    /// Writes the server's answer to one option and says what happens next.
    /// - Parameters:
    ///   - length: the option's data length from its header.
    ///   - data: the option's data, or nil if it was longer than `maximumOptionData` and thrown away.
    public static func respond(to option: UInt32, length: UInt32, data: UnsafeRawBufferPointer?, export: NBDExport,
                               clientFlags: NBDProtocol.ClientFlags, into out: inout ByteWriter) -> NBDOptionOutcome {
        typealias R = NBDProtocol.Reply
        switch option {
        case NBDProtocol.Option.exportName:
            // No error reply is possible: an unknown name MUST end the session.
            guard let data, export.isNamed(data) else { return .disconnect }
            out.u64(export.size)
            out.u16(export.flags.rawValue)
            if !clientFlags.contains(.noZeroes) { out.zeroes(NBDProtocol.exportNameZeroes) }
            return .enterTransmission

        case NBDProtocol.Option.abort:
            // Any data is ignored ("a server SHOULD ignore any data sent by the client").
            reply(option, R.ack, into: &out)
            return .closeAfterReplies

        case NBDProtocol.Option.list:
            guard length == 0 else {
                error(option, R.errInvalid, "NBD_OPT_LIST takes no data", into: &out)
                return .continueHaggling
            }
            let payload = 4 + export.name.count + export.description.count
            header(option, R.server, length: payload, into: &out)
            out.u32(UInt32(export.name.count))
            out.bytes(export.name)
            out.bytes(export.description)  // "implementation-specific details ... for a human being"
            reply(option, R.ack, into: &out)
            return .continueHaggling

        case NBDProtocol.Option.info, NBDProtocol.Option.go:
            guard let data else {
                error(option, R.errTooBig, "option data too long", into: &out)
                return .continueHaggling
            }
            guard let request = parseInfoRequest(data) else {
                error(option, R.errInvalid, "malformed NBD_OPT_INFO/GO data", into: &out)
                return .continueHaggling
            }
            guard export.isNamed(UnsafeRawBufferPointer(rebasing: data[request.name])) else {
                error(option, R.errUnknown, "no such export", into: &out)
                return .continueHaggling
            }
            writeInfo(option, export: export, name: request.wantsName, description: request.wantsDescription, into: &out)
            reply(option, R.ack, into: &out)
            return option == NBDProtocol.Option.go ? .enterTransmission : .continueHaggling

        default:
            // STARTTLS (no TLS at all: NOTLS mode), STRUCTURED_REPLY (simple replies only), the
            // meta-context options (need structured replies), EXTENDED_HEADERS, and anything unknown.
            error(option, R.errUnsup, "option not supported", into: &out)
            return .continueHaggling
        }
    }

    /// Longest reason given to a refused client.
    public static let maximumRefusalBytes = 1024

    /// The answer to a client the server will not serve (past its client limit): every option is
    /// answered NBD_REP_ERR_POLICY with `message`, which clients show ("server busy: ..."); ABORT
    /// is acknowledged and EXPORT_NAME, which has no error reply, ends the session.
    public static func refuse(_ option: UInt32, message: [UInt8], into out: inout ByteWriter) -> NBDOptionOutcome {
        switch option {
        case NBDProtocol.Option.exportName:
            return .disconnect
        case NBDProtocol.Option.abort:
            reply(option, NBDProtocol.Reply.ack, into: &out)
            return .closeAfterReplies
        default:
            let text = message.prefix(maximumRefusalBytes)
            header(option, NBDProtocol.Reply.errPolicy, length: text.count, into: &out)
            out.bytes(Array(text))
            return .continueHaggling
        }
    }

    /// The data of NBD_OPT_INFO / NBD_OPT_GO: 32-bit name length, name, 16-bit count, 16-bit info
    /// types. Nil if the lengths do not add up exactly.
    public static func parseInfoRequest(_ data: UnsafeRawBufferPointer)
        -> (name: Range<Int>, wantsName: Bool, wantsDescription: Bool, wantsBlockSize: Bool)?
    {
        guard data.count >= 6 else { return nil }
        let nameLength = Int(data.be32(0))
        guard nameLength <= data.count - 6 else { return nil }
        let count = Int(data.be16(4 + nameLength))
        guard data.count == 4 + nameLength + 2 + 2 * count else { return nil }
        var name = false, description = false, blockSize = false
        for i in 0..<count {
            switch data.be16(4 + nameLength + 2 + 2 * i) {
            case NBDProtocol.Info.name: name = true
            case NBDProtocol.Info.description: description = true
            case NBDProtocol.Info.blockSize: blockSize = true
            default: break  // "The server MUST ignore any information requests it does not understand."
            }
        }
        return (4..<(4 + nameLength), name, description, blockSize)
    }

    /// NBD_REP_INFO replies: EXPORT and BLOCK_SIZE always, NAME and DESCRIPTION when asked for
    /// (DESCRIPTION only if there is one).
    static func writeInfo(_ option: UInt32, export: NBDExport, name: Bool, description: Bool, into out: inout ByteWriter) {
        let info = NBDProtocol.Reply.info
        header(option, info, length: 12, into: &out)
        out.u16(NBDProtocol.Info.export)
        out.u64(export.size)
        out.u16(export.flags.rawValue)
        header(option, info, length: 14, into: &out)
        out.u16(NBDProtocol.Info.blockSize)
        out.u32(export.minimumBlockSize)
        out.u32(export.preferredBlockSize)
        out.u32(export.maximumPayload)
        if name {
            header(option, info, length: 2 + export.name.count, into: &out)
            out.u16(NBDProtocol.Info.name)
            out.bytes(export.name)
        }
        if description && !export.description.isEmpty {
            header(option, info, length: 2 + export.description.count, into: &out)
            out.u16(NBDProtocol.Info.description)
            out.bytes(export.description)
        }
    }

    /// S: reply magic, option, reply type, length.
    static func header(_ option: UInt32, _ type: UInt32, length: Int, into out: inout ByteWriter) {
        out.u64(NBDProtocol.optionReplyMagic)
        out.u32(option)
        out.u32(type)
        out.u32(UInt32(length))
    }

    static func reply(_ option: UInt32, _ type: UInt32, into out: inout ByteWriter) {
        header(option, type, length: 0, into: &out)
    }

    /// An error reply with a message for the user ("All error replies MAY have some data set").
    static func error(_ option: UInt32, _ type: UInt32, _ message: StaticString, into out: inout ByteWriter) {
        header(option, type, length: message.utf8CodeUnitCount, into: &out)
        message.withUTF8Buffer { out.bytes(UnsafeRawBufferPointer($0)) }
    }
}
