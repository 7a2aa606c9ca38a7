import Glibc
import Testing
@testable import NBD
import Syscalls
import Synchronization

/// The server on a temporary UNIX socket, its loop on its own thread, driven by `TestClient`.
@Suite("NBD server")
struct ServerTests {
    typealias O = NBDProtocol.Option
    typealias R = NBDProtocol.Reply
    typealias C = NBDProtocol.Command
    typealias E = NBDProtocol.Error

    // MARK: handshake

    @Test func optionHaggling() throws {
        let server = try RunningServer { $0.exportName = "disk0"; $0.exportDescription = "memory" }
        let c = try server.connect()
        #expect(try c.readGreeting() == 3)  // FIXED_NEWSTYLE | NO_ZEROES
        try c.sendClientFlags(3)

        try c.sendOption(O.list)
        let list = [try c.readOptionReply(), try c.readOptionReply()]
        #expect(list.map(\.type) == [R.server, R.ack])
        #expect(list[0].data == be32(5) + Array("disk0memory".utf8))

        let info = try c.info(O.info, name: "disk0", infos: [NBDProtocol.Info.name, NBDProtocol.Info.description])
        #expect(info.map(\.type) == [R.info, R.info, R.info, R.info, R.ack])
        #expect(info[0].data == be16(0) + be64(8 << 20) + be16(0x0000_016d))  // HAS_FLAGS FLUSH FUA TRIM ZEROES MULTI_CONN
        #expect(info[1].data == be16(3) + be32(512) + be32(4096) + be32(1 << 20))
        #expect(info[2].data == be16(1) + Array("disk0".utf8))
        #expect(info[3].data == be16(2) + Array("memory".utf8))

        #expect(try c.info(O.info, name: "disk1").map(\.type) == [R.errUnknown])
        #expect(try c.info(O.go, name: "disk1").map(\.type) == [R.errUnknown])
        try c.sendOption(O.structuredReply)
        #expect(try c.readOptionReply().type == R.errUnsup)
        try c.sendOption(O.startTLS)
        #expect(try c.readOptionReply().type == R.errUnsup)
        try c.sendOption(4242, [1, 2, 3, 4])
        #expect(try c.readOptionReply().type == R.errUnsup)
        // An unknown option with more data than the server keeps is still skipped correctly.
        try c.sendOption(4243, [UInt8](repeating: 7, count: 100_000))
        #expect(try c.readOptionReply().type == R.errUnsup)
        try c.sendOption(O.go, [UInt8](repeating: 0, count: 20_000))
        #expect(try c.readOptionReply().type == R.errTooBig)
        try c.sendOption(O.go, [0, 0])
        #expect(try c.readOptionReply().type == R.errInvalid)

        let go = try c.info(O.go, name: "")  // the default export
        #expect(go.last?.type == R.ack)
        #expect(try c.read(0, 4096).error == 0)
        try c.disconnect()
        #expect(c.serverCloses())
        let stats = server.stop()
        #expect(stats.connectionsAccepted == 1 && stats.connectionsClosed == 1 && stats.protocolViolations == 0)
        #expect(server.disk.violations.isEmpty)
    }

