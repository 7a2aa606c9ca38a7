#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Syscalls

/// How `NBDServer.run(until:quiesceWhen:)` ended.
public enum NBDRunOutcome: Sendable, Equatable {
    /// `stop` was set: every connection is closed; the server cannot run again.
    case stopped
    /// Every connection is at a message boundary with every reply sent, and nothing in flight
    /// unless the backend hands requests over in flight: `handoverState()` and `release()` are
    /// valid, or `run` resumes service.
    case quiesced
    /// The quiesce did not finish within `quiesceTimeout`; nothing was lost: `run` resumes service.
    case quiesceFailed(NBDQuiesceFailure)
}

/// What kept a quiesce from finishing, when it timed out.
public struct NBDQuiesceFailure: Sendable, Equatable, CustomStringConvertible {
    public var timeout: Duration
    /// Requests in the backend.
    public var requestsInFlight = 0
    /// Connections with replies not (fully) sent, and of those, how many have a full socket (the
    /// client is not taking its replies).
    public var connectionsWithRepliesUnsent = 0
    public var connectionsNotTakingReplies = 0
    /// Connections in a request whose header was read: its WRITE payload still arriving, or
    /// waiting for backend room.
    public var connectionsMidRequest = 0
    /// Connections in the middle of a handshake option (its data still arriving).
    public var connectionsMidOption = 0
    /// Connections whose input ended (NBD_CMD_DISC, end of stream, NBD_OPT_ABORT) that are being
    /// answered before they close.
    public var connectionsClosing = 0

    public init(timeout: Duration) { self.timeout = timeout }

    public var description: String {
        var parts: [String] = []
        if requestsInFlight > 0 { parts.append("\(requestsInFlight) requests in flight in the backend") }
        if connectionsWithRepliesUnsent > 0 {
            parts.append("\(connectionsWithRepliesUnsent) connections with replies unsent"
                         + (connectionsNotTakingReplies > 0 ? " (\(connectionsNotTakingReplies) not taking them)" : ""))
        }
        if connectionsMidRequest > 0 { parts.append("\(connectionsMidRequest) connections in the middle of a request (WRITE payload or backend room)") }
        if connectionsMidOption > 0 { parts.append("\(connectionsMidOption) connections in the middle of a handshake option") }
        if connectionsClosing > 0 { parts.append("\(connectionsClosing) connections closing") }
        return "quiesce did not finish within \(timeout): " + (parts.isEmpty ? "no reason recorded" : parts.joined(separator: ", "))
    }
}

extension NBDServer where B: ~Copyable {
    // MARK: quiescing

    mutating func beginQuiesce() {
        quiescing = true
        quiesceStarted = now
        quiesceDeadline = now &+ UInt64(configuration.quiesceTimeout.nanoseconds)
        log("quiescing: no new connections or requests; finishing \(totalInFlight) requests in flight")
    }

    /// Ends the quiesce (failed if `failure` is given) and counts it.
    mutating func endQuiesce(failure: NBDQuiesceFailure?, stopping: Bool = false) -> NBDRunOutcome {
        quiescing = false
        let took = Duration.nanoseconds(Int64(now &- quiesceStarted))
        if took > statistics.longestQuiesce { statistics.longestQuiesce = took }
        if stopping {
            log("quiesce abandoned: stopping")
            return .stopped
        }
        if let failure {
            statistics.quiesceFailures += 1
            log(failure.description)
            return .quiesceFailed(failure)
        }
        statistics.quiesces += 1
        log("quiesced in \(took): \(connectedClients) connections at a message boundary")
        return .quiesced
    }

    /// Whether every connection is at a message boundary with nothing unsent, and nothing in
    /// flight unless the backend can hand it over.
    func isQuiescent() -> Bool {
        let carries = backend.handsOverInFlight
        if totalInFlight > 0 && !carries || companionInFlight > 0 { return false }
        for i in 0..<clientCount where !isQuiescent(i, carryingInFlight: carries) { return false }
        return true
    }

    func isQuiescent(_ i: Int, carryingInFlight: Bool) -> Bool {
        let c = clients[i]
        switch c.phase {
        case .free: return true
        case .closed: return false  // requests still in the backend, for a connection that is gone
        case .handshake, .transmission:
            // Every request slot in use is in the backend (carried) or none is in use.
            guard c.inputOpen, c.used == (carryingInFlight ? c.inFlight : 0), !c.hasOutput else { return false }
            switch c.input {
            case .clientFlags, .optionHeader, .requestHeader: return true
            default: return false
            }
        }
    }

