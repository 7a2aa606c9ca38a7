#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// The service manager's notification protocol (sd_notify(3), systemd's `Type=notify`): one
/// datagram of newline-separated `KEY=value` assignments to the socket named by `$NOTIFY_SOCKET`
/// (a path, or an abstract name when it starts with "@"). Written here, not linked from
/// libsystemd: it is one sendto(2).
public enum ServiceManager {
    /// The socket the manager listens on, nil when this process was not started by one.
    public static var notifySocket: String? {
        guard let raw = getenv("NOTIFY_SOCKET") else { return nil }
        let path = String(cString: raw)
        return path.isEmpty ? nil : path
    }

    /// Sends `assignments` (e.g. ["READY=1", "STATUS=serving"]) to the manager. Returns false
    /// when there is no manager to tell; throws the errno when sending fails.
    @discardableResult
    public static func notify(_ assignments: [String], socket path: String? = notifySocket) -> Result<Bool, Errno> {
        guard let path else { return .success(false) }
        let name = Array(path.utf8)
        let abstract = name.first == UInt8(ascii: "@")
        var address = sockaddr_un()
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard name.count < capacity, path.hasPrefix("/") || abstract else { return .failure(Errno(rawValue: EINVAL)) }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: name)
            if abstract { raw[0] = 0 } else { raw[name.count] = 0 }
        }
        // An abstract name is exactly its bytes long; a path includes its NUL.
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + name.count + (abstract ? 0 : 1))
        let fd: Int32
        switch SocketSyscall.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue)) {
        case .success(let raw): fd = raw
        case .failure(let e): return .failure(e)
        }
        defer { Syscall.close(fd) }
        let message = Array(assignments.joined(separator: "\n").utf8)
        let sent = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketSyscall.sendTo(fd, message, $0, length) }
        }
        switch sent {
        case .success: return .success(true)
        case .failure(let e): return .failure(e)
        }
    }
}
