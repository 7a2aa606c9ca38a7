#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization
import Syscalls
import SystemPackage

/// How an `NBDServer` listens and how much it takes on.
public struct NBDServerConfiguration: Sendable {
    /// The one export's name; clients may also ask for "" (the default export).
    public var exportName = ""
    /// Shown by clients (NBD_INFO_DESCRIPTION, NBD_OPT_LIST).
    public var exportDescription = ""
    /// A UNIX socket to create (fresh: a stale socket there is replaced, anything else refused).
    public var unixSocketPath: String?
    /// Permissions of the UNIX socket, set before it accepts connections.
    public var unixSocketMode: UInt32 = 0o600
    /// A TCP address to listen on too (any address; the CLI only offers loopback).
    public var tcpAddress: NBDTCPAddress?
    /// Connections served at once. A client past the limit is still greeted and told why during
    /// option haggling: every option but NBD_OPT_ABORT is answered NBD_REP_ERR_POLICY with a
    /// message naming the limit (NBD_OPT_EXPORT_NAME, which has no error reply, is hung up on).
    /// Up to `refusingClients` such connections are held for that at once; more are closed at once.
    public var maximumClients = 16
    /// Connections past `maximumClients` that are told why at once (each holds a slot: buffers
    /// like a served connection's).
    public var refusingClients = 16
    /// The text a refused client is given (nil: "server busy: N clients are being served, the
    /// most this export takes; try again later").
    public var refusalMessage: String?
    /// Requests of one connection in flight at once (read, queued in the backend, or replies
    /// waiting to be sent); the connection is not read while all are taken.
    public var requestsPerClient = 64
    /// Advertise NBD_FLAG_CAN_MULTI_CONN. Safe for one backend whose flush covers every write it
    /// completed before the flush was submitted (see `NBDServer`).
    public var multiConnection = true
    /// A backend without `completionDescriptor`: after a completion, poll it without sleeping
    /// this long, then sleep 20 µs, 40 µs ... up to 1 ms between polls while requests are in flight.
    public var busyPoll: Duration = .microseconds(200)
    /// A connection that stops mid-request (part of a header or payload read) or stops taking
    /// replies for this long is closed. Idle connections between requests are kept.
    public var stallTimeout: Duration = .seconds(30)
    /// A connection still negotiating after this long is closed.
    public var handshakeTimeout: Duration = .seconds(30)
    /// After stop: how long to wait for requests in flight to finish and their replies to go out.
    public var drainTimeout: Duration = .seconds(10)
    /// How long a quiesce (`run(until:quiesceWhen:)`) may take before `run` gives up and returns
    /// `.quiesceFailed`.
    public var quiesceTimeout: Duration = .seconds(5)
    /// An eventfd the server polls too: writing it wakes the loop at once, so that a stop or
    /// quiesce request set from another thread is seen without waiting for the 100 ms check. The
    /// server reads (resets) it when readable and never closes it.
    public var wakeDescriptor: Int32?
    /// Connection events and errors (not called per request).
    public var log: (@Sendable (String) -> Void)?
    /// What an operator should see whatever the verbosity: each refused connection, with the
    /// count so far (nil: `log`).
    public var notice: (@Sendable (String) -> Void)?
    /// Called with each reply sent: the NBD command and the time from reading its header to its
    /// reply being handed to the socket (ns). Not called for requests carried over from an
    /// earlier server. It runs on the server's thread, per request: keep it cheap.
    public var requestAnswered: (@Sendable (UInt16, UInt64) -> Void)?
    /// Called from the server's loop every `statusInterval` (the loop wakes at least every 100 ms)
    /// with the counters, the connections and the backend's health: what a metrics endpoint, a
    /// service manager's STATUS and watchdog show.
    public var status: (@Sendable (NBDServerStatus) -> Void)?
    public var statusInterval: Duration = .milliseconds(500)
    /// Requests from elsewhere served from the same backend by the same loop (a ublk device). With
    /// one, the server may have no listener at all.
    public var companion: (any BackendCompanion)?

    public init() {}
}

/// The server's state as `NBDServerConfiguration.status` reports it.
public struct NBDServerStatus: Sendable {
    public var statistics: NBDServerStatistics
    /// Connections negotiating or in transmission.
    public var connectedClients: Int
    /// Requests in the backend.
    public var inFlight: Int
    /// The backend's recoveries and whether it answers now (`BlockBackend.health`).
    public var backend: BackendHealth

