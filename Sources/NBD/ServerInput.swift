#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Syscalls
import SystemPackage

/// The input side of a connection: the handshake's client flags and options, then request headers
/// and WRITE payloads.
extension NBDServer where B: ~Copyable {
    /// Requests parsed per connection before others get a turn.
    static var requestsPerTurn: Int { 32 }

    enum Fill { case ready, wait, closed }

    /// Makes `n` bytes available in the client's input buffer (n <= its capacity), reading what
    /// the socket has. `.closed` means the connection was closed (end of stream mid-message, or
    /// an error), or the stream ended cleanly between messages, which stops input.
    mutating func fill(_ i: Int, _ n: Int) -> Fill {
        while clients[i].buffered < n {
            clients[i].compact(toFit: n)
            let c = clients[i]
            switch SocketSyscall.read(c.fd, c.inBase + c.inEnd, c.inCapacity - c.inEnd) {
            case .success(0):
                endOfStream(i)
                return .closed
            case .success(let got):
                clients[i].inEnd += got
                clients[i].lastActivity = now
            case .failure(let e) where e.rawValue == EAGAIN:
                return .wait
            case .failure(let e):
                close(i, "read failed: \(e)")
                return .closed
            }
        }
        return .ready
    }

    /// The client closed its side. Between messages that is the end of its input: what is in
    /// flight is still answered (it may be a half-close). Mid-message it is a hard disconnect.
    mutating func endOfStream(_ i: Int) {
        let c = clients[i]
        let betweenMessages: Bool
        switch c.input {
        case .clientFlags, .optionHeader, .requestHeader: betweenMessages = c.buffered == 0
        default: betweenMessages = false
        }
        if betweenMessages {
            clients[i].inputOpen = false
        } else {
            close(i, "connection ended mid-message")
        }
    }

    mutating func pumpInput(_ i: Int) {
        var budget = Self.requestsPerTurn
        while clients[i].inputOpen {
            switch clients[i].input {
            case .clientFlags:
                if quiescing { return }  // a message boundary: stays for the successor
                guard fill(i, 4) == .ready else { return }
                let c = clients[i]
                guard let flags = NBDHandshake.parseClientFlags(UnsafeRawBufferPointer(start: c.inBase + c.inStart, count: 4)) else {
                    statistics.protocolViolations += 1
                    close(i, "unknown client flags")
                    return
                }
                clients[i].consume(4)
                clients[i].clientFlags = flags
                clients[i].input = .optionHeader

            case .optionHeader:
                if clients[i].hasHandshakeOutput { return }  // answer one option at a time
                if quiescing { return }
                guard fill(i, NBDProtocol.optionHeaderSize) == .ready else { return }
                let c = clients[i]
                guard let (option, length) = NBDHandshake.parseOptionHeader(
                    UnsafeRawBufferPointer(start: c.inBase + c.inStart, count: NBDProtocol.optionHeaderSize)) else {
                    statistics.protocolViolations += 1
                    close(i, "option without the IHAVEOPT magic")
                    return
                }
                clients[i].consume(NBDProtocol.optionHeaderSize)
                if length <= NBDHandshake.maximumOptionData {
                    clients[i].input = .optionData(option: option, length: Int(length))
                } else if length <= NBDHandshake.maximumDiscardedOptionData {
                    clients[i].input = .optionDiscard(option: option, length: length, remaining: Int(length))
                } else {
                    statistics.protocolViolations += 1
                    close(i, "option with \(length) bytes of data")
                    return
                }

            case .optionData(let option, let length):
                guard fill(i, length) == .ready else { return }
                let c = clients[i]
                answerOption(i, option, UInt32(length), UnsafeRawBufferPointer(start: c.inBase + c.inStart, count: length))
                if clients[i].phase == .handshake || clients[i].phase == .transmission { clients[i].consume(length) }

            case .optionDiscard(let option, let length, let remaining):
                guard let left = drop(i, remaining) else { return }
                if left > 0 {
                    clients[i].input = .optionDiscard(option: option, length: length, remaining: left)
                    return
                }
                answerOption(i, option, length, nil)

            case .requestHeader:
                // Quiescing: no new request is parsed; what is buffered stays for the successor.
                if quiescing { return }
                if clients[i].freeHead < 0 { return }  // every slot taken: resumed when a reply is sent
                if budget == 0 { clients[i].pumpAgain = true; return }
                budget -= 1
                guard fill(i, NBDProtocol.requestHeaderSize) == .ready else { return }
                let c = clients[i]
                guard let request = NBDRequest.parse(UnsafeRawBufferPointer(start: c.inBase + c.inStart,
                                                                            count: NBDProtocol.requestHeaderSize)) else {
                    statistics.protocolViolations += 1
                    close(i, NBDViolation.badRequestMagic.description)
                    return
                }
                clients[i].consume(NBDProtocol.requestHeaderSize)
                startRequest(i, request, shuttingDown: draining)

            case .request(let r):
                switch clients[i].requests[Int(r)].state {
                case .waitingForRoom:
                    if !reserve(i, r) { return }
                case .receivingPayload:
                    if !receivePayload(i, r) { return }
                case .discardingPayload:
                    let remaining = clients[i].requests[Int(r)].length - clients[i].payloadDone
                    guard let left = drop(i, remaining) else { return }
                    clients[i].payloadDone = clients[i].requests[Int(r)].length - left
                    if left > 0 { return }
                    clients[i].input = .requestHeader
                    queueReply(i, r)
                default:
                    preconditionFailure("request \(r) of client \(i) is input but \(clients[i].requests[Int(r)].state)")
                }
            }
        }
    }

