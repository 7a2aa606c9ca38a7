import Upgrade

/// What one NBD server hands to its successor in a new process (driver hot upgrade): the
/// listening sockets, and each connection at a message boundary with the bytes it had received and
/// not consumed. A plain value; `encoded()` is one blob for the upgrade record, and the descriptors
/// travel beside it (SCM_RIGHTS) in the order of `descriptors`. `init(decoding:descriptors:)`
/// trusts nothing: every field is bounded and checked, and each received descriptor must be used
/// exactly once.
///
/// Encoding (little-endian, Upgrade's codec: ByteCoding.swift), version 2:
///
///     magic "NBDH", version u16, length u32 (of everything after it),
///     export size u64, minimum block u32, preferred block u32, maximum payload u32,
///     descriptor count u32,
///     UNIX listener present u8 [fd index u32, path length u16, path],
///     TCP listener present u8 [fd index u32, port u16],
///     client count u32, per client:
///       fd index u32, isTCP u8, phase u8, client flags u32, promised transmission flags u16,
///       pending input length u32, pending input
///
/// Version 1 (older builds) was big-endian with a u32 version and a total length; it is refused
/// by name, so an upgrade from such a build stops before anything is adopted.
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

    public static let magic = Array("NBDH".utf8)
    public static let version: UInt16 = 2
    /// Magic and version as the codec checks them.
    public static let format = BlobFormat(name: "NBD hand-over state", magic: magic, version: version)
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
        var r = Upgrade.ByteReader(bytes)
        try r.header(format)
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
            clients.append(Client(fd: fd, isTCP: tcpByte == 1, phase: phase, clientFlags: clientFlags,
                                  promisedFlags: promised, pendingInput: pending))
        }
        guard r.remaining == 0 else { throw NBDHandoverError.trailingBytes(r.remaining) }
        guard used.allSatisfy({ $0 }) else { throw NBDHandoverError.descriptors("a received descriptor is not used by the state") }
        return NBDHandoverState(exportSize: size, minimumBlockSize: minimum, preferredBlockSize: preferred, maximumPayload: maximum,
                                unixListener: unix, tcpListener: tcp, clients: clients)
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
