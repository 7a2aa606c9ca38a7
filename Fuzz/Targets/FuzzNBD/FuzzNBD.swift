import FuzzSupport
import NBD

/// Fuzz target: the NBD server's protocol functions (`NBDHandshake`, `NBDRequest`), driven
/// through a client byte stream exactly as `NBDServer`'s input side (ServerInput.swift) frames it:
/// 4 bytes of client flags, options (header, then data up to `maximumOptionData` kept and parsed,
/// longer data up to `maximumDiscardedOptionData` dropped, anything longer a hang-up) until an
/// option enters transmission, then request headers each followed by its WRITE payload.
///
/// Input: a 15-byte export description (flags, block size exponents, maximum payload, size),
/// name and description (`text`: up to 31 bytes of input, or 3970-4097 generated letters), then
/// the client stream.
///
/// Asserts: no crash, no ASan report, no ByteWriter overflow (each option's answer goes into a
/// buffer of exactly `maximumReplyBytes`, as in the server); every option answer is a well-formed
/// sequence of replies that echo the option and end in an ack or one error (or the EXPORT_NAME
/// answer, or nothing for its hang-up), and carry this export's size, flags, block sizes, name and
/// description; INFO/GO data parsing agrees with a reference; each request's action agrees with
/// a reference of proto.md's rules, and anything handed to the backend is aligned, inside the
/// export, non-empty, and within the maximum payload; error values are only those a server may
/// send; request headers and simple replies round-trip through their writers.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    guard let export = makeExport(&input) else { return 0 }
    var session = Session(export: export)
    session.run(&input)
    return 0
}

typealias P = NBDProtocol
typealias C = NBDProtocol.Command
typealias E = NBDProtocol.Error

/// The export from the input's first bytes; nil if `NBDExport.problem` refuses the values (then
/// the checks of `problem` itself are what ran).
func makeExport(_ input: inout FuzzInput) -> NBDExport? {
    let flagBits = input.u8()
    let minimumExponent = Int(input.u8() % 17)
    let preferredExponent = max(minimumExponent, 9) + Int(input.u8() % 8)
    let maximumRaw = Int(input.u32())
    let size = input.u64()
    let name = text(&input)
    let description = text(&input)
    let minimum = 1 << minimumExponent, preferred = 1 << preferredExponent
    let maximum = flagBits & 0x80 != 0 ? maximumRaw : max(maximumRaw, preferred)
    var flags: P.TransmissionFlags = []
    let bits: [P.TransmissionFlags] = [.readOnly, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn, .rotational]
    for (i, f) in bits.enumerated() where flagBits & (1 << i) != 0 { flags.insert(f) }
    let tooLong = name.utf8.count > P.maximumStringLength || description.utf8.count > P.maximumStringLength
    if let problem = NBDExport.problem(name: name, description: description, minimumBlockSize: minimum,
                                       preferredBlockSize: preferred, maximumPayload: maximum) {
        require(maximum < preferred || name.utf8.contains(0) || description.utf8.contains(0) || tooLong,
                "NBDExport.problem refused valid values: \(problem)")
        return nil
    }
    require(maximum >= preferred && !name.utf8.contains(0) && !description.utf8.contains(0) && !tooLong,
            "NBDExport.problem accepted maximum \(maximum) < preferred \(preferred), a NUL or a string over 4096 bytes")
    let export = NBDExport(name: name, description: description, size: size, flags: flags,
                           minimumBlockSize: minimum, preferredBlockSize: preferred, maximumPayload: maximum)
    require(export.flags.contains(.hasFlags) && export.minimumBlockSize == UInt32(minimum)
            && export.maximumPayload == UInt32(clamping: maximum), "NBDExport does not hold what it was given")
    return export
}

/// An export name or description: a length byte, then (below 0x80) up to 31 bytes of the input,
/// or (0x80 and above) 4097 - (b & 0x7F) letters: strings at and just past the protocol's
/// 4096-byte limit, where the answers to LIST and INFO/GO are the longest (`maximumReplyBytes`).
func text(_ input: inout FuzzInput) -> String {
    let b = input.u8()
    guard b & 0x80 != 0 else { return String(decoding: input.take(Int(b & 31)), as: UTF8.self) }
    let seed = Int(input.u8())
    let count = P.maximumStringLength + 1 - Int(b & 0x7F)
    return String(decoding: (0..<count).map { UInt8(0x61 + (seed + $0) % 26) }, as: UTF8.self)
}

