import Upgrade

/// What one NBD server hands to its successor in a new process (driver hot upgrade): the
/// listening sockets, and each connection at a message boundary with the bytes it had received and
/// not consumed. A plain value; `encoded()` is one blob for the upgrade record, and the descriptors
/// travel beside it (SCM_RIGHTS) in the order of `descriptors`. `init(decoding:descriptors:)`
/// trusts nothing: every field is bounded and checked, and each received descriptor must be used
/// exactly once.
///
/// Connections in transmission may have requests in flight in the backend (when it can hand them
/// over: `BlockBackend.handsOverInFlight`): each travels with its request slot, and the connection
/// with its slot and generation in the server, so the backend's tags stay valid for the successor.
///
/// Encoding (little-endian, Upgrade's codec: ByteCoding.swift), version 3:
///
///     magic "NBDH", version u16, length u32 (of everything after it),
///     export size u64, minimum block u32, preferred block u32, maximum payload u32,
///     descriptor count u32,
///     UNIX listener present u8 [fd index u32, path length u16, path],
///     TCP listener present u8 [fd index u32, port u16],
///     client count u32, per client:
///       fd index u32, isTCP u8, phase u8, client flags u32, promised transmission flags u16,
///       pending input length u32, pending input,
///       server slot u32, generation u32, requests in flight u32, per request:
///         request slot u32, flushing u8, operation u8, flush after u8, command u16, cookie u64,
///         offset u64, length u32, buffer first u32, count u32, length u32
///
/// Version 2 (builds before requests were carried) is version 3 without the fields after the
/// pending input: read as connections in the order given, nothing in flight. Version 1 (older
/// builds) was big-endian with a u32 version and a total length; it is refused by name, so an
/// upgrade from such a build stops before anything is adopted.
public struct NBDHandoverState: Sendable, Equatable {
    /// Where a connection's input is: always at a message boundary.
    public enum Phase: UInt8, Sendable {
        /// Greeting sent; the client flags are read next.
        case awaitingClientFlags = 0
        /// Haggling: the next option header is read next.
        case negotiating = 1
        /// The next request header is read next.
        case transmission = 2
    }

    public struct Client: Sendable, Equatable {
        public var fd: Int32
        public var isTCP: Bool
        public var phase: Phase
        /// The client flags it sent (0 while `awaitingClientFlags`).
        public var clientFlags: UInt32
        /// The transmission flags it was promised (0 before the transmission phase); its requests
        /// are held to these.
        public var promisedFlags: UInt16
        /// Received and not consumed, parsed first by the successor (at most `maximumPendingInput`).
        public var pendingInput: [UInt8]
        /// Where the connection is in the server, and which connection of that slot it is: both
        /// are part of the backend tags of its requests in flight.
        public var slot: Int
        public var generation: UInt32
        /// Its requests submitted to the backend and not completed (only in transmission).
        public var inFlight: [Request]

        public init(fd: Int32, isTCP: Bool, phase: Phase, clientFlags: UInt32, promisedFlags: UInt16, pendingInput: [UInt8],
                    slot: Int, generation: UInt32 = 1, inFlight: [Request] = []) {
            self.fd = fd
            self.isTCP = isTCP
            self.phase = phase
            self.clientFlags = clientFlags
            self.promisedFlags = promisedFlags
            self.pendingInput = pendingInput
            self.slot = slot
            self.generation = generation
            self.inFlight = inFlight
        }

        /// The backend tag of `request`, as the server that submitted it made it.
        public func tag(of request: Request) -> UInt64 {
            UInt64(generation & 0xFF_FFFF) << 40 | UInt64(slot) << 20 | UInt64(request.slot)
        }
    }

    /// A request in flight in the backend: which request slot of its connection, what was
    /// submitted (a FUA TRIM / WRITE_ZEROES may be in its flush), what the client asked, the buffer.
    public struct Request: Sendable, Equatable {
        public var slot: Int
        public var flushing: Bool
        public var operation: BackendOperation
        public var flushAfter: Bool
        public var command: UInt16
        public var cookie: UInt64
        public var offset: UInt64
        public var length: Int
        public var buffer: BackendBuffer

        public init(slot: Int, flushing: Bool, operation: BackendOperation, flushAfter: Bool, command: UInt16, cookie: UInt64,
                    offset: UInt64, length: Int, buffer: BackendBuffer) {
            self.slot = slot
            self.flushing = flushing
            self.operation = operation
            self.flushAfter = flushAfter
            self.command = command
            self.cookie = cookie
            self.offset = offset
            self.length = length
            self.buffer = buffer
        }
    }

