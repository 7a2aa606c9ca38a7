import Glibc
@testable import NBD
import Synchronization
import Syscalls

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A blocking NBD client written for the tests: it speaks the protocol byte by byte so that tests
/// can also send what a real client never would. Every read times out after 5 s.
final class TestClient {
    let fd: Int32
    var closed = false

    init(unixPath path: String) throws {
        fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        var address = SocketSyscall.unixAddress(path)
        let r = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                SocketSyscall.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if case .failure(let e) = r { Glibc.close(fd); throw TestFailure("connect \(path): \(e)") }
        setTimeout(seconds: 5)
    }

    init(tcpPort port: UInt16) throws {
        fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr = Listener.ipv4("127.0.0.1")!
        let r = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                SocketSyscall.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if case .failure(let e) = r { Glibc.close(fd); throw TestFailure("connect 127.0.0.1:\(port): \(e)") }
        setTimeout(seconds: 5)
    }

    deinit { close() }

    func close() {
        if !closed { Glibc.close(fd); closed = true }
    }

    func setTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = Glibc.setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = Glibc.setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    // MARK: bytes

    func send(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.send(fd, raw.baseAddress! + done, raw.count - done, Int32(MSG_NOSIGNAL))
                if n < 0 { if errno == EINTR { continue }; throw TestFailure("send: errno \(errno)") }
                done += n
            }
        }
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        try out.withUnsafeMutableBytes { raw in
            while done < count {
                let n = Glibc.recv(fd, raw.baseAddress! + done, count - done, 0)
                if n == 0 { throw TestFailure("server closed the connection after \(done) of \(count) bytes") }
                if n < 0 { if errno == EINTR { continue }; throw TestFailure("recv: errno \(errno) after \(done) of \(count) bytes") }
                done += n
            }
        }
        return out
    }

    /// True if the server closes the connection (end of stream or reset) within `seconds`;
    /// anything it sends before is skipped.
    func serverCloses(within seconds: Int = 3) -> Bool {
        setTimeout(seconds: seconds)
        defer { setTimeout(seconds: 5) }
        var scratch = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = scratch.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress!, $0.count, 0) }
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET || errno == EPIPE }
        }
    }

    // MARK: handshake

    /// Reads the greeting, checks both magics, returns the handshake flags.
    func readGreeting() throws -> UInt16 {
        let g = try receive(18)
        let (magic, opt, flags) = g.withUnsafeBytes { ($0.be64(0), $0.be64(8), $0.be16(16)) }
        guard magic == NBDProtocol.initMagic, opt == NBDProtocol.optionMagic else { throw TestFailure("bad greeting \(g)") }
        return flags
    }

    func sendClientFlags(_ flags: UInt32) throws { try send(be32(flags)) }

    func sendOption(_ option: UInt32, _ data: [UInt8] = []) throws {
        try send(be64(NBDProtocol.optionMagic) + be32(option) + be32(UInt32(data.count)) + data)
    }

    struct OptionReply { var option: UInt32; var type: UInt32; var data: [UInt8] }

    func readOptionReply() throws -> OptionReply {
        let h = try receive(20)
        let (magic, option, type, length) = h.withUnsafeBytes { ($0.be64(0), $0.be32(8), $0.be32(12), $0.be32(16)) }
        guard magic == NBDProtocol.optionReplyMagic else { throw TestFailure("bad option reply magic \(h)") }
        return OptionReply(option: option, type: type, data: try receive(Int(length)))
    }

    static func infoData(name: String, infos: [UInt16]) -> [UInt8] {
        be32(UInt32(name.utf8.count)) + Array(name.utf8) + be16(UInt16(infos.count)) + infos.flatMap { be16($0) }
    }

    struct ExportInfo { var size: UInt64; var flags: NBDProtocol.TransmissionFlags; var replies: [OptionReply] }

    /// NBD_OPT_INFO or NBD_OPT_GO; returns the replies up to the final one (included).
    func info(_ option: UInt32, name: String = "", infos: [UInt16] = [NBDProtocol.Info.blockSize]) throws -> [OptionReply] {
        try sendOption(option, Self.infoData(name: name, infos: infos))
        var replies: [OptionReply] = []
        while true {
            let r = try readOptionReply()
            replies.append(r)
            if r.type != NBDProtocol.Reply.info { return replies }
        }
    }

    /// Greeting, flags, NBD_OPT_GO: the connection is in the transmission phase afterwards.
    @discardableResult
    func handshake(name: String = "") throws -> ExportInfo {
        _ = try readGreeting()
        try sendClientFlags(NBDProtocol.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        let replies = try info(NBDProtocol.Option.go, name: name)
        guard let last = replies.last, last.type == NBDProtocol.Reply.ack else {
            throw TestFailure("NBD_OPT_GO failed: \(replies.map { String($0.type, radix: 16) })")
        }
        guard let export = replies.first(where: { $0.data.count == 12 && $0.data[0] == 0 && $0.data[1] == 0 }) else {
            throw TestFailure("no NBD_INFO_EXPORT")
        }
        let (size, flags) = export.data.withUnsafeBytes { ($0.be64(2), $0.be16(10)) }
        return ExportInfo(size: size, flags: NBDProtocol.TransmissionFlags(rawValue: flags), replies: replies)
    }

    // MARK: transmission

    func sendRequest(_ request: NBDRequest, payload: [UInt8] = []) throws {
        var header = [UInt8](repeating: 0, count: 28)
        header.withUnsafeMutableBytes { request.write(into: $0.baseAddress!) }
        try send(header + payload)
    }

    func readReply() throws -> (error: UInt32, cookie: UInt64) {
        let h = try receive(16)
        guard let reply = h.withUnsafeBytes({ NBDSimpleReply.parse($0) }) else { throw TestFailure("bad reply magic \(h)") }
        return reply
    }

    func read(_ offset: UInt64, _ length: Int, cookie: UInt64 = 1) throws -> (error: UInt32, data: [UInt8]) {
        try sendRequest(NBDRequest(type: NBDProtocol.Command.read, cookie: cookie, offset: offset, length: UInt32(length)))
        let reply = try readReply()
        guard reply.cookie == cookie else { throw TestFailure("cookie \(reply.cookie), expected \(cookie)") }
        return (reply.error, reply.error == 0 ? try receive(length) : [])
    }

    func command(_ type: UInt16, _ offset: UInt64 = 0, _ length: Int = 0, flags: NBDProtocol.CommandFlags = [],
                 payload: [UInt8]? = nil, cookie: UInt64 = 2) throws -> UInt32 {
        let len = UInt32(payload?.count ?? length)
        try sendRequest(NBDRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: len), payload: payload ?? [])
        let reply = try readReply()
        guard reply.cookie == cookie else { throw TestFailure("cookie \(reply.cookie), expected \(cookie)") }
        return reply.error
    }

    func write(_ offset: UInt64, _ data: [UInt8], flags: NBDProtocol.CommandFlags = [], cookie: UInt64 = 3) throws -> UInt32 {
        try command(NBDProtocol.Command.write, offset, flags: flags, payload: data, cookie: cookie)
    }

    func disconnect() throws {
        try sendRequest(NBDRequest(type: NBDProtocol.Command.disc, cookie: 0))
    }
}

