import Syscalls
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Why the control socket could not be set up, reached or used.
public enum ControlSocketError: Error, Equatable, CustomStringConvertible {
    case system(String, path: String, Errno)
    /// Another process answers on the path: one device, one serving driver.
    case inUse(path: String, pid: Int32?)
    case notASocket(path: String)
    case pathTooLong(path: String)
    /// No driver answers on the path (nothing to take over).
    case nobodyListening(path: String)
    case timedOut(String)
    case closed(String)
    case protocolError(String)

    public var description: String {
        switch self {
        case .system(let what, let path, let e): return "\(what) \(path): \(e)"
        case .inUse(let path, let pid):
            return "\(path) is the control socket of a running driver\(pid.map { " (pid \($0))" } ?? ""); stop it, or use --take-over / `virtio-vfio upgrade` to replace it"
        case .notASocket(let path): return "\(path) exists and is not a socket; refusing to replace it (remove it)"
        case .pathTooLong(let path): return "\(path) is too long for a UNIX socket path (107 bytes, with room for a .PID.new suffix while it is created); use a shorter --control-directory"
        case .nobodyListening(let path): return "no driver is serving on \(path) (start `virtio-vfio serve ...` first)"
        case .timedOut(let what): return "timed out \(what)"
        case .closed(let what): return "the other side closed the control connection \(what)"
        case .protocolError(let why): return "control protocol: \(why)"
        }
    }
}

/// The control socket of one serving driver: `/run/virtio-vfio/<BDF>.sock`, a UNIX stream socket
/// of mode 0600 in a directory of mode 0700, answering only peers of the same effective uid
/// (SO_PEERCRED). The next driver version connects here to take the device over.
///
/// The socket file belongs to whoever serves now: a successor puts its own in place with an
/// atomic rename(2) before the old instance ends, and an instance removes the file only if it is
/// still its own (same inode), so a handover never leaves the path empty.
public struct ControlListener: ~Copyable {
    public static let directory = "/run/virtio-vfio"
    public let fd: OwnedFD
    public let path: String
    let inode: UInt64

    /// The control socket path for device `address` ("0000:00:05.0").
    public static func path(for address: String, directory: String = ControlListener.directory) -> String {
        "\(directory)/\(address).sock"
    }

    /// Creates the socket at `path`. `replacing`: put it in place with rename(2) even if a running
    /// driver answers there (the successor of that driver does this); otherwise a live socket is
    /// refused and a stale one (nobody answers) is replaced.
    public init(path: String, replacing: Bool = false) throws(ControlSocketError) {
        // The socket is bound under `path.PID.new` first: that name must fit sun_path too.
        let temporary = "\(path).\(getpid()).new"
        guard temporary.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else { throw .pathTooLong(path: path) }
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !directory.isEmpty, Glibc.mkdir(directory, 0o700) != 0, errno != EEXIST {
            throw .system("creating the directory", path: directory, Errno(rawValue: errno))
        }
        switch SocketSyscall.lstat(path) {
        case .success(let existing):
            guard existing.mode & UInt32(S_IFMT) == UInt32(S_IFSOCK) else { throw .notASocket(path: path) }
            if !replacing, let peer = try? ControlConnection(connectingTo: path, timeoutMilliseconds: 1000) {
                let pid = peer.peer.pid
                throw .inUse(path: path, pid: pid)
            }
        case .failure(.noSuchFileOrDirectory): break
        case .failure(let e): throw .system("checking", path: path, e)
        }
        // Bound under a temporary name, made 0600, listening, then renamed over `path`: a client
        // never finds the path without a listener behind it, and never with looser permissions.
        _ = SocketSyscall.unlink(temporary)
        let fd: OwnedFD
        switch SocketSyscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue)) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw .system("creating a UNIX socket for", path: path, e)
        }
        var address = SocketSyscall.unixAddress(temporary)
        let raw = fd.raw
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketSyscall.bind(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if case .failure(let e) = bound { throw .system("binding", path: temporary, e) }
        do throws(ControlSocketError) {
            if case .failure(let e) = SocketSyscall.chmod(temporary, 0o600) { throw .system("setting mode 0600 on", path: temporary, e) }
            if case .failure(let e) = SocketSyscall.listen(raw, 8) { throw .system("listening on", path: temporary, e) }
            if case .failure(let e) = SocketSyscall.rename(temporary, path) { throw .system("putting the control socket in place at", path: path, e) }
        } catch {
            _ = SocketSyscall.unlink(temporary)
            throw error
        }
        guard case .success(let s) = SocketSyscall.lstat(path) else { throw .system("checking", path: path, .noSuchFileOrDirectory) }
        self.inode = s.inode
        self.fd = fd
        self.path = path
    }

    deinit {
        // Only our own file: after a handover the path holds the successor's socket.
        if case .success(let now) = SocketSyscall.lstat(path), now.inode == inode {
            _ = SocketSyscall.unlink(path)
        }
    }

    /// Accepts one pending connection (nil if none). A peer whose effective uid differs from ours
    /// is refused: `log` gets one line naming its pid and uid, and the connection is closed.
    public func accept(log: (String) -> Void) -> ControlConnection? {
        guard case .success(let raw) = SocketSyscall.accept(fd.raw) else { return nil }
        let connection = OwnedFD(adopting: raw)
        guard case .success(let peer) = SocketSyscall.peerCredentials(connection.raw) else {
            log("control socket \(path): refused a connection whose credentials cannot be read")
            return nil
        }
        guard peer.uid == geteuid() else {
            log("control socket \(path): refused a connection from uid \(peer.uid) (pid \(peer.pid)); only uid \(geteuid()) may control this driver")
            return nil
        }
        return ControlConnection(fd: connection, peer: peer)
    }
}