    public init(statistics: NBDServerStatistics, connectedClients: Int, inFlight: Int, backend: BackendHealth) {
        self.statistics = statistics
        self.connectedClients = connectedClients
        self.inFlight = inFlight
        self.backend = backend
    }
}

/// Counters since the server started.
public struct NBDServerStatistics: Sendable, Equatable {
    public var connectionsAccepted = 0
    /// Connections closed at once because `maximumClients` were being served.
    public var connectionsRefused = 0
    public var connectionsClosed = 0
    /// Connections closed for breaking the protocol (bad magic, bad flags, oversized WRITE ...).
    public var protocolViolations = 0
    public var reads = 0
    public var writes = 0
    public var flushes = 0
    public var trims = 0
    public var writeZeroes = 0
    /// Replies with a non-zero error.
    public var errorReplies = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// `submit` threw (the request was answered EIO).
    public var submitFailures = 0
    /// Completions whose tag matched no request in flight (ignored).
    public var unknownCompletions = 0
    /// Requests still in the backend when `run` returned (the drain timed out).
    public var abandonedRequests = 0
    /// Quiesces that ended with every connection at a message boundary, and those that timed out.
    /// Requests a previous server left in flight that this one continued (`init(adopting:)`).
    public var requestsAdopted = 0
    public var quiesces = 0
    public var quiesceFailures = 0
    /// The longest quiesce (successful or not), from the request to the outcome.
    public var longestQuiesce: Duration = .zero
    /// Connections taken over from an earlier server (`init(backend:configuration:adopting:)`).
    public var connectionsAdopted = 0
    public init() {}
}

/// An NBD server (fixed newstyle, simple replies) for one export backed by a `BlockBackend`.
///
/// One thread runs everything: `run(until:)` is a poll(2) loop over the listening sockets, the
/// clients and the backend's completion descriptor (or, without one, it polls the backend while
/// requests are in flight: busy for `busyPoll`, then short sleeps). Each connection is a small
/// state machine on a non-blocking socket: greeting and options, then request headers, WRITE
/// payloads read straight into the backend's memory, and replies (header and READ data, sent
/// from the backend's memory with sendmsg, partial sends resumed on POLLOUT). Requests of one
/// connection are in flight together, up to `requestsPerClient` and what the backend has room for;
/// replies go out in completion order (NBD allows any order). All per-connection state is
/// allocated when the server starts; serving a request allocates nothing.
///
/// Ordering and durability:
/// - A reply is sent only after the backend completed the request, so a write that was replied
///   to is complete in the backend. NBD_CMD_FLUSH is submitted when it arrives: every write
///   replied to before it arrived completed before the flush was submitted, and the backend's
///   flush covers those ("all write commands ... completed (replied to) prior to processing a
///   NBD_CMD_FLUSH MUST be written to non-volatile storage prior to replying to that flush").
///   Writes still in flight when a flush arrives are not waited for; the spec does not ask it.
/// - NBD_CMD_FLAG_FUA on WRITE is submitted as `.writeFUA`; on TRIM and WRITE_ZEROES the request
///   is followed by a `.flush` (same buffer, same tag) before the reply; on other commands it is
///   ignored, as the spec allows.
/// - CAN_MULTI_CONN is advertised (unless configured off): all connections share one backend and
///   the server caches nothing, so a flush or FUA write on any connection covers writes replied to
///   on every connection.
///
/// Backpressure: a connection is not read while all its request slots are taken, or while the
/// backend has no room for its next request (`reserve` returned nil); releases of backend room
/// wake such connections. NBD_CMD_DISC stops reading and closes the connection once its requests
/// are answered. A connection that goes away leaves its requests in the backend; their buffers
/// are released as they complete, and the slot is reused only then.
///
/// Stopping: `run(until:)` checks its flag at least every 100 ms (a signal handler may set it).
/// On stop it closes the listeners (removing the UNIX socket), closes connections still
/// negotiating, answers requests that arrive from then on NBD_ESHUTDOWN, and closes each
/// connection as soon as none of its requests is in flight or unanswered; after `drainTimeout`
/// it closes the rest and returns.
///
/// Hand-over to a new process (driver upgrade; Handover.swift): `run(until:quiesceWhen:)` returns
/// `.quiesced` once no connection has anything in progress: no new connection is accepted (the
/// listeners stay open; connections wait in the kernel's backlog), no new request header or
/// handshake message is parsed (bytes already read stay in the input buffer), while WRITE
/// payloads already started are read and submitted, handshake messages already started are
/// answered, every request in the backend completes and every reply is sent. `handoverState()`
/// then describes the listeners and connections for `init(backend:configuration:adopting:)` in
/// the new process, and `release()` lets go of them without closing anything the clients see.
/// If the quiesce takes longer than `quiesceTimeout`, or the new process fails, `run` is called
/// again and service resumes where it stopped.
///
/// The backend contract as used here: the server reserves a buffer for every request (length 0
/// for those without data), submits once (twice for the FUA flush above, after the first
/// completion), and releases every reserved buffer exactly once: after the completion, or for a
/// READ after its data was sent, or without submitting if the connection went away first.
/// When `completionDescriptor` is readable the server reads its 8-byte counter (an eventfd) before
/// calling `poll`. `submit` throwing fails that request with EIO; `poll` throwing marks the
/// backend failed: requests in flight and all later ones are answered EIO.
public struct NBDServer<B: BlockBackend & ~Copyable>: ~Copyable {
    var backend: B
    public let export: NBDExport
    var configuration: NBDServerConfiguration
    var unixListener: Listener?
    var tcpListener: Listener?
    /// The listeners' descriptors (-1: none or closed), and the UNIX socket's path.
    var unixListenerFD: Int32 = -1
    var tcpListenerFD: Int32 = -1
    let socketPath: String?
    /// The port the TCP listener got (useful with port 0).
    public let tcpPort: UInt16?
    public internal(set) var statistics = NBDServerStatistics()
    /// Set once the backend's `poll` threw.
    public internal(set) var backendFailure: BackendError?

