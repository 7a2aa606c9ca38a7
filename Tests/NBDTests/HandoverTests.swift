import Glibc
import Testing
@testable import NBD
import Synchronization
import Syscalls

/// A server whose `run(until:quiesceWhen:)` runs on its own thread, again after each quiesce if
/// asked; between runs the test owns the server (hand-over state, release).
private final class Hosted: @unchecked Sendable {
    var server: NBDServer<MemoryBlockBackend>?
    let stop = Atomic<Bool>(false)
    let quiesce = Atomic<Bool>(false)
    let wake: Int32
    var outcome: NBDRunOutcome?
    var runError: NBDServerError?
    private var thread: TestThread?

    init(_ server: consuming NBDServer<MemoryBlockBackend>, wake: Int32) {
        self.server = consume server
        self.wake = wake
    }

    func start() {
        outcome = nil
        thread = TestThread { [self] in
            var s = self.server.take()!
            do throws(NBDServerError) {
                self.outcome = try s.run(until: self.stop, quiesceWhen: self.quiesce)
            } catch {
                self.runError = error
            }
            self.server = consume s
        }
    }

    /// Waits for the run to end; its outcome.
    func join() -> NBDRunOutcome? {
        thread?.join()
        thread = nil
        return outcome
    }

    func requestQuiesce() {
        quiesce.store(true, ordering: .relaxed)
        _ = Syscall.write64(wake, 1)
    }

    func requestStop() -> NBDRunOutcome? {
        stop.store(true, ordering: .relaxed)
        _ = Syscall.write64(wake, 1)
        return join()
    }

    deinit { if thread != nil { _ = requestStop() } }
}

private func eventFD() -> Int32 {
    guard case .success(let fd) = Syscall.eventfd(0, O_NONBLOCK) else { fatalError("eventfd") }
    return fd
}

private func configuration(path: String, log: ServerLog, wake: Int32) -> NBDServerConfiguration {
    var c = NBDServerConfiguration()
    c.unixSocketPath = path
    c.wakeDescriptor = wake
    c.drainTimeout = .seconds(3)
    c.log = { log.append($0) }
    return c
}

/// The successor's copy of the state: every descriptor dup'ed (as SCM_RIGHTS would), the state
/// encoded and decoded again.
private func passOn(_ state: NBDHandoverState) throws -> NBDHandoverState {
    let received = state.descriptors.map { Glibc.dup($0) }
    #expect(received.allSatisfy { $0 >= 0 })
    return try NBDHandoverState(decoding: state.encoded(), descriptors: received)
}

private func socketFileExists(_ path: String) -> Bool {
    if case .success(let s) = SocketSyscall.lstat(path) { return s.mode & UInt32(S_IFMT) == UInt32(S_IFSOCK) }
    return false
}

/// Runs `body` on a thread; `finish()` joins it and returns its error, if any.
private final class ClientThread: @unchecked Sendable {
    private let failure = Mutex<String?>(nil)
    private var thread: TestThread?
    init(_ body: @escaping () throws -> Void) {
        thread = TestThread { [self] in
            do { try body() } catch { self.failure.withLock { $0 = "\(error)" } }
        }
    }
    func finish() -> String? {
        thread?.join()
        return failure.withLock { $0 }
    }
}

@Suite("NBD hand-over")
struct HandoverTests {
    typealias C = NBDProtocol.Command
    typealias E = NBDProtocol.Error
    typealias O = NBDProtocol.Option