    public struct UnixListener: Sendable, Equatable {
        public var fd: Int32
        public var path: String
        public init(fd: Int32, path: String) { self.fd = fd; self.path = path }
    }

    public struct TCPListener: Sendable, Equatable {
        public var fd: Int32
        public var port: UInt16
        public init(fd: Int32, port: UInt16) { self.fd = fd; self.port = port }
    }

    public static let magic = Array("NBDH".utf8)
    public static let version: UInt16 = 3
    /// Magic and version as the codec checks them.
    public static let format = BlobFormat(name: "NBD hand-over state", magic: magic, version: version)
    /// The most unconsumed input one connection can have (the server's input buffer).
    public static var maximumPendingInput: Int { ClientState.inputCapacity }
    /// As many connections as a server can have (`maximumClients` < 2^20), and requests per
    /// connection (`requestsPerClient` < 2^20).
    public static let maximumClients = (1 << 20) - 1
    public static let maximumRequests = (1 << 20) - 1
    /// Client flags and transmission flags a server of this version sends or accepts.
    static let knownClientFlags = NBDProtocol.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue
    static let knownPromisedFlags = NBDProtocol.TransmissionFlags([.hasFlags, .readOnly, .sendFlush, .sendFUA, .sendTrim,
                                                                   .sendWriteZeroes, .canMultiConn]).rawValue

    /// The export the clients were told about.
    public var exportSize: UInt64
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumPayload: UInt32
    public var unixListener: UnixListener?
    public var tcpListener: TCPListener?
    public var clients: [Client]

    public init(exportSize: UInt64, minimumBlockSize: UInt32, preferredBlockSize: UInt32, maximumPayload: UInt32,
                unixListener: UnixListener? = nil, tcpListener: TCPListener? = nil, clients: [Client] = []) {
        self.exportSize = exportSize
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumPayload = maximumPayload
        self.unixListener = unixListener
        self.tcpListener = tcpListener
        self.clients = clients
    }

    /// Every descriptor, in the order the encoding numbers them: the UNIX listener, the TCP
    /// listener, then the clients. Pass them in this order; the decoder takes them by position.
    public var descriptors: [Int32] {
        var fds: [Int32] = []
        if let unixListener { fds.append(unixListener.fd) }
        if let tcpListener { fds.append(tcpListener.fd) }
        for c in clients { fds.append(c.fd) }
        return fds
    }

    /// Why this state cannot be served, or nil. Checked by the decoder and by `NBDServer.init(adopting:)`.
    public func problem() -> String? {
        if let p = NBDExport.problem(name: "", description: "", minimumBlockSize: Int(minimumBlockSize),
                                     preferredBlockSize: Int(preferredBlockSize), maximumPayload: Int(maximumPayload)) {
            return "export: \(p)"
        }
        // No listener at all is a server only for its companion (`serve blk --ublk` without --nbd).
        if unixListener == nil && tcpListener == nil && !clients.isEmpty { return "clients but no listening socket" }
        if let u = unixListener {
            let n = u.path.utf8.count
            if n == 0 || n >= 108 || u.path.utf8.contains(0) { return "UNIX socket path of \(n) bytes (1...107, no NUL)" }
        }
        if clients.count > Self.maximumClients { return "\(clients.count) clients, more than \(Self.maximumClients)" }
        for (k, c) in clients.enumerated() {
            if c.clientFlags & ~Self.knownClientFlags != 0 { return "client \(k): unknown client flags \(c.clientFlags)" }
            if c.promisedFlags & ~Self.knownPromisedFlags != 0 { return "client \(k): unknown transmission flags \(c.promisedFlags)" }
            switch c.phase {
            case .awaitingClientFlags where c.clientFlags != 0 || c.promisedFlags != 0,
                 .negotiating where c.promisedFlags != 0:
                return "client \(k): flags set before they were negotiated"
            case .transmission where c.promisedFlags & NBDProtocol.TransmissionFlags.hasFlags.rawValue == 0:
                return "client \(k): transmission flags without HAS_FLAGS"
            default: break
            }
            if c.pendingInput.count > Self.maximumPendingInput {
                return "client \(k): \(c.pendingInput.count) bytes of pending input, more than \(Self.maximumPendingInput)"
            }
            if c.slot < 0 || c.slot >= Self.maximumClients { return "client \(k): server slot \(c.slot)" }
            if !c.inFlight.isEmpty && c.phase != .transmission { return "client \(k): requests in flight before the transmission phase" }
            var requestSlots = Set<Int>()
            for r in c.inFlight {
                guard r.slot >= 0, r.slot < Self.maximumRequests, requestSlots.insert(r.slot).inserted else {
                    return "client \(k): request slot \(r.slot) out of range or in flight twice"
                }
                if let problem = r.problem() { return "client \(k), request slot \(r.slot): \(problem)" }
            }
        }
        if Set(clients.map(\.slot)).count != clients.count { return "two clients in one server slot" }
        let fds = descriptors
        if fds.contains(where: { $0 < 0 }) { return "a negative descriptor" }
        if Set(fds).count != fds.count { return "a descriptor listed twice" }
        return nil
    }