struct Session {
    let export: NBDExport
    var clientFlags: P.ClientFlags = []
    let out: UnsafeMutableRawBufferPointer

    init(export: NBDExport) {
        self.export = export
        out = .allocate(byteCount: NBDHandshake.maximumReplyBytes, alignment: 8)
    }

    mutating func run(_ input: inout FuzzInput) {
        defer { out.deallocate() }
        var greeting = ByteWriter(out)
        NBDHandshake.writeGreeting(into: &greeting)
        require(Array(greeting.written) == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3], "greeting \(Array(greeting.written))")

        guard input.remaining >= 4 else { return }
        let flagBytes = input.take(4)
        let flags = NBDHandshake.parseClientFlags(flagBytes)
        let raw = be32(flagBytes, 0)
        require((flags == nil) == (raw & ~3 != 0), "client flags 0x\(String(raw, radix: 16)) \(flags == nil ? "refused" : "accepted")")
        guard let flags else { return }
        require(flags.rawValue == raw, "client flags changed in parsing")
        clientFlags = flags

        // Option haggling.
        var options = 0
        while true {
            options += 1
            guard options <= 256, input.remaining >= P.optionHeaderSize else { return }
            let header = input.take(P.optionHeaderSize)
            let parsed = NBDHandshake.parseOptionHeader(header)
            require((parsed == nil) == (be64(header, 0) != P.optionMagic), "option header magic check")
            guard let (option, length) = parsed else { return }
            require(option == be32(header, 8) && length == be32(header, 12), "option header fields")
            trace("option \(option), \(length) bytes of data")
            let outcome: NBDOptionOutcome
            if length <= NBDHandshake.maximumOptionData {
                guard input.remaining >= Int(length) else { return }
                let data = input.take(Int(length))
                outcome = answer(option, length, data)
            } else if length <= NBDHandshake.maximumDiscardedOptionData {
                guard input.remaining >= Int(length) else { return }
                _ = input.take(Int(length))
                outcome = answer(option, length, nil)
            } else {
                return  // the server hangs up on more than 1 MiB of option data
            }
            trace("  -> \(outcome)")
            switch outcome {
            case .continueHaggling: continue
            case .enterTransmission: break
            case .closeAfterReplies, .disconnect: return
            }
            break
        }

