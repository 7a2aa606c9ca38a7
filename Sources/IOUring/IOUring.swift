#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls
import SystemPackage

/// An io_uring instance with its three shared mappings (SQ ring, CQ ring, submission entries), one
/// owner, unmapped and closed when the owner goes away.
///
/// Ordering (the rules at the top of Linux's io_uring/io_uring.c): entries are written, then the
/// SQ tail is stored with release semantics; the CQ tail is loaded with acquire semantics before
/// the completions it covers are read, and the CQ head is stored with release semantics after.
/// Nothing here allocates after `init`.
public struct IOUring: ~Copyable {
    public let fd: OwnedFD
    /// Bytes per submission entry: 64, or 128 with `bigEntries` (IORING_SETUP_SQE128, which ublk's
    /// control commands need for their 32-byte payload).
    public let entrySize: Int
    public let submissionEntries: UInt32
    public let completionEntries: UInt32
    let ring: UnsafeMutableRawPointer
    let ringLength: Int
    let entries: UnsafeMutableRawPointer
    let entriesLength: Int
    let sqHead: UnsafeMutableRawPointer, sqTail: UnsafeMutableRawPointer, sqArray: UnsafeMutablePointer<UInt32>
    let cqHead: UnsafeMutableRawPointer, cqTail: UnsafeMutableRawPointer, cqes: UnsafeMutableRawPointer
    let sqMask: UInt32, cqMask: UInt32
    /// Entries prepared (`next`) but not yet published to the kernel, and the tail published last.
    var preparedTail: UInt32
    var publishedTail: UInt32

    /// Sets up a ring of `entries` submissions (a power of two, at most 32768).
    public init(entries: UInt32, bigEntries: Bool = false) throws(IOUringError) {
        var p = io_uring_params()
        if bigEntries { p.flags |= UInt32(IORING_SETUP_SQE128) }
        let raw: Int32
        switch Syscall.ioUringSetup(entries: entries, &p) {
        case .success(let fd): raw = fd
        case .failure(let e): throw IOUringError(.setup, e)
        }
        let fd = OwnedFD(adopting: raw)
        // IORING_FEAT_SINGLE_MMAP (Linux 5.4): SQ and CQ rings share one mapping.
        guard p.features & UInt32(IORING_FEAT_SINGLE_MMAP) != 0 else { throw IOUringError(.setup, Errno(rawValue: ENOSYS)) }
        let sqLength = Int(p.sq_off.array) + Int(p.sq_entries) * 4
        let cqLength = Int(p.cq_off.cqes) + Int(p.cq_entries) * MemoryLayout<io_uring_cqe>.size
        let ringLength = max(sqLength, cqLength)
        let ring: UnsafeMutableRawPointer
        switch Syscall.mmap(length: ringLength, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED | MAP_POPULATE,
                            fd: fd.raw, offset: UInt64(IORING_OFF_SQ_RING)) {
        case .success(let p): ring = p
        case .failure(let e): throw IOUringError(.mapping, e)
        }
        let entrySize = bigEntries ? 128 : 64
        let entriesLength = Int(p.sq_entries) * entrySize
        let entries: UnsafeMutableRawPointer
        switch Syscall.mmap(length: entriesLength, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED | MAP_POPULATE,
                            fd: fd.raw, offset: UInt64(IORING_OFF_SQES)) {
        case .success(let p): entries = p
        case .failure(let e):
            Syscall.munmap(ring, ringLength)
            throw IOUringError(.mapping, e)
        }
        self.fd = fd
        self.entrySize = entrySize
        submissionEntries = p.sq_entries
        completionEntries = p.cq_entries
        self.ring = ring
        self.ringLength = ringLength
        self.entries = entries
        self.entriesLength = entriesLength
        sqHead = ring + Int(p.sq_off.head)
        sqTail = ring + Int(p.sq_off.tail)
        sqArray = (ring + Int(p.sq_off.array)).assumingMemoryBound(to: UInt32.self)
        sqMask = (ring + Int(p.sq_off.ring_mask)).load(as: UInt32.self)
        cqHead = ring + Int(p.cq_off.head)
        cqTail = ring + Int(p.cq_off.tail)
        cqMask = (ring + Int(p.cq_off.ring_mask)).load(as: UInt32.self)
        cqes = ring + Int(p.cq_off.cqes)
        preparedTail = sqTail.load(as: UInt32.self)
        publishedTail = preparedTail
    }

    deinit {
        Syscall.munmap(entries, entriesLength)
        Syscall.munmap(ring, ringLength)
    }

    /// The next submission entry, zeroed, or nil while the kernel has not consumed enough of the
    /// ring. It is published by the next `submit`.
    public mutating func next() -> SubmissionEntry? {
        // The kernel's SQ head moves as it consumes entries: acquire, so the slot is free to reuse.
        let head = CVirtioShim_load_acquire32(sqHead)
        guard preparedTail &- head < submissionEntries else { return nil }
        let index = preparedTail & sqMask
        let entry = entries + Int(index) * entrySize
        entry.initializeMemory(as: UInt8.self, repeating: 0, count: entrySize)
        sqArray[Int(index)] = index
        preparedTail &+= 1
        return SubmissionEntry(base: entry, size: entrySize)
    }