    /// The blob for the upgrade record (see the type's documentation).
    public func encoded() -> [UInt8] {
        var w = Upgrade.ByteWriter(capacity: 64 + clients.reduce(0) { $0 + 16 + $1.pendingInput.count })
        w.header(Self.format)
        w.lengthPrefixed { w in
            w.u64(exportSize)
            w.u32(minimumBlockSize)
            w.u32(preferredBlockSize)
            w.u32(maximumPayload)
            w.u32(UInt32(descriptors.count))
            var index: UInt32 = 0
            if let u = unixListener {
                w.u8(1); w.u32(index); index += 1
                w.string(u.path)
            } else {
                w.u8(0)
            }
            if let t = tcpListener {
                w.u8(1); w.u32(index); index += 1
                w.u16(t.port)
            } else {
                w.u8(0)
            }
            w.u32(UInt32(clients.count))
            for c in clients {
                w.u32(index); index += 1
                w.u8(c.isTCP ? 1 : 0)
                w.u8(c.phase.rawValue)
                w.u32(c.clientFlags)
                w.u16(c.promisedFlags)
                w.u32(UInt32(c.pendingInput.count))
                w.raw(c.pendingInput)
                w.u32(UInt32(c.slot))
                w.u32(c.generation)
                w.u32(UInt32(c.inFlight.count))
                for r in c.inFlight {
                    w.u32(UInt32(r.slot)); w.u8(r.flushing ? 1 : 0); w.u8(r.operation.rawValue); w.u8(r.flushAfter ? 1 : 0)
                    w.u16(r.command); w.u64(r.cookie); w.u64(r.offset); w.u32(UInt32(r.length))
                    w.u32(UInt32(r.buffer.first)); w.u32(UInt32(r.buffer.count)); w.u32(UInt32(r.buffer.length))
                }
            }
        }
        return w.bytes
    }

    /// Decodes `encoded()`'s output; `descriptors` are the received descriptors in the order they
    /// were sent. Throws on anything out of place, naming the field; nothing is closed either way.
    public init(decoding bytes: [UInt8], descriptors fds: [Int32]) throws(NBDHandoverError) {
        do {
            self = try Self.decode(bytes, fds)
        } catch let error as NBDHandoverError {
            throw error
        } catch let error as StateRecordError {
            throw NBDHandoverError(error)
        } catch {
            throw .invalid("\(error)")  // decode throws nothing else
        }
        if let problem = problem() { throw .invalid(problem) }
    }