    let clients: UnsafeMutablePointer<ClientState>
    let clientCount: Int
    let depth: Int
    /// Completions collected from one `backend.poll` (tag, result).
    let completedTags: UnsafeMutablePointer<UInt64>
    let completedResults: UnsafeMutablePointer<Int32>
    let completionCapacity: Int
    /// poll(2) set and which client each entry is (-1 listener/backend).
    let pollSet: UnsafeMutablePointer<pollfd>
    let pollOwner: UnsafeMutablePointer<Int32>
    /// What a client past `maximumClients` is told (UTF-8).
    let refusalMessage: [UInt8]
    /// Room for the reply headers and iovecs of one sendmsg.
    let headerScratch: UnsafeMutableRawPointer
    let vectors: UnsafeMutablePointer<iovec>
    static var repliesPerSend: Int { 16 }

    var activeClients = 0
    var totalInFlight = 0
    /// Buffers reserved from the backend and not released yet.
    var totalReserved = 0
    /// Backend room was released this round: connections waiting for room are retried.
    var roomReleased = false
    /// When something last happened (a descriptor was ready, or a completion came): for
    /// `busyPoll` after it, a backend without a descriptor is polled without sleeping.
    var lastProgress: UInt64 = 0
    var idleSleep: Int64 = 20_000
    var draining = false
    var drainDeadline: UInt64 = 0
    /// `run` stopped (or threw): it cannot run again.
    var finished = false
    /// Quiescing: see the type's documentation.
    var quiescing = false
    var quiesceStarted: UInt64 = 0
    var quiesceDeadline: UInt64 = 0
    /// The last `run` returned `.quiesced`, or `run` was never called (every connection is where
    /// it was handed over, at a message boundary, or there is none): `handoverState()` and
    /// `release()` are valid.
    var quiesced = true
    var now: UInt64 = 0
    /// When `configuration.status` was last called (CLOCK_MONOTONIC ns).
    var lastStatus: UInt64 = 0

    /// Starts listening for `backend`'s export. Nothing is served until `run(until:)`.
    public init(backend: consuming B, configuration: NBDServerConfiguration) throws(NBDServerError) {
        let export = try Self.export(of: backend, configuration)
        guard configuration.unixSocketPath != nil || configuration.tcpAddress != nil || configuration.companion != nil else {
            throw .configuration("neither a UNIX socket path nor a TCP address to listen on")
        }
        // Everything that can throw happens before the first stored property is set.
        var unixFD: Int32 = -1, tcpFD: Int32 = -1
        var port: UInt16?
        let unix = try Listener.unix(configuration.unixSocketPath, mode: configuration.unixSocketMode, fd: &unixFD)
        let tcp = try Listener.tcp(configuration.tcpAddress, fd: &tcpFD, port: &port)
        self.init(backend: backend, configuration: configuration, export: export, unix: unix, unixFD: unixFD,
                  socketPath: configuration.unixSocketPath, tcp: tcp, tcpFD: tcpFD, port: port)
    }

