#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CVirtioShim
import SystemPackage

/// One wrapper per socket system call (the NBD server, the upgrade control socket), in the style of `Syscall`
/// (Sources/Syscalls/Syscall.swift): each returns the result or the errno.
///
/// EINTR policy: `accept4`, `read`, `sendmsg`, `connect`... are retried on EINTR; `ppoll` returns
/// 0 ready descriptors on EINTR (the loop re-checks its stop flag). EAGAIN is always returned to
/// the caller (every socket here is non-blocking, except a test client's). Sends use
/// MSG_NOSIGNAL, so a client that went away yields EPIPE instead of killing the process.
public enum SocketSyscall {
    @inline(never)
    public static func socket(_ domain: Int32, _ type: Int32) -> Result<Int32, Errno> {
        let fd = Glibc.socket(domain, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        return fd >= 0 ? .success(fd) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func bind(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t) -> Result<Void, Errno> {
        Glibc.bind(fd, address, length) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func listen(_ fd: Int32, _ backlog: Int32) -> Result<Void, Errno> {
        Glibc.listen(fd, backlog) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    /// accept(2), then fcntl(2) to make the connection non-blocking and close-on-exec (accept4 is
    /// a GNU extension the Glibc module does not export). EAGAIN when nothing is pending.
    @inline(never)
    public static func accept(_ fd: Int32) -> Result<Int32, Errno> {
        while true {
            let c = Glibc.accept(fd, nil, nil)
            if c >= 0 {
                let flags = Glibc.fcntl(c, F_GETFL)
                if flags < 0 || Glibc.fcntl(c, F_SETFL, flags | O_NONBLOCK) < 0 || Glibc.fcntl(c, F_SETFD, FD_CLOEXEC) < 0 {
                    let e = errno
                    _ = Glibc.close(c)
                    return .failure(Errno(rawValue: e))
                }
                return .success(c)
            }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// connect(2), blocking. Retried on EINTR (a retried connect may report EISCONN/EALREADY: those
    /// mean the first attempt went on, so they count as success here).
    @inline(never)
    public static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t) -> Result<Void, Errno> {
        var interrupted = false
        while true {
            if Glibc.connect(fd, address, length) == 0 { return .success(()) }
            let e = errno
            if interrupted && (e == EISCONN || e == EALREADY) { return .success(()) }
            if e != EINTR { return .failure(Errno(rawValue: e)) }
            interrupted = true
        }
    }

    @inline(never)
    public static func setsockopt(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int32) -> Result<Void, Errno> {
        var v = value
        let r = Glibc.setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size))
        return r == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func getsockname(_ fd: Int32, _ address: UnsafeMutablePointer<sockaddr>, _ length: inout socklen_t) -> Result<Void, Errno> {
        Glibc.getsockname(fd, address, &length) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    /// getsockopt(SO_PEERCRED): the pid, uid and gid of the process at the other end of a connected
    /// UNIX socket, as the kernel recorded them at connect(2) (not forgeable by the peer).
    @inline(never)
    public static func peerCredentials(_ fd: Int32) -> Result<(pid: Int32, uid: UInt32, gid: UInt32), Errno> {
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        let r = CVirtioShim_peer_credentials(fd, &pid, &uid, &gid)
        return r == 0 ? .success((pid, uid, gid)) : .failure(Errno(rawValue: -r))
    }

    /// rename(2): atomically replaces `to` (a socket file put in place for the next instance).
    @inline(never)
    public static func rename(_ from: String, _ to: String) -> Result<Void, Errno> {
        Glibc.rename(from, to) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    /// getsockopt(2) of an int option.
    @inline(never)
    public static func getsockopt(_ fd: Int32, _ level: Int32, _ name: Int32) -> Result<Int32, Errno> {
        var v: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        let r = Glibc.getsockopt(fd, level, name, &v, &length)
        return r == 0 ? .success(v) : .failure(Errno(rawValue: errno))
    }

    /// fcntl(2): makes `fd` non-blocking and close-on-exec (descriptors received with SCM_RIGHTS
    /// come without FD_CLOEXEC).
    @inline(never)
    public static func makeNonBlockingCloseOnExec(_ fd: Int32) -> Result<Void, Errno> {
        let flags = Glibc.fcntl(fd, F_GETFL)
        if flags < 0 || Glibc.fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 || Glibc.fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 {
            return .failure(Errno(rawValue: errno))
        }
        return .success(())
    }

    /// read(2). 0 is end of stream; EAGAIN returned.
    @inline(never)
    public static func read(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) -> Result<Int, Errno> {
        while true {
            let n = Glibc.read(fd, buffer, count)
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// sendmsg(2) of `count` iovecs with MSG_NOSIGNAL | MSG_DONTWAIT. Returns the bytes sent
    /// (possibly fewer than asked); EAGAIN when the socket buffer is full.
    @inline(never)
    public static func send(_ fd: Int32, _ vectors: UnsafeMutablePointer<iovec>, _ count: Int) -> Result<Int, Errno> {
        var message = msghdr()
        message.msg_iov = vectors
        message.msg_iovlen = count
        while true {
            let n = Glibc.sendmsg(fd, &message, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// sendto(2) of one datagram to a UNIX address of `length` bytes, MSG_NOSIGNAL; EINTR retried.
    @inline(never)
    public static func sendTo(_ fd: Int32, _ bytes: [UInt8], _ address: UnsafePointer<sockaddr>, _ length: socklen_t) -> Result<Int, Errno> {
        while true {
            let n = bytes.withUnsafeBytes { Glibc.sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), address, length) }
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// sendmsg(2) of `bytes` with `descriptors` as SCM_RIGHTS (none: no control message), to
    /// `address` of `length` bytes or, when nil, the connected peer. MSG_NOSIGNAL; EINTR retried.
    /// Returns the bytes sent (a stream socket may take fewer than all).
    @inline(never)
    public static func sendWithRights(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, descriptors: [Int32],
                                      to address: UnsafePointer<sockaddr>? = nil, length: socklen_t = 0) -> Result<Int, Errno> {
        let space = CVirtioShim_CMSG_SPACE(MemoryLayout<Int32>.size * descriptors.count)
        let control = UnsafeMutableRawPointer.allocate(byteCount: max(space, 1), alignment: 8)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0, count: max(space, 1))
        var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        return withUnsafeMutablePointer(to: &iov) { iovPointer in
            var message = msghdr()
            message.msg_name = UnsafeMutableRawPointer(mutating: address)
            message.msg_namelen = address == nil ? 0 : length
            message.msg_iov = iovPointer
            message.msg_iovlen = 1
            if !descriptors.isEmpty {
                message.msg_control = control
                message.msg_controllen = space
                let header = CVirtioShim_CMSG_FIRSTHDR(&message)!
                header.pointee.cmsg_level = SOL_SOCKET
                header.pointee.cmsg_type = Int32(SCM_RIGHTS)
                header.pointee.cmsg_len = CVirtioShim_CMSG_LEN(MemoryLayout<Int32>.size * descriptors.count)
                let data = UnsafeMutableRawPointer(CVirtioShim_CMSG_DATA(header)!)
                for (i, fd) in descriptors.enumerated() { data.storeBytes(of: fd, toByteOffset: i * 4, as: Int32.self) }
            }
            return Syscall.sendmsg(fd, &message, 0)
        }
    }

    /// poll(2) with a timeout in nanoseconds (nil: wait forever). Returns how many descriptors
    /// have events; 0 on timeout and on EINTR. poll(2) counts in milliseconds (ppoll is a GNU
    /// extension the Glibc module does not export): a timeout under 1 ms is a nanosleep(2)
    /// followed by a poll that does not wait, so events during the sleep wait at most that long.
    @inline(never)
    public static func poll(_ fds: UnsafeMutablePointer<pollfd>, _ count: Int, timeoutNanoseconds: Int64?) -> Result<Int, Errno> {
        var milliseconds: Int32 = -1
        if let t = timeoutNanoseconds {
            if t > 0 && t < 1_000_000 {
                var ts = timespec(tv_sec: 0, tv_nsec: Int(t))
                _ = Glibc.nanosleep(&ts, nil)  // EINTR: the poll below runs early, which is harmless
                milliseconds = 0
            } else {
                milliseconds = Int32(clamping: (max(0, t) + 999_999) / 1_000_000)
            }
        }
        let r = Glibc.poll(fds, nfds_t(count), milliseconds)
        if r >= 0 { return .success(Int(r)) }
        let e = errno
        return e == EINTR ? .success(0) : .failure(Errno(rawValue: e))
    }

    /// lstat(2): the file type bits, device and inode of `path` (a symlink is not followed).
    @inline(never)
    public static func lstat(_ path: String) -> Result<(mode: UInt32, device: UInt64, inode: UInt64), Errno> {
        var s = stat()
        guard Glibc.lstat(path, &s) == 0 else { return .failure(Errno(rawValue: errno)) }
        return .success((UInt32(s.st_mode), UInt64(s.st_dev), UInt64(s.st_ino)))
    }

    @inline(never)
    public static func unlink(_ path: String) -> Result<Void, Errno> {
        Glibc.unlink(path) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func chmod(_ path: String, _ mode: UInt32) -> Result<Void, Errno> {
        Glibc.chmod(path, mode_t(mode)) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    /// A sockaddr_un for `path`; the caller checked that it fits (`sun_path` holds 107 bytes
    /// and the terminating NUL).
    public static func unixAddress(_ path: String) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            precondition(bytes.count < raw.count, "UNIX socket path longer than sun_path")
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }
}