    /// Entries prepared and not yet given to the kernel.
    public var unsubmitted: Int { Int(preparedTail &- publishedTail) }

    /// Publishes the prepared entries and enters the kernel to submit them, waiting for `waitFor`
    /// completions. One system call; none when there is nothing to submit or wait for.
    @discardableResult
    public mutating func submit(waitFor: UInt32 = 0) throws(IOUringError) -> Int {
        let count = preparedTail &- publishedTail
        guard count > 0 || waitFor > 0 else { return 0 }
        // Entries (and array slots) are written before the tail that covers them is published.
        CVirtioShim_store_release32(sqTail, preparedTail)
        publishedTail = preparedTail
        switch Syscall.ioUringEnter(fd.raw, submit: count, waitFor: waitFor) {
        case .success(let n): return n
        case .failure(let e): throw IOUringError(.enter, e)
        }
    }

    /// Whether completions wait in the CQ ring (one shared-memory load each side).
    public var hasCompletions: Bool {
        CVirtioShim_load_acquire32(cqTail) != cqHead.load(as: UInt32.self)
    }

    /// Hands every completion in the ring to `body` (user data, result, flags) and frees their
    /// slots. Returns how many there were.
    @discardableResult
    public mutating func drainCompletions<E: Error>(_ body: (UInt64, Int32, UInt32) throws(E) -> Void) throws(E) -> Int {
        var head = cqHead.load(as: UInt32.self)
        // The tail is read before the entries it covers.
        let tail = CVirtioShim_load_acquire32(cqTail)
        var count = 0
        while head != tail {
            let cqe = cqes + Int(head & cqMask) * MemoryLayout<io_uring_cqe>.size
            let userData = cqe.load(fromByteOffset: 0, as: UInt64.self)
            let result = cqe.load(fromByteOffset: 8, as: Int32.self)
            let flags = cqe.load(fromByteOffset: 12, as: UInt32.self)
            head &+= 1
            count += 1
            // The slot is released before the body runs: a body that submits may wait on the ring.
            CVirtioShim_store_release32(cqHead, head)
            try body(userData, result, flags)
        }
        return count
    }
}

/// One submission entry being written (linux/io_uring.h `struct io_uring_sqe`; offsets pinned by
/// IOUringTests against the header's struct). Valid until the next `IOUring.submit`.
public struct SubmissionEntry {
    public let base: UnsafeMutableRawPointer
    public let size: Int

    public enum Offset {
        public static let opcode = 0, flags = 1, fd = 4, commandOperation = 8, offset = 8, address = 16, length = 24
        public static let operationFlags = 28, userData = 32, command = 48
    }

    public func set(opcode: UInt8, fd: Int32, userData: UInt64) {
        base.storeBytes(of: opcode, toByteOffset: Offset.opcode, as: UInt8.self)
        base.storeBytes(of: fd, toByteOffset: Offset.fd, as: Int32.self)
        base.storeBytes(of: userData, toByteOffset: Offset.userData, as: UInt64.self)
    }

    public func set(address: UInt64, length: UInt32, offset: UInt64) {
        base.storeBytes(of: address, toByteOffset: Offset.address, as: UInt64.self)
        base.storeBytes(of: length, toByteOffset: Offset.length, as: UInt32.self)
        base.storeBytes(of: offset, toByteOffset: Offset.offset, as: UInt64.self)
    }

    /// IORING_OP_URING_CMD: the driver's command `operation` (the 32 bits after which __pad1 stays 0);
    /// its payload goes in `command` (16 bytes, 80 with big entries).
    public func setCommand(_ operation: UInt32) {
        base.storeBytes(of: operation, toByteOffset: Offset.commandOperation, as: UInt32.self)
    }

    public var command: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base + Offset.command, count: size - Offset.command)
    }
}

/// What went wrong with a ring (not with an operation on it: those come back as completions).
public struct IOUringError: Error, CustomStringConvertible {
    public enum Step: Sendable { case setup, mapping, enter }
    public let step: Step
    public let errno: Errno

    public init(_ step: Step, _ errno: Errno) { self.step = step; self.errno = errno }

    public var description: String {
        let text = "\(errno) (errno \(errno.rawValue))"
        switch step {
        case .setup:
            if errno.rawValue == ENOSYS { return "io_uring_setup: io_uring is not available (\(text)); Linux 5.4 or later with CONFIG_IO_URING is needed" }
            if errno.rawValue == EPERM { return "io_uring_setup: not permitted (\(text)); check the sysctl kernel.io_uring_disabled" }
            return "io_uring_setup: \(text)"
        case .mapping: return "mapping the io_uring rings: \(text)"
        case .enter: return "io_uring_enter: \(text)"
        }
    }
}

/// io_uring opcodes this project issues.
public enum IOUringOpcode {
    public static let noOperation = UInt8(IORING_OP_NOP.rawValue)
    public static let read = UInt8(IORING_OP_READ.rawValue)
    public static let uringCommand = UInt8(IORING_OP_URING_CMD.rawValue)
}