    /// Server A with requests in flight in a held backend, and clients in every state, quiesces;
    /// server B takes its descriptors and state; every request gets exactly one correct reply.
    @Test func handoverKeepsEveryRequestAndEveryClient() throws {
        let disk = MemoryDisk(MemoryBackendOptions(size: 16 << 20))
        let directory = TemporaryDirectory()
        let path = directory.path + "/nbd.sock"
        let logA = ServerLog(), logB = ServerLog()
        let wakeA = eventFD(), wakeB = eventFD()
        defer { Glibc.close(wakeA); Glibc.close(wakeB) }
        var confA = configuration(path: path, log: logA, wake: wakeA)
        confA.requestsPerClient = 4
        let a = Hosted(try NBDServer(backend: MemoryBlockBackend(disk), configuration: confA), wake: wakeA)
        a.start()
        let readData = pattern(1 << 20, seed: 99)
        disk.fill(8 << 20, readData)
        disk.hold.store(true, ordering: .relaxed)  // nothing completes until the quiesce was asked for

        // c2: a WRITE whose header the server parsed, half its payload sent before the quiesce.
        let c2 = try TestClient(unixPath: path)
        try c2.handshake()
        let c2Data = pattern(64 << 10, seed: 2)
        let reserved = disk.reservations
        try c2.sendRequest(NBDRequest(type: C.write, cookie: 22, offset: 4 << 20, length: UInt32(c2Data.count)),
                           payload: Array(c2Data[..<(32 << 10)]))
        #expect(waitUntil { disk.reservations > reserved })

        // c6: eight READ headers in one send: four taken (requestsPerClient), four left in the
        // input buffer, handed over unparsed.
        let c6 = try TestClient(unixPath: path)
        try c6.handshake()
        var eight: [UInt8] = []
        for k in 0..<8 {
            var h = [UInt8](repeating: 0, count: 28)
            h.withUnsafeMutableBytes {
                NBDRequest(type: C.read, cookie: UInt64(600 + k), offset: UInt64(8 << 20) + UInt64(k) * 4096, length: 4096)
                    .write(into: $0.baseAddress!)
            }
            eight += h
        }
        try c6.send(eight)

        // c4: half an NBD_OPT_GO sent; c5: client flags sent, nothing more; c7: nothing sent.
        let c4 = try TestClient(unixPath: path)
        _ = try c4.readGreeting()
        try c4.sendClientFlags(3)
        let go = be64(NBDProtocol.optionMagic) + be32(O.go) + be32(6) + TestClient.infoData(name: "", infos: [])
        try c4.send(Array(go[..<18]))
        let c5 = try TestClient(unixPath: path)
        _ = try c5.readGreeting()
        try c5.sendClientFlags(3)
        let c7 = try TestClient(unixPath: path)
        // c2b: in transmission, sends a header and half a payload only once the quiesce started.
        let c2b = try TestClient(unixPath: path)
        try c2b.handshake()

        // c1: a pipeline of writes, reads and flushes across the hand-over.
        let c1 = try TestClient(unixPath: path)
        try c1.handshake()
        var plan: [Planned] = []
        for k in 0..<96 {
            switch k % 3 {
            case 0:
                plan.append(Planned(request: NBDRequest(type: C.write, cookie: UInt64(k), offset: UInt64(k) * 16384, length: 16384),
                                    payload: pattern(16384, seed: 1000 + k)))
            case 1:
                let offset = (k * 16384) % (1 << 20)
                plan.append(Planned(request: NBDRequest(type: C.read, cookie: UInt64(k), offset: UInt64(8 << 20 + offset), length: 16384),
                                    expected: Array(readData[offset..<(offset + 16384)])))
            default:
                plan.append(Planned(request: NBDRequest(type: C.flush, cookie: UInt64(k))))
            }
        }
        let pipelined = ClientThread { _ = try pipeline(c1, plan, window: 8) }
        // c1's four, c6's four: in the held backend.
        #expect(waitUntil { disk.inFlightNow == 8 })

        a.requestQuiesce()
        try c2b.sendRequest(NBDRequest(type: C.write, cookie: 23, offset: 5 << 20, length: 8192),
                            payload: Array(pattern(8192, seed: 3)[..<4096]))
        // c3 connects during the quiesce: it waits in the backlog for server B.
        let c3 = try TestClient(unixPath: path)
        let backlogged = ClientThread {
            try c3.handshake()
            guard try c3.write(6 << 20, pattern(4096, seed: 4)) == 0 else { throw TestFailure("c3 write") }
            guard try c3.read(6 << 20, 4096).data == pattern(4096, seed: 4) else { throw TestFailure("c3 read") }
        }
        usleep(100_000)
        try c2.send(Array(c2Data[(32 << 10)...]))  // the rest of the payload whose header was parsed
        try c4.send(Array(go[18...]))                // the rest of the option being read
        usleep(100_000)
        #expect(a.outcome == nil)  // requests still in flight: not quiesced yet
        disk.resume()
        #expect(a.join() == .quiesced)
        #expect(disk.inFlightNow == 0 && disk.reservedNow == 0)
        #expect(socketFileExists(path))

        let state = a.server!.handoverState()
        let statsA = a.server!.statistics
        #expect(statsA.quiesces == 1 && statsA.quiesceFailures == 0)
        #expect(statsA.connectionsAccepted == 7)  // not c3
        #expect(state.unixListener?.path == path && state.tcpListener == nil)
        #expect(state.clients.count == 7)
        #expect(state.clients.filter { $0.phase == .awaitingClientFlags }.count == 1)  // c7
        #expect(state.clients.filter { $0.phase == .negotiating }.count == 1)          // c5
        #expect(state.clients.contains { $0.pendingInput.count == 4 * 28 })            // c6
        let adopted = try passOn(state)
        #expect(adopted.clients.map(\.pendingInput) == state.clients.map(\.pendingInput))
        a.server.take()!.release()
        #expect(socketFileExists(path))  // the successor listens on it

        let b = Hosted(try NBDServer(backend: MemoryBlockBackend(disk),
                                     configuration: configuration(path: path, log: logB, wake: wakeB), adopting: adopted),
                       wake: wakeB)
        #expect(b.server!.statistics.connectionsAdopted == 7)
        b.start()

        // c2: its WRITE was finished and answered by A.
        #expect(try c2.readReply() == (0, 22))
        #expect(try c2.read(4 << 20, c2Data.count).data == c2Data)
        // c2b: B reads the header A left, then the rest of the payload.
        try c2b.send(Array(pattern(8192, seed: 3)[4096...]))
        #expect(try c2b.readReply() == (0, 23))
        #expect(try c2b.read(5 << 20, 8192).data == pattern(8192, seed: 3))
        // c6: eight replies, four from each server.
        var cookies: Set<UInt64> = []
        for _ in 0..<8 {
            let reply = try c6.readReply()
            #expect(reply.error == 0)
            let k = Int(reply.cookie) - 600
            #expect(try c6.receive(4096) == Array(readData[(k * 4096)..<(k * 4096 + 4096)]))
            cookies.insert(reply.cookie)
        }
        #expect(cookies == Set(600..<608))
        // c4: A answered its GO; it goes on with B.
        let c4Replies = [try c4.readOptionReply(), try c4.readOptionReply(), try c4.readOptionReply()]
        #expect(c4Replies.last?.type == NBDProtocol.Reply.ack)
        #expect(try c4.write(7 << 20, pattern(4096, seed: 5)) == 0)
        #expect(try c4.read(7 << 20, 4096).data == pattern(4096, seed: 5))
        // c5 negotiates with B; c7 starts its handshake with B (A's greeting already read or not).
        #expect(try c5.info(O.go).last?.type == NBDProtocol.Reply.ack)
        #expect(try c5.read(8 << 20, 512).data == Array(readData[..<512]))
        try c7.handshake()
        #expect(try c7.command(C.flush) == 0)

        #expect(pipelined.finish() == nil)
        #expect(backlogged.finish() == nil)
        for k in stride(from: 0, to: 96, by: 3) {
            #expect(disk.read(k * 16384, 16384) == pattern(16384, seed: 1000 + k))
        }
        #expect(b.requestStop() == .stopped)
        #expect(!socketFileExists(path))  // B owned the socket file, and removed it
        let statsB = b.server!.statistics
        #expect(statsB.connectionsAccepted == 1)  // c3, from the backlog
        #expect(statsB.protocolViolations == 0 && statsA.protocolViolations == 0)
        #expect(disk.violations.isEmpty)
        #expect(disk.reservedNow == 0)
        #expect(!logA.all.contains { $0.contains("closed:") }, "\(logA.all)")
    }