    /// The export `backend` offers under `configuration` (which is checked too).
    static func export(of backend: borrowing B, _ configuration: NBDServerConfiguration) throws(NBDServerError) -> NBDExport {
        let minimum = backend.minimumBlockSize, preferred = backend.preferredBlockSize, maximum = backend.maxPayload
        if let problem = NBDExport.problem(name: configuration.exportName, description: configuration.exportDescription,
                                           minimumBlockSize: minimum, preferredBlockSize: preferred, maximumPayload: maximum) {
            throw .unusableBackend(problem)
        }
        guard configuration.maximumClients >= 1, configuration.refusingClients >= 0,
              configuration.maximumClients + configuration.refusingClients < 1 << 20 else {
            throw .configuration("maximumClients (at least 1) and refusingClients together must be below 2^20")
        }
        guard configuration.requestsPerClient >= 1, configuration.requestsPerClient < 1 << 20 else {
            throw .configuration("requestsPerClient must be between 1 and 2^20 - 1")
        }
        var flags: NBDProtocol.TransmissionFlags = [.hasFlags]
        if backend.readOnly {
            flags.insert(.readOnly)
        } else {
            if backend.canTrim { flags.insert(.sendTrim) }
            if backend.canWriteZeroes { flags.insert(.sendWriteZeroes) }
        }
        // FUA is carried out as `.writeFUA`, or a flush after TRIM/WRITE_ZEROES: it needs flush.
        if backend.canFlush { flags.formUnion([.sendFlush, .sendFUA]) }
        if configuration.multiConnection { flags.insert(.canMultiConn) }
        return NBDExport(name: configuration.exportName, description: configuration.exportDescription,
                         size: backend.size, flags: flags, minimumBlockSize: minimum,
                         preferredBlockSize: preferred, maximumPayload: maximum)
    }

    /// Sets everything up around listeners that exist already (nothing here can fail).
    init(backend: consuming B, configuration: NBDServerConfiguration, export: NBDExport, unix: consuming Listener?,
         unixFD: Int32, socketPath: String?, tcp: consuming Listener?, tcpFD: Int32, port: UInt16?) {
        self.export = export
        self.configuration = configuration
        self.socketPath = socketPath
        unixListener = unix
        tcpListener = tcp
        unixListenerFD = unixFD
        tcpListenerFD = tcpFD
        tcpPort = port
        self.backend = backend
        clientCount = configuration.maximumClients + configuration.refusingClients
        depth = configuration.requestsPerClient
        let refusal = configuration.refusalMessage
            ?? "server busy: \(configuration.maximumClients) clients are being served, the most this export takes; try again later"
        refusalMessage = Array(refusal.utf8.prefix(NBDHandshake.maximumRefusalBytes))
        clients = .allocate(capacity: clientCount)
        let inCapacity = ClientState.inputCapacity
        for i in 0..<clientCount {
            (clients + i).initialize(to: ClientState(inCapacity: inCapacity, outCapacity: NBDHandshake.maximumReplyBytes,
                                                     depth: depth))
        }
        completionCapacity = clientCount * depth
        completedTags = .allocate(capacity: completionCapacity)
        completedResults = .allocate(capacity: completionCapacity)
        pollSet = .allocate(capacity: clientCount + 5)
        pollOwner = .allocate(capacity: clientCount + 5)
        headerScratch = .allocate(byteCount: NBDProtocol.simpleReplyHeaderSize * Self.repliesPerSend, alignment: 16)
        vectors = .allocate(capacity: 2 * Self.repliesPerSend)
    }

    deinit {
        for i in 0..<clientCount {
            if clients[i].fd >= 0 { Syscall.close(clients[i].fd) }
            clients[i].deallocate()
        }
        clients.deinitialize(count: clientCount)
        clients.deallocate()
        completedTags.deallocate()
        completedResults.deallocate()
        pollSet.deallocate()
        pollOwner.deallocate()
        headerScratch.deallocate()
        vectors.deallocate()
    }

    /// The path of the UNIX socket while it is listening.
    public var unixSocketPath: String? { unixListenerFD >= 0 ? socketPath : nil }

    /// Connections served now (negotiating or transmitting; not those being refused).
    public var connectedClients: Int {
        var n = 0
        for i in 0..<configuration.maximumClients where clients[i].phase == .handshake || clients[i].phase == .transmission { n += 1 }
        return n
    }

