#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Syscalls
import SystemPackage

/// A TCP address to listen on: an IPv4 or IPv6 literal and a port (0: any free port).
public struct NBDTCPAddress: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) { self.host = host; self.port = port }
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// Why the server could not start or stopped.
public enum NBDServerError: Error, CustomStringConvertible {
    /// The backend's sizes break the NBD size constraints.
    case unusableBackend(String)
    case configuration(String)
    /// `path` exists and is not a socket: the server never deletes it.
    case notASocket(path: String)
    /// Another server accepts connections on `path`.
    case socketInUse(path: String)
    case socketPathTooLong(path: String)
    case badAddress(String)
    /// A system call failed: what was being done, on which path or address, and the errno.
    case system(String, target: String, Errno)
    /// The state handed over by an earlier server cannot be taken on (`init(adopting:)`): why.
    case handover(String)
    /// The companion (`NBDServerConfiguration.companion`) cannot go on: why.
    case companion(String)

    public var description: String {
        switch self {
        case .unusableBackend(let why): return "the backend cannot be exported over NBD: \(why)"
        case .configuration(let why): return "bad NBD server configuration: \(why)"
        case .notASocket(let path):
            return "\(path) exists and is not a socket; refusing to replace it (remove it or choose another path)"
        case .socketInUse(let path):
            return "\(path) is a socket another process is listening on; stop that server or choose another path"
        case .socketPathTooLong(let path): return "\(path) is longer than a UNIX socket path can be (107 bytes)"
        case .badAddress(let a): return "\(a) is not an IPv4 or IPv6 address"
        case .system(let what, let target, let e): return "\(what) \(target): \(e)"
        case .handover(let why): return "cannot take over the NBD connections of the previous server: \(why)"
        case .companion(let why): return why
        }
    }
}

/// A listening socket, closed when it goes away; a UNIX socket's file is removed then too, if it
/// is still the one this listener created (same device and inode).
struct Listener: ~Copyable {
    let fd: OwnedFD
    let path: String?
    let identity: (device: UInt64, inode: UInt64)
    /// The TCP port listened on (0 for a UNIX socket).
    let port: UInt16
    /// Whether going away removes the UNIX socket's file (not after a hand-over: the successor
    /// listens on it).
    var removesFile = true

    private init(fd: consuming OwnedFD, path: String?, identity: (UInt64, UInt64), port: UInt16 = 0) {
        self.fd = fd
        self.path = path
        self.identity = identity
        self.port = port
    }

    var raw: Int32 { fd.raw }
    var isTCP: Bool { path == nil }

    deinit {
        if removesFile, let path, case .success(let now) = SocketSyscall.lstat(path),
           now.mode & UInt32(S_IFMT) == UInt32(S_IFSOCK), now.device == identity.device, now.inode == identity.inode {
            _ = SocketSyscall.unlink(path)
        }
    }

    /// A listening socket handed over by an earlier server. The UNIX socket's file becomes this
    /// listener's (removed when it goes away) if `path` is a socket now.
    static func adopted(fd: Int32, path: String?, port: UInt16) -> Listener {
        var identity: (UInt64, UInt64) = (0, 0)
        if let path, case .success(let s) = SocketSyscall.lstat(path), s.mode & UInt32(S_IFMT) == UInt32(S_IFSOCK) {
            identity = (s.device, s.inode)
        }
        return Listener(fd: OwnedFD(adopting: fd), path: path, identity: identity, port: port)
    }

    /// `unix(path:mode:)` if `path` is given; sets `fd` to its descriptor.
    static func unix(_ path: String?, mode: UInt32, fd: inout Int32) throws(NBDServerError) -> Listener? {
        guard let path else { return nil }
        let listener = try unix(path: path, mode: mode)
        fd = listener.raw
        return listener
    }

    /// `tcp(_:)` if `address` is given; sets `fd` and `port`.
    static func tcp(_ address: NBDTCPAddress?, fd: inout Int32, port: inout UInt16?) throws(NBDServerError) -> Listener? {
        guard let address else { return nil }
        let listener = try tcp(address)
        fd = listener.raw
        port = listener.port
        return listener
    }