    @Test func exportNameWithAndWithoutZeroes() throws {
        let server = try RunningServer()
        for noZeroes in [false, true] {
            let c = try server.connect()
            _ = try c.readGreeting()
            try c.sendClientFlags(noZeroes ? 3 : 1)
            try c.sendOption(O.exportName)
            let reply = try c.receive(noZeroes ? 10 : 134)
            #expect(Array(reply[0..<8]) == be64(8 << 20))
            if !noZeroes { #expect(reply[10...].allSatisfy { $0 == 0 }) }
            #expect(try c.write(0, pattern(512, seed: 1)) == 0)
            #expect(try c.read(0, 512).data == pattern(512, seed: 1))
        }
        // A client without FIXED_NEWSTYLE (plain newstyle) is served too.
        let old = try server.connect()
        _ = try old.readGreeting()
        try old.sendClientFlags(0)
        try old.sendOption(O.exportName)
        _ = try old.receive(134)
        #expect(try old.read(0, 512).error == 0)
    }

    @Test func exportNameForAnUnknownExportHangsUp() throws {
        let server = try RunningServer { $0.exportName = "disk0" }
        let c = try server.connect()
        _ = try c.readGreeting()
        try c.sendClientFlags(3)
        try c.sendOption(O.exportName, Array("nope".utf8))
        #expect(c.serverCloses())
        let ok = try server.connect()
        try ok.handshake(name: "disk0")
    }

    @Test func abortIsAcknowledgedThenClosed() throws {
        let server = try RunningServer()
        let c = try server.connect()
        _ = try c.readGreeting()
        try c.sendClientFlags(3)
        try c.sendOption(O.abort)
        #expect(try c.readOptionReply().type == R.ack)
        #expect(c.serverCloses())
        #expect(waitUntil { server.stop().connectionsClosed == 1 })
    }

    @Test func garbageDuringHagglingEndsOnlyThatConnection() throws {
        let server = try RunningServer()
        let good = try server.connect()
        _ = try good.readGreeting()
        try good.sendClientFlags(3)

        let badFlags = try server.connect()
        _ = try badFlags.readGreeting()
        try badFlags.sendClientFlags(0x10)
        #expect(badFlags.serverCloses())

        let badMagic = try server.connect()
        _ = try badMagic.readGreeting()
        try badMagic.sendClientFlags(3)
        try badMagic.send(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        #expect(badMagic.serverCloses())

        let huge = try server.connect()
        _ = try huge.readGreeting()
        try huge.sendClientFlags(3)
        try huge.send(be64(NBDProtocol.optionMagic) + be32(O.go) + be32(0xffff_fff0))
        #expect(huge.serverCloses())

        let early = try server.connect()
        _ = try early.readGreeting()
        try early.send([0, 0])  // half the client flags, then gone
        early.close()

        try good.sendOption(O.list)
        #expect(try good.readOptionReply().type == R.server)
        #expect(try good.readOptionReply().type == R.ack)
        _ = try good.info(O.go)
        #expect(try good.read(0, 512).error == 0)
        let stats = server.stop()
        #expect(stats.protocolViolations == 3)
    }

    // MARK: commands

    @Test func readWriteFlushTrimWriteZeroes() throws {
        let server = try RunningServer()
        let c = try server.connect()
        let export = try c.handshake()
        #expect(export.size == 8 << 20)
        #expect(export.flags == [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn])

        let data = pattern(256 << 10, seed: 7)
        #expect(try c.write(1 << 20, data) == 0)
        #expect(try c.read(1 << 20, data.count).data == data)
        #expect(server.disk.read(1 << 20, data.count) == data)
        #expect(try c.command(C.flush) == 0)
        #expect(try c.command(C.trim, 1 << 20, 64 << 10) == 0)
        #expect(try c.read(1 << 20, 64 << 10).data == [UInt8](repeating: 0, count: 64 << 10))
        #expect(try c.command(C.writeZeroes, (1 << 20) + (64 << 10), 64 << 10, flags: .noHole) == 0)
        #expect(try c.read((1 << 20) + (64 << 10), 128 << 10).data
                == [UInt8](repeating: 0, count: 64 << 10) + Array(data[(128 << 10)..<(192 << 10)]))
        // Trim and write-zeroes longer than the maximum payload are fine (no payload).
        #expect(try c.command(C.writeZeroes, 0, 4 << 20) == 0)
        // Zero-length requests succeed.
        #expect(try c.read(4096, 0).error == 0)
        #expect(try c.write(4096, []) == 0)
        #expect(try c.command(C.trim, 4096, 0) == 0)
        try c.disconnect()
        #expect(c.serverCloses())
        let stats = server.stop()
        #expect(stats.reads == 4 && stats.writes == 2 && stats.flushes == 1 && stats.trims == 2 && stats.writeZeroes == 2)
        #expect(stats.bytesWritten == UInt64(data.count) && stats.errorReplies == 0)
        #expect(server.disk.violations.isEmpty)
        #expect(server.disk.reservedNow == 0)
    }

    @Test func flushAndFUAMakeRepliedWritesDurable() throws {
        let server = try RunningServer()
        let c = try server.connect()
        try c.handshake()
        let a = pattern(8192, seed: 1), b = pattern(8192, seed: 2)
        #expect(try c.write(0, a) == 0)
        #expect(server.disk.readDurable(0, 8192) != a)  // replied, not yet flushed
        #expect(try c.command(C.flush) == 0)
        #expect(server.disk.readDurable(0, 8192) == a)
        #expect(try c.write(65536, b, flags: .fua) == 0)
        #expect(server.disk.readDurable(65536, 8192) == b)  // FUA: durable at the reply
        #expect(try c.command(C.writeZeroes, 0, 4096, flags: .fua) == 0)
        #expect(server.disk.readDurable(0, 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try c.command(C.trim, 65536, 4096, flags: .fua) == 0)
        #expect(try c.command(C.flush, flags: .fua) == 0)  // FUA on flush is accepted
        server.stop()
        #expect(server.disk.operations == [.write, .flush, .writeFUA, .writeZeroes, .flush, .trim, .flush, .flush])
    }

    @Test func badRequestsAreAnsweredAndTheStreamStaysInStep() throws {
        let server = try RunningServer(MemoryBackendOptions(maxPayload: 64 << 10))
        let c = try server.connect()
        try c.handshake()
        let end: UInt64 = 8 << 20
        #expect(try c.read(end, 512).error == E.einval)
        #expect(try c.read(end - 512, 1024).error == E.einval)
        #expect(try c.write(end - 512, pattern(1024, seed: 3)) == E.enospc)      // payload consumed
        #expect(try c.command(C.trim, end, 512) == E.einval)
        #expect(try c.command(C.writeZeroes, end - 512, 1024) == E.enospc)
        #expect(try c.read(100, 512).error == E.einval)                          // unaligned
        #expect(try c.write(0, pattern(1000, seed: 4)) == E.einval)
        #expect(try c.read(0, 128 << 10).error == E.einval)                      // above the maximum payload
        #expect(try c.write(0, pattern(128 << 10, seed: 5)) == E.einval)         // ... its payload dropped
        #expect(try c.command(C.cache, 0, 4096) == E.einval)
        #expect(try c.command(C.blockStatus, 0, 4096) == E.einval)
        #expect(try c.command(99, 0, 4096) == E.einval)
        #expect(try c.command(C.read, 0, 4096, flags: .dontFragment) == E.einval)
        #expect(try c.write(0, pattern(512, seed: 6), flags: NBDProtocol.CommandFlags(rawValue: 0x100)) == E.einval)
        #expect(try c.command(C.writeZeroes, 0, 512, flags: .fastZero) == E.einval)
        // Still in step: the data written before and after is right.
        #expect(try c.write(512, pattern(512, seed: 8)) == 0)
        #expect(try c.read(0, 1024).data == [UInt8](repeating: 0, count: 512) + pattern(512, seed: 8))
        server.stop()
        #expect(server.disk.violations.isEmpty)
        #expect(server.disk.operations == [.write, .read])
    }

    @Test func protocolViolationsEndOnlyThatConnection() throws {
        let server = try RunningServer()
        let good = try server.connect()
        try good.handshake()
        #expect(try good.write(0, pattern(4096, seed: 1)) == 0)

        let badMagic = try server.connect()
        try badMagic.handshake()
        var header = [UInt8](repeating: 0, count: 28)
        header.withUnsafeMutableBytes { NBDRequest(type: C.read, cookie: 1, length: 512).write(into: $0.baseAddress!) }
        header[0] ^= 0xff
        try badMagic.send(header)
        #expect(badMagic.serverCloses())

        let tooBig = try server.connect()
        try tooBig.handshake()
        try tooBig.sendRequest(NBDRequest(type: C.write, cookie: 1, length: (1 << 25) + 512))
        #expect(tooBig.serverCloses())

        #expect(try good.read(0, 4096).data == pattern(4096, seed: 1))
        let stats = server.stop()
        #expect(stats.protocolViolations == 2)
        #expect(server.disk.reservedNow == 0)
    }

    @Test func readOnlyExport() throws {
        let server = try RunningServer(MemoryBackendOptions(readOnly: true))
        server.disk.fill(0, pattern(4096, seed: 9))
        let c = try server.connect()
        let export = try c.handshake()
        #expect(export.flags == [.hasFlags, .readOnly, .sendFlush, .sendFUA, .canMultiConn])
        #expect(try c.write(0, pattern(4096, seed: 1)) == E.eperm)
        #expect(try c.write(0, pattern(4096, seed: 1), flags: .fua) == E.eperm)
        #expect(try c.command(C.trim, 0, 4096) == E.eperm)
        #expect(try c.command(C.writeZeroes, 0, 4096) == E.eperm)
        #expect(try c.read(0, 4096).data == pattern(4096, seed: 9))
        #expect(try c.command(C.flush) == 0)
        server.stop()
        #expect(server.disk.violations.isEmpty)
        #expect(server.disk.operations == [.read, .flush])
    }

    @Test func backendWithoutFlushTrimOrZeroes() throws {
        let server = try RunningServer(MemoryBackendOptions(canFlush: false, canTrim: false, canWriteZeroes: false)) {
            $0.multiConnection = false
        }
        let c = try server.connect()
        #expect(try c.handshake().flags == [.hasFlags])
        #expect(try c.command(C.flush) == E.einval)
        #expect(try c.write(0, pattern(512, seed: 1), flags: .fua) == E.einval)
        #expect(try c.command(C.trim, 0, 512) == E.einval)
        #expect(try c.command(C.writeZeroes, 0, 512) == E.einval)
        #expect(try c.write(0, pattern(512, seed: 1)) == 0)
    }

    // MARK: concurrency

    /// Four clients at once, each with up to 48 requests in flight against a backend that completes
    /// out of order and has room for fewer buffers than requested (backpressure).
    @Test(arguments: [true, false])
    func parallelClientsWithManyRequestsInFlight(_ eventFD: Bool) throws {
        let options = MemoryBackendOptions(size: 16 << 20, maxPayload: 256 << 10, slotSize: 16 << 10, slots: 96,
                                           eventFD: eventFD, delay: 2, shuffle: true, seed: 7)
        let server = try RunningServer(options)
        let clients = 4, block = 16 << 10, blocks = 48
        let failures = Mutex<[String]>([])
        let threads = (0..<clients).map { k in
            TestThread {
                do {
                    let c = try server.connect()
                    try c.handshake()
                    let base = UInt64(k * blocks * block)
                    let data = (0..<blocks).map { pattern(block * (1 + $0 % 3) / 3 / 512 * 512, seed: k * 1000 + $0) }
                    func offset(_ b: Int) -> UInt64 { base + UInt64(b * block) }
                    // Even blocks written; then odd blocks written while even ones are read; then all read.
                    var plan: [Planned] = []
                    for b in stride(from: 0, to: blocks, by: 2) {
                        plan.append(Planned(request: NBDRequest(flags: b % 4 == 0 ? .fua : [], type: C.write, cookie: UInt64(plan.count),
                                                                offset: offset(b), length: UInt32(data[b].count)), payload: data[b]))
                    }
                    _ = try pipeline(c, plan, window: 48)
                    plan = []
                    for b in 0..<blocks {
                        if b % 2 == 0 {
                            plan.append(Planned(request: NBDRequest(type: C.read, cookie: UInt64(plan.count), offset: offset(b),
                                                                    length: UInt32(data[b].count)), expected: data[b]))
                        } else {
                            plan.append(Planned(request: NBDRequest(type: C.write, cookie: UInt64(plan.count), offset: offset(b),
                                                                    length: UInt32(data[b].count)), payload: data[b]))
                        }
                    }
                    plan.append(Planned(request: NBDRequest(type: C.flush, cookie: UInt64(plan.count))))
                    let order = try pipeline(c, plan, window: 48)
                    if order == Array(0..<plan.count) { failures.withLock { $0.append("client \(k): replies all in order") } }
                    plan = (0..<blocks).map {
                        Planned(request: NBDRequest(type: C.read, cookie: UInt64($0), offset: offset($0), length: UInt32(data[$0].count)),
                                expected: data[$0])
                    }
                    _ = try pipeline(c, plan, window: 48)
                    try c.disconnect()
                    if !c.serverCloses() { failures.withLock { $0.append("client \(k): not closed after DISC") } }
                } catch {
                    failures.withLock { $0.append("client \(k): \(error)") }
                }
            }
        }
        threads.forEach { $0.join() }
        let stats = server.stop()
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(server.disk.violations.isEmpty, "\(server.disk.violations)")
        #expect(server.disk.reservedNow == 0)
        #expect(server.disk.maxInFlight > 8)
        #expect(stats.connectionsAccepted == clients && stats.connectionsClosed == clients)
        #expect(stats.reads == clients * blocks * 3 / 2 && stats.writes == clients * blocks && stats.errorReplies == 0)
    }

    /// Requests sent together come back out of order, each with its own cookie and data.
    @Test func outOfOrderCompletionsKeepTheirCookies() throws {
        let server = try RunningServer(MemoryBackendOptions(delay: 1, shuffle: true, seed: 3))
        for b in 0..<32 { server.disk.fill(b * 4096, pattern(4096, seed: b)) }
        let c = try server.connect()
        try c.handshake()
        server.disk.hold.store(true, ordering: .relaxed)
        for b in 0..<32 {
            try c.sendRequest(NBDRequest(type: C.read, cookie: UInt64(1000 + b), offset: UInt64(b * 4096), length: 4096))
        }
        #expect(waitUntil { server.disk.inFlightNow == 32 })
        server.disk.resume()
        var order: [Int] = []
        for _ in 0..<32 {
            let reply = try c.readReply()
            let b = Int(reply.cookie) - 1000
            #expect(reply.error == 0 && (0..<32).contains(b))
            #expect(try c.receive(4096) == pattern(4096, seed: b))
            order.append(b)
        }
        #expect(Set(order).count == 32)
        #expect(order != Array(0..<32))
    }

    /// Only `slots` buffers: requests wait for room, none is lost.
    @Test func backpressureWhenTheBackendIsFull() throws {
        let server = try RunningServer(MemoryBackendOptions(maxPayload: 64 << 10, slotSize: 64 << 10, slots: 2))
        let c = try server.connect()
        try c.handshake()
        let plan = (0..<64).map { i in
            Planned(request: NBDRequest(type: C.write, cookie: UInt64(i), offset: UInt64(i * (64 << 10)), length: 64 << 10),
                    payload: pattern(64 << 10, seed: i))
        }
        _ = try pipeline(c, plan, window: 64)
        let reads = (0..<64).map { i in
            Planned(request: NBDRequest(type: C.read, cookie: UInt64(i), offset: UInt64(i * (64 << 10)), length: 64 << 10),
                    expected: pattern(64 << 10, seed: i))
        }
        _ = try pipeline(c, reads, window: 64)
        server.stop()
        #expect(server.disk.maxInFlight <= 2)
        #expect(server.disk.violations.isEmpty)
    }

    // MARK: clients going away

    @Test func clientVanishingMidRequestLeavesOthersServed() throws {
        let server = try RunningServer()
        let other = try server.connect()
        try other.handshake()

        // Gone in the middle of a WRITE payload (its buffer was reserved).
        let a = try server.connect()
        try a.handshake()
        try a.sendRequest(NBDRequest(type: C.write, cookie: 1, offset: 0, length: 65536), payload: pattern(30000, seed: 1))
        #expect(waitUntil { server.disk.reservedNow == 1 })
        a.close()

        // Gone with requests in the backend (completions held back until it is gone).
        server.disk.hold.store(true, ordering: .relaxed)
        let b = try server.connect()
        try b.handshake()
        for i in 0..<8 {
            try b.sendRequest(NBDRequest(type: i % 2 == 0 ? C.read : C.write, cookie: UInt64(i), offset: UInt64(i * 4096), length: 4096),
                              payload: i % 2 == 0 ? [] : pattern(4096, seed: i))
        }
        #expect(waitUntil { server.disk.inFlightNow == 8 })
        b.close()
        // Gone in the middle of a request header.
        let d = try server.connect()
        try d.handshake()
        try d.send([0x25, 0x60])
        d.close()
        #expect(waitUntil { server.closedSoFar == 3 })
        server.disk.resume()

        #expect(try other.write(1 << 20, pattern(4096, seed: 5)) == 0)
        #expect(try other.read(1 << 20, 4096).data == pattern(4096, seed: 5))
        #expect(waitUntil { server.disk.reservedNow == 0 })
        #expect(server.disk.inFlightNow == 0)
        // The writes of the vanished client were carried out (they were in the backend).
        #expect(server.disk.read(4096, 4096) == pattern(4096, seed: 1))
        server.stop()
        #expect(server.disk.violations.isEmpty, "\(server.disk.violations)")
        #expect(server.disk.reservations == server.disk.releases)
    }

    /// NBD_CMD_DISC right behind writes: they are finished and answered before the close.
    @Test func disconnectFinishesRequestsInFlight() throws {
        let server = try RunningServer()
        let c = try server.connect()
        try c.handshake()
        server.disk.hold.store(true, ordering: .relaxed)
        for i in 0..<4 {
            try c.sendRequest(NBDRequest(type: C.write, cookie: UInt64(i), offset: UInt64(i * 4096), length: 4096),
                              payload: pattern(4096, seed: 20 + i))
        }
        try c.disconnect()
        #expect(waitUntil { server.disk.inFlightNow == 4 })
        server.disk.resume()
        var cookies = Set<UInt64>()
        for _ in 0..<4 {
            let reply = try c.readReply()
            #expect(reply.error == 0)
            cookies.insert(reply.cookie)
        }
        #expect(cookies == [0, 1, 2, 3])
        #expect(c.serverCloses())
        for i in 0..<4 { #expect(server.disk.read(i * 4096, 4096) == pattern(4096, seed: 20 + i)) }
    }

    @Test func stopFinishesRequestsInFlightAndRemovesTheSocket() throws {
        let server = try RunningServer()
        let c = try server.connect()
        try c.handshake()
        let idle = try server.connect()
        try idle.handshake()
        let negotiating = try server.connect()
        _ = try negotiating.readGreeting()
        server.disk.hold.store(true, ordering: .relaxed)
        for i in 0..<4 {
            try c.sendRequest(NBDRequest(type: C.read, cookie: UInt64(i), offset: UInt64(i * 4096), length: 4096))
        }
        #expect(waitUntil { server.disk.inFlightNow == 4 })
        let stopping = TestThread { server.stop() }
        // Stopping: the socket is gone, idle and negotiating connections are closed, requests
        // arriving now are answered ESHUTDOWN (a WRITE's payload still read), those in flight finish.
        #expect(waitUntil { access(server.socketPath, F_OK) != 0 })
        #expect(idle.serverCloses())
        #expect(negotiating.serverCloses())
        #expect(try c.write(0, pattern(4096, seed: 1), cookie: 10) == E.eshutdown)
        #expect(try c.read(0, 4096, cookie: 11).error == E.eshutdown)
        server.disk.resume()
        stopping.join()
        var cookies = Set<UInt64>()
        for _ in 0..<4 {
            let reply = try c.readReply()
            #expect(reply.error == 0)
            _ = try c.receive(4096)
            cookies.insert(reply.cookie)
        }
        #expect(cookies == [0, 1, 2, 3])
        #expect(c.serverCloses())
        let stats = server.stop()
        #expect(stats.abandonedRequests == 0 && stats.reads == 5 && stats.writes == 1)
        #expect(server.disk.reservedNow == 0)
        #expect(server.disk.operations == [.read, .read, .read, .read])
    }

    // MARK: backend failures

    @Test func backendErrorsBecomeReplies() throws {
        let server = try RunningServer()
        server.disk.fill(0, pattern(8192, seed: 1))
        server.disk.inject(.read, at: 4096, errno: EIO)
        server.disk.inject(.write, at: 8192, errno: ENOSPC)
        server.disk.inject(.flush, at: 0, errno: EIO)
        server.disk.inject(.writeZeroes, at: 0, errno: ENOTSUP)
        let c = try server.connect()
        try c.handshake()
        #expect(try c.read(4096, 4096).error == E.eio)  // no data follows an error
        #expect(try c.read(0, 4096).data == pattern(4096, seed: 1))
        #expect(try c.write(8192, pattern(4096, seed: 2)) == E.enospc)
        #expect(try c.command(C.flush) == E.eio)
        #expect(try c.command(C.writeZeroes, 0, 4096) == E.enotsup)
        // A failed write-zeroes with FUA is answered without the flush.
        #expect(try c.command(C.writeZeroes, 0, 4096, flags: .fua) == E.enotsup)
        server.disk.failSubmit.store(true, ordering: .relaxed)
        #expect(try c.read(0, 4096).error == E.eio)
        #expect(try c.write(0, pattern(4096, seed: 3)) == E.eio)
        server.disk.failSubmit.store(false, ordering: .relaxed)
        #expect(try c.read(0, 4096).data == pattern(4096, seed: 1))
        let stats = server.stop()
        #expect(stats.submitFailures == 2)
        #expect(server.disk.reservedNow == 0)
        #expect(server.disk.violations.isEmpty)
    }

    @Test func aBrokenBackendAnswersEverythingEIO() throws {
        let server = try RunningServer()
        let c = try server.connect()
        try c.handshake()
        server.disk.hold.store(true, ordering: .relaxed)
        try c.sendRequest(NBDRequest(type: C.read, cookie: 1, offset: 0, length: 4096))
        #expect(waitUntil { server.disk.inFlightNow == 1 })
        server.disk.failPoll.store(true, ordering: .relaxed)
        server.disk.signal()
        let reply = try c.readReply()
        #expect(reply.cookie == 1 && reply.error == E.eio)
        #expect(try c.write(0, pattern(4096, seed: 1)) == E.eio)
        #expect(try c.command(C.flush) == E.eio)
        #expect(try c.read(0, 512).error == E.eio)
        server.stop()
    }

    // MARK: sockets and limits

    @Test func socketPathIsFreshPrivateAndNeverReplacesOtherFiles() throws {
        let dir = TemporaryDirectory()
        let path = dir.path + "/s"
        // A regular file is refused and left alone.
        let f = open(path, O_CREAT | O_WRONLY, 0o644)
        Glibc.close(f)
        let disk = MemoryDisk(MemoryBackendOptions())
        var configuration = NBDServerConfiguration()
        configuration.unixSocketPath = path
        #expect(throws: NBDServerError.self) { _ = try NBDServer(backend: MemoryBlockBackend(disk), configuration: configuration) }
        #expect(access(path, F_OK) == 0)
        unlink(path)

        // A stale socket (nobody listening) is replaced; the mode is 0600, or as configured.
        let stale = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = SocketSyscall.unixAddress(path)
        _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(stale, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        Glibc.close(stale)
        do {
            let server = try NBDServer(backend: MemoryBlockBackend(disk), configuration: configuration)
            var st = stat()
            #expect(lstat(path, &st) == 0 && st.st_mode & 0o777 == 0o600 && st.st_mode & S_IFMT == S_IFSOCK)
            #expect(server.unixSocketPath == path)
            // A live socket is refused.
            #expect(throws: NBDServerError.self) { _ = try NBDServer(backend: MemoryBlockBackend(disk), configuration: configuration) }
            _ = consume server
        }
        #expect(access(path, F_OK) != 0)  // removed with the server
        configuration.unixSocketMode = 0o660
        do {
            let server = try NBDServer(backend: MemoryBlockBackend(disk), configuration: configuration)
            var st = stat()
            #expect(lstat(path, &st) == 0 && st.st_mode & 0o777 == 0o660)
            _ = consume server
        }
        configuration.unixSocketPath = dir.path + "/" + String(repeating: "x", count: 120)
        #expect(throws: NBDServerError.self) { _ = try NBDServer(backend: MemoryBlockBackend(disk), configuration: configuration) }
    }

    @Test func unusableBackendsAreRefused() throws {
        let dir = TemporaryDirectory()
        var configuration = NBDServerConfiguration()
        configuration.unixSocketPath = dir.path + "/s"
        for options in [MemoryBackendOptions(minimumBlockSize: 768), MemoryBackendOptions(preferredBlockSize: 256),
                        MemoryBackendOptions(maxPayload: 1024)] {
            #expect(throws: NBDServerError.self) {
                _ = try NBDServer(backend: MemoryBlockBackend(MemoryDisk(options)), configuration: configuration)
            }
        }
        #expect(access(dir.path + "/s", F_OK) != 0)
        configuration.unixSocketPath = nil
        #expect(throws: NBDServerError.self) {
            _ = try NBDServer(backend: MemoryBlockBackend(MemoryDisk(MemoryBackendOptions())), configuration: configuration)
        }
    }

    @Test func tcpListener() throws {
        let server = try RunningServer(tcp: true)
        let port = try #require(server.tcpPort)
        #expect(port != 0)
        let c = try TestClient(tcpPort: port)
        try c.handshake()
        #expect(try c.write(0, pattern(65536, seed: 4)) == 0)
        #expect(try c.read(0, 65536).data == pattern(65536, seed: 4))
        let u = try server.connect()
        try u.handshake()
        #expect(try u.read(0, 65536).data == pattern(65536, seed: 4))
    }

    @Test func connectionsBeyondTheLimitAreToldWhy() throws {
        let server = try RunningServer { $0.maximumClients = 2; $0.refusingClients = 1 }
        let a = try server.connect(), b = try server.connect()
        try a.handshake()
        try b.handshake()
        // The third is greeted and told why on every option it tries; ABORT is acknowledged.
        let c = try server.connect()
        #expect(try c.readGreeting() == 3)
        try c.sendClientFlags(3)
        for option in [O.go, O.info, O.list, O.structuredReply] {
            try c.sendOption(option, option == O.go || option == O.info ? TestClient.infoData(name: "", infos: []) : [])
            let reply = try c.readOptionReply()
            #expect(reply.type == R.errPolicy)
            #expect(String(decoding: reply.data, as: UTF8.self)
                    == "server busy: 2 clients are being served, the most this export takes; try again later")
        }
        // While the one refusal slot is taken, a fourth is closed at once.
        let d = try server.connect()
        #expect(d.serverCloses())
        try c.sendOption(O.abort)
        #expect(try c.readOptionReply().type == R.ack)
        #expect(c.serverCloses())
        // NBD_OPT_EXPORT_NAME has no error reply: a refused client asking that way is hung up on.
        let e = try server.connect()
        #expect(try e.readGreeting() == 3)
        try e.sendClientFlags(3)
        try e.sendOption(O.exportName, [])
        #expect(e.serverCloses())
        a.close()
        #expect(waitUntil { server.closedSoFar == 3 })
        let f = try server.connect()
        try f.handshake()
        #expect(try f.read(0, 4096).error == 0)
        let stats = server.stop()
        #expect(stats.connectionsRefused == 3 && stats.connectionsAccepted == 5)
        #expect(server.log.all.contains { $0.contains("refusing connection 1: 2 clients are being served (the limit); it is told so") })
        #expect(server.log.all.contains { $0.contains("refusing connection 2") && $0.contains("closed at once") })
    }

    @Test func stalledAndSilentConnectionsTimeOut() throws {
        let server = try RunningServer {
            $0.handshakeTimeout = .milliseconds(300)
            $0.stallTimeout = .milliseconds(300)
        }
        let silent = try server.connect()
        let halfHeader = try server.connect()
        try halfHeader.handshake()
        try halfHeader.send([0x25, 0x60, 0x95])
        let halfPayload = try server.connect()
        try halfPayload.handshake()
        try halfPayload.sendRequest(NBDRequest(type: C.write, cookie: 1, length: 4096), payload: [1, 2, 3])
        let idle = try server.connect()
        try idle.handshake()
        #expect(silent.serverCloses())
        #expect(halfHeader.serverCloses())
        #expect(halfPayload.serverCloses())
        // Idle between requests is fine.
        #expect(try idle.read(0, 512).error == 0)
        #expect(waitUntil { server.disk.reservedNow == 0 })
    }
}

extension RunningServer {
    /// Connections closed so far, from the server's log (its counters are read after stop).
    var closedSoFar: Int {
        log.all.filter { $0.contains(" closed: ") || $0.contains(" disconnected") }.count
    }
}
