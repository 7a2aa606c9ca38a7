import Foundation
import Glibc
import NBD
import Services
import Synchronization
import Virtio
import VirtioDevices
import VirtioEmulator

/// What the export tests' client saw, filled on the client's thread and read after it joined.
final class ClientRecord: @unchecked Sendable {
    var replies: [UInt64: (error: UInt32, data: [UInt8])] = [:]
    var failure: String?
    let done = Atomic<Bool>(false)
}

/// A blocking NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) written for the
/// export tests: requests can be pipelined and replies matched by cookie. Reads time out after 10 s.
final class ExportClient {
    let fd: Int32

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { close(fd); throw Failure("connect \(path): errno \(errno)") }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw Failure("send: errno \(errno)") }
            sent += n
        }
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            guard n > 0 else { throw Failure("receive: \(n == 0 ? "connection closed" : "errno \(errno)") after \(got) of \(count) bytes") }
            got += n
        }
        return bytes
    }

    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
    static func value<T: FixedWidthInteger>(_ bytes: ArraySlice<UInt8>, _: T.Type) -> T {
        bytes.reduce(T(0)) { $0 << 8 | T($1) }
    }

    /// Greeting, client flags (FIXED_NEWSTYLE | NO_ZEROES), NBD_OPT_EXPORT_NAME "": the export size.
    func handshake() throws -> UInt64 {
        let greeting = try receive(NBDProtocol.greetingSize)
        guard ExportClient.value(greeting[0..<8], UInt64.self) == NBDProtocol.initMagic else { throw Failure("bad greeting") }
        try send(ExportClient.be(UInt32(3)))
        try send(ExportClient.be(NBDProtocol.optionMagic) + ExportClient.be(NBDProtocol.Option.exportName) + ExportClient.be(UInt32(0)))
        let reply = try receive(NBDProtocol.exportNameReplySize)
        return ExportClient.value(reply[0..<8], UInt64.self)
    }

    func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: Int, payload: [UInt8] = []) throws {
        try send(ExportClient.be(NBDProtocol.requestMagic) + ExportClient.be(flags) + ExportClient.be(type)
                 + ExportClient.be(cookie) + ExportClient.be(offset) + ExportClient.be(UInt32(length)) + payload)
    }

    /// One simple reply; a successful read's data (its length from `readLengths`) is taken with it.
    func reply(readLengths: [UInt64: Int]) throws -> (cookie: UInt64, error: UInt32, data: [UInt8]) {
        let h = try receive(NBDProtocol.simpleReplyHeaderSize)
        guard ExportClient.value(h[0..<4], UInt32.self) == NBDProtocol.simpleReplyMagic else { throw Failure("bad reply magic") }
        let error = ExportClient.value(h[4..<8], UInt32.self), cookie = ExportClient.value(h[8..<16], UInt64.self)
        let data = error == 0 ? try receive(readLengths[cookie] ?? 0) : []
        return (cookie, error, data)
    }
}

/// One request of a pipelined batch.
enum ExportRequest: Sendable {
    case read(cookie: UInt64, offset: UInt64, length: Int)
    case write(cookie: UInt64, offset: UInt64, data: [UInt8], fua: Bool)
    case flush(cookie: UInt64)
}

/// Serves `backend` over NBD on this thread while a client on another thread sends each batch of
/// `batches` (all requests of a batch pipelined, then every reply collected; `before(n)` runs
/// before batch n is sent, after every reply of the batches before it came; `afterSending(n)` once
/// its requests are sent, while they are in flight), then stops the server. Returns the replies by cookie, the
/// server's statistics and log, and the backend's recovery count.
func serveExport(_ backend: consuming VirtioBlockBackend<EmulatedTransport>, batches: [[ExportRequest]],
                 before: @escaping @Sendable (Int) -> Void = { _ in },
                 afterSending: @escaping @Sendable (Int) -> Void = { _ in })
    throws -> (record: ClientRecord, statistics: NBDServerStatistics, log: [String], recoveries: Int) {
    let path = NSTemporaryDirectory() + "vb-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
    defer { unlink(path) }
    let lines = LogLines()
    var configuration = NBDServerConfiguration()
    configuration.unixSocketPath = path
    configuration.drainTimeout = .seconds(5)
    configuration.log = { lines.append($0) }
    var server = try NBDServer(backend: backend, configuration: configuration)
    let record = ClientRecord()
    // Joined before returning: the client's closures (`before`, `afterSending`) may hold the
    // device, which must go away in the test that made it (JoinedThread.swift).
    let client = JoinedThread {
        defer { record.done.store(true, ordering: .releasing) }
        do {
            let client = try ExportClient(path: path)
            _ = try client.handshake()
            for (n, batch) in batches.enumerated() {
                before(n)
                var lengths: [UInt64: Int] = [:]
                for request in batch {
                    switch request {
                    case .read(let cookie, let offset, let length):
                        lengths[cookie] = length
                        try client.request(NBDProtocol.Command.read, cookie: cookie, offset: offset, length: length)
                    case .write(let cookie, let offset, let data, let fua):
                        try client.request(NBDProtocol.Command.write, flags: fua ? NBDProtocol.CommandFlags.fua.rawValue : 0,
                                           cookie: cookie, offset: offset, length: data.count, payload: data)
                    case .flush(let cookie):
                        try client.request(NBDProtocol.Command.flush, cookie: cookie, offset: 0, length: 0)
                    }
                }
                afterSending(n)
                for _ in batch {
                    let r = try client.reply(readLengths: lengths)
                    record.replies[r.cookie] = (r.error, r.data)
                }
            }
            try client.request(NBDProtocol.Command.disc, cookie: 0, offset: 0, length: 0)
        } catch {
            record.failure = "\(error)"
        }
    }
    defer { client.join() }
    // The server stops once the client is done (it checks the flag at least every 100 ms).
    try server.run(until: record.done)
    let recoveries = server.withBackend { $0.recoveries }
    return (record, server.statistics, lines.all, recoveries)
}

final class LogLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.lock(); lines.append(line); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}