    func quiesceFailure() -> NBDQuiesceFailure {
        var f = NBDQuiesceFailure(timeout: configuration.quiesceTimeout)
        f.requestsInFlight = totalInFlight + companionInFlight
        for i in 0..<clientCount where !isQuiescent(i, carryingInFlight: backend.handsOverInFlight) {
            let c = clients[i]
            guard c.phase == .handshake || c.phase == .transmission else { continue }
            if c.hasOutput {
                f.connectionsWithRepliesUnsent += 1
                if c.waitingToSend { f.connectionsNotTakingReplies += 1 }
            }
            if !c.inputOpen {
                f.connectionsClosing += 1
                continue
            }
            switch c.input {
            case .request: f.connectionsMidRequest += 1
            case .optionData, .optionDiscard: f.connectionsMidOption += 1
            default: break
            }
        }
        return f
    }

    // MARK: handing over

    /// The listeners and connections, for the successor. Valid only right after `run` returned
    /// `.quiesced`. The descriptors stay this server's until `release()`.
    public func handoverState() -> NBDHandoverState {
        precondition(quiesced, "NBDServer.handoverState() is valid only after run returned .quiesced")
        var state = NBDHandoverState(exportSize: export.size, minimumBlockSize: export.minimumBlockSize,
                                     preferredBlockSize: export.preferredBlockSize, maximumPayload: export.maximumPayload)
        if unixListenerFD >= 0, let socketPath { state.unixListener = .init(fd: unixListenerFD, path: socketPath) }
        if tcpListenerFD >= 0 { state.tcpListener = .init(fd: tcpListenerFD, port: tcpPort ?? 0) }
        // Connections being refused are not handed over: they close with this process.
        for i in 0..<configuration.maximumClients {
            let c = clients[i]
            guard c.phase == .handshake || c.phase == .transmission else { continue }
            let phase: NBDHandoverState.Phase
            switch c.input {
            case .clientFlags: phase = .awaitingClientFlags
            case .optionHeader: phase = .negotiating
            case .requestHeader: phase = .transmission
            default: preconditionFailure("client \(i) quiesced in the middle of a message: \(c.input)")
            }
            var inFlight: [NBDHandoverState.Request] = []
            for r in 0..<depth where c.requests[r].state == .submitted || c.requests[r].state == .flushing {
                let q = c.requests[r]
                inFlight.append(.init(slot: r, flushing: q.state == .flushing, operation: q.operation, flushAfter: q.flushAfter,
                                      command: q.command, cookie: q.cookie, offset: q.offset, length: q.length, buffer: q.buffer))
            }
            state.clients.append(.init(fd: c.fd, isTCP: c.isTCP, phase: phase, clientFlags: c.clientFlags.rawValue,
                                       promisedFlags: phase == .transmission ? c.promisedFlags.rawValue : 0,
                                       pendingInput: Array(UnsafeRawBufferPointer(start: c.inBase + c.inStart, count: c.buffered)),
                                       slot: i, generation: c.generation, inFlight: inFlight))
        }
        return state
    }

    /// After a successful hand-over: closes this process's copies of the listeners and connections
    /// without removing the UNIX socket's file and without sending anything (the successor holds
    /// the same sockets, so the clients see nothing). Valid only right after `.quiesced`.
    public consuming func release() {
        precondition(quiesced, "NBDServer.release() is valid only after run returned .quiesced")
        if var unix = unixListener.take() {
            unix.removesFile = false
            _ = consume unix
        }
        tcpListener = nil
        unixListenerFD = -1
        tcpListenerFD = -1
        var released = 0
        for i in 0..<clientCount where clients[i].phase == .handshake || clients[i].phase == .transmission {
            Syscall.close(clients[i].fd)
            clients[i].fd = -1
            clients[i].phase = .free
            released += 1
        }
        activeClients = 0
        log("handed over: released the listeners and \(released) connections")
    }

    // MARK: adopting

