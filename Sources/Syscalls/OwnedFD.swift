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

/// A set of eventfds owned together (one per interrupt vector); all closed when the set goes away.
/// A class because the set is shared by whoever waits on a vector and the transport that routes it.
public final class EventFDSet: @unchecked Sendable {
    public private(set) var descriptors: [Int32] = []

    public init() {}

    /// Replaces the set with `count` new eventfds.
    public func create(count: Int) throws(Errno) {
        closeAll()
        for _ in 0..<count {
            switch Syscall.eventfd(0, 0) {
            case .success(let fd): descriptors.append(fd)
            case .failure(let e): closeAll(); throw e
            }
        }
    }

    /// Takes ownership of `descriptors` (eventfds handed over by a predecessor), replacing the set.
    public func adopt(_ handed: [Int32]) {
        closeAll()
        descriptors = handed
    }

    public func closeAll() {
        for fd in descriptors { Syscall.close(fd) }
        descriptors = []
    }

    deinit { closeAll() }
}