    /// The decoding proper: the codec's errors (`StateRecordError`, naming the field) and this
    /// format's own, both mapped to `NBDHandoverError` by the initialiser.
    private static func decode(_ bytes: [UInt8], _ fds: [Int32]) throws -> NBDHandoverState {
        // Version 1 was big-endian with a u32 version: its bytes 4-7 are 00 00 00 01, which the
        // header below would read as version 0. Named, so the log says which version came.
        if bytes.starts(with: magic + [0, 0, 0, 1]) { throw NBDHandoverError.unsupportedVersion(1) }
        // Version 2 is version 3 without the slots and requests in flight (see the type).
        let version2 = bytes.starts(with: magic + [2, 0])
        var r = Upgrade.ByteReader(bytes)
        try r.header(version2 ? BlobFormat(name: format.name, magic: magic, version: 2) : format)
        _ = try r.length("body length")
        let size = try r.u64("export size")
        let minimum = try r.u32("minimum block size")
        let preferred = try r.u32("preferred block size")
        let maximum = try r.u32("maximum payload")
        let descriptorCount = Int(try r.u32("descriptor count"))
        guard descriptorCount == fds.count else {
            throw NBDHandoverError.descriptors("the state lists \(descriptorCount) descriptors, \(fds.count) were received")
        }
        var used = [Bool](repeating: false, count: descriptorCount)
        func take(_ field: String, _ r: inout Upgrade.ByteReader) throws -> Int32 {
            let index = Int(try r.u32(field))
            guard index < descriptorCount else { throw NBDHandoverError.badField(field, "index \(index) of \(descriptorCount) descriptors") }
            guard !used[index] else { throw NBDHandoverError.badField(field, "descriptor \(index) used twice") }
            used[index] = true
            return fds[index]
        }
        var unix: UnixListener?
        switch try r.u8("UNIX listener present") {
        case 0: break
        case 1:
            let fd = try take("UNIX listener fd index", &r)
            let length = Int(try r.u16("UNIX socket path length"))
            guard length >= 1 && length < 108 else { throw NBDHandoverError.badField("UNIX socket path length", "\(length) (1...107)") }
            let raw = try r.take(length, "UNIX socket path")
            guard !raw.contains(0), let path = String(validating: raw, as: UTF8.self) else {
                throw NBDHandoverError.badField("UNIX socket path", "not UTF-8 without NUL")
            }
            unix = UnixListener(fd: fd, path: path)
        case let v: throw NBDHandoverError.badField("UNIX listener present", "\(v) (0 or 1)")
        }
        var tcp: TCPListener?
        switch try r.u8("TCP listener present") {
        case 0: break
        case 1:
            let fd = try take("TCP listener fd index", &r)
            tcp = TCPListener(fd: fd, port: try r.u16("TCP port"))
        case let v: throw NBDHandoverError.badField("TCP listener present", "\(v) (0 or 1)")
        }
        let clientCount = Int(try r.u32("client count"))
        // Each client takes at least 16 bytes: bounds the count by the input before allocating.
        guard clientCount <= maximumClients, clientCount <= r.remaining / 16 else {
            throw NBDHandoverError.badField("client count", "\(clientCount) with \(r.remaining) bytes left")
        }
        var clients: [Client] = []
        clients.reserveCapacity(clientCount)
        for k in 0..<clientCount {
            let fd = try take("client \(k) fd index", &r)
            let tcpByte = try r.u8("client \(k) isTCP")
            guard tcpByte <= 1 else { throw NBDHandoverError.badField("client \(k) isTCP", "\(tcpByte) (0 or 1)") }
            let phaseByte = try r.u8("client \(k) phase")
            guard let phase = Phase(rawValue: phaseByte) else { throw NBDHandoverError.badField("client \(k) phase", "\(phaseByte) (0...2)") }
            let clientFlags = try r.u32("client \(k) client flags")
            let promised = try r.u16("client \(k) promised flags")
            let pendingLength = Int(try r.u32("client \(k) pending input length"))
            guard pendingLength <= maximumPendingInput else {
                throw NBDHandoverError.badField("client \(k) pending input length", "\(pendingLength), more than \(maximumPendingInput)")
            }
            let pending = Array(try r.take(pendingLength, "client \(k) pending input"))
            var client = Client(fd: fd, isTCP: tcpByte == 1, phase: phase, clientFlags: clientFlags,
                                promisedFlags: promised, pendingInput: pending, slot: k)
            if !version2 {
                client.slot = Int(try r.u32("client \(k) server slot"))
                client.generation = try r.u32("client \(k) generation")
                let count = Int(try r.u32("client \(k) requests in flight"))
                // Each request takes 41 bytes: bounds the count by the input before allocating.
                guard count <= r.remaining / 41 else {
                    throw NBDHandoverError.badField("client \(k) requests in flight", "\(count) with \(r.remaining) bytes left")
                }
                for q in 0..<count {
                    let field = "client \(k) request \(q)"
                    let slot = Int(try r.u32("\(field) slot"))
                    let flushing = try r.u8("\(field) flushing")
                    let code = try r.u8("\(field) operation")
                    let flushAfter = try r.u8("\(field) flush after")
                    guard flushing <= 1, flushAfter <= 1, let operation = BackendOperation(rawValue: code) else {
                        throw NBDHandoverError.badField("\(field) flags or operation", "\(flushing), \(flushAfter), \(code)")
                    }
                    let command = try r.u16("\(field) command")
                    let cookie = try r.u64("\(field) cookie")
                    let offset = try r.u64("\(field) offset")
                    let length = Int(try r.u32("\(field) length"))
                    let buffer = BackendBuffer(first: Int(try r.u32("\(field) buffer first")), count: Int(try r.u32("\(field) buffer count")),
                                               length: Int(try r.u32("\(field) buffer length")))
                    client.inFlight.append(Request(slot: slot, flushing: flushing == 1, operation: operation, flushAfter: flushAfter == 1,
                                                   command: command, cookie: cookie, offset: offset, length: length, buffer: buffer))
                }
            }
            clients.append(client)
        }
        guard r.remaining == 0 else { throw NBDHandoverError.trailingBytes(r.remaining) }
        guard used.allSatisfy({ $0 }) else { throw NBDHandoverError.descriptors("a received descriptor is not used by the state") }
        return NBDHandoverState(exportSize: size, minimumBlockSize: minimum, preferredBlockSize: preferred, maximumPayload: maximum,
                                unixListener: unix, tcpListener: tcp, clients: clients)
    }
}