    /// A backend that never completes: the quiesce times out naming why, and the next run
    /// resumes; nothing was lost.
    @Test func quiesceTimeoutThenResume() throws {
        let disk = MemoryDisk(MemoryBackendOptions())
        let directory = TemporaryDirectory()
        let path = directory.path + "/nbd.sock"
        let log = ServerLog()
        let wake = eventFD()
        defer { Glibc.close(wake) }
        var conf = configuration(path: path, log: log, wake: wake)
        conf.quiesceTimeout = .milliseconds(300)
        let a = Hosted(try NBDServer(backend: MemoryBlockBackend(disk), configuration: conf), wake: wake)
        a.start()
        disk.hold.store(true, ordering: .relaxed)
        let c = try TestClient(unixPath: path)
        try c.handshake()
        try c.sendRequest(NBDRequest(type: C.read, cookie: 5, offset: 0, length: 4096))
        #expect(waitUntil { disk.inFlightNow == 1 })
        a.requestQuiesce()
        let late = try TestClient(unixPath: path)  // in the backlog
        guard case .quiesceFailed(let failure) = a.join() else {
            Issue.record("expected a failed quiesce, got \(String(describing: a.outcome))")
            return
        }
        #expect(failure.requestsInFlight == 1)
        #expect(failure.description.contains("1 requests in flight"), "\(failure)")
        #expect(a.server!.statistics.quiesceFailures == 1)
        #expect(a.server!.statistics.longestQuiesce >= .milliseconds(300))

        a.quiesce.store(false, ordering: .relaxed)
        a.start()
        disk.resume()
        #expect(try c.readReply() == (0, 5))
        _ = try c.receive(4096)
        try late.handshake()
        #expect(try late.write(0, pattern(512, seed: 1)) == 0)
        #expect(try c.read(0, 512).data == pattern(512, seed: 1))

        // A client that takes no replies keeps the quiesce from finishing too, and is named.
        let deaf = try TestClient(unixPath: path)
        try deaf.handshake()
        for k in 0..<4 { try deaf.sendRequest(NBDRequest(type: C.read, cookie: UInt64(k), offset: 0, length: 1 << 20)) }
        usleep(100_000)
        a.requestQuiesce()
        guard case .quiesceFailed(let stuck) = a.join() else {
            Issue.record("expected a failed quiesce, got \(String(describing: a.outcome))")
            return
        }
        #expect(stuck.connectionsNotTakingReplies == 1 && stuck.requestsInFlight == 0, "\(stuck)")
        #expect(stuck.description.contains("not taking them"), "\(stuck)")
        a.quiesce.store(false, ordering: .relaxed)
        a.start()
        for _ in 0..<4 {
            #expect(try deaf.readReply().error == 0)
            _ = try deaf.receive(1 << 20)
        }
        #expect(a.requestStop() == .stopped)
        #expect(disk.violations.isEmpty)
    }