    /// A fresh UNIX socket at `path` with permissions `mode` (set before listen, so nobody can
    /// connect while it still has the default ones). An existing socket nobody listens on is
    /// replaced; anything else at `path` is refused.
    static func unix(path: String, mode: UInt32) throws(NBDServerError) -> Listener {
        guard path.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else { throw .socketPathTooLong(path: path) }
        switch SocketSyscall.lstat(path) {
        case .success(let existing):
            guard existing.mode & UInt32(S_IFMT) == UInt32(S_IFSOCK) else { throw .notASocket(path: path) }
            if Listener.someoneListens(path) { throw .socketInUse(path: path) }
            if case .failure(let e) = SocketSyscall.unlink(path), e != .noSuchFileOrDirectory {
                throw .system("removing the stale socket", target: path, e)
            }
        case .failure(.noSuchFileOrDirectory): break
        case .failure(let e): throw .system("checking", target: path, e)
        }
        let fd: OwnedFD
        switch SocketSyscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue)) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw .system("creating a UNIX socket for", target: path, e)
        }
        let raw = fd.raw
        var address = SocketSyscall.unixAddress(path)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                SocketSyscall.bind(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if case .failure(let e) = bound { throw .system("binding", target: path, e) }
        // From here the file is ours: a failure below removes it (through deinit).
        let identity: (UInt64, UInt64)
        switch SocketSyscall.lstat(path) {
        case .success(let s): identity = (s.device, s.inode)
        case .failure(let e):
            _ = SocketSyscall.unlink(path)
            throw .system("checking the new socket", target: path, e)
        }
        let listener = Listener(fd: fd, path: path, identity: identity)
        if case .failure(let e) = SocketSyscall.chmod(path, mode) { throw .system("setting the mode of", target: path, e) }
        if case .failure(let e) = SocketSyscall.listen(listener.raw, 128) { throw .system("listening on", target: path, e) }
        return listener
    }

    /// A TCP listener on `address` (SO_REUSEADDR); `port` is the one it got.
    static func tcp(_ address: NBDTCPAddress) throws(NBDServerError) -> Listener {
        var storage = sockaddr_storage()
        let length: socklen_t
        let family: Int32
        if let v4 = ipv4(address.host) {
            family = AF_INET
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
            withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                    $0.pointee.sin_family = sa_family_t(AF_INET)
                    $0.pointee.sin_port = address.port.bigEndian
                    $0.pointee.sin_addr = v4
                }
            }
        } else if let v6 = ipv6(address.host) {
            family = AF_INET6
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                    $0.pointee.sin6_family = sa_family_t(AF_INET6)
                    $0.pointee.sin6_port = address.port.bigEndian
                    $0.pointee.sin6_addr = v6
                }
            }
        } else {
            throw .badAddress(address.host)
        }
        let fd: OwnedFD
        switch SocketSyscall.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue)) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw .system("creating a TCP socket for", target: address.description, e)
        }
        let raw = fd.raw
        _ = SocketSyscall.setsockopt(raw, SOL_SOCKET, SO_REUSEADDR, 1)
        let bound = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketSyscall.bind(raw, $0, length) }
        }
        if case .failure(let e) = bound { throw .system("binding", target: address.description, e) }
        if case .failure(let e) = SocketSyscall.listen(raw, 128) { throw .system("listening on", target: address.description, e) }
        var got = sockaddr_storage()
        var gotLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &got) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketSyscall.getsockname(raw, $0, &gotLength) }
        }
        if case .failure(let e) = named { throw .system("reading the address of", target: address.description, e) }
        let port: UInt16 = withUnsafePointer(to: &got) {
            family == AF_INET
                ? $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
                : $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
        }
        return Listener(fd: fd, path: nil, identity: (0, 0), port: port)
    }

    /// Whether a connect to `path` succeeds (a live server owns the socket).
    static func someoneListens(_ path: String) -> Bool {
        guard case .success(let raw) = SocketSyscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue)) else { return false }
        let fd = OwnedFD(adopting: raw)
        var address = SocketSyscall.unixAddress(path)
        let r = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                SocketSyscall.connect(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        _ = consume fd
        if case .success = r { return true }
        return false
    }

    static func ipv4(_ host: String) -> in_addr? {
        var a = in_addr()
        return inet_pton(AF_INET, host, &a) == 1 ? a : nil
    }

    static func ipv6(_ host: String) -> in6_addr? {
        var a = in6_addr()
        return inet_pton(AF_INET6, host, &a) == 1 ? a : nil
    }
}

/// The path a UNIX socket is bound to (getsockname(2)), nil if it is not a bound UNIX socket.
public func boundUnixPath(_ fd: Int32) -> String? {
    var address = sockaddr_un()
    var length = socklen_t(MemoryLayout<sockaddr_un>.size)
    let named = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketSyscall.getsockname(fd, $0, &length) }
    }
    guard case .success = named, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
    let pathLength = Int(length) - MemoryLayout<sockaddr_un>.offset(of: \.sun_path)!
    guard pathLength > 1 else { return nil }
    return withUnsafeBytes(of: &address.sun_path) { raw in
        String(decoding: raw.prefix(pathLength).prefix { $0 != 0 }, as: UTF8.self)
    }
}