/// One control connection: framed messages (u32 length, then the bytes), each read or written
/// with a deadline, plus descriptor passing for the state record.
public struct ControlConnection: ~Copyable {
    public let fd: OwnedFD
    public let peer: (pid: Int32, uid: UInt32, gid: UInt32)
    public static let maxMessage = 1 << 20

    init(fd: consuming OwnedFD, peer: (pid: Int32, uid: UInt32, gid: UInt32)) {
        self.fd = fd
        self.peer = peer
    }

    /// A connection accepted (and its peer checked) elsewhere, e.g. on another thread.
    public init(adopting fd: consuming OwnedFD, peerPID: Int32) {
        self.fd = fd
        self.peer = (peerPID, geteuid(), getegid())
    }

    /// Gives up the descriptor without closing it.
    public consuming func releaseDescriptor() -> Int32 { fd.take() }

    /// Connects to the driver serving on `path`; its credentials must carry our effective uid too.
    public init(connectingTo path: String, timeoutMilliseconds: Int32 = 5000) throws(ControlSocketError) {
        guard path.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else { throw .pathTooLong(path: path) }
        let fd: OwnedFD
        switch SocketSyscall.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue)) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw .system("creating a UNIX socket for", path: path, e)
        }
        var address = SocketSyscall.unixAddress(path)
        let raw = fd.raw
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketSyscall.connect(raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        switch connected {
        case .success: break
        case .failure(.noSuchFileOrDirectory), .failure(.connectionRefused): throw .nobodyListening(path: path)
        case .failure(let e): throw .system("connecting to", path: path, e)
        }
        guard case .success(let peer) = SocketSyscall.peerCredentials(raw) else {
            throw .protocolError("cannot read the credentials of the driver on \(path)")
        }
        guard peer.uid == geteuid() else {
            throw .protocolError("the driver on \(path) runs as uid \(peer.uid), not \(geteuid()); refusing to talk to it")
        }
        self.fd = fd
        self.peer = peer
    }

    /// Sends one message.
    public func send(_ bytes: [UInt8], timeoutMilliseconds: Int32 = 5000) throws(ControlSocketError) {
        guard bytes.count <= Self.maxMessage else { throw .protocolError("message of \(bytes.count) bytes is too large") }
        var frame = withUnsafeBytes(of: UInt32(bytes.count).littleEndian) { Array($0) }
        frame += bytes
        var sent = 0
        while sent < frame.count {
            try waitFor(Int16(POLLOUT), timeoutMilliseconds, "sending a control message")
            // MSG_NOSIGNAL: a peer that went away is EPIPE here, not a SIGPIPE.
            let result: Result<Int, Errno> = frame.withUnsafeMutableBytes { bytes in
                var vector = iovec(iov_base: bytes.baseAddress! + sent, iov_len: bytes.count - sent)
                return SocketSyscall.send(fd.raw, &vector, 1)
            }
            switch result {
            case .success(let n): sent += n
            case .failure(.resourceTemporarilyUnavailable): continue
            case .failure(.brokenPipe), .failure(.connectionReset): throw .closed("while sending")
            case .failure(let e): throw .system("sending on", path: "the control socket", e)
            }
        }
    }

    /// Receives one message (nil: the peer closed the connection cleanly before a new message).
    public func receive(timeoutMilliseconds: Int32 = 5000) throws(ControlSocketError) -> [UInt8]? {
        guard let header = try read(4, timeoutMilliseconds, allowEnd: true) else { return nil }
        let length = Int(header.reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard length <= Self.maxMessage else { throw .protocolError("announced message of \(length) bytes is too large") }
        return try read(length, timeoutMilliseconds, allowEnd: false) ?? []
    }

    func read(_ count: Int, _ timeout: Int32, allowEnd: Bool) throws(ControlSocketError) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            try waitFor(Int16(POLLIN), timeout, "waiting for a control message")
            let result = bytes.withUnsafeMutableBytes { Syscall.read(fd.raw, UnsafeMutableRawBufferPointer(rebasing: $0[got...])) }
            switch result {
            case .success(0):
                if got == 0 && allowEnd { return nil }
                throw .closed("in the middle of a message")
            case .success(let n): got += n
            case .failure(.resourceTemporarilyUnavailable): continue
            case .failure(.connectionReset): throw .closed("(connection reset)")
            case .failure(let e): throw .system("reading from", path: "the control socket", e)
            }
        }
        return bytes
    }

    /// Waits until the socket is ready for `events`, at most `timeout` ms (negative: forever).
    public func waitFor(_ events: Int16, _ timeout: Int32, _ what: String) throws(ControlSocketError) {
        var p = pollfd(fd: fd.raw, events: events, revents: 0)
        switch SocketSyscall.poll(&p, 1, timeoutNanoseconds: timeout < 0 ? nil : Int64(timeout) * 1_000_000) {
        case .success(0): throw .timedOut(what)
        case .success: return
        case .failure(let e): throw .system("poll on", path: "the control socket", e)
        }
    }
}