    /// Requests submitted to the backend and not completed.
    public var requestsInFlight: Int { totalInFlight }

    /// The listening sockets (nil: none, or closed), e.g. to keep them in a service manager's
    /// descriptor store. They stay the server's.
    public var unixListenerDescriptor: Int32? { unixListenerFD >= 0 ? unixListenerFD : nil }
    public var tcpListenerDescriptor: Int32? { tcpListenerFD >= 0 ? tcpListenerFD : nil }

    /// Lends the backend (e.g. for its counters).
    public func withBackend<R>(_ body: (borrowing B) -> R) -> R { body(backend) }

    /// Serves until `stop` becomes true, then drains (see the type's documentation) and returns.
    /// `stop` is read at least every 100 ms; setting it from a signal handler is fine:
    ///
    ///     let stopRequested = Atomic<Bool>(false)   // a global
    ///     signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
    ///     try server.run(until: stopRequested)
    ///
    /// Runs once; throws only if poll(2) itself fails.
    public mutating func run(until stop: borrowing Atomic<Bool>) throws(NBDServerError) {
        let never = Atomic<Bool>(false)
        try run(until: stop, quiesceWhen: never)
    }

    /// Serves until `stop` becomes true (then drains as `run(until:)` does and returns `.stopped`)
    /// or `quiesce` becomes true: then it quiesces (see the type's documentation) and returns
    /// `.quiesced`, or `.quiesceFailed` after `quiesceTimeout`. Both flags are read at least every
    /// 100 ms, at once if `configuration.wakeDescriptor` is written after setting them.
    ///
    /// After `.quiesced` the caller may take `handoverState()` and `release()` the server; after
    /// either quiesce outcome it may call `run` again (with `quiesce` false) to resume service
    /// exactly where it stopped. After `.stopped`, or a throw (poll(2) failed), every connection
    /// is closed and `run` may not be called again.
    @discardableResult
    public mutating func run(until stop: borrowing Atomic<Bool>, quiesceWhen quiesce: borrowing Atomic<Bool>)
        throws(NBDServerError) -> NBDRunOutcome {
        precondition(!finished, "NBDServer.run after the server stopped")
        quiesced = false
        // Input left unparsed by a quiesce (or brought by a hand-over) is looked at again.
        for i in 0..<clientCount where clients[i].inputOpen { clients[i].pumpAgain = true }
        let outcome: NBDRunOutcome
        do throws(NBDServerError) {
            outcome = try serve(until: stop, quiesceWhen: quiesce)
        } catch {
            finished = true
            finish()
            throw error
        }
        switch outcome {
        case .stopped:
            finished = true
            finish()
        case .quiesced: quiesced = true
        case .quiesceFailed: break
        }
        return outcome
    }

    mutating func serve(until stop: borrowing Atomic<Bool>, quiesceWhen quiesce: borrowing Atomic<Bool>)
        throws(NBDServerError) -> NBDRunOutcome {
        while true {
            now = monotonicNanoseconds()
            if !draining && stop.load(ordering: .relaxed) {
                if quiescing { _ = endQuiesce(failure: nil, stopping: true) }
                beginDrain()
            }
            if draining {
                if activeClients == 0 && configuration.companion?.finished ?? true { return .stopped }
                if now >= drainDeadline {
                    log("stop: drain timed out with \(totalInFlight) requests in the backend; closing every connection")
                    return .stopped
                }
            } else {
                if !quiescing && quiesce.load(ordering: .relaxed) { beginQuiesce() }
                if quiescing {
                    if isQuiescent() { return endQuiesce(failure: nil) }
                    if now >= quiesceDeadline { return endQuiesce(failure: quiesceFailure()) }
                }
            }
            let count = buildPollSet()
            let ready: Int
            switch SocketSyscall.poll(pollSet, count, timeoutNanoseconds: pollTimeout()) {
            case .success(let n): ready = n
            case .failure(let e): throw .system("polling", target: "the NBD server's descriptors", e)
            }
            now = monotonicNanoseconds()
            if ready > 0 { progressed() }
            // A quiesce asked for while polling starts before anything that arrived meanwhile is
            // looked at: a connection or request header that came after the request (the
            // caller's wake-up, say) is left for the successor.
            if !draining && !quiescing && quiesce.load(ordering: .acquiring) { beginQuiesce() }
            var backendSignalled = false
            for i in 0..<count where pollSet[i].revents != 0 {
                let owner = pollOwner[i]
                if owner >= 0 {
                    serviceEvents(Int(owner), pollSet[i].revents)
                } else if owner == -1 {
                    if !quiescing { acceptAll(pollSet[i].fd) }
                } else if owner == -3 {
                    _ = Syscall.read64(pollSet[i].fd)  // the wake-up: flags are checked at the top
                } else if owner == -4 {
                    continue  // the companion's events: it takes them in `service` below
                } else {
                    backendSignalled = true
                    // The counter is non-zero (POLLIN), so this read does not block.
                    _ = Syscall.read64(pollSet[i].fd)
                }
            }
            if totalInFlight > 0 || backendSignalled || companionInFlight > 0 { collectCompletions() }
            if let companion = configuration.companion {
                do throws(BackendError) { try companion.service(&backend, failed: backendFailure != nil, holding: quiescing) } catch {
                    throw .companion(error.message)
                }
            }
            serviceAll()
            checkTimeouts()
            if configuration.status != nil, now &- lastStatus >= UInt64(configuration.statusInterval.nanoseconds) { reportStatus() }
        }
    }
}

