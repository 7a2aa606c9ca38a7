/// The transmission phase as pure functions: request headers, simple replies, and what the server
/// does with each request ("Transmission", "Request types", "Error values" in proto.md).

/// C: magic, command flags, type, cookie, offset, length (28 bytes).
public struct NBDRequest: Equatable, Sendable {
    public var flags: NBDProtocol.CommandFlags
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBDProtocol.CommandFlags = [], type: UInt16, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    /// Parses a request header. Nil on a wrong magic: the server cannot find the next request and
    /// hangs up (a violation of a MUST, "Terminating the transmission phase").
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> NBDRequest? {
        precondition(bytes.count >= NBDProtocol.requestHeaderSize)
        guard bytes.be32(0) == NBDProtocol.requestMagic else { return nil }
        return NBDRequest(flags: NBDProtocol.CommandFlags(rawValue: bytes.be16(4)), type: bytes.be16(6),
                          cookie: bytes.be64(8), offset: bytes.be64(16), length: bytes.be32(24))
    }

    /// Writes this request's 28-byte header (the client side; used by tests and tools).
    public func write(into p: UnsafeMutableRawPointer) {
        p.storeBE32(NBDProtocol.requestMagic, at: 0)
        p.storeBE16(flags.rawValue, at: 4)
        p.storeBE16(type, at: 6)
        p.storeBE64(cookie, at: 8)
        p.storeBE64(offset, at: 16)
        p.storeBE32(length, at: 24)
    }
}

/// S: magic, error, cookie (16 bytes), followed by the data of a successful READ.
public enum NBDSimpleReply {
    public static func write(error: UInt32, cookie: UInt64, into p: UnsafeMutableRawPointer) {
        p.storeBE32(NBDProtocol.simpleReplyMagic, at: 0)
        p.storeBE32(error, at: 4)
        p.storeBE64(cookie, at: 8)
    }

    /// Parses a simple reply header (the client side). Nil on a wrong magic.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> (error: UInt32, cookie: UInt64)? {
        precondition(bytes.count >= NBDProtocol.simpleReplyHeaderSize)
        guard bytes.be32(0) == NBDProtocol.simpleReplyMagic else { return nil }
        return (bytes.be32(4), bytes.be64(8))
    }
}

/// Why the server hangs up on a client in the transmission phase.
public enum NBDViolation: Equatable, Sendable, CustomStringConvertible {
    case badRequestMagic
    /// A WRITE whose payload is longer than the maximum payload and than 2^25 bytes: reading and
    /// throwing it away would be a denial of service.
    case oversizedWrite(UInt32)

    public var description: String {
        switch self {
        case .badRequestMagic: return "request with a wrong magic"
        case .oversizedWrite(let n): return "WRITE of \(n) bytes, above the maximum payload and 2^25"
        }
    }
}

/// What the server does with one request header.
public enum NBDRequestAction: Equatable, Sendable {
    /// Hand it to the backend (a WRITE's payload is read into the backend's memory first). With
    /// `flushAfter`, a successful completion is followed by a flush before the reply: FUA on
    /// TRIM and WRITE_ZEROES, which the backend has no FUA variant of.
    case submit(BackendOperation, flushAfter: Bool)
    /// Reply at once with this error (0 for zero-length requests). A WRITE's payload is still read
    /// and thrown away, so the stream stays in step.
    case reply(UInt32)
    /// NBD_CMD_DISC: finish what is in flight, then close.
    case finish
    /// Hang up now.
    case disconnect(NBDViolation)
}

extension NBDRequest {
    /// Decides what to do with this request for `export` (size, flags, block sizes). Pure.
    ///
    /// Order of checks: unknown command and flags (EINVAL), read-only (EPERM), unsupported command
    /// (EINVAL), payload above the maximum (EINVAL), alignment to the minimum block (EINVAL), range
    /// (EINVAL; ENOSPC for WRITE and WRITE_ZEROES, as "Error values" asks), zero length (success).
    public func action(for export: NBDExport) -> NBDRequestAction {
        action(size: export.size, flags: export.flags, minimumBlockSize: export.minimumBlockSize,
               maximumPayload: export.maximumPayload)
    }

