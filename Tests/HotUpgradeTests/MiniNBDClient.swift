import Foundation
import Glibc

/// Just enough of an NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, READ and WRITE) to prove a
/// connection survives a handover; the full client is in NBDTests, with real nbd tools.
struct MiniNBDClient: ~Copyable {
    let fd: Int32

    init?(path: String) {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
        }
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        } == 0
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        if !ok { close(fd); return nil }
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) -> Bool { bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count }

    func receive(_ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, count - got) }
            if n <= 0 { return nil }
            got += n
        }
        return bytes
    }

    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
    static func value<T: FixedWidthInteger>(_ bytes: ArraySlice<UInt8>, as: T.Type) -> T {
        bytes.reduce(T(0)) { $0 << 8 | T($1) }
    }

    /// The greeting: "NBDMAGIC", "IHAVEOPT", handshake flags.
    func greeting() -> Bool {
        guard let g = receive(18) else { return false }
        return Array(g[0..<8]) == Array("NBDMAGIC".utf8) && Array(g[8..<16]) == Array("IHAVEOPT".utf8)
    }

    /// Client flags (fixed newstyle, no zeroes), then NBD_OPT_EXPORT_NAME "": the export size
    /// (0 if the server did not answer). Plain values, not optionals of integers: Swift Testing's
    /// `#expect` on an `UInt64?` overflows a stack slot under ASan with Swift 6.3.1.
    func enterTransmission() -> UInt64 {
        guard send(Self.be(UInt32(3))) else { return 0 }
        guard send(Array("IHAVEOPT".utf8) + Self.be(UInt32(1)) + Self.be(UInt32(0))) else { return 0 }
        guard let reply = receive(10) else { return 0 }
        return Self.value(reply[0..<8], as: UInt64.self)
    }

    /// No reply (the connection failed or the reply did not match the request).
    static let noReply: (error: UInt32, data: [UInt8]) = (UInt32.max, [])

    /// One request (type 0 READ, 1 WRITE) and its simple reply: the error and, for a read, the
    /// data; `noReply` if none came.
    func request(_ type: UInt16, handle: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) -> (error: UInt32, data: [UInt8]) {
        let header = Self.be(UInt32(0x2560_9513)) + Self.be(UInt16(0)) + Self.be(type) + Self.be(handle) + Self.be(offset) + Self.be(length)
        guard send(header + payload) else { return Self.noReply }
        guard let reply = receive(16), Self.value(reply[0..<4], as: UInt32.self) == 0x6744_6698,
              Self.value(reply[8..<16], as: UInt64.self) == handle else { return Self.noReply }
        let error = Self.value(reply[4..<8], as: UInt32.self)
        guard type == 0, error == 0 else { return (error, []) }
        guard let data = receive(Int(length)) else { return Self.noReply }
        return (error, data)
    }

    /// Sends one request (type 0 READ, 1 WRITE) without waiting for its reply.
    func send(_ type: UInt16, handle: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) -> Bool {
        send(Self.be(UInt32(0x2560_9513)) + Self.be(UInt16(0)) + Self.be(type) + Self.be(handle) + Self.be(offset) + Self.be(length) + payload)
    }

    /// The next simple reply, in whatever order the server sends them: its handle, error and,
    /// for a successful READ (`readLengths[handle]`), the data. Nil if none came or it is malformed.
    func nextReply(readLengths: [UInt64: Int]) -> (handle: UInt64, error: UInt32, data: [UInt8])? {
        guard let reply = receive(16), Self.value(reply[0..<4], as: UInt32.self) == 0x6744_6698 else { return nil }
        let handle = Self.value(reply[8..<16], as: UInt64.self), error = Self.value(reply[4..<8], as: UInt32.self)
        guard error == 0, let n = readLengths[handle] else { return (handle, error, []) }
        guard let data = receive(n) else { return nil }
        return (handle, error, data)
    }
}