extension NBDServer where B: ~Copyable {
    /// Requests of the companion in the backend (0 without one).
    var companionInFlight: Int { configuration.companion?.inFlight ?? 0 }

    func log(_ message: @autoclosure () -> String) {
        if let log = configuration.log { log("nbd: " + message()) }
    }

    func notice(_ message: @autoclosure () -> String) {
        if let notice = configuration.notice ?? configuration.log { notice("nbd: " + message()) }
    }

    // MARK: the poll set

    /// Listeners (owner -1), the backend's descriptor (-2), the wake descriptor (-3), then every
    /// open client. Listeners are left out while stopping (they are closed) and while quiescing
    /// (they stay open: new connections wait in the backlog).
    mutating func buildPollSet() -> Int {
        var n = 0
        if let fd = configuration.wakeDescriptor {
            pollSet[n] = pollfd(fd: fd, events: Int16(POLLIN), revents: 0); pollOwner[n] = -3; n += 1
        }
        if !draining && !quiescing {
            if unixListenerFD >= 0 {
                pollSet[n] = pollfd(fd: unixListenerFD, events: Int16(POLLIN), revents: 0); pollOwner[n] = -1; n += 1
            }
            if tcpListenerFD >= 0 {
                pollSet[n] = pollfd(fd: tcpListenerFD, events: Int16(POLLIN), revents: 0); pollOwner[n] = -1; n += 1
            }
        }
        if let fd = backend.completionDescriptor {
            pollSet[n] = pollfd(fd: fd, events: Int16(POLLIN), revents: 0); pollOwner[n] = -2; n += 1
        }
        if !quiescing, let fd = configuration.companion?.descriptor {
            pollSet[n] = pollfd(fd: fd, events: Int16(POLLIN), revents: 0); pollOwner[n] = -4; n += 1
        }
        for i in 0..<clientCount {
            let c = clients[i]
            guard c.phase == .handshake || c.phase == .transmission else { continue }
            var events: Int16 = 0
            if wantsInput(i) { events |= Int16(POLLIN) }
            if c.waitingToSend { events |= Int16(POLLOUT) }
            // Even with no events: POLLHUP and POLLERR are reported.
            pollSet[n] = pollfd(fd: c.fd, events: events, revents: 0); pollOwner[n] = Int32(i); n += 1
        }
        return n
    }

    /// Whether reading this client can make progress now.
    func wantsInput(_ i: Int) -> Bool {
        let c = clients[i]
        guard c.inputOpen else { return false }
        switch c.input {
        case .clientFlags: return !quiescing
        case .optionHeader: return !c.hasHandshakeOutput && !quiescing  // one option answered at a time
        case .requestHeader: return c.freeHead >= 0 && !quiescing
        case .request(let r): return c.requests[Int(r)].state != .waitingForRoom
        default: return true
        }
    }

    /// 0 while there is work. With requests in a backend that has no descriptor: 0 until
    /// `busyPoll` after anything last happened, then sleeps of 20 µs doubling to 1 ms. Otherwise
    /// 100 ms (the stop flag and the timeouts are checked at least that often). A backend with a
    /// descriptor wakes the loop itself, so the loop never spins for it.
    mutating func pollTimeout() -> Int64 {
        for i in 0..<clientCount where clients[i].pumpAgain { return 0 }
        if roomReleased && anyWaitingForRoom() { return 0 }
        var timeout: Int64 = 100_000_000
        if totalInFlight + companionInFlight > 0 && backend.completionDescriptor == nil {
            if Int64(now &- lastProgress) < configuration.busyPoll.nanoseconds { return 0 }
            timeout = idleSleep
            idleSleep = min(idleSleep * 2, 1_000_000)
        }
        if draining { timeout = min(timeout, Int64(drainDeadline &- now)) }
        if quiescing { timeout = min(timeout, Int64(quiesceDeadline &- now)) }
        return max(0, timeout)
    }

