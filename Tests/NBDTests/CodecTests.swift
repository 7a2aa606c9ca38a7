import Testing
@testable import NBD

/// The pure protocol functions: every message the server writes, every input it parses.
@Suite("NBD codec")
struct CodecTests {
    typealias O = NBDProtocol.Option
    typealias R = NBDProtocol.Reply
    typealias C = NBDProtocol.Command
    typealias E = NBDProtocol.Error

    static let flags: NBDProtocol.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn]
    static let export = NBDExport(name: "disk0", description: "a test disk", size: 1 << 20, flags: flags,
                                  minimumBlockSize: 512, preferredBlockSize: 4096, maximumPayload: 65536)

    /// Runs `respond` on `data` (nil: data thrown away) and splits what it wrote into replies.
    func respond(_ option: UInt32, _ data: [UInt8]?, length: UInt32? = nil, export: NBDExport = CodecTests.export,
                 clientFlags: NBDProtocol.ClientFlags = [.fixedNewstyle, .noZeroes]) -> (NBDOptionOutcome, [UInt8]) {
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: NBDHandshake.maximumReplyBytes, alignment: 8)
        defer { out.deallocate() }
        var writer = ByteWriter(out)
        let outcome: NBDOptionOutcome
        if let data {
            outcome = data.withUnsafeBytes {
                NBDHandshake.respond(to: option, length: length ?? UInt32($0.count), data: $0, export: export,
                                     clientFlags: clientFlags, into: &writer)
            }
        } else {
            outcome = NBDHandshake.respond(to: option, length: length ?? 100_000, data: nil, export: export,
                                           clientFlags: clientFlags, into: &writer)
        }
        return (outcome, Array(writer.written))
    }

    struct Reply: Equatable { var option: UInt32; var type: UInt32; var data: [UInt8] }

    func replies(_ bytes: [UInt8]) -> [Reply] {
        var out: [Reply] = []
        var at = 0
        while at < bytes.count {
            let (magic, option, type, length) = bytes.withUnsafeBytes {
                ($0.be64(at), $0.be32(at + 8), $0.be32(at + 12), Int($0.be32(at + 16)))
            }
            #expect(magic == NBDProtocol.optionReplyMagic)
            out.append(Reply(option: option, type: type, data: Array(bytes[(at + 20)..<(at + 20 + length)])))
            at += 20 + length
        }
        #expect(at == bytes.count)
        return out
    }

    // MARK: greeting and flags

    @Test func greetingIsNBDMAGICThenIHAVEOPTThenFlags() {
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 18, alignment: 8)
        defer { out.deallocate() }
        var w = ByteWriter(out)
        NBDHandshake.writeGreeting(into: &w)
        #expect(Array(w.written) == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3])
    }

    @Test func clientFlagsAcceptOnlyWhatWasOffered() {
        func parse(_ v: UInt32) -> NBDProtocol.ClientFlags? { be32(v).withUnsafeBytes { NBDHandshake.parseClientFlags($0) } }
        #expect(parse(0) == [])
        #expect(parse(1) == [.fixedNewstyle])
        #expect(parse(3) == [.fixedNewstyle, .noZeroes])
        #expect(parse(2) == [.noZeroes])
        #expect(parse(4) == nil)
        #expect(parse(0x8000_0001) == nil)
        #expect(parse(0xffff_ffff) == nil)
    }

    @Test func optionHeaderNeedsIHAVEOPT() {
        let good = be64(NBDProtocol.optionMagic) + be32(7) + be32(12)
        #expect(good.withUnsafeBytes { NBDHandshake.parseOptionHeader($0) }! == (7, 12))
        var bad = good
        bad[3] ^= 1
        #expect(bad.withUnsafeBytes { NBDHandshake.parseOptionHeader($0) } == nil)
        let request = be32(NBDProtocol.requestMagic) + [UInt8](repeating: 0, count: 12)
        #expect(request.withUnsafeBytes { NBDHandshake.parseOptionHeader($0) } == nil)
    }

    // MARK: options

    @Test func exportNameSendsSizeFlagsAndZeroesUnlessNoZeroes() {
        let (outcome, bytes) = respond(O.exportName, Array("disk0".utf8), clientFlags: [.fixedNewstyle])
        #expect(outcome == .enterTransmission)
        #expect(bytes == be64(1 << 20) + be16(Self.flags.rawValue) + [UInt8](repeating: 0, count: 124))
        let (o2, short) = respond(O.exportName, [], clientFlags: [.fixedNewstyle, .noZeroes])
        #expect(o2 == .enterTransmission)  // "" is the default export
        #expect(short == be64(1 << 20) + be16(Self.flags.rawValue))
    }

    @Test func exportNameForAnUnknownExportHangsUp() {
        #expect(respond(O.exportName, Array("disk1".utf8)) == (.disconnect, []))
        #expect(respond(O.exportName, Array("disk".utf8)) == (.disconnect, []))
        #expect(respond(O.exportName, nil) == (.disconnect, []))  // longer than any name
    }

    @Test func abortIsAcknowledgedAndCloses() {
        let (outcome, bytes) = respond(O.abort, [1, 2, 3])  // data is ignored
        #expect(outcome == .closeAfterReplies)
        #expect(replies(bytes) == [Reply(option: O.abort, type: R.ack, data: [])])
    }

    @Test func listNamesTheExportThenAcks() {
        let (outcome, bytes) = respond(O.list, [])
        #expect(outcome == .continueHaggling)
        #expect(replies(bytes) == [
            Reply(option: O.list, type: R.server, data: be32(5) + Array("disk0a test disk".utf8)),
            Reply(option: O.list, type: R.ack, data: []),
        ])
        let (o2, b2) = respond(O.list, [0])
        #expect(o2 == .continueHaggling)
        #expect(replies(b2).map(\.type) == [R.errInvalid])
    }

    @Test(arguments: [NBDProtocol.Option.info, NBDProtocol.Option.go])
    func infoAndGoSendExportAndBlockSizeThenAck(_ option: UInt32) {
        let (outcome, bytes) = respond(option, TestClient.infoData(name: "disk0", infos: []))
        #expect(outcome == (option == O.go ? .enterTransmission : .continueHaggling))
        #expect(replies(bytes) == [
            Reply(option: option, type: R.info, data: be16(0) + be64(1 << 20) + be16(Self.flags.rawValue)),
            Reply(option: option, type: R.info, data: be16(3) + be32(512) + be32(4096) + be32(65536)),
            Reply(option: option, type: R.ack, data: []),
        ])
    }

    @Test func infoAnswersNameAndDescriptionWhenAskedAndIgnoresUnknownRequests() {
        let (_, bytes) = respond(O.info, TestClient.infoData(name: "", infos: [2, 1, 99, 3, 1]))
        let r = replies(bytes)
        #expect(r.map(\.type) == [R.info, R.info, R.info, R.info, R.ack])
        #expect(r[2].data == be16(1) + Array("disk0".utf8))
        #expect(r[3].data == be16(2) + Array("a test disk".utf8))
        // No description: none is sent even if asked.
        let plain = NBDExport(name: "", size: 4096, flags: [.hasFlags], minimumBlockSize: 1, preferredBlockSize: 4096,
                              maximumPayload: 1 << 25)
        let (_, b2) = respond(O.go, TestClient.infoData(name: "", infos: [2]), export: plain)
        #expect(replies(b2).map(\.type) == [R.info, R.info, R.ack])
    }

    @Test func infoForAnUnknownExportIsErrUnknown() {
        let (outcome, bytes) = respond(O.go, TestClient.infoData(name: "disk1", infos: [3]))
        #expect(outcome == .continueHaggling)
        let r = replies(bytes)
        #expect(r.count == 1 && r[0].type == R.errUnknown && !r[0].data.isEmpty)
    }

    @Test(arguments: [
        [UInt8](),                                   // too short
        [0, 0, 0],
        [0, 0, 0, 0, 0],
        be32(6) + Array("disk0".utf8) + be16(0),     // name longer than the data
        be32(5) + Array("disk0".utf8) + be16(1),     // count says 1, no entry
        be32(5) + Array("disk0".utf8) + be16(0) + [0],  // trailing byte
        be32(0xffff_ffff) + be16(0),
        be32(0) + be16(2) + be16(3),                 // count 2, one entry
    ])
    func malformedInfoIsErrInvalid(_ data: [UInt8]) {
        for option in [O.info, O.go] {
            let (outcome, bytes) = respond(option, data)
            #expect(outcome == .continueHaggling)
            #expect(replies(bytes).map(\.type) == [R.errInvalid])
        }
    }

    @Test func tooLongInfoIsErrTooBig() {
        let (outcome, bytes) = respond(O.go, nil)
        #expect(outcome == .continueHaggling)
        #expect(replies(bytes).map(\.type) == [R.errTooBig])
    }

    @Test(arguments: [NBDProtocol.Option.structuredReply, NBDProtocol.Option.startTLS, NBDProtocol.Option.listMetaContext,
                      NBDProtocol.Option.setMetaContext, NBDProtocol.Option.extendedHeaders, NBDProtocol.Option.peekExport,
                      0, 12, 0x7fff_ffff, 0xffff_ffff])
    func everythingElseIsErrUnsup(_ option: UInt32) {
        for data in [[], [1, 2, 3], nil] as [[UInt8]?] {
            let (outcome, bytes) = respond(option, data)
            #expect(outcome == .continueHaggling)
            let r = replies(bytes)
            #expect(r.count == 1 && r[0].option == option && r[0].type == R.errUnsup)
        }
    }

    @Test func exportChecksSizeConstraints() {
        func problem(_ min: Int, _ pref: Int, _ max: Int, name: String = "") -> String? {
            NBDExport.problem(name: name, description: "", minimumBlockSize: min, preferredBlockSize: pref, maximumPayload: max)
        }
        #expect(problem(512, 4096, 1 << 20) == nil)
        #expect(problem(1, 512, 512) == nil)
        #expect(problem(65536, 65536, 1 << 20) == nil)
        #expect(problem(0, 4096, 1 << 20) != nil)
        #expect(problem(768, 4096, 1 << 20) != nil)
        #expect(problem(131072, 131072, 1 << 20) != nil)
        #expect(problem(512, 256, 1 << 20) != nil)
        #expect(problem(4096, 2048, 1 << 20) != nil)
        #expect(problem(512, 3000, 1 << 20) != nil)
        #expect(problem(512, 4096, 2048) != nil)
        #expect(problem(512, 4096, 1 << 20, name: String(repeating: "x", count: 4097)) != nil)
        let huge = NBDExport(name: "", size: 1, flags: [], minimumBlockSize: 1, preferredBlockSize: 512, maximumPayload: 1 << 40)
        #expect(huge.maximumPayload == UInt32.max)
        #expect(huge.flags.contains(.hasFlags))
    }

    // MARK: requests and replies

    @Test func requestHeaderRoundTrips() {
        let request = NBDRequest(flags: [.fua, .noHole], type: C.writeZeroes, cookie: 0x0102_0304_0506_0708,
                                 offset: 0x1122_3344_5566_7788, length: 0x99aa_bbcc)
        var bytes = [UInt8](repeating: 0, count: 28)
        bytes.withUnsafeMutableBytes { request.write(into: $0.baseAddress!) }
        #expect(bytes == be32(0x2560_9513) + be16(3) + be16(6) + be64(0x0102_0304_0506_0708) + be64(0x1122_3344_5566_7788)
                + be32(0x99aa_bbcc))
        #expect(bytes.withUnsafeBytes { NBDRequest.parse($0) } == request)
        for i in 0..<4 {
            var bad = bytes
            bad[i] ^= 0x10
            #expect(bad.withUnsafeBytes { NBDRequest.parse($0) } == nil)
        }
    }

    @Test func simpleReplyRoundTrips() {
        var bytes = [UInt8](repeating: 0, count: 16)
        bytes.withUnsafeMutableBytes { NBDSimpleReply.write(error: 22, cookie: 0xdead_beef_0000_0001, into: $0.baseAddress!) }
        #expect(bytes == be32(0x6744_6698) + be32(22) + be64(0xdead_beef_0000_0001))
        #expect(bytes.withUnsafeBytes { NBDSimpleReply.parse($0) }! == (22, 0xdead_beef_0000_0001))
        bytes[0] = 0
        #expect(bytes.withUnsafeBytes { NBDSimpleReply.parse($0) } == nil)
    }

    func action(_ type: UInt16, _ offset: UInt64 = 0, _ length: UInt32 = 0, _ flags: NBDProtocol.CommandFlags = [],
                export: NBDExport = CodecTests.export) -> NBDRequestAction {
        NBDRequest(flags: flags, type: type, cookie: 9, offset: offset, length: length).action(for: export)
    }

    @Test func validRequestsGoToTheBackend() {
        #expect(action(C.read, 0, 4096) == .submit(.read, flushAfter: false))
        #expect(action(C.read, (1 << 20) - 65536, 65536) == .submit(.read, flushAfter: false))
        #expect(action(C.read, 512, 512, .fua) == .submit(.read, flushAfter: false))  // FUA ignored on reads
        #expect(action(C.write, 0, 4096) == .submit(.write, flushAfter: false))
        #expect(action(C.write, 4096, 4096, .fua) == .submit(.writeFUA, flushAfter: false))
        #expect(action(C.flush) == .submit(.flush, flushAfter: false))
        #expect(action(C.flush, 4096, 4096) == .submit(.flush, flushAfter: false))  // reserved fields ignored
        #expect(action(C.flush, 0, 0, .fua) == .submit(.flush, flushAfter: false))
        #expect(action(C.trim, 0, 1 << 20) == .submit(.trim, flushAfter: false))
        #expect(action(C.trim, 0, 4096, .fua) == .submit(.trim, flushAfter: true))
        #expect(action(C.writeZeroes, 0, 1 << 20, .noHole) == .submit(.writeZeroes, flushAfter: false))
        #expect(action(C.writeZeroes, 0, 4096, [.fua, .noHole]) == .submit(.writeZeroes, flushAfter: true))
        #expect(action(C.disc) == .finish)
        #expect(action(C.disc, 5, 5) == .finish)
    }

    @Test func zeroLengthRequestsSucceedWithoutTheBackend() {
        for type in [C.read, C.write, C.trim, C.writeZeroes] {
            #expect(action(type, 4096, 0) == .reply(E.ok))
            #expect(action(type, 1 << 20, 0) == .reply(E.ok))  // at the very end
        }
    }

    @Test func outOfRangeIsEINVALOrENOSPC() {
        let end: UInt64 = 1 << 20
        #expect(action(C.read, end, 512) == .reply(E.einval))
        #expect(action(C.read, end - 512, 1024) == .reply(E.einval))
        #expect(action(C.read, UInt64.max - 511, 512) == .reply(E.einval))   // offset + length overflows
        #expect(action(C.read, end + 512, 0) == .reply(E.einval))
        #expect(action(C.write, end - 512, 1024) == .reply(E.enospc))
        #expect(action(C.write, UInt64.max - 511, 512) == .reply(E.enospc))
        #expect(action(C.trim, end, 512) == .reply(E.einval))
        #expect(action(C.writeZeroes, end - 512, 1024) == .reply(E.enospc))
    }

    @Test func unalignedIsEINVAL() {
        #expect(action(C.read, 1, 512) == .reply(E.einval))
        #expect(action(C.read, 0, 100) == .reply(E.einval))
        #expect(action(C.write, 0, 1000) == .reply(E.einval))
        #expect(action(C.trim, 256, 512) == .reply(E.einval))
        #expect(action(C.writeZeroes, 0, 513) == .reply(E.einval))
    }

    @Test func oversizedPayloadsAreEINVALOrHangUp() {
        #expect(action(C.read, 0, 65536 + 512) == .reply(E.einval))
        #expect(action(C.read, 0, UInt32.max) == .reply(E.einval))
        #expect(action(C.write, 0, 65536 + 512) == .reply(E.einval))     // payload read and dropped
        #expect(action(C.write, 0, 1 << 25) == .reply(E.einval))
        #expect(action(C.write, 0, (1 << 25) + 512) == .disconnect(.oversizedWrite((1 << 25) + 512)))
        // No payload: longer than the maximum payload is fine for trim and write-zeroes.
        #expect(action(C.trim, 0, 1 << 20) == .submit(.trim, flushAfter: false))
    }

    @Test func readOnlyRefusesWritesWithEPERM() {
        let ro = NBDExport(name: "", size: 1 << 20, flags: [.hasFlags, .readOnly, .sendFlush, .sendFUA],
                           minimumBlockSize: 512, preferredBlockSize: 4096, maximumPayload: 65536)
        #expect(action(C.write, 0, 512, export: ro) == .reply(E.eperm))
        #expect(action(C.write, 0, 512, .fua, export: ro) == .reply(E.eperm))
        #expect(action(C.trim, 0, 512, export: ro) == .reply(E.eperm))
        #expect(action(C.writeZeroes, 0, 512, export: ro) == .reply(E.eperm))
        #expect(action(C.read, 0, 512, export: ro) == .submit(.read, flushAfter: false))
        #expect(action(C.flush, export: ro) == .submit(.flush, flushAfter: false))
    }

    @Test func unadvertisedCommandsAndFlagsAreEINVAL() {
        let bare = NBDExport(name: "", size: 1 << 20, flags: [.hasFlags], minimumBlockSize: 512, preferredBlockSize: 4096,
                             maximumPayload: 65536)
        #expect(action(C.flush, export: bare) == .reply(E.einval))
        #expect(action(C.trim, 0, 512, export: bare) == .reply(E.einval))
        #expect(action(C.writeZeroes, 0, 512, export: bare) == .reply(E.einval))
        #expect(action(C.write, 0, 512, .fua, export: bare) == .reply(E.einval))  // FUA not offered
        #expect(action(C.read, 0, 512, .fua, export: bare) == .reply(E.einval))
        #expect(action(C.cache, 0, 512) == .reply(E.einval))
        #expect(action(C.blockStatus, 0, 512) == .reply(E.einval))
        #expect(action(8, 0, 512) == .reply(E.einval))
        #expect(action(0xffff, 0, 512) == .reply(E.einval))
        #expect(action(C.read, 0, 512, .dontFragment) == .reply(E.einval))  // no structured replies
        #expect(action(C.read, 0, 512, .noHole) == .reply(E.einval))
        #expect(action(C.write, 0, 512, .reqOne) == .reply(E.einval))
        #expect(action(C.writeZeroes, 0, 512, .fastZero) == .reply(E.einval))  // FAST_ZERO not offered
        #expect(action(C.trim, 0, 512, .noHole) == .reply(E.einval))
        #expect(action(C.write, 0, 512, NBDProtocol.CommandFlags(rawValue: 0x8000)) == .reply(E.einval))
    }

    @Test func errnoMapsToTheAllowedErrorValues() {
        let allowed: Set<UInt32> = [0, 1, 5, 12, 22, 28, 75, 95, 108]
        for e in Int32(0)...200 { #expect(allowed.contains(NBDProtocol.nbdError(fromErrno: e))) }
        #expect(NBDProtocol.nbdError(fromErrno: 30) == E.eperm)    // EROFS
        #expect(NBDProtocol.nbdError(fromErrno: 122) == E.enospc)  // EDQUOT
        #expect(NBDProtocol.nbdError(fromErrno: 27) == E.enospc)   // EFBIG
        #expect(NBDProtocol.nbdError(fromErrno: 95) == E.enotsup)
        #expect(NBDProtocol.nbdError(fromErrno: 11) == E.eio)      // EAGAIN: not a protocol value
    }

    // MARK: garbage

    /// Random option numbers, lengths and data, and random request headers: the codec never traps
    /// and always answers within the protocol.
    @Test func randomInputNeverTraps() {
        var rng = SplitMix(seed: 42)
        for _ in 0..<20_000 {
            let option = rng.next() % 3 == 0 ? UInt32(truncatingIfNeeded: rng.next()) : UInt32(rng.next() % 13)
            let count = Int(rng.next() % 64)
            var data = (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 2 == 0 && count >= 6 {  // plausible INFO/GO shape with random lengths
                data.replaceSubrange(0..<4, with: be32(UInt32(rng.next() % 8)))
            }
            let (outcome, bytes) = respond(option, rng.next() % 50 == 0 ? nil : data)
            if outcome != .disconnect && option != O.exportName { #expect(!replies(bytes).isEmpty) }
        }
        for _ in 0..<20_000 {
            var header = (0..<28).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 4 != 0 { header.replaceSubrange(0..<4, with: be32(NBDProtocol.requestMagic)) }
            if rng.next() % 2 == 0 { header[6] = 0; header[7] = UInt8(rng.next() % 9) }
            guard let request = header.withUnsafeBytes({ NBDRequest.parse($0) }) else { continue }
            switch request.action(for: Self.export) {
            case .submit(let op, _):
                if op != .flush { #expect(request.inRange(Self.export) && request.isAligned(Self.export) && request.length > 0) }
                if op == .read || op == .write || op == .writeFUA { #expect(request.length <= Self.export.maximumPayload) }
            case .reply, .finish, .disconnect: break
            }
        }
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