    /// Reads and drops up to `count` bytes (buffered first). Returns how many are left to drop,
    /// or nil if the connection was closed.
    mutating func drop(_ i: Int, _ count: Int) -> Int? {
        var left = count
        let take = min(left, clients[i].buffered)
        clients[i].consume(take)
        left -= take
        while left > 0 {
            let c = clients[i]
            switch SocketSyscall.read(c.fd, c.inBase, min(left, c.inCapacity)) {
            case .success(0):
                close(i, "connection ended mid-message")
                return nil
            case .success(let got):
                left -= got
                clients[i].lastActivity = now
            case .failure(let e) where e.rawValue == EAGAIN:
                return left
            case .failure(let e):
                close(i, "read failed: \(e)")
                return nil
            }
        }
        return 0
    }

    // MARK: handshake

    mutating func answerOption(_ i: Int, _ option: UInt32, _ length: UInt32, _ data: UnsafeRawBufferPointer?) {
        let c = clients[i]
        var out = ByteWriter(UnsafeMutableRawBufferPointer(start: c.outBase + c.outEnd, count: c.outCapacity - c.outEnd))
        let outcome = c.refusing
            ? NBDHandshake.refuse(option, message: refusalMessage, into: &out)
            : NBDHandshake.respond(to: option, length: length, data: data, export: export, clientFlags: c.clientFlags, into: &out)
        clients[i].outEnd += out.count
        clients[i].input = .optionHeader
        switch outcome {
        case .continueHaggling:
            break
        case .enterTransmission:
            clients[i].input = .requestHeader
            clients[i].phase = .transmission
            clients[i].promisedFlags = export.flags
            log("client \(i) entered transmission (\(option == NBDProtocol.Option.go ? "NBD_OPT_GO" : "NBD_OPT_EXPORT_NAME"))")
        case .closeAfterReplies:
            clients[i].inputOpen = false
        case .disconnect:
            close(i, c.refusing ? "refused (NBD_OPT_EXPORT_NAME cannot be answered with a reason)"
                                : "asked for an export that does not exist (NBD_OPT_EXPORT_NAME)")
        }
    }

    // MARK: requests

    /// Starts a request. While the server is stopping, requests are answered NBD_ESHUTDOWN ("The
    /// error value issued in respect of these requests and any subsequently received requests
    /// SHOULD be NBD_ESHUTDOWN"), payloads still read and dropped.
    mutating func startRequest(_ i: Int, _ request: NBDRequest, shuttingDown: Bool) {
        let promised = clients[i].promisedFlags
        var action = request.action(size: export.size, flags: promised, minimumBlockSize: export.minimumBlockSize,
                                    maximumPayload: export.maximumPayload)
        if promised != export.flags, case .submit(let operation, let flushAfter) = action {
            action = Self.adoptedAction(operation, flushAfter: flushAfter, export: export.flags)
        }
        if shuttingDown, case .submit = action { action = .reply(NBDProtocol.Error.eshutdown) }
        switch action {
        case .disconnect(let violation):
            statistics.protocolViolations += 1
            close(i, violation.description)
            return
        case .finish:
            clients[i].inputOpen = false
            return
        default: break
        }
        let r = clients[i].allocateSlot()
        clients[i].requests[Int(r)].command = request.type
        clients[i].requests[Int(r)].cookie = request.cookie
        clients[i].requests[Int(r)].offset = request.offset
        clients[i].requests[Int(r)].length = Int(request.length)
        clients[i].requests[Int(r)].received = now
        clients[i].requests[Int(r)].error = 0
        clients[i].requests[Int(r)].flushAfter = false
        var error: UInt32 = 0
        switch action {
        case .reply(let e):
            error = e
        case .submit(let operation, let flushAfter):
            clients[i].requests[Int(r)].operation = operation
            clients[i].requests[Int(r)].flushAfter = flushAfter
            if backendFailure != nil { error = NBDProtocol.Error.eio; break }
            clients[i].requests[Int(r)].state = .waitingForRoom
            clients[i].input = .request(r)
            _ = reserve(i, r)
            return
        default: preconditionFailure()
        }
        clients[i].requests[Int(r)].error = error
        if request.payloadLength > 0 {
            clients[i].requests[Int(r)].state = .discardingPayload
            clients[i].payloadDone = 0
            clients[i].input = .request(r)
        } else {
            queueReply(i, r)
        }
    }

