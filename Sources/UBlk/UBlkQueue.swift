#if canImport(Glibc)
import Glibc
#endif
import IOUring
import Syscalls
import SystemPackage

/// One ublk queue as its server sees it: /dev/ublkcN, the queue's read-only array of request
/// descriptors, one buffer per tag, and the ring that carries FETCH_REQ / COMMIT_AND_FETCH_REQ
/// for every tag (and the device's START_DEV, END_USER_RECOVERY and STOP_DEV, whose answers come
/// back as completions like any other).
///
/// The kernel insists that every command of a queue comes from one thread (the one that issued
/// the last FETCH_REQ becomes the queue's daemon): create the queue anywhere, but call `fetchAll`
/// and everything after it from the thread that serves it. Nothing allocates after `init`.
public struct UBlkQueue: ~Copyable {
    public let deviceID: UInt32
    public let queue: UInt16
    public let depth: Int
    let character: OwnedFD
    let control: OwnedFD
    var ring: IOUring
    let descriptors: UnsafeMutableRawPointer
    let descriptorsLength: Int
    /// Per tag: its buffer's address.
    let buffers: UnsafeMutablePointer<UInt64>

    /// What a completion on the ring means.
    public enum Event {
        /// The kernel gives tag `tag` a request (its descriptor, read once).
        case request(tag: Int, UBlkABI.IODescriptor)
        /// No more requests for `tag`: the device stops, or its server is being replaced.
        case aborted(tag: Int)
        /// The kernel refused a FETCH or COMMIT for `tag` (a server bug, or a device in a state it
        /// cannot serve).
        case refused(tag: Int, Errno)
        /// A device command sent with `send` was answered: result ≥ 0, or -errno.
        case answered(UBlkABI.Command, Int32)
    }

    static let commandBit: UInt64 = 1 << 63

    /// Opens /dev/ublkc`deviceID` (the kernel allows one opener at a time), maps the queue's
    /// descriptors and sets up its ring. `buffers[tag]` is where the kernel copies a write's data
    /// before handing over the request, and where it takes a read's data when it is committed;
    /// each holds the device's max_io_buf_bytes.
    public init(deviceID: UInt32, queue: UInt16, depth: Int, buffers: [UnsafeMutableRawPointer],
                control: borrowing OwnedFD) throws(UBlkError) {
        precondition(buffers.count == depth && depth > 0 && depth <= UBlkABI.maximumQueueDepth)
        let path = "/dev/ublkc\(deviceID)"
        let raw: Int32
        switch Syscall.open(path, O_RDWR) {
        case .success(let fd): raw = fd
        case .failure(let e) where e.rawValue == EBUSY:
            throw .refused("\(path) is open elsewhere (ublk allows one server per device): is another driver serving ublk device \(deviceID)?")
        case .failure(let e): throw .characterDevice(path, e)
        }
        let character = OwnedFD(adopting: raw)
        let duplicate: Int32
        switch Syscall.duplicate(control.raw) {
        case .success(let fd): duplicate = fd
        case .failure(let e): throw .characterDevice(UBlkControl.path, e)
        }
        let controlCopy = OwnedFD(adopting: duplicate)
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let length = (depth * UBlkABI.IODescriptor.size + page - 1) / page * page
        let mapped: UnsafeMutableRawPointer
        switch Syscall.mmap(length: length, protection: PROT_READ, flags: MAP_SHARED | MAP_POPULATE, fd: character.raw,
                            offset: UBlkABI.descriptorOffset(queue: Int(queue), pageSize: page)) {
        case .success(let p): mapped = p
        case .failure(let e): throw .characterDevice("\(path) (descriptors of queue \(queue))", e)
        }
        // One command per tag outstanding at most, plus the device commands: room for all of them.
        var entries: UInt32 = 8
        while entries < UInt32(depth + 4) { entries <<= 1 }
        let ring: IOUring
        do { ring = try IOUring(entries: entries, bigEntries: true) } catch {
            Syscall.munmap(mapped, length)
            throw .ring(error)
        }
        self.deviceID = deviceID
        self.queue = queue
        self.depth = depth
        self.character = character
        self.control = controlCopy
        self.ring = ring
        descriptors = mapped
        descriptorsLength = length
        self.buffers = .allocate(capacity: depth)
        for tag in 0..<depth { self.buffers[tag] = UInt64(UInt(bitPattern: buffers[tag])) }
    }