extension NBDHandoverState.Request {
    /// Why a server cannot continue this request, or nil: the operation is the command's, the
    /// buffer holds a READ's or WRITE's data (and nothing for the rest), the flush phase only
    /// where a flush follows.
    func problem() -> String? {
        typealias C = NBDProtocol.Command
        let expected: [BackendOperation]
        switch command {
        case C.read: expected = [.read]
        case C.write: expected = [.write, .writeFUA]
        case C.flush: expected = [.flush]
        case C.trim: expected = [.trim]
        case C.writeZeroes: expected = [.writeZeroes]
        default: return "command \(command) is not one the backend serves"
        }
        guard expected.contains(operation) else { return "command \(command) submitted as \(operation)" }
        if flushing && !flushAfter { return "in a flush phase without FUA" }
        if flushAfter && !(operation == .trim || operation == .writeZeroes) { return "a flush after \(operation)" }
        guard buffer.first >= 0, buffer.count >= 1 else { return "buffer \(buffer)" }
        switch operation {
        case .read, .write, .writeFUA:
            guard length > 0, buffer.length == length else { return "\(length) bytes in a buffer of \(buffer.length)" }
        case .flush, .trim, .writeZeroes:
            guard buffer.length == 0 else { return "\(operation) with a buffer of \(buffer.length) bytes" }
        }
        return nil
    }
}

/// Why an encoded `NBDHandoverState` was refused.
public enum NBDHandoverError: Error, Equatable, CustomStringConvertible {
    case badMagic([UInt8])
    case unsupportedVersion(UInt16)
    case lengthMismatch(declared: Int, actual: Int)
    /// The input ended inside this field.
    case truncated(String)
    case trailingBytes(Int)
    /// A field out of range: which, and what it held.
    case badField(String, String)
    /// The descriptors do not match the state.
    case descriptors(String)
    /// Well-formed, but not a state a server can take on (`NBDHandoverState.problem()`).
    case invalid(String)

    public var description: String {
        switch self {
        case .badMagic(let m): return "NBD hand-over state: bad magic \(m.map { String($0, radix: 16) }.joined(separator: " "))"
        case .unsupportedVersion(1):
            return "NBD hand-over state: version 1 (big-endian, from an older build), this server reads version \(NBDHandoverState.version)"
        case .unsupportedVersion(let v): return "NBD hand-over state: version \(v), this server reads version \(NBDHandoverState.version)"
        case .lengthMismatch(let d, let a): return "NBD hand-over state: declares \(d) bytes, \(a) were given"
        case .truncated(let f): return "NBD hand-over state: truncated in \(f)"
        case .trailingBytes(let n): return "NBD hand-over state: \(n) bytes after the end"
        case .badField(let f, let v): return "NBD hand-over state: \(f) is \(v)"
        case .descriptors(let why): return "NBD hand-over state: \(why)"
        case .invalid(let why): return "NBD hand-over state: \(why)"
        }
    }
}

extension NBDHandoverError {
    /// The codec's error as this format's, naming the same field.
    init(_ error: StateRecordError) {
        switch error {
        case .badMagic(_, let found): self = .badMagic(found)
        case .unsupportedVersion(let found, _): self = .unsupportedVersion(found)
        case .truncated(let field, _): self = .truncated(field)
        case .lengthMismatch(_, let declared, let actual): self = .lengthMismatch(declared: declared, actual: actual)
        case .invalid(let field, let why): self = .badField(field, why)
        case .checksumMismatch: self = .invalid("\(error)")  // this format has no checksum
        }
    }
}