        // Transmission.
        var requests = 0
        while requests < 4096, input.remaining >= P.requestHeaderSize {
            requests += 1
            let header = input.take(P.requestHeaderSize)
            guard let request = NBDRequest.parse(header) else {
                require(be32(header, 0) != P.requestMagic, "a request with the right magic was refused")
                return
            }
            require(be32(header, 0) == P.requestMagic, "a request with a wrong magic was parsed")
            checkRoundTrip(request, header)
            let action = request.action(for: export)
            let expected = referenceAction(request)
            require(action == expected, "request \(request): action \(action), proto.md says \(expected)")
            trace("request \(request) -> \(action)")
            check(request, action)
            switch action {
            case .disconnect, .finish: return
            case .submit, .reply:
                guard input.remaining >= request.payloadLength else { return }
                _ = input.take(request.payloadLength)
            }
        }
    }

    /// Answers one option into a fresh buffer of `maximumReplyBytes` and checks the answer.
    func answer(_ option: UInt32, _ length: UInt32, _ data: UnsafeRawBufferPointer?) -> NBDOptionOutcome {
        var w = ByteWriter(out)
        let outcome = NBDHandshake.respond(to: option, length: length, data: data, export: export,
                                           clientFlags: clientFlags, into: &w)
        let bytes = Array(w.written)
        typealias O = P.Option
        typealias R = P.Reply

        if option == O.exportName {
            let named = data.map { $0.isEmpty || Array($0) == export.name } ?? false
            if !named {
                require(outcome == .disconnect && bytes.isEmpty, "EXPORT_NAME of another export: \(outcome), \(bytes.count) bytes")
                return outcome
            }
            require(outcome == .enterTransmission, "EXPORT_NAME of this export: \(outcome)")
            let zeroes = clientFlags.contains(.noZeroes) ? 0 : P.exportNameZeroes
            require(bytes.count == P.exportNameReplySize + zeroes, "EXPORT_NAME answer of \(bytes.count) bytes")
            bytes.withUnsafeBytes {
                require(be64($0, 0) == export.size && be16($0, 8) == export.flags.rawValue, "EXPORT_NAME answer fields")
            }
            require(bytes.dropFirst(P.exportNameReplySize).allSatisfy { $0 == 0 }, "EXPORT_NAME zeroes")
            return outcome
        }

        let replies = parseReplies(bytes, option: option)
        let last = replies.last!
        let isError = last.type & 0x8000_0000 != 0
        if isError {
            require(replies.count == 1, "an error reply after other replies")
            require(last.data.allSatisfy { $0 >= 0x20 && $0 < 0x7F }, "error message is not printable text")
            require(outcome == .continueHaggling, "an error reply and then \(outcome)")
        } else {
            require(last.type == R.ack && last.data.isEmpty, "the last reply is type 0x\(String(last.type, radix: 16)), not an ack")
        }

        switch option {
        case O.abort:
            require(outcome == .closeAfterReplies && replies.count == 1 && !isError, "ABORT answer")
        case O.list:
            if length != 0 {
                require(isError && last.type == R.errInvalid, "LIST with data: not ERR_INVALID")
            } else {
                require(replies.count == 2 && replies[0].type == R.server, "LIST answer")
                let d = replies[0].data
                let nameLength = d.withUnsafeBytes { Int(be32($0, 0)) }
                require(nameLength == export.name.count && Array(d[4..<(4 + nameLength)]) == export.name
                        && Array(d[(4 + nameLength)...]) == export.description, "LIST names another export")
            }
        case O.info, O.go:
            let reference = data.flatMap(referenceInfoRequest)
            if let data {
                let parsed = NBDHandshake.parseInfoRequest(data)
                require(parsed?.name == reference?.name && parsed?.wantsName == reference?.wantsName
                        && parsed?.wantsDescription == reference?.wantsDescription
                        && parsed?.wantsBlockSize == reference?.wantsBlockSize,
                        "parseInfoRequest \(String(describing: parsed)), reference \(String(describing: reference))")
            }
            guard let data else {
                require(isError && last.type == R.errTooBig, "INFO/GO with dropped data: not ERR_TOO_BIG")
                return outcome
            }
            guard let request = reference else {
                require(isError && last.type == R.errInvalid, "malformed INFO/GO: not ERR_INVALID")
                return outcome
            }
            let name = Array(data[request.name])
            guard name.isEmpty || name == export.name else {
                require(isError && last.type == R.errUnknown, "INFO/GO for another export: not ERR_UNKNOWN")
                return outcome
            }
            require(!isError, "INFO/GO for this export refused with 0x\(String(last.type, radix: 16))")
            require(outcome == (option == O.go ? .enterTransmission : .continueHaggling), "INFO/GO outcome \(outcome)")
            var infos: [UInt16: [UInt8]] = [:]
            for r in replies.dropLast() {
                require(r.type == R.info && r.data.count >= 2, "INFO/GO reply of type 0x\(String(r.type, radix: 16))")
                let kind = UInt16(r.data[0]) << 8 | UInt16(r.data[1])
                require(infos[kind] == nil, "information \(kind) sent twice")
                infos[kind] = Array(r.data[2...])
            }
            var e = SeedBytes(); e.be64(export.size); e.be16(export.flags.rawValue)
            require(infos[P.Info.export] == e.bytes, "NBD_INFO_EXPORT does not describe the export")
            var b = SeedBytes(); b.be32(export.minimumBlockSize); b.be32(export.preferredBlockSize); b.be32(export.maximumPayload)
            require(infos[P.Info.blockSize] == b.bytes, "NBD_INFO_BLOCK_SIZE does not describe the export")
            require(infos[P.Info.name] == (request.wantsName ? export.name : nil), "NBD_INFO_NAME")
            let description = request.wantsDescription && !export.description.isEmpty ? export.description : nil
            require(infos[P.Info.description] == description, "NBD_INFO_DESCRIPTION")
            require(infos.count == 2 + (request.wantsName ? 1 : 0) + (description == nil ? 0 : 1), "extra information replies")
        default:
            require(isError && last.type == R.errUnsup && outcome == .continueHaggling, "option \(option) not answered ERR_UNSUP")
        }
        return outcome
    }

    struct Reply { var type: UInt32; var data: [UInt8] }

    /// Splits an option answer into replies; each must have the reply magic and echo the option.
    func parseReplies(_ bytes: [UInt8], option: UInt32) -> [Reply] {
        var replies: [Reply] = []
        var at = 0
        bytes.withUnsafeBytes { b in
            while at < b.count {
                require(at + P.optionReplyHeaderSize <= b.count, "truncated reply header at \(at) of \(b.count)")
                require(be64(b, at) == P.optionReplyMagic && be32(b, at + 8) == option, "reply without magic or for another option")
                let length = Int(be32(b, at + 16))
                require(at + 20 + length <= b.count, "reply length \(length) past the answer")
                replies.append(Reply(type: be32(b, at + 12), data: Array(b[(at + 20)..<(at + 20 + length)])))
                at += 20 + length
            }
        }
        require(!replies.isEmpty, "option \(option) got no reply")
        return replies
    }

    /// proto.md, NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count u16 info types; the
    /// lengths must add up exactly.
    func referenceInfoRequest(_ d: UnsafeRawBufferPointer) -> (name: Range<Int>, wantsName: Bool, wantsDescription: Bool, wantsBlockSize: Bool)? {
        guard d.count >= 4 else { return nil }
        let nameLength = UInt64(be32(d, 0))
        guard UInt64(d.count) >= 4 + nameLength + 2 else { return nil }
        let n = Int(nameLength)
        let count = Int(be16(d, 4 + n))
        guard d.count == 4 + n + 2 + 2 * count else { return nil }
        let kinds = (0..<count).map { be16(d, 4 + n + 2 + 2 * $0) }
        return (4..<(4 + n), kinds.contains(P.Info.name), kinds.contains(P.Info.description), kinds.contains(P.Info.blockSize))
    }

    func checkRoundTrip(_ request: NBDRequest, _ header: UnsafeRawBufferPointer) {
        var written = [UInt8](repeating: 0, count: P.requestHeaderSize)
        written.withUnsafeMutableBytes { request.write(into: $0.baseAddress!) }
        require(written == Array(header), "request header does not round-trip")
        var reply = [UInt8](repeating: 0, count: P.simpleReplyHeaderSize)
        let error = P.nbdError(fromErrno: Int32(truncatingIfNeeded: request.offset))
        require(allowedErrors.contains(error), "errno \(Int32(truncatingIfNeeded: request.offset)) maps to \(error)")
        reply.withUnsafeMutableBytes { NBDSimpleReply.write(error: error, cookie: request.cookie, into: $0.baseAddress!) }
        let parsed = reply.withUnsafeBytes { NBDSimpleReply.parse($0) }
        require(parsed?.error == error && parsed?.cookie == request.cookie, "simple reply does not round-trip")
    }

    /// "Error values": the only ones a server may send.
    var allowedErrors: Set<UInt32> { [E.ok, E.eperm, E.eio, E.enomem, E.einval, E.enospc, E.eoverflow, E.enotsup, E.eshutdown] }

    /// proto.md's rules for one request, in the order the server documents (`action(for:)`).
    func referenceAction(_ r: NBDRequest) -> NBDRequestAction {
        let x = export
        let fua = P.CommandFlags.fua.rawValue, noHole = P.CommandFlags.noHole.rawValue
        var allowed: UInt16 = x.flags.contains(.sendFUA) ? fua : 0
        let readOnly = x.flags.contains(.readOnly)
        let length = UInt64(r.length)
        let aligned = r.offset % UInt64(x.minimumBlockSize) == 0 && length % UInt64(x.minimumBlockSize) == 0
        let inside = r.offset <= x.size && length <= x.size - r.offset
        let hasFUA = r.flags.rawValue & fua != 0
        switch r.type {
        case C.read, C.write:
            let write = r.type == C.write
            // "Size constraints": a payload above 2^25 (and above the maximum) may end the session.
            if write && r.length > x.maximumPayload && length > UInt64(P.denialOfServicePayload) { return .disconnect(.oversizedWrite(r.length)) }
            if r.flags.rawValue & ~allowed != 0 { return .reply(E.einval) }
            if write && readOnly { return .reply(E.eperm) }
            if r.length > x.maximumPayload || !aligned { return .reply(E.einval) }
            if !inside { return .reply(write ? E.enospc : E.einval) }
            if length == 0 { return .reply(E.ok) }
            return .submit(write ? (hasFUA ? .writeFUA : .write) : .read, flushAfter: false)
        case C.disc:
            return .finish
        case C.flush:
            if r.flags.rawValue & ~allowed != 0 || !x.flags.contains(.sendFlush) { return .reply(E.einval) }
            return .submit(.flush, flushAfter: false)
        case C.trim, C.writeZeroes:
            let trim = r.type == C.trim
            if !trim { allowed |= noHole }
            if r.flags.rawValue & ~allowed != 0 { return .reply(E.einval) }
            if readOnly { return .reply(E.eperm) }
            if !x.flags.contains(trim ? .sendTrim : .sendWriteZeroes) || !aligned { return .reply(E.einval) }
            if !inside { return .reply(trim ? E.einval : E.enospc) }
            if length == 0 { return .reply(E.ok) }
            return .submit(trim ? .trim : .writeZeroes, flushAfter: hasFUA)
        default:
            return .reply(E.einval)
        }
    }

    /// What reaches the backend is safe whatever the reference says.
    func check(_ r: NBDRequest, _ action: NBDRequestAction) {
        switch action {
        case .submit(let op, _):
            if op != .flush {
                let length = UInt64(r.length)
                require(length > 0, "empty \(op) submitted")
                require(r.offset <= export.size && length <= export.size - r.offset, "\(op) of \(length) at \(r.offset) past \(export.size)")
                require(r.offset % UInt64(export.minimumBlockSize) == 0 && length % UInt64(export.minimumBlockSize) == 0, "unaligned \(op)")
            }
            if op == .read || op == .write || op == .writeFUA {
                require(r.length <= export.maximumPayload, "\(op) of \(r.length) above the maximum payload")
            }
            if op != .read && op != .flush { require(!export.flags.contains(.readOnly), "\(op) on a read-only export") }
        case .reply(let e):
            require(allowedErrors.contains(e), "reply with error \(e)")
        case .finish:
            require(r.type == C.disc, "finish for command \(r.type)")
        case .disconnect(let v):
            _ = v.description
            require(r.type == C.write && Int(r.length) > P.denialOfServicePayload, "hang-up on \(r)")
        }
    }
}