    deinit {
        buffers.deallocate()
        Syscall.munmap(descriptors, descriptorsLength)
    }

    /// The ring's descriptor: readable (POLLIN) while completions wait.
    public var descriptor: Int32 { ring.fd.raw }
    public var hasEvents: Bool { ring.hasCompletions }

    /// A free entry; submits what is prepared to make room if the ring is full.
    mutating func entry() throws(UBlkError) -> SubmissionEntry {
        if let e = ring.next() { return e }
        do { try ring.submit() } catch { throw .ring(error) }
        guard let e = ring.next() else { throw .ring(IOUringError(.enter, Errno(rawValue: EBUSY))) }
        return e
    }

    mutating func ioCommand(_ command: UBlkABI.IOCommand, tag: Int, result: Int32) throws(UBlkError) {
        let e = try entry()
        e.set(opcode: IOUringOpcode.uringCommand, fd: character.raw, userData: UInt64(tag))
        e.setCommand(command.rawValue)
        UBlkABI.IOCommandPayload(queue: queue, tag: UInt16(tag), result: result, address: buffers[tag]).write(to: e.command)
    }

    /// FETCH_REQ for every tag (prepared; `submit` sends them).
    public mutating func fetchAll() throws(UBlkError) {
        for tag in 0..<depth { try ioCommand(.fetchRequest, tag: tag, result: 0) }
    }

    /// Answers `tag`'s request with `result` (bytes done, or -errno) and asks for its next one.
    public mutating func commit(tag: Int, result: Int32) throws(UBlkError) {
        try ioCommand(.commitAndFetchRequest, tag: tag, result: result)
    }

    /// A device command (START_DEV, END_USER_RECOVERY, STOP_DEV) whose answer comes back as an
    /// `.answered` event; `data` is its data[0] (the server's pid for the first two).
    public mutating func send(_ command: UBlkABI.Command, data: UInt64 = 0) throws(UBlkError) {
        UBlkControl.prepare(try entry(), controlFD: control.raw, command, payload: UBlkABI.ControlCommand(deviceID: deviceID, data: data),
                            userData: Self.commandBit | UInt64(command.rawValue))
    }

    /// Gives the kernel what was prepared (one system call, none if nothing was).
    public mutating func submit() throws(UBlkError) {
        guard ring.unsubmitted > 0 else { return }
        do { try ring.submit() } catch { throw .ring(error) }
    }

    /// Hands every completion to `body` as an event. Returns how many there were.
    @discardableResult
    public mutating func events(_ body: (Event) throws(UBlkError) -> Void) throws(UBlkError) -> Int {
        let depth = self.depth, descriptors = UnsafeRawPointer(self.descriptors)
        return try ring.drainCompletions { (userData, result, _) throws(UBlkError) in
            if userData & Self.commandBit != 0 {
                // Only what `send` wrote comes back here.
                guard let command = UBlkABI.Command(rawValue: UInt32(truncatingIfNeeded: userData)) else { return }
                try body(.answered(command, result))
                return
            }
            let tag = Int(userData)
            guard tag < depth else { return }  // never ours: user data is only what we wrote
            if result == 0 {
                try body(.request(tag: tag, UBlkABI.IODescriptor(reading: descriptors + tag * UBlkABI.IODescriptor.size)))
            } else if result == UBlkABI.abortResult {
                try body(.aborted(tag: tag))
            } else {
                // NEED_GET_DATA (1) only comes with UBLK_F_NEED_GET_DATA, which this driver never asks for.
                try body(.refused(tag: tag, Errno(rawValue: result < 0 ? -result : EPROTO)))
            }
        }
    }
}
