#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CVirtioShim
import SystemPackage

/// One wrapper per system call the driver makes (VFIO, DMA memory, eventfds). Each returns the result or throws the errno.
///
/// EINTR policy: `open`, `pread`, `pwrite` and `ioctl` are retried on EINTR (VFIO ioctls can be
/// interrupted while the kernel waits for a device, e.g. in reset); `close` is never retried
/// (Linux releases the descriptor even when close reports EINTR).
public enum Syscall {
    @inline(never)
    public static func open(_ path: String, _ flags: Int32) -> Result<Int32, Errno> {
        while true {
            let fd = Glibc.open(path, flags | O_CLOEXEC)
            if fd >= 0 { return .success(fd) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    @inline(never)
    public static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// ioctl with a pointer argument. Returns the ioctl's non-negative result.
    @inline(never)
    public static func ioctl(_ fd: Int32, _ request: UInt, _ arg: UnsafeMutableRawPointer?) -> Result<Int, Errno> {
        while true {
            let r = CVirtioShim_ioctl_ptr(fd, request, arg)
            if r >= 0 { return .success(r) }
            if r != -Int(EINTR) { return .failure(Errno(rawValue: Int32(-r))) }
        }
    }

    /// ioctl with an integer argument.
    @inline(never)
    public static func ioctl(_ fd: Int32, _ request: UInt, value: UInt) -> Result<Int, Errno> {
        while true {
            let r = CVirtioShim_ioctl_value(fd, request, value)
            if r >= 0 { return .success(r) }
            if r != -Int(EINTR) { return .failure(Errno(rawValue: Int32(-r))) }
        }
    }

    @inline(never)
    public static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ offset: UInt64) -> Result<Int, Errno> {
        while true {
            let n = Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(bitPattern: UInt(offset)))
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    @inline(never)
    public static func pwrite(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ offset: UInt64) -> Result<Int, Errno> {
        while true {
            let n = Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(bitPattern: UInt(offset)))
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    @inline(never)
    public static func mmap(length: Int, protection: Int32, flags: Int32, fd: Int32, offset: UInt64)
        -> Result<UnsafeMutableRawPointer, Errno>
    {
        let p = Glibc.mmap(nil, length, protection, flags, fd, off_t(bitPattern: UInt(offset)))
        if p == MAP_FAILED || p == nil { return .failure(Errno(rawValue: errno)) }
        return .success(p!)
    }

    @inline(never)
    public static func munmap(_ address: UnsafeMutableRawPointer, _ length: Int) {
        _ = Glibc.munmap(address, length)
    }

    @inline(never)
    public static func memfdCreate(_ name: String, _ flags: UInt32) -> Result<Int32, Errno> {
        let fd = CVirtioShim_memfd_create(name, flags | CVirtioShim_MFD_CLOEXEC)
        return fd >= 0 ? .success(fd) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func ftruncate(_ fd: Int32, _ size: Int) -> Result<Void, Errno> {
        while true {
            if Glibc.ftruncate(fd, off_t(size)) == 0 { return .success(()) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// fstat(2), for the size of a file (a handed-over memfd).
    @inline(never)
    public static func fileSize(_ fd: Int32) -> Result<Int, Errno> {
        var s = stat()
        return Glibc.fstat(fd, &s) == 0 ? .success(Int(s.st_size)) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func access(_ path: String, _ mode: Int32) -> Result<Void, Errno> {
        Glibc.access(path, mode) == 0 ? .success(()) : .failure(Errno(rawValue: errno))
    }

    @inline(never)
    public static func eventfd(_ initial: UInt32, _ flags: Int32) -> Result<Int32, Errno> {
        let fd = CVirtioShim.eventfd(initial, flags | Int32(EFD_CLOEXEC))
        return fd >= 0 ? .success(fd) : .failure(Errno(rawValue: errno))
    }

    /// read(2) of exactly 8 bytes, as eventfds require. EINTR retried; EAGAIN returned.
    @inline(never)
    public static func read64(_ fd: Int32) -> Result<UInt64, Errno> {
        var value: UInt64 = 0
        while true {
            let n = Glibc.read(fd, &value, 8)
            if n == 8 { return .success(value) }
            let e = n < 0 ? errno : EIO
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// write(2) of exactly 8 bytes, as eventfds require. EINTR retried.
    @inline(never)
    public static func write64(_ fd: Int32, _ value: UInt64) -> Result<Void, Errno> {
        var v = value
        while true {
            let n = Glibc.write(fd, &v, 8)
            if n == 8 { return .success(()) }
            let e = n < 0 ? errno : EIO
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// pthread_sigmask(SIG_BLOCK): the calling thread no longer takes `signals`, so the process's
    /// other threads (the one that sleeps in ppoll and checks the stop flags) get them.
    @inline(never)
    public static func blockSignalsInThisThread(_ signals: [Int32]) -> Result<Void, Errno> {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        let rc = pthread_sigmask(SIG_BLOCK, &set, nil)
        return rc == 0 ? .success(()) : .failure(Errno(rawValue: rc))
    }

    /// fcntl(F_DUPFD_CLOEXEC): a second descriptor (3 or above) for `fd`'s open file.
    @inline(never)
    public static func duplicate(_ fd: Int32) -> Result<Int32, Errno> {
        let n = Glibc.fcntl(fd, F_DUPFD_CLOEXEC, 3)
        return n >= 0 ? .success(n) : .failure(Errno(rawValue: errno))
    }

    /// Runs `body` with `signals` blocked in the calling thread, then restores its mask: threads
    /// `body` starts inherit the blocked set, so they never take those signals.
    public static func withSignalsBlocked<R, E: Error>(_ signals: [Int32], _ body: () throws(E) -> R) throws(E) -> R {
        var set = sigset_t(), old = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        let blocked = pthread_sigmask(SIG_BLOCK, &set, &old) == 0
        defer { if blocked { pthread_sigmask(SIG_SETMASK, &old, nil) } }
        return try body()
    }

    /// poll(2) for POLLIN on one descriptor. Returns true if readable, false on timeout.
    /// EINTR is returned as "not readable" so that the caller re-checks its own state.
    @inline(never)
    public static func pollIn(_ fd: Int32, timeoutMilliseconds: Int32) -> Result<Bool, Errno> {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let r = Glibc.poll(&p, 1, timeoutMilliseconds)
        if r > 0 { return .success(p.revents & Int16(POLLIN) != 0) }
        if r == 0 { return .success(false) }
        let e = errno
        return e == EINTR ? .success(false) : .failure(Errno(rawValue: e))
    }

    @inline(never)
    public static func socketpair(_ domain: Int32, _ type: Int32) -> Result<(Int32, Int32), Errno> {
        var fds: [Int32] = [-1, -1]
        if Glibc.socketpair(domain, type | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 { return .success((fds[0], fds[1])) }
        return .failure(Errno(rawValue: errno))
    }

    /// sendmsg(2); EINTR retried.
    @inline(never)
    public static func sendmsg(_ fd: Int32, _ message: UnsafePointer<msghdr>, _ flags: Int32) -> Result<Int, Errno> {
        while true {
            let n = Glibc.sendmsg(fd, message, flags | Int32(MSG_NOSIGNAL))
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// recvmsg(2) with MSG_CMSG_CLOEXEC, so received descriptors never leak into children; EINTR retried.
    @inline(never)
    public static func recvmsg(_ fd: Int32, _ message: UnsafeMutablePointer<msghdr>, _ flags: Int32) -> Result<Int, Errno> {
        while true {
            let n = Glibc.recvmsg(fd, message, flags | Int32(MSG_CMSG_CLOEXEC))
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// read(2) into a buffer; EINTR retried. Returns 0 at end of file.
    @inline(never)
    public static func read(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) -> Result<Int, Errno> {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// write(2) from a buffer; EINTR retried. May write less than asked.
    @inline(never)
    public static func write(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) -> Result<Int, Errno> {
        while true {
            let n = Glibc.write(fd, buffer.baseAddress, buffer.count)
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }
}