func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * $0)) } }
func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }

/// Deterministic test data (xorshift, 8 bytes per step: debug builds are slow per element).
func pattern(_ count: Int, seed: Int) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
        var x = UInt64(truncatingIfNeeded: seed) &* 0x9E37_79B9_7F4A_7C15 | 1
        let raw = UnsafeMutableRawPointer(buffer.baseAddress!)
        var i = 0
        while i < count {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            if i + 8 <= count {
                raw.storeBytes(of: x, toByteOffset: i, as: UInt64.self)
            } else {
                for k in i..<count { buffer[k] = UInt8(truncatingIfNeeded: x >> (8 * (k - i))) }
            }
            i += 8
        }
        initialized = count
    }
}

/// A private temporary directory, removed (with what is in it) at deinit.
final class TemporaryDirectory {
    let path: String
    init() {
        var template = Array("/tmp/nbd-test.XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }
    deinit {
        if let dir = opendir(path) {
            while let e = readdir(dir) {
                let name = withUnsafePointer(to: e.pointee.d_name) {
                    $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
                }
                if name != "." && name != ".." { unlink(path + "/" + name) }
            }
            closedir(dir)
        }
        rmdir(path)
    }
}

/// Log lines of a server (printed too when NBD_TEST_LOG is set).
final class ServerLog: Sendable {
    let lines = Mutex<[String]>([])
    let echo = getenv("NBD_TEST_LOG") != nil
    func append(_ line: String) {
        if echo { print(line) }
        lines.withLock { $0.append(line) }
    }
    var all: [String] { lines.withLock { $0 } }
}

/// What the server thread owns.
private final class ServerThread: @unchecked Sendable {
    var server: NBDServer<MemoryBlockBackend>?
    let flag = Atomic<Bool>(false)
    var statistics = NBDServerStatistics()
    var runError: NBDServerError?
    init(_ server: consuming NBDServer<MemoryBlockBackend>) { self.server = consume server }
}

/// An `NBDServer` over a `MemoryBlockBackend`, running on its own thread until `stop()` (or
/// deinit).
final class RunningServer {
    let disk: MemoryDisk
    let directory = TemporaryDirectory()
    let socketPath: String
    let tcpPort: UInt16?
    let log = ServerLog()
    private let context: ServerThread
    private var thread = pthread_t()
    private var running = false

    init(_ options: MemoryBackendOptions = MemoryBackendOptions(), tcp: Bool = false,
         configure: (inout NBDServerConfiguration) -> Void = { _ in }) throws {
        disk = MemoryDisk(options)
        socketPath = directory.path + "/nbd.sock"
        var configuration = NBDServerConfiguration()
        configuration.unixSocketPath = socketPath
        if tcp { configuration.tcpAddress = NBDTCPAddress(host: "127.0.0.1", port: 0) }
        configuration.drainTimeout = .seconds(3)
        let log = self.log
        configuration.log = { log.append($0) }
        configure(&configuration)
        let s = try NBDServer(backend: MemoryBlockBackend(disk), configuration: configuration)
        tcpPort = s.tcpPort
        context = ServerThread(s)
        let raw = Unmanaged.passRetained(context).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let context = Unmanaged<ServerThread>.fromOpaque(raw!).takeRetainedValue()
            var s = context.server.take()!
            do throws(NBDServerError) { try s.run(until: context.flag) } catch { context.runError = error }
            context.statistics = s.statistics
            return nil
        }, raw)
        precondition(rc == 0)
        running = true
    }

    /// Stops the server, waits for its thread, returns its statistics.
    @discardableResult
    func stop() -> NBDServerStatistics {
        if running {
            context.flag.store(true, ordering: .relaxed)
            pthread_join(thread, nil)
            running = false
        }
        return context.statistics
    }

    var runError: NBDServerError? { context.runError }

    deinit { stop() }

    func connect() throws -> TestClient { try TestClient(unixPath: socketPath) }
}