    /// A successor whose backend cannot do what the clients were promised: the export size must
    /// match; lost capabilities are answered without the backend.
    @Test func adoptionChecksTheExportAndAnswersLostCapabilities() throws {
        let disk = MemoryDisk(MemoryBackendOptions())
        let directory = TemporaryDirectory()
        let path = directory.path + "/nbd.sock"
        let log = ServerLog()
        let wake = eventFD()
        defer { Glibc.close(wake) }
        let conf = configuration(path: path, log: log, wake: wake)
        let a = Hosted(try NBDServer(backend: MemoryBlockBackend(disk), configuration: conf), wake: wake)
        a.start()
        let c = try TestClient(unixPath: path)
        #expect(try c.handshake().flags.contains(.sendTrim))
        #expect(try c.write(0, pattern(4096, seed: 1)) == 0)
        a.requestQuiesce()
        #expect(a.join() == .quiesced)
        let state = a.server!.handoverState()

        // Another size: refused, and nothing taken.
        let smaller = MemoryDisk(MemoryBackendOptions(size: 4 << 20))
        let copy = try passOn(state)
        #expect {
            _ = try NBDServer(backend: MemoryBlockBackend(smaller), configuration: conf, adopting: copy)
        } throws: { "\($0)".contains("told the export has 8388608 bytes") }
        for fd in copy.descriptors { #expect(fcntl(fd, F_GETFD) >= 0); Glibc.close(fd) }

        // Same size, no trim, no write zeroes.
        let poorer = MemoryDisk(MemoryBackendOptions(canTrim: false, canWriteZeroes: false))
        let forB = try passOn(state)
        a.server.take()!.release()
        let b = Hosted(try NBDServer(backend: MemoryBlockBackend(poorer), configuration: conf, adopting: forB),
                       wake: wake)
        b.start()
        #expect(try c.command(C.trim, 0, 4096) == 0)           // a hint: ignored
        #expect(try c.command(C.writeZeroes, 0, 4096) == E.enotsup)
        #expect(try c.write(0, pattern(4096, seed: 2)) == 0)
        #expect(try c.command(C.flush) == 0)
        let fresh = try TestClient(unixPath: path)
        #expect(try !fresh.handshake().flags.contains(.sendTrim))  // new clients get this backend's flags
        #expect(try fresh.command(C.trim, 0, 4096) == E.einval)

        // And on to a read-only backend without flush (a second hand-over, of both kinds of client).
        b.requestQuiesce()
        #expect(b.join() == .quiesced)
        let second = b.server!.handoverState()
        #expect(second.clients.count == 2)
        let forD = try passOn(second)
        b.server.take()!.release()
        let readOnly = MemoryDisk(MemoryBackendOptions(readOnly: true, canFlush: false))
        let d = Hosted(try NBDServer(backend: MemoryBlockBackend(readOnly), configuration: conf, adopting: forD),
                       wake: wake)
        d.start()
        #expect(try c.write(0, pattern(4096, seed: 3)) == E.eperm)
        #expect(try c.command(C.trim, 0, 4096) == E.eperm)
        #expect(try c.command(C.flush) == E.eio)
        #expect(try c.read(0, 512).error == 0)
        #expect(try fresh.write(0, pattern(512, seed: 3), flags: .fua) == E.eperm)
        #expect(d.requestStop() == .stopped)
        #expect(readOnly.violations.isEmpty && poorer.violations.isEmpty && disk.violations.isEmpty)
    }

