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

    /// Sends `assignments` (e.g. ["READY=1", "STATUS=serving"]) to the manager, with
    /// `descriptors` attached (for FDSTORE=1; they stay open here). Returns false when there is
    /// no manager to tell; the errno when sending fails.
    @discardableResult
    public static func notify(_ assignments: [String], descriptors: [Int32] = [],
                              socket path: String? = notifySocket) -> Result<Bool, Errno> {
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
        let sent = withUnsafePointer(to: &address) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { to in
                message.withUnsafeBytes { SocketSyscall.sendWithRights(fd, $0, descriptors: descriptors, to: to, length: length) }
            }
        }
        switch sent {
        case .success: return .success(true)
        case .failure(let e): return .failure(e)
        }
    }

    /// The descriptors the manager passed at start (sd_listen_fds_with_names(3)): its file
    /// descriptor store's content after a restart, by the names they were stored under. Only when
    /// $LISTEN_PID is this process; the three variables are removed, so no child sees them, and
    /// each descriptor is made close-on-exec. They start at 3.
    public static func takePassedDescriptors() -> [(name: String, fd: Int32)] {
        let passed = passedDescriptors(pid: getenv("LISTEN_PID").map { String(cString: $0) },
                                       count: getenv("LISTEN_FDS").map { String(cString: $0) },
                                       names: getenv("LISTEN_FDNAMES").map { String(cString: $0) }, this: getpid())
        for variable in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] { unsetenv(variable) }
        for p in passed { _ = fcntl(p.fd, F_SETFD, FD_CLOEXEC) }
        return passed
    }

    /// The parsing of `takePassedDescriptors`: nothing unless `pid` is `this` and `count` a
    /// number; names missing or empty are "unknown" (as sd_listen_fds_with_names says).
    public static func passedDescriptors(pid: String?, count: String?, names: String?, this: pid_t) -> [(name: String, fd: Int32)] {
        guard let pid, pid_t(pid) == this, let count, let n = Int32(count), n > 0, n < 65536 else { return [] }
        let list = names.map { $0.split(separator: ":", omittingEmptySubsequences: false).map(String.init) } ?? []
        return (0..<n).map { i in
            let name = Int(i) < list.count && !list[Int(i)].isEmpty ? list[Int(i)] : "unknown"
            return (name, 3 + i)
        }
    }
}