    /// Takes over the listeners and connections an earlier server handed over (`state`, usually
    /// from `NBDHandoverState(decoding:descriptors:)` with the received descriptors), serving them
    /// with `backend`. The listeners come from `state` (`configuration.unixSocketPath` and
    /// `tcpAddress` are not used; the UNIX socket's file becomes this server's, removed when it
    /// stops). Connections continue where they were: pending input is parsed first; connections
    /// still negotiating go on negotiating (their handshake timeout starts again).
    ///
    /// The export is this backend's, and must match what the clients were told: the same size,
    /// a minimum block no larger and a maximum payload no smaller (else `.handover` is thrown).
    /// Requests a connection had in flight are continued: each connection goes to the same slot
    /// with the same generation, each request to the same request slot, so the tags the backend
    /// carried (`BlockBackend.handsOverInFlight`) complete them here; their buffers are the
    /// backend's as handed over. The caller checks that the backend carries exactly these tags.
    ///
    /// Connections keep the transmission flags they were promised. What this backend cannot do
    /// any more is answered without it (`adoptedAction`): TRIM succeeds without effect (a hint
    /// the server may ignore), writes on a now read-only backend get NBD_EPERM, WRITE_ZEROES
    /// NBD_ENOTSUP, FLUSH and FUA without flush support NBD_EIO.
    ///
    /// Throws before taking anything: on a throw, every descriptor in `state` is still the caller's.
    /// A server on a UNIX socket listener kept from an earlier process that ended without a
    /// hand-over (a service manager's descriptor store after a crash): no connection is carried
    /// over (the earlier one's died with it); clients that connected meanwhile wait in the
    /// listener's backlog and are served. The listener must be bound to the configured path;
    /// a configuration with a TCP listener too is refused (it would not be listening).
    public init(backend: consuming B, configuration: NBDServerConfiguration, keptUnixListener fd: Int32) throws(NBDServerError) {
        guard let path = configuration.unixSocketPath, configuration.tcpAddress == nil else {
            throw .handover("a kept UNIX listener serves a configuration with only a UNIX socket")
        }
        guard boundUnixPath(fd) == path else {
            throw .handover("the kept listener is bound to \(boundUnixPath(fd) ?? "no path"), not \(path)")
        }
        let export = try Self.export(of: backend, configuration)
        let state = NBDHandoverState(exportSize: export.size, minimumBlockSize: UInt32(export.minimumBlockSize),
                                     preferredBlockSize: UInt32(export.preferredBlockSize), maximumPayload: UInt32(export.maximumPayload),
                                     unixListener: .init(fd: fd, path: path))
        try self.init(backend: backend, configuration: configuration, adopting: state)
    }

    public init(backend: consuming B, configuration: NBDServerConfiguration, adopting state: NBDHandoverState)
        throws(NBDServerError) {
        if let problem = state.problem() { throw .handover(problem) }
        let export = try Self.export(of: backend, configuration)
        guard export.size == state.exportSize else {
            throw .handover("clients were told the export has \(state.exportSize) bytes; this backend has \(export.size)")
        }
        guard export.minimumBlockSize <= state.minimumBlockSize else {
            throw .handover("this backend's minimum block is \(export.minimumBlockSize) bytes; clients were told \(state.minimumBlockSize)")
        }
        guard export.maximumPayload >= state.maximumPayload else {
            throw .handover("this backend's maximum payload is \(export.maximumPayload) bytes; clients were told \(state.maximumPayload)")
        }
        for c in state.clients {
            guard c.slot < configuration.maximumClients else {
                throw .handover("a connection in server slot \(c.slot), more than maximumClients (\(configuration.maximumClients))")
            }
            for r in c.inFlight where r.slot >= configuration.requestsPerClient {
                throw .handover("a request in flight in request slot \(r.slot), more than requestsPerClient (\(configuration.requestsPerClient))")
            }
        }
        if let u = state.unixListener {
            try Self.checkSocket(u.fd, "the UNIX socket listener (\(u.path))", listening: true, family: AF_UNIX)
        }
        if let t = state.tcpListener { try Self.checkSocket(t.fd, "the TCP listener (port \(t.port))", listening: true, family: nil) }
        for (k, c) in state.clients.enumerated() {
            try Self.checkSocket(c.fd, "connection \(k)", listening: false, family: c.isTCP ? nil : AF_UNIX)
        }
        var unix: Listener?
        if let u = state.unixListener { unix = Listener.adopted(fd: u.fd, path: u.path, port: 0) }
        var tcp: Listener?
        if let t = state.tcpListener { tcp = Listener.adopted(fd: t.fd, path: nil, port: t.port) }
        self.init(backend: backend, configuration: configuration, export: export, unix: unix,
                  unixFD: state.unixListener?.fd ?? -1, socketPath: state.unixListener?.path, tcp: tcp,
                  tcpFD: state.tcpListener?.fd ?? -1, port: state.tcpListener?.port)
        let now = monotonicNanoseconds()
        for (k, c) in state.clients.enumerated() {
            let phase: ClientPhase, input: ClientInput
            switch c.phase {
            case .awaitingClientFlags: (phase, input) = (.handshake, .clientFlags)
            case .negotiating: (phase, input) = (.handshake, .optionHeader)
            case .transmission: (phase, input) = (.transmission, .requestHeader)
            }
            clients[c.slot].adopt(fd: c.fd, isTCP: c.isTCP, phase: phase, input: input,
                                  clientFlags: NBDProtocol.ClientFlags(rawValue: c.clientFlags),
                                  promisedFlags: NBDProtocol.TransmissionFlags(rawValue: c.promisedFlags),
                                  pending: c.pendingInput, generation: c.generation,
                                  inFlight: c.inFlight.map { r in
                                      (r.slot, RequestSlot(state: r.flushing ? .flushing : .submitted, operation: r.operation,
                                                           flushAfter: r.flushAfter, command: r.command, cookie: r.cookie,
                                                           offset: r.offset, length: r.length, buffer: r.buffer, hasBuffer: true))
                                  }, now: now)
            activeClients += 1
            totalInFlight += c.inFlight.count
            totalReserved += c.inFlight.count
        }
        statistics.connectionsAdopted = state.clients.count
        let carried = state.clients.reduce(0) { $0 + $1.inFlight.count }
        statistics.requestsAdopted = carried
        log("took over \(state.clients.count) connections" + (carried > 0 ? " with \(carried) requests in flight" : "")
            + (state.unixListener.map { " and \($0.path)" } ?? "") + (state.tcpListener.map { " and TCP port \($0.port)" } ?? ""))
    }