func be16(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
func be32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 { UInt32(be16(b, at)) << 16 | UInt32(be16(b, at + 2)) }
func be64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 { UInt64(be32(b, at)) << 32 | UInt64(be32(b, at + 4)) }

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

/// A client's side of a session, written with the library's request writer.
struct Client {
    var s = SeedBytes()
    /// Export header: the `serve blk` export of a 256 MiB virtio-blk disk (flush, FUA, trim,
    /// write zeroes, multi-conn; blocks 512/4096; 128 KiB payloads), named `name`.
    init(flags: UInt8 = 0b0011_1110, minimumExponent: UInt8 = 9, size: UInt64 = 256 << 20, name: String = "",
         description: String = "virtio-blk 0000:00:05.0") {
        s.u8(flags); s.u8(minimumExponent); s.u8(3)
        s.le32(128 << 10); s.le64(size)
        s.u8(UInt8(name.utf8.count)); s.raw(name.utf8)
        s.u8(UInt8(description.utf8.count)); s.raw(description.utf8)
        s.be32(P.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
    }
    mutating func option(_ option: UInt32, _ data: [UInt8] = []) {
        s.be64(P.optionMagic); s.be32(option); s.be32(UInt32(data.count)); s.raw(data)
    }
    static func infoData(name: String, _ kinds: [UInt16]) -> [UInt8] {
        var d = SeedBytes()
        d.be32(UInt32(name.utf8.count)); d.raw(name.utf8); d.be16(UInt16(kinds.count))
        for k in kinds { d.be16(k) }
        return d.bytes
    }
    mutating func request(_ type: UInt16, offset: UInt64 = 0, length: UInt32 = 0, flags: P.CommandFlags = [], payload: Bool = true) {
        var header = [UInt8](repeating: 0, count: P.requestHeaderSize)
        header.withUnsafeMutableBytes {
            NBDRequest(flags: flags, type: type, cookie: UInt64(s.bytes.count), offset: offset, length: length).write(into: $0.baseAddress!)
        }
        s.raw(header)
        if type == C.write && payload { s.raw((0..<Int(length)).map { UInt8(truncatingIfNeeded: $0) }) }
    }
}

func seeds() -> [(name: String, bytes: [UInt8])] {
    typealias O = P.Option
    var result: [(name: String, bytes: [UInt8])] = []
    // nbd-client: EXPORT_NAME "", then every command the server supports.
    var c = Client()
    c.option(O.exportName)
    c.request(C.read, offset: 0, length: 4096)
    c.request(C.write, offset: 4096, length: 512, flags: .fua)
    c.request(C.flush)
    c.request(C.trim, offset: 1 << 20, length: 1 << 16, flags: .fua)
    c.request(C.writeZeroes, offset: 2 << 20, length: 4096, flags: [.noHole])
    c.request(C.read, length: 0)
    c.request(C.disc)
    result.append(("nbd-client-export-name", c.s.bytes))
    // qemu-img / nbdinfo: STRUCTURED_REPLY (unsupported), LIST, INFO, GO with info requests.
    var q = Client(name: "blk0")
    q.option(O.structuredReply)
    q.option(O.list)
    q.option(O.info, Client.infoData(name: "blk0", [P.Info.name, P.Info.description, P.Info.blockSize]))
    q.option(O.go, Client.infoData(name: "", [P.Info.blockSize]))
    q.request(C.read, offset: 512, length: 512)
    q.request(C.write, offset: 0, length: 512)
    q.request(C.disc)
    result.append(("qemu-go", q.s.bytes))
    // The longest answers: a 4096-byte name and description (length bytes 0x81), LIST, then
    // INFO and GO for the default export asking for both.
    var big = SeedBytes()
    big.u8(0b0011_1110); big.u8(9); big.u8(3); big.le32(128 << 10); big.le64(256 << 20)
    big.raw([0x81, 0, 0x81, 7])
    big.be32(P.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
    var longest = Client()
    longest.s = big
    longest.option(O.list)
    longest.option(O.info, Client.infoData(name: "", [P.Info.name, P.Info.description, P.Info.blockSize]))
    longest.option(O.go, Client.infoData(name: "", [P.Info.description, P.Info.name]))
    longest.request(C.disc)
    result.append(("longest-strings", longest.s.bytes))
    // Refusals in haggling: unknown export, malformed INFO, LIST with data, ABORT.
    var r = Client(name: "blk0")
    r.option(O.info, Client.infoData(name: "other", []))
    r.option(O.go, [0, 0, 0, 9, 1, 2])
    r.option(O.list, [1])
    r.option(O.setMetaContext, [0, 0, 0, 0])
    r.option(O.abort)
    result.append(("haggling-refusals", r.s.bytes))
    // Option data too long to keep (dropped, answered ERR_TOO_BIG), then EXPORT_NAME of another export.
    var long = Client()
    long.option(O.info, [UInt8](repeating: 0, count: NBDHandshake.maximumOptionData + 1))
    long.option(O.exportName, Array("nope".utf8))
    result.append(("option-too-long", long.s.bytes))
    // Request errors: unaligned, past the end, unknown flags and commands, oversized payloads.
    var e = Client(size: 1 << 20)
    e.option(O.go, Client.infoData(name: "", []))
    e.request(C.read, offset: 100, length: 512)
    e.request(C.write, offset: (1 << 20) - 512, length: 1024)
    e.request(C.trim, offset: 1 << 20, length: 512)
    e.request(C.read, length: 512, flags: [.dontFragment])
    e.request(C.cache, length: 512)
    e.request(C.blockStatus, length: 512)
    e.request(9)
    e.request(C.read, length: 256 << 10)
    e.request(C.write, length: (1 << 25) + 512, payload: false)
    result.append(("request-errors", e.s.bytes))
    // A read-only export without flush: writes EPERM, FUA and FLUSH EINVAL.
    var ro = Client(flags: 0b0000_0001, minimumExponent: 0)
    ro.option(O.exportName)
    ro.request(C.write, offset: 1, length: 3)
    ro.request(C.read, offset: 1, length: 3, flags: .fua)
    ro.request(C.flush)
    ro.request(C.writeZeroes, length: 512)
    result.append(("read-only", ro.s.bytes))
    // Garbage: unknown client flags; a bad option magic; a bad request magic.
    var flags = SeedBytes()
    flags.raw(Client().s.bytes.dropLast(4)); flags.be32(4)
    result.append(("bad-client-flags", flags.bytes))
    var magic = Client()
    magic.s.raw(Array("IHAVEOPX".utf8) + [0, 0, 0, 7, 0, 0, 0, 0])
    result.append(("bad-option-magic", magic.s.bytes))
    var garbage = Client()
    garbage.option(O.exportName)
    garbage.s.raw([UInt8](repeating: 0x41, count: 28))
    result.append(("bad-request-magic", garbage.s.bytes))
    return result
}