    // MARK: the encoded state

    static let sample = NBDHandoverState(
        exportSize: 8 << 20, minimumBlockSize: 512, preferredBlockSize: 4096, maximumPayload: 1 << 20,
        unixListener: .init(fd: 3, path: "/run/nbd.sock"), tcpListener: .init(fd: 4, port: 10809),
        clients: [
            .init(fd: 5, isTCP: false, phase: .transmission, clientFlags: 3, promisedFlags: 0x16d, pendingInput: [1, 2, 3],
                  slot: 4, generation: 9, inFlight: [
                      .init(slot: 7, flushing: false, operation: .writeFUA, flushAfter: false, command: NBDProtocol.Command.write,
                            cookie: 0xC0FFEE, offset: 4096, length: 8192, buffer: BackendBuffer(first: 2, count: 1, length: 8192)),
                      .init(slot: 0, flushing: true, operation: .trim, flushAfter: true, command: NBDProtocol.Command.trim,
                            cookie: 1, offset: 0, length: 512, buffer: BackendBuffer(first: 3, count: 1, length: 0)),
                  ]),
            .init(fd: 6, isTCP: true, phase: .negotiating, clientFlags: 1, promisedFlags: 0, pendingInput: [], slot: 0),
            .init(fd: 7, isTCP: false, phase: .awaitingClientFlags, clientFlags: 0, promisedFlags: 0, pendingInput: [9], slot: 1),
        ])

    /// Offsets in `sample.encoded()` (little-endian): the header (magic 4, version 2, length 4),
    /// the export and the descriptor count (24), the UNIX listener, the first client's record.
    static let header = 10
    static let unixListener = header + 24
    static var firstClient: Int { unixListener + 1 + 4 + 2 + "/run/nbd.sock".utf8.count + 1 + 4 + 2 + 4 }

    static func decode(_ bytes: [UInt8], _ fds: [Int32] = [3, 4, 5, 6, 7]) throws(NBDHandoverError) -> NBDHandoverState {
        try NBDHandoverState(decoding: bytes, descriptors: fds)
    }

    static func patched(_ offset: Int, _ values: [UInt8]) -> [UInt8] {
        var b = sample.encoded()
        for (k, v) in values.enumerated() { b[offset + k] = v }
        return b
    }