    /// A request of a connection handed over from a server whose backend could do more than this
    /// one (the connection keeps the flags it was promised): what this backend cannot do is
    /// answered without it. TRIM is a hint a server "MAY" ignore: success. Writes, TRIM and
    /// WRITE_ZEROES on a backend that became read-only: NBD_EPERM ("SHOULD return NBD_EPERM if it
    /// receives a write or trim request on a read-only export"). WRITE_ZEROES it cannot do:
    /// NBD_ENOTSUP, as a device reporting it unsupported is answered (qemu falls back to writing
    /// zeroes). FLUSH, and FUA (on WRITE, TRIM, WRITE_ZEROES), without a flush: NBD_EIO, never a
    /// success that would claim durability.
    static func adoptedAction(_ operation: BackendOperation, flushAfter: Bool,
                              export flags: NBDProtocol.TransmissionFlags) -> NBDRequestAction {
        typealias E = NBDProtocol.Error
        let writes = operation != .read && operation != .flush
        if writes && flags.contains(.readOnly) { return .reply(E.eperm) }
        if (operation == .flush || operation == .writeFUA || flushAfter) && !flags.contains(.sendFlush) { return .reply(E.eio) }
        if operation == .trim && !flags.contains(.sendTrim) { return .reply(E.ok) }
        if operation == .writeZeroes && !flags.contains(.sendWriteZeroes) { return .reply(E.enotsup) }
        return .submit(operation, flushAfter: flushAfter)
    }

    /// Reserves backend room for request `r` and moves it on: a WRITE to reading its payload,
    /// anything else to the backend. False if the backend has no room (the client waits).
    mutating func reserve(_ i: Int, _ r: Int32) -> Bool {
        let request = clients[i].requests[Int(r)]
        let hasData = request.operation == .read || request.operation == .write || request.operation == .writeFUA
        guard let buffer = backend.reserve(length: hasData ? request.length : 0) else {
            if totalReserved == 0 {
                // Nothing will ever free room: the backend broke its contract ("never nil when
                // nothing is in flight"). Fail the request rather than wait forever.
                log("backend has no room with nothing in flight; failing the request with EIO")
                fail(i, r, hasPayload: request.operation == .write || request.operation == .writeFUA)
                return true
            }
            return false
        }
        totalReserved += 1
        clients[i].requests[Int(r)].buffer = buffer
        clients[i].requests[Int(r)].hasBuffer = true
        if request.operation == .write || request.operation == .writeFUA {
            clients[i].requests[Int(r)].state = .receivingPayload
            clients[i].payloadDone = 0
            _ = receivePayload(i, r)
        } else {
            clients[i].input = .requestHeader
            submit(i, r, request.operation)
        }
        return true
    }

    /// Answers request `r` EIO without the backend (its payload, if any, is still dropped).
    mutating func fail(_ i: Int, _ r: Int32, hasPayload: Bool) {
        clients[i].requests[Int(r)].error = NBDProtocol.Error.eio
        if hasPayload {
            clients[i].requests[Int(r)].state = .discardingPayload
            clients[i].payloadDone = 0
            clients[i].input = .request(r)
        } else {
            clients[i].input = .requestHeader
            queueReply(i, r)
        }
    }

    /// Reads the WRITE payload into the reserved buffer (buffered bytes first, then straight from
    /// the socket), and submits once complete. False while waiting for more bytes.
    mutating func receivePayload(_ i: Int, _ r: Int32) -> Bool {
        let request = clients[i].requests[Int(r)]
        let memory = backend.memory(of: request.buffer).baseAddress!
        var done = clients[i].payloadDone
        let take = min(request.length - done, clients[i].buffered)
        if take > 0 {
            memory.advanced(by: done).copyMemory(from: clients[i].inBase + clients[i].inStart, byteCount: take)
            clients[i].consume(take)
            done += take
        }
        while done < request.length {
            switch SocketSyscall.read(clients[i].fd, memory + done, request.length - done) {
            case .success(0):
                close(i, "connection ended in a WRITE payload")
                return false
            case .success(let got):
                done += got
                clients[i].lastActivity = now
            case .failure(let e) where e.rawValue == EAGAIN:
                clients[i].payloadDone = done
                return false
            case .failure(let e):
                close(i, "read failed: \(e)")
                return false
            }
        }
        clients[i].input = .requestHeader
        if backendFailure != nil {
            releaseBuffer(i, r)
            clients[i].requests[Int(r)].error = NBDProtocol.Error.eio
            queueReply(i, r)
        } else {
            submit(i, r, request.operation)
        }
        return true
    }