    /// `action(for:)` with the export's parts given one by one: a connection handed over from an
    /// earlier server is held to the flags it was promised, which may differ from this export's.
    func action(size: UInt64, flags exportFlags: NBDProtocol.TransmissionFlags, minimumBlockSize: UInt32,
                maximumPayload: UInt32) -> NBDRequestAction {
        typealias C = NBDProtocol.Command
        typealias E = NBDProtocol.Error
        let export = (size: size, flags: exportFlags, minimumBlockSize: minimumBlockSize, maximumPayload: maximumPayload)
        let readOnly = export.flags.contains(.readOnly)
        let length = UInt64(self.length)
        // FUA is "valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated" (and is
        // then ignored where nothing is written).
        // (No array literals here: an OptionSet built from one allocates in unoptimized builds.)
        var allowed = export.flags.contains(.sendFUA) ? NBDProtocol.CommandFlags.fua : NBDProtocol.CommandFlags()

        switch type {
        case C.read, C.write:
            if type == C.write && self.length > export.maximumPayload
                && Int(self.length) > NBDProtocol.denialOfServicePayload {
                return .disconnect(.oversizedWrite(self.length))
            }
            guard flags.subtracting(allowed).isEmpty else { return .reply(E.einval) }
            if type == C.write && readOnly { return .reply(E.eperm) }
            guard self.length <= export.maximumPayload else { return .reply(E.einval) }
            guard isAligned(minimumBlockSize) else { return .reply(E.einval) }
            guard inRange(size) else { return .reply(type == C.write ? E.enospc : E.einval) }
            if length == 0 { return .reply(E.ok) }
            if type == C.read { return .submit(.read, flushAfter: false) }
            return .submit(flags.contains(.fua) ? .writeFUA : .write, flushAfter: false)

        case C.disc:
            return .finish

        case C.flush:
            // offset and length "MUST be set to all-zero"; other values are ignored, not refused.
            guard flags.subtracting(allowed).isEmpty else { return .reply(E.einval) }
            guard export.flags.contains(.sendFlush) else { return .reply(E.einval) }
            return .submit(.flush, flushAfter: false)

        case C.trim, C.writeZeroes:
            if type == C.writeZeroes { allowed.insert(.noHole) }
            guard flags.subtracting(allowed).isEmpty else { return .reply(E.einval) }
            if readOnly { return .reply(E.eperm) }
            let advertised: NBDProtocol.TransmissionFlags = type == C.trim ? .sendTrim : .sendWriteZeroes
            guard export.flags.contains(advertised) else { return .reply(E.einval) }
            guard isAligned(minimumBlockSize) else { return .reply(E.einval) }
            guard inRange(size) else { return .reply(type == C.trim ? E.einval : E.enospc) }
            if length == 0 { return .reply(E.ok) }
            // NO_HOLE needs nothing as long as `.writeZeroes` never deallocates (virtio-blk
            // WRITE_ZEROES without the unmap flag, as VirtioBlockBackend sends it).
            return .submit(type == C.trim ? .trim : .writeZeroes, flushAfter: flags.contains(.fua))

        default:
            // CACHE and BLOCK_STATUS are not advertised (BLOCK_STATUS needs a metadata context,
            // which needs structured replies): "SHOULD return NBD_EINVAL if it receives an
            // unknown command", and "SHOULD reply with NBD_EINVAL" to BLOCK_STATUS without a
            // context. A WRITE-like payload never follows these.
            return .reply(E.einval)
        }
    }

    func inRange(_ export: NBDExport) -> Bool { inRange(export.size) }
    func isAligned(_ export: NBDExport) -> Bool { isAligned(export.minimumBlockSize) }

    /// offset + length within an export of `size` bytes (no overflow).
    func inRange(_ size: UInt64) -> Bool {
        offset <= size && UInt64(length) <= size - offset
    }

    func isAligned(_ minimumBlockSize: UInt32) -> Bool {
        let mask = UInt64(minimumBlockSize) - 1
        return offset & mask == 0 && UInt64(length) & mask == 0
    }

    /// How many payload bytes follow this header on the wire (only WRITE has any).
    public var payloadLength: Int { type == NBDProtocol.Command.write ? Int(length) : 0 }
}

extension NBDProtocol {
    /// Maps a backend's errno-style result to one of the error values a server may send.
    /// ENOTSUP stays ENOTSUP (qemu falls back to plain writes when WRITE_ZEROES reports it);
    /// EDQUOT and EFBIG become ENOSPC as "Error values" asks; EROFS becomes EPERM; anything
    /// unknown becomes EIO.
    public static func nbdError(fromErrno e: Int32) -> UInt32 {
        switch e {
        case 0: return Error.ok
        case 1, 30: return Error.eperm                 // EPERM, EROFS
        case 5: return Error.eio
        case 12: return Error.enomem
        case 22: return Error.einval
        case 28, 122, 27: return Error.enospc           // ENOSPC, EDQUOT, EFBIG
        case 75: return Error.eoverflow
        case 95: return Error.enotsup                   // ENOTSUP == EOPNOTSUPP on Linux
        case 108: return Error.eshutdown
        default: return Error.eio
        }
    }
}