    @Test func encodedStateRoundTrips() throws {
        let bytes = Self.sample.encoded()
        #expect(try Self.decode(bytes) == Self.sample)
        #expect(Self.sample.descriptors == [3, 4, 5, 6, 7])
        // Received under other numbers: taken by position.
        let moved = try Self.decode(bytes, [20, 21, 22, 23, 24])
        #expect(moved.descriptors == [20, 21, 22, 23, 24])
        #expect(moved.clients.map(\.pendingInput) == Self.sample.clients.map(\.pendingInput))
    }

    @Test func encodedStateRefusesBadInput() throws {
        let bytes = Self.sample.encoded()
        // Every truncation.
        for n in 0..<bytes.count {
            #expect(throws: NBDHandoverError.self) { try Self.decode(Array(bytes[..<n])) }
        }
        // Trailing bytes (with the length patched to match, and without).
        var longer = bytes + [0]
        #expect(throws: NBDHandoverError.lengthMismatch(declared: bytes.count - Self.header, actual: bytes.count + 1 - Self.header)) {
            try Self.decode(longer)
        }
        longer[6] &+= 1  // the length's low byte
        #expect(throws: NBDHandoverError.trailingBytes(1)) { try Self.decode(longer) }
        #expect(throws: NBDHandoverError.badMagic(Array("NBDI".utf8))) { try Self.decode(Self.patched(3, [0x49])) }
        #expect(throws: NBDHandoverError.unsupportedVersion(4)) { try Self.decode(Self.patched(4, [4])) }
        // Version 1's header (big-endian, u32 version) is named as such.
        #expect(throws: NBDHandoverError.unsupportedVersion(1)) { try Self.decode(Self.patched(4, [0, 0, 0, 1])) }
        #expect("\(NBDHandoverError.unsupportedVersion(1))".contains("version 1 (big-endian"))
        // Descriptors: too few or too many received; an index out of range or used twice.
        #expect(throws: NBDHandoverError.self) { try Self.decode(bytes, [3, 4, 5, 6]) }
        #expect(throws: NBDHandoverError.self) { try Self.decode(bytes, [3, 4, 5, 6, 7, 8]) }
        let c = Self.firstClient
        #expect(throws: NBDHandoverError.badField("client 0 fd index", "index 9 of 5 descriptors")) {
            try Self.decode(Self.patched(c, [9]))
        }
        #expect(throws: NBDHandoverError.badField("client 0 fd index", "descriptor 0 used twice")) {
            try Self.decode(Self.patched(c, [0]))
        }
        // Fields out of range.
        #expect(throws: NBDHandoverError.badField("client 0 isTCP", "2 (0 or 1)")) { try Self.decode(Self.patched(c + 4, [2])) }
        #expect(throws: NBDHandoverError.badField("client 0 phase", "3 (0...2)")) { try Self.decode(Self.patched(c + 5, [3])) }
        #expect(throws: NBDHandoverError.self) { try Self.decode(Self.patched(c + 6, [0x13])) }       // unknown client flag
        #expect(throws: NBDHandoverError.self) { try Self.decode(Self.patched(c + 10, [0x6c, 0x01])) } // no HAS_FLAGS
        #expect(throws: NBDHandoverError.self) { try Self.decode(Self.patched(c + 10, [0x01, 0x80])) } // unknown flag
        #expect(throws: NBDHandoverError.self) { try Self.decode(Self.patched(c - 4, [0xff, 0xff, 0xff, 0xff])) } // client count
        let u = Self.unixListener
        #expect(throws: NBDHandoverError.badField("UNIX listener present", "2 (0 or 1)")) { try Self.decode(Self.patched(u, [2])) }
        #expect(throws: NBDHandoverError.badField("UNIX socket path length", "0 (1...107)")) {
            try Self.decode(Self.patched(u + 5, [0, 0]))
        }
        #expect(throws: NBDHandoverError.badField("UNIX socket path", "not UTF-8 without NUL")) {
            try Self.decode(Self.patched(u + 7, [0]))
        }
        #expect(throws: NBDHandoverError.self) { try Self.decode(Self.patched(Self.header + 16, [0, 3, 0, 0])) } // maximum payload < preferred
        // The codec's errors still name the field: the last client's pending input cut short, with
        // the length patched to match so that the decoder gets there.
        var cut = Array(bytes.dropLast())
        cut.replaceSubrange(6..<10, with: [UInt8(cut.count - Self.header), 0, 0, 0])
        #expect(throws: NBDHandoverError.truncated("client 2 requests in flight")) { try Self.decode(cut) }
        // Pending input above the input buffer.
        var big = Self.sample
        big.clients[0].pendingInput = [UInt8](repeating: 0, count: NBDHandoverState.maximumPendingInput + 1)
        #expect(big.problem() != nil)
        #expect(throws: NBDHandoverError.self) { try Self.decode(big.encoded()) }
        var most = Self.sample
        most.clients[0].pendingInput = [UInt8](repeating: 7, count: NBDHandoverState.maximumPendingInput)
        #expect(try Self.decode(most.encoded()) == most)
        // Clients without a listener, or a descriptor twice, is no state to serve; no listener and
        // no client is a server that only serves its companion (a ublk device).
        var none = Self.sample
        none.unixListener = nil
        none.tcpListener = nil
        #expect(throws: NBDHandoverError.invalid("clients but no listening socket")) { try Self.decode(none.encoded(), [5, 6, 7]) }
        none.clients = []
        #expect(try Self.decode(none.encoded(), []) == none)
        #expect(throws: NBDHandoverError.self) { try Self.decode(bytes, [3, 4, 5, 6, 3]) }
    }

    @Test func requestsInFlightAreCheckedAgainstTheirCommandAndConnection() throws {
        func refused(_ change: (inout NBDHandoverState) -> Void) -> Bool {
            var state = Self.sample
            change(&state)
            guard state.problem() != nil else { return false }
            do { _ = try Self.decode(state.encoded()); return false } catch { return true }
        }
        #expect(refused { $0.clients[0].inFlight[0].operation = .read })             // a WRITE submitted as a read
        #expect(refused { $0.clients[0].inFlight[0].buffer = BackendBuffer(first: 2, count: 1, length: 4096) })           // data past its buffer
        #expect(refused { $0.clients[0].inFlight[1].buffer = BackendBuffer(first: 3, count: 1, length: 512) })            // a TRIM with data
        #expect(refused { $0.clients[0].inFlight[1].flushAfter = false })             // a flush phase without FUA
        #expect(refused { $0.clients[0].inFlight[1].slot = 7 })                       // one request slot twice
        #expect(refused { $0.clients[0].inFlight[0].command = 99 })                   // a command never submitted
        #expect(refused { $0.clients[2].slot = 4 })                                   // two connections in one slot
        #expect(refused { $0.clients[1].inFlight = Self.sample.clients[0].inFlight }) // in flight while negotiating
        // The tag the first server gave the backend: generation, server slot, request slot.
        let c = Self.sample.clients[0]
        #expect(c.tag(of: c.inFlight[0]) == 9 << 40 | 4 << 20 | 7)
    }

    /// A version 2 state (builds before requests were carried) is read as connections in the
    /// order given, in server slots 0, 1, ..., nothing in flight.
    @Test func aVersion2StateIsReadWithNothingInFlight() throws {
        let one = NBDHandoverState(exportSize: 8 << 20, minimumBlockSize: 512, preferredBlockSize: 4096, maximumPayload: 1 << 20,
                                   unixListener: .init(fd: 3, path: "/run/nbd.sock"),
                                   clients: [.init(fd: 5, isTCP: false, phase: .transmission, clientFlags: 3, promisedFlags: 0x16d,
                                                   pendingInput: [1, 2, 3], slot: 0)])
        // Version 3 without the last client's slot, generation and request count (12 bytes).
        var v2 = Array(one.encoded().dropLast(12))
        v2[4] = 2
        v2.replaceSubrange(6..<10, with: [UInt8(v2.count - Self.header), 0, 0, 0])
        let decoded = try NBDHandoverState(decoding: v2, descriptors: [3, 5])
        #expect(decoded.clients.count == 1)
        #expect(decoded.clients[0].slot == 0 && decoded.clients[0].inFlight.isEmpty)
        #expect(decoded.clients[0].pendingInput == [1, 2, 3])
    }
}