    // MARK: accepting

    mutating func acceptAll(_ listenerFD: Int32) {
        let isTCP = listenerFD == tcpListenerFD
        for _ in 0..<16 {
            let fd: Int32
            switch SocketSyscall.accept(listenerFD) {
            case .success(let raw): fd = raw
            case .failure(let e) where e.rawValue == EAGAIN: return
            case .failure(let e):
                log("accept failed: \(e)")  // EMFILE, ECONNABORTED ...: try again next round
                return
            }
            // Served connections take the first `maximumClients` slots, refused ones the rest.
            let limit = configuration.maximumClients
            var refusing = false
            var found = (0..<limit).first(where: { clients[$0].phase == .free })
            if found == nil {
                statistics.connectionsRefused += 1
                found = (limit..<clientCount).first(where: { clients[$0].phase == .free })
                guard found != nil else {
                    notice("refusing connection \(statistics.connectionsRefused): \(limit) clients are being served (the limit) and \(configuration.refusingClients) more are being told so; closed at once")
                    Syscall.close(fd)
                    continue
                }
                refusing = true
                notice("refusing connection \(statistics.connectionsRefused): \(limit) clients are being served (the limit); it is told so during option haggling")
            }
            let slot = found!
            if isTCP { _ = SocketSyscall.setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1) }
            clients[slot].open(fd: fd, isTCP: isTCP, now: now)
            clients[slot].refusing = refusing
            activeClients += 1
            statistics.connectionsAccepted += 1
            var out = ByteWriter(UnsafeMutableRawBufferPointer(start: clients[slot].outBase, count: clients[slot].outCapacity))
            NBDHandshake.writeGreeting(into: &out)
            clients[slot].outEnd = out.count
            log("client \(slot) connected (\(isTCP ? "TCP" : "UNIX socket"))")
            sendOutput(slot)
        }
    }

    // MARK: servicing clients

    mutating func serviceEvents(_ i: Int, _ revents: Int16) {
        guard clients[i].phase == .handshake || clients[i].phase == .transmission else { return }
        if revents & Int16(POLLERR | POLLNVAL) != 0 {
            close(i, "socket error")
            return
        }
        if revents & Int16(POLLHUP) != 0 {
            // Both directions are shut (a UNIX socket's peer closed): no reply can be delivered.
            // What it sent before closing is still taken (up to a turn's budget; e.g. writes
            // followed by NBD_CMD_DISC), then the connection is closed; requests already in the
            // backend complete there.
            if wantsInput(i) { pumpInput(i) }
            close(i, "hung up")
            return
        }
        if revents & Int16(POLLOUT) != 0 { clients[i].waitingToSend = false }
        if revents & Int16(POLLIN) != 0 { clients[i].pumpAgain = true }
    }

    /// Reads, sends and closes what can be, for every client, and retries those waiting for room.
    /// Room released while sending (a READ's buffer) is offered again in the same round: up to
    /// three passes, then the next poll does not wait.
    mutating func serviceAll() {
        for _ in 0..<3 {
            let retryRoom = roomReleased
            roomReleased = false
            for i in 0..<clientCount {
                guard clients[i].phase == .handshake || clients[i].phase == .transmission else { continue }
                if retryRoom, case .request(let r) = clients[i].input, clients[i].requests[Int(r)].state == .waitingForRoom {
                    clients[i].pumpAgain = true
                }
                service(i)
            }
            if !roomReleased || !anyWaitingForRoom() { break }
        }
    }

    mutating func progressed() {
        lastProgress = now
        idleSleep = 20_000
    }

    func anyWaitingForRoom() -> Bool {
        for i in 0..<clientCount {
            if case .request(let r) = clients[i].input, clients[i].requests[Int(r)].state == .waitingForRoom { return true }
        }
        return false
    }

    mutating func service(_ i: Int) {
        for _ in 0..<2 {
            if clients[i].pumpAgain {
                clients[i].pumpAgain = false
                if clients[i].inputOpen { pumpInput(i) }
            }
            guard clients[i].phase == .handshake || clients[i].phase == .transmission else { return }
            if clients[i].hasOutput && !clients[i].waitingToSend { sendOutput(i) }
            guard clients[i].phase == .handshake || clients[i].phase == .transmission else { return }
            if !clients[i].pumpAgain || !clients[i].inputOpen { break }
        }
        let c = clients[i]
        if (!c.inputOpen || draining) && c.used == 0 && !c.hasOutput {
            close(i, draining ? "server stopping" : nil)
        }
    }

    /// Closes the connection (`reason` nil: a normal end). Buffers not in the backend are
    /// released now; those in it when they complete.
    mutating func close(_ i: Int, _ reason: String?) {
        guard clients[i].phase == .handshake || clients[i].phase == .transmission else { return }
        Syscall.close(clients[i].fd)
        clients[i].fd = -1
        clients[i].inputOpen = false
        clients[i].pumpAgain = false
        clients[i].waitingToSend = false
        statistics.connectionsClosed += 1
        if let reason { log("client \(i) closed: \(reason)") } else { log("client \(i) disconnected") }
        if case .request(let r) = clients[i].input {
            if clients[i].requests[Int(r)].hasBuffer { releaseBuffer(i, r) }
            clients[i].freeSlot(r)
        }
        clients[i].input = .clientFlags
        while clients[i].readyHead >= 0 {
            let r = clients[i].popReady()
            if clients[i].requests[Int(r)].hasBuffer { releaseBuffer(i, r) }
            clients[i].freeSlot(r)
        }
        clients[i].outStart = 0
        clients[i].outEnd = 0
        if clients[i].inFlight == 0 {
            clients[i].phase = .free
            activeClients -= 1
        } else {
            clients[i].phase = .closed
        }
    }

    mutating func releaseBuffer(_ i: Int, _ r: Int32) {
        backend.release(clients[i].requests[Int(r)].buffer)
        clients[i].requests[Int(r)].hasBuffer = false
        totalReserved -= 1
        roomReleased = true
    }

    /// Calls `configuration.status` with what the server and its backend look like now.
    mutating func reportStatus() {
        lastStatus = now
        configuration.status?(NBDServerStatus(statistics: statistics, connectedClients: connectedClients,
                                              inFlight: totalInFlight, backend: backend.health))
    }

    // MARK: timeouts and stopping

    mutating func checkTimeouts() {
        let stall = UInt64(configuration.stallTimeout.nanoseconds)
        let handshake = UInt64(configuration.handshakeTimeout.nanoseconds)
        for i in 0..<clientCount {
            let c = clients[i]
            switch c.phase {
            case .handshake:
                if now &- c.connectedAt > handshake { close(i, "still negotiating after \(configuration.handshakeTimeout)") }
            case .transmission:
                var partial = c.waitingToSend
                switch c.input {
                case .request(let r): partial = partial || c.requests[Int(r)].state != .waitingForRoom
                case .requestHeader:
                    // (Not while quiescing: then the server, not the client, leaves a header unread.)
                    partial = partial || (c.buffered > 0 && c.freeHead >= 0 && c.inputOpen && !quiescing)
                default: break
                }
                if partial && now &- c.lastActivity > stall { close(i, "stalled mid-request for \(configuration.stallTimeout)") }
            default: break
            }
        }
    }

    mutating func beginDrain() {
        draining = true
        drainDeadline = now &+ UInt64(configuration.drainTimeout.nanoseconds)
        closeListeners()
        configuration.companion?.beginStop()
        log("stopping: no new connections; finishing \(totalInFlight) requests in flight")
        for i in 0..<clientCount {
            switch clients[i].phase {
            case .handshake: close(i, "server stopping")
            case .transmission:
                // Requests already started are finished; later ones are answered ESHUTDOWN; the
                // connection closes once nothing of it is in flight.
                break
            default: break
            }
        }
    }

    /// After `run`: every connection closed; requests still in the backend are left to it.
    mutating func finish() {
        for i in 0..<clientCount {
            close(i, draining ? "server stopped" : "server loop ended")
            if clients[i].phase == .closed {
                // Completions that never came: the backend keeps those buffers.
                statistics.abandonedRequests += clients[i].inFlight
                clients[i].phase = .free
                activeClients -= 1
            }
        }
        closeListeners()
    }

    /// Closes the listeners (removing the UNIX socket file).
    mutating func closeListeners() {
        unixListener = nil
        tcpListener = nil
        unixListenerFD = -1
        tcpListenerFD = -1
    }
}