    /// Tag of request `r` of client `i`: generation (23 bits), client (20), request (20); the top
    /// bit is the companion's (`companionTagBit`).
    func tag(_ i: Int, _ r: Int32) -> UInt64 {
        UInt64(clients[i].generation & 0x7F_FFFF) << 40 | UInt64(i) << 20 | UInt64(r)
    }

    mutating func submit(_ i: Int, _ r: Int32, _ operation: BackendOperation) {
        let request = clients[i].requests[Int(r)]
        let offset = operation == .flush ? 0 : request.offset
        let length = operation == .flush ? 0 : request.length
        do {
            try backend.submit(operation, offset: offset, length: length, buffer: request.buffer, tag: tag(i, r))
        } catch {
            statistics.submitFailures += 1
            log("backend refused \(operation) of \(length) bytes at \(offset): \(error)")
            releaseBuffer(i, r)
            clients[i].requests[Int(r)].error = NBDProtocol.Error.eio
            queueReply(i, r)
            return
        }
        clients[i].requests[Int(r)].state = operation == .flush && request.state == .submitted ? .flushing : .submitted
        clients[i].inFlight += 1
        totalInFlight += 1
    }

    // MARK: completions

    /// Collects what the backend finished and moves each request on.
    mutating func collectCompletions() {
        guard backendFailure == nil else { return }
        let tags = completedTags, results = completedResults, capacity = completionCapacity
        var count = 0
        do {
            _ = try backend.poll { tag, result in
                if count < capacity { tags[count] = tag; results[count] = result }
                count += 1
            }
        } catch {
            backendFailed(error)
            return
        }
        if count > capacity {
            statistics.unknownCompletions += count - capacity
            log("backend reported \(count) completions with \(totalInFlight) requests in flight")
            count = capacity
        }
        if count > 0 {
            progressed()
        }
        for k in 0..<count { complete(tags[k], results[k]) }
    }

    mutating func complete(_ tag: UInt64, _ result: Int32) {
        if tag & companionTagBit != 0, let companion = configuration.companion {
            companion.completed(tag: tag, result: result)
            return
        }
        let i = Int(tag >> 20 & 0xF_FFFF), r = Int32(tag & 0xF_FFFF)
        guard i < clientCount, Int(r) < depth, UInt64(clients[i].generation & 0x7F_FFFF) == tag >> 40,
              clients[i].phase != .free,
              clients[i].requests[Int(r)].state == .submitted || clients[i].requests[Int(r)].state == .flushing else {
            statistics.unknownCompletions += 1
            return
        }
        clients[i].inFlight -= 1
        totalInFlight -= 1
        let request = clients[i].requests[Int(r)]
        if clients[i].phase == .closed {
            releaseBuffer(i, r)
            clients[i].freeSlot(r)
            if clients[i].inFlight == 0 {
                clients[i].phase = .free
                activeClients -= 1
            }
            return
        }
        if result == 0 && request.flushAfter && request.state == .submitted {
            submit(i, r, .flush)  // FUA on TRIM / WRITE_ZEROES: durable before the reply
            return
        }
        clients[i].requests[Int(r)].error = NBDProtocol.nbdError(fromErrno: result)
        if request.operation == .read && result == 0 {
            clients[i].requests[Int(r)].sendsData = true
        } else {
            releaseBuffer(i, r)
        }
        queueReply(i, r)
    }

    /// The backend cannot serve any more: everything in flight is answered EIO (its buffers are
    /// not released: the device may still hold them), and so is every later request.
    mutating func backendFailed(_ error: BackendError) {
        backendFailure = error
        log("backend failed: \(error); answering every request EIO")
        for i in 0..<clientCount where clients[i].inFlight > 0 {
            for r in 0..<depth {
                let state = clients[i].requests[r].state
                guard state == .submitted || state == .flushing else { continue }
                clients[i].requests[r].hasBuffer = false
                totalReserved -= 1
                if clients[i].phase == .closed {
                    clients[i].freeSlot(Int32(r))
                } else {
                    clients[i].requests[r].error = NBDProtocol.Error.eio
                    queueReply(i, Int32(r))
                }
            }
            clients[i].inFlight = 0
            if clients[i].phase == .closed {
                clients[i].phase = .free
                activeClients -= 1
            }
        }
        totalInFlight = 0
    }
}