    /// The successor's health check before it serves: reads the export's first `length` bytes
    /// through the backend. Completions of requests carried in flight that come meanwhile are
    /// handled as always (their replies go out once `run` starts). Throws if the read fails or
    /// does not complete within `timeout`; the backend stays usable either way.
    public mutating func readFirstBlock(length wanted: Int = 4096, timeout: Duration = .seconds(5)) throws(BackendError) {
        let length = Int(min(UInt64(wanted), export.size))
        guard let buffer = backend.reserve(length: length) else {
            throw BackendError("no room in the backend for a read of \(length) bytes")
        }
        // Never a request's tag: client slot 2^20 - 1 is past `maximumClients`.
        let probeTag = UInt64.max
        do throws(BackendError) {
            try backend.submit(.read, offset: 0, length: length, buffer: buffer, tag: probeTag)
        } catch {
            backend.release(buffer)
            throw error
        }
        let deadline = monotonicNanoseconds() &+ UInt64(timeout.nanoseconds)
        var result: Int32?
        while result == nil {
            let tags = completedTags, results = completedResults, capacity = completionCapacity
            var count = 0
            _ = try backend.poll { tag, r in
                if tag == probeTag { result = r } else if count < capacity { tags[count] = tag; results[count] = r; count += 1 }
            }
            for k in 0..<count { complete(tags[k], results[k]) }
            if result != nil { break }
            // The buffer stays reserved: the device may still write it.
            guard monotonicNanoseconds() < deadline else { throw BackendError("the first read did not complete within \(timeout)") }
            if let fd = backend.completionDescriptor { _ = Syscall.pollIn(fd, timeoutMilliseconds: 10) } else { usleep(50) }
        }
        backend.release(buffer)
        guard result == 0 else { throw BackendError("the first read failed (errno \(result!))") }
    }

    /// Checks that `fd` is a stream socket of the kind the state says (listening or not; AF_UNIX if
    /// `family` says so, else AF_INET or AF_INET6), and makes it non-blocking and close-on-exec.
    static func checkSocket(_ fd: Int32, _ what: String, listening: Bool, family: Int32?) throws(NBDServerError) {
        func option(_ name: Int32) throws(NBDServerError) -> Int32 {
            switch SocketSyscall.getsockopt(fd, SOL_SOCKET, name) {
            case .success(let v): return v
            case .failure(let e): throw .system("checking descriptor \(fd) for", target: what, e)
            }
        }
        guard try option(SO_TYPE) == Int32(SOCK_STREAM.rawValue) else { throw .handover("descriptor \(fd) for \(what) is not a stream socket") }
        guard (try option(SO_ACCEPTCONN) != 0) == listening else {
            throw .handover("descriptor \(fd) for \(what) is \(listening ? "not " : "")a listening socket")
        }
        let domain = try option(SO_DOMAIN)
        if let family {
            guard domain == family else { throw .handover("descriptor \(fd) for \(what) is not a UNIX socket") }
        } else {
            guard domain == AF_INET || domain == AF_INET6 else { throw .handover("descriptor \(fd) for \(what) is not a TCP socket") }
        }
        if case .failure(let e) = SocketSyscall.makeNonBlockingCloseOnExec(fd) {
            throw .system("making descriptor \(fd) non-blocking for", target: what, e)
        }
    }
}
