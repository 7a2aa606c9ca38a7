/// What one NBD server hands to its successor in a new process (driver hot upgrade): the
/// listening sockets, and each connection at a message boundary with the bytes it had received and
/// not consumed. A plain value; `encoded()` is one blob for the upgrade record, and the descriptors
/// travel beside it (SCM_RIGHTS) in the order of `descriptors`. `init(decoding:descriptors:)`
/// trusts nothing: every field is bounded and checked, and each received descriptor must be used
/// exactly once.
///
/// Encoding (big-endian), version 1:
///
///     magic "NBDH" u32, version u32, total length u32,
///     export size u64, minimum block u32, preferred block u32, maximum payload u32,
///     descriptor count u32,
///     UNIX listener present u8 [fd index u32, path length u16, path],
///     TCP listener present u8 [fd index u32, port u16],
///     client count u32, per client:
///       fd index u32, isTCP u8, phase u8, client flags u32, promised transmission flags u16,
///       pending input length u32, pending input
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

        public init(fd: Int32, isTCP: Bool, phase: Phase, clientFlags: UInt32, promisedFlags: UInt16, pendingInput: [UInt8]) {
            self.fd = fd
            self.isTCP = isTCP
            self.phase = phase
            self.clientFlags = clientFlags
            self.promisedFlags = promisedFlags
            self.pendingInput = pendingInput
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

    public static let magic: UInt32 = 0x4E42_4448  // "NBDH"
    public static let version: UInt32 = 1
    /// The most unconsumed input one connection can have (the server's input buffer).
    public static var maximumPendingInput: Int { ClientState.inputCapacity }
    /// As many connections as a server can have (`maximumClients` < 2^20).
    public static let maximumClients = (1 << 20) - 1
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
        if unixListener == nil && tcpListener == nil { return "no listening socket" }
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
        }
        let fds = descriptors
        if fds.contains(where: { $0 < 0 }) { return "a negative descriptor" }
        if Set(fds).count != fds.count { return "a descriptor listed twice" }
        return nil
    }

    /// The blob for the upgrade record (see the type's documentation).
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        func u8(_ v: UInt8) { out.append(v) }
        func u16(_ v: UInt16) { out.append(UInt8(v >> 8)); out.append(UInt8(truncatingIfNeeded: v)) }
        func u32(_ v: UInt32) { u16(UInt16(v >> 16)); u16(UInt16(truncatingIfNeeded: v)) }
        func u64(_ v: UInt64) { u32(UInt32(v >> 32)); u32(UInt32(truncatingIfNeeded: v)) }
        u32(Self.magic)
        u32(Self.version)
        u32(0)  // total length, patched below
        u64(exportSize)
        u32(minimumBlockSize)
        u32(preferredBlockSize)
        u32(maximumPayload)
        u32(UInt32(descriptors.count))
        var index: UInt32 = 0
        if let u = unixListener {
            u8(1); u32(index); index += 1
            u16(UInt16(u.path.utf8.count)); out.append(contentsOf: u.path.utf8)
        } else {
            u8(0)
        }
        if let t = tcpListener {
            u8(1); u32(index); index += 1
            u16(t.port)
        } else {
            u8(0)
        }
        u32(UInt32(clients.count))
        for c in clients {
            u32(index); index += 1
            u8(c.isTCP ? 1 : 0)
            u8(c.phase.rawValue)
            u32(c.clientFlags)
            u16(c.promisedFlags)
            u32(UInt32(c.pendingInput.count))
            out.append(contentsOf: c.pendingInput)
        }
        let total = UInt32(out.count)
        for k in 0..<4 { out[8 + k] = UInt8(truncatingIfNeeded: total >> (24 - 8 * k)) }
        return out
    }

    /// Decodes `encoded()`'s output; `descriptors` are the received descriptors in the order they
    /// were sent. Throws on anything out of place, naming the field; nothing is closed either way.
    public init(decoding bytes: [UInt8], descriptors fds: [Int32]) throws(NBDHandoverError) {
        var r = Reader(bytes: bytes)
        let magic = try r.u32("magic")
        guard magic == Self.magic else { throw .badMagic(magic) }
        let version = try r.u32("version")
        guard version == Self.version else { throw .unsupportedVersion(version) }
        let total = try r.u32("total length")
        guard Int(total) == bytes.count else { throw .lengthMismatch(declared: Int(total), actual: bytes.count) }
        let size = try r.u64("export size")
        let minimum = try r.u32("minimum block size")
        let preferred = try r.u32("preferred block size")
        let maximum = try r.u32("maximum payload")
        let descriptorCount = Int(try r.u32("descriptor count"))
        guard descriptorCount == fds.count else {
            throw .descriptors("the state lists \(descriptorCount) descriptors, \(fds.count) were received")
        }
        var used = [Bool](repeating: false, count: descriptorCount)
        func take(_ field: String, _ r: inout Reader) throws(NBDHandoverError) -> Int32 {
            let index = Int(try r.u32(field))
            guard index < descriptorCount else { throw .badField(field, "index \(index) of \(descriptorCount) descriptors") }
            guard !used[index] else { throw .badField(field, "descriptor \(index) used twice") }
            used[index] = true
            return fds[index]
        }
        var unix: UnixListener?
        switch try r.u8("UNIX listener present") {
        case 0: break
        case 1:
            let fd = try take("UNIX listener fd index", &r)
            let length = Int(try r.u16("UNIX socket path length"))
            guard length >= 1 && length < 108 else { throw .badField("UNIX socket path length", "\(length) (1...107)") }
            let raw = try r.bytes(length, "UNIX socket path")
            guard !raw.contains(0), let path = String(validating: raw, as: UTF8.self) else {
                throw .badField("UNIX socket path", "not UTF-8 without NUL")
            }
            unix = UnixListener(fd: fd, path: path)
        case let v: throw .badField("UNIX listener present", "\(v) (0 or 1)")
        }
        var tcp: TCPListener?
        switch try r.u8("TCP listener present") {
        case 0: break
        case 1:
            let fd = try take("TCP listener fd index", &r)
            tcp = TCPListener(fd: fd, port: try r.u16("TCP port"))
        case let v: throw .badField("TCP listener present", "\(v) (0 or 1)")
        }
        let clientCount = Int(try r.u32("client count"))
        // Each client takes at least 16 bytes: bounds the count by the input before allocating.
        guard clientCount <= Self.maximumClients, clientCount <= r.remaining / 16 else {
            throw .badField("client count", "\(clientCount) with \(r.remaining) bytes left")
        }
        var clients: [Client] = []
        clients.reserveCapacity(clientCount)
        for k in 0..<clientCount {
            let fd = try take("client \(k) fd index", &r)
            let tcpByte = try r.u8("client \(k) isTCP")
            guard tcpByte <= 1 else { throw .badField("client \(k) isTCP", "\(tcpByte) (0 or 1)") }
            let phaseByte = try r.u8("client \(k) phase")
            guard let phase = Phase(rawValue: phaseByte) else { throw .badField("client \(k) phase", "\(phaseByte) (0...2)") }
            let clientFlags = try r.u32("client \(k) client flags")
            let promised = try r.u16("client \(k) promised flags")
            let pendingLength = Int(try r.u32("client \(k) pending input length"))
            guard pendingLength <= Self.maximumPendingInput else {
                throw .badField("client \(k) pending input length", "\(pendingLength), more than \(Self.maximumPendingInput)")
            }
            let pending = try r.bytes(pendingLength, "client \(k) pending input")
            clients.append(Client(fd: fd, isTCP: tcpByte == 1, phase: phase, clientFlags: clientFlags,
                                  promisedFlags: promised, pendingInput: pending))
        }
        guard r.remaining == 0 else { throw .trailingBytes(r.remaining) }
        guard used.allSatisfy({ $0 }) else { throw .descriptors("a received descriptor is not used by the state") }
        self.init(exportSize: size, minimumBlockSize: minimum, preferredBlockSize: preferred, maximumPayload: maximum,
                  unixListener: unix, tcpListener: tcp, clients: clients)
        if let problem = problem() { throw .invalid(problem) }
    }

    struct Reader {
        let bytes: [UInt8]
        var offset = 0
        var remaining: Int { bytes.count - offset }

        mutating func bytes(_ n: Int, _ field: String) throws(NBDHandoverError) -> [UInt8] {
            guard n <= remaining else { throw .truncated(field) }
            defer { offset += n }
            return Array(bytes[offset..<(offset + n)])
        }
        mutating func u8(_ field: String) throws(NBDHandoverError) -> UInt8 {
            guard remaining >= 1 else { throw .truncated(field) }
            defer { offset += 1 }
            return bytes[offset]
        }
        mutating func u16(_ field: String) throws(NBDHandoverError) -> UInt16 {
            UInt16(try u8(field)) << 8 | UInt16(try u8(field))
        }
        mutating func u32(_ field: String) throws(NBDHandoverError) -> UInt32 {
            UInt32(try u16(field)) << 16 | UInt32(try u16(field))
        }
        mutating func u64(_ field: String) throws(NBDHandoverError) -> UInt64 {
            UInt64(try u32(field)) << 32 | UInt64(try u32(field))
        }
    }
}

/// Why an encoded `NBDHandoverState` was refused.
public enum NBDHandoverError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt32)
    case unsupportedVersion(UInt32)
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
        case .badMagic(let m): return "NBD hand-over state: bad magic \(String(m, radix: 16))"
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
