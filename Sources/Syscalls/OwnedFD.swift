import SystemPackage

/// A file descriptor with exactly one owner. Closed when the owner goes away, unless it was
/// handed on with `take()` (e.g. to another process over SCM_RIGHTS during an upgrade).
public struct OwnedFD: ~Copyable {
    public let raw: Int32

    public init(adopting raw: Int32) {
        precondition(raw >= 0, "OwnedFD needs a valid descriptor")
        self.raw = raw
    }

    /// Gives up ownership without closing; the caller now owns the descriptor.
    public consuming func take() -> Int32 {
        let raw = self.raw
        discard self
        return raw
    }

    deinit {
        Syscall.close(raw)
    }
}

/// An eventfd: the kernel's counter that VFIO signals for an interrupt vector and that a software
/// device signals the same way. One owner.
public struct EventFD: ~Copyable {
    public let fd: OwnedFD

    public init() throws(Errno) {
        switch Syscall.eventfd(0, 0) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw e
        }
    }

    public var raw: Int32 { fd.raw }

    /// Adds 1 to the counter (what an interrupt does).
    public func signal() {
        _ = Syscall.write64(fd.raw, 1)
    }

    /// Blocks until the counter is non-zero, or `timeoutMilliseconds` pass (-1: forever);
    /// returns the count consumed (0 on timeout).
    public func wait(timeoutMilliseconds: Int32 = -1) throws(Errno) -> UInt64 {
        switch Syscall.pollIn(fd.raw, timeoutMilliseconds: timeoutMilliseconds) {
        case .failure(let e): throw e
        case .success(false): return 0
        case .success(true):
            switch Syscall.read64(fd.raw) {
            case .success(let n): return n
            case .failure(let e): throw e
            }
        }
    }
}
