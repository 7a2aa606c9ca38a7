import Glibc
import NBD
import Synchronization
import Syscalls

/// How the in-memory backend behaves.
struct MemoryBackendOptions: Sendable {
    var size = 8 << 20
    var readOnly = false
    var canFlush = true
    var canTrim = true
    var canWriteZeroes = true
    var minimumBlockSize = 512
    var preferredBlockSize = 4096
    var maxPayload = 1 << 20
    /// Buffer memory: `slots` slots of `slotSize` bytes; a reservation takes a contiguous run
    /// (at least one slot, also for length 0).
    var slotSize = 64 << 10
    var slots = 64
    /// Signal an eventfd (the `completionDescriptor`) instead of being polled.
    var eventFD = true
    /// A request completes on the `delay + 1`-th poll after its submission (never on the first).
    var delay = 1
    /// Complete eligible requests in a random order, and only some of them per poll.
    var shuffle = false
    var seed: UInt64 = 1
}

/// The backend's memory and bookkeeping, shared by the backend (on the server's thread) and the
/// test (which inspects it). Everything is behind one lock.
final class MemoryDisk: @unchecked Sendable {
    struct Pending {
        var tag: UInt64
        var operation: BackendOperation
        var offset: UInt64
        var length: Int
        var buffer: BackendBuffer
        var age: Int
    }

    struct State {
        /// Per slot: 0 free, 1 reserved, 2 submitted.
        var slotState: [UInt8]
        var pending: [Pending] = []
        var violations: [String] = []
        var operations: [BackendOperation] = []
        var reservations = 0
        var releases = 0
        var maxReserved = 0
        var maxInFlight = 0
        var rng: UInt64
        /// Completed writes not yet flushed: range and completion sequence.
        var dirty: [(offset: Int, length: Int, sequence: Int)] = []
        var sequence = 0
        var reserved: Int { slotState.reduce(0) { $0 + ($1 != 0 ? 1 : 0) } }
    }

    let options: MemoryBackendOptions
    let data: UnsafeMutableRawBufferPointer
    /// What a flush (or FUA) made durable.
    let durable: UnsafeMutableRawBufferPointer
    let pool: UnsafeMutableRawBufferPointer
    let eventFD: Int32?
    let state: Mutex<State>
    /// While true, nothing completes.
    let hold = Atomic<Bool>(false)
    /// `submit` throws while set; `poll` throws once set (the device broke).
    let failSubmit = Atomic<Bool>(false)
    let failPoll = Atomic<Bool>(false)
    /// Results to inject: (operation, offset) -> errno, checked at completion.
    let injected: Mutex<[(BackendOperation, UInt64, Int32)]> = Mutex([])

    init(_ options: MemoryBackendOptions) {
        self.options = options
        data = .allocate(byteCount: options.size, alignment: 4096)
        data.initializeMemory(as: UInt8.self, repeating: 0)
        durable = .allocate(byteCount: options.size, alignment: 4096)
        durable.initializeMemory(as: UInt8.self, repeating: 0)
        pool = .allocate(byteCount: options.slotSize * options.slots, alignment: 4096)
        pool.initializeMemory(as: UInt8.self, repeating: 0xEE)
        if options.eventFD, case .success(let fd) = Syscall.eventfd(0, O_NONBLOCK) { eventFD = fd } else { eventFD = nil }
        state = Mutex(State(slotState: Array(repeating: 0, count: options.slots), rng: options.seed | 1))
    }

    deinit {
        data.deallocate()
        durable.deallocate()
        pool.deallocate()
        if let eventFD { Glibc.close(eventFD) }
    }

    func inject(_ operation: BackendOperation, at offset: UInt64, errno: Int32) {
        injected.withLock { $0.append((operation, offset, errno)) }
    }

    /// Ends `hold` and wakes the server.
    func resume() {
        hold.store(false, ordering: .relaxed)
        signal()
    }

    func signal() {
        if let eventFD { var one: UInt64 = 1; _ = Glibc.write(eventFD, &one, 8) }
    }

    var violations: [String] { state.withLock { $0.violations } }
    var reservedNow: Int { state.withLock { $0.reserved } }
    var inFlightNow: Int { state.withLock { $0.pending.count } }
    var operations: [BackendOperation] { state.withLock { $0.operations } }
    var maxInFlight: Int { state.withLock { $0.maxInFlight } }
    var reservations: Int { state.withLock { $0.reservations } }
    var releases: Int { state.withLock { $0.releases } }

    func read(_ offset: Int, _ count: Int) -> [UInt8] {
        state.withLock { _ in Array(UnsafeRawBufferPointer(rebasing: data[offset..<(offset + count)])) }
    }
    func readDurable(_ offset: Int, _ count: Int) -> [UInt8] {
        state.withLock { _ in Array(UnsafeRawBufferPointer(rebasing: durable[offset..<(offset + count)])) }
    }
    func fill(_ offset: Int, _ bytes: [UInt8]) {
        state.withLock { _ in
            UnsafeMutableRawBufferPointer(rebasing: data[offset..<(offset + bytes.count)]).copyBytes(from: bytes)
        }
    }
}

/// A `BlockBackend` over memory that behaves like a device: requests complete on a later poll,
/// optionally out of order and with injected errors, with buffers from a fixed pool of slots.
/// Every misuse of the contract is recorded in `disk.violations`.
struct MemoryBlockBackend: BlockBackend {
    let disk: MemoryDisk

    init(_ disk: MemoryDisk) { self.disk = disk }

    var size: UInt64 { UInt64(disk.options.size) }
    var readOnly: Bool { disk.options.readOnly }
    var canFlush: Bool { disk.options.canFlush }
    var canTrim: Bool { disk.options.canTrim }
    var canWriteZeroes: Bool { disk.options.canWriteZeroes }
    var minimumBlockSize: Int { disk.options.minimumBlockSize }
    var preferredBlockSize: Int { disk.options.preferredBlockSize }
    var maxPayload: Int { disk.options.maxPayload }
    var completionDescriptor: Int32? { disk.eventFD }

    mutating func reserve(length: Int) -> BackendBuffer? {
        let options = disk.options
        return disk.state.withLock { s -> BackendBuffer? in
            if length > options.maxPayload { s.violations.append("reserve(\(length)) above maxPayload"); return nil }
            let need = max(1, (length + options.slotSize - 1) / options.slotSize)
            var run = 0
            for i in 0..<options.slots {
                run = s.slotState[i] == 0 ? run + 1 : 0
                if run == need {
                    let first = i - need + 1
                    for k in first...i { s.slotState[k] = 1 }
                    s.reservations += 1
                    s.maxReserved = max(s.maxReserved, s.reserved)
                    return BackendBuffer(first: first, count: need, length: length)
                }
            }
            if s.reserved == 0 { s.violations.append("no room with nothing reserved") }
            return nil
        }
    }

    func memory(of buffer: BackendBuffer) -> UnsafeMutableRawBufferPointer {
        let options = disk.options
        return UnsafeMutableRawBufferPointer(rebasing: disk.pool[(buffer.first * options.slotSize)..<(buffer.first * options.slotSize + max(buffer.length, 0))])
    }

    mutating func submit(_ operation: BackendOperation, offset: UInt64, length: Int, buffer: BackendBuffer, tag: UInt64) throws(BackendError) {
        let options = disk.options
        if disk.failSubmit.load(ordering: .relaxed) { throw BackendError("submit refused (test)") }
        let problem: String? = disk.state.withLock { s in
            guard buffer.first >= 0, buffer.first + buffer.count <= options.slots,
                  (buffer.first..<(buffer.first + buffer.count)).allSatisfy({ s.slotState[$0] == 1 }) else {
                s.violations.append("submit \(operation) with a buffer not reserved or already submitted: \(buffer)")
                return "bad buffer"
            }
            if options.readOnly && operation != .read && operation != .flush {
                s.violations.append("\(operation) submitted to a read-only backend")
            }
            if operation == .read || operation == .write || operation == .writeFUA {
                if length > buffer.length { s.violations.append("\(operation) of \(length) in a buffer of \(buffer.length)") }
            }
            if operation != .flush {
                if offset > UInt64(options.size) || UInt64(length) > UInt64(options.size) - offset {
                    s.violations.append("\(operation) out of range: \(offset)+\(length)")
                }
                if Int(offset) % options.minimumBlockSize != 0 || length % options.minimumBlockSize != 0 {
                    s.violations.append("\(operation) unaligned: \(offset)+\(length)")
                }
            }
            for k in buffer.first..<(buffer.first + buffer.count) { s.slotState[k] = 2 }
            s.pending.append(MemoryDisk.Pending(tag: tag, operation: operation, offset: offset, length: length, buffer: buffer, age: 0))
            s.operations.append(operation)
            s.maxInFlight = max(s.maxInFlight, s.pending.count)
            return nil
        }
        if let problem { throw BackendError(problem) }
        disk.signal()
    }

    mutating func poll(_ body: (UInt64, Int32) -> Void) throws(BackendError) -> Int {
        if let fd = disk.eventFD { var v: UInt64 = 0; _ = Glibc.read(fd, &v, 8) }  // may already be consumed
        if disk.failPoll.load(ordering: .relaxed) { throw BackendError("device broke (test)") }
        if disk.hold.load(ordering: .relaxed) { return 0 }  // `resume()` signals again
        let options = disk.options
        let injected = disk.injected.withLock { $0 }
        var done: [(UInt64, Int32)] = []
        let more: Bool = disk.state.withLock { s in
            for k in s.pending.indices { s.pending[k].age += 1 }
            var eligible = s.pending.indices.filter { s.pending[$0].age > options.delay }
            if options.shuffle {
                // xorshift: a random subset (at least one) in a random order.
                for k in eligible.indices.reversed() where k > 0 {
                    s.rng ^= s.rng << 13; s.rng ^= s.rng >> 7; s.rng ^= s.rng << 17
                    eligible.swapAt(k, Int(s.rng % UInt64(k + 1)))
                }
                if eligible.count > 1 { eligible = Array(eligible.prefix(max(1, Int(s.rng % UInt64(eligible.count)) + 1))) }
            }
            var finished = Set<Int>()
            for k in eligible {
                let p = s.pending[k]
                var result: Int32 = 0
                if let hit = injected.first(where: { $0.0 == p.operation && $0.1 == p.offset }) { result = hit.2 }
                if result == 0 { result = execute(p, &s) }
                for slot in p.buffer.first..<(p.buffer.first + p.buffer.count) { s.slotState[slot] = 1 }
                done.append((p.tag, result))
                finished.insert(k)
            }
            s.pending = s.pending.enumerated().filter { !finished.contains($0.offset) }.map { $0.element }
            return !s.pending.isEmpty
        }
        if more { disk.signal() }  // like a device still busy: another interrupt will come
        for (tag, result) in done { body(tag, result) }
        return done.count
    }

    /// Carries out a request at completion time (as a device would DMA then).
    func execute(_ p: MemoryDisk.Pending, _ s: inout MemoryDisk.State) -> Int32 {
        let options = disk.options
        if p.operation != .flush && (p.offset > UInt64(options.size) || UInt64(p.length) > UInt64(options.size) - p.offset) {
            return EINVAL
        }
        if options.readOnly && p.operation != .read && p.operation != .flush { return EROFS }
        let offset = Int(p.offset)
        let memory = self.memory(of: p.buffer)
        switch p.operation {
        case .read:
            memory.baseAddress!.copyMemory(from: disk.data.baseAddress! + offset, byteCount: p.length)
        case .write, .writeFUA:
            (disk.data.baseAddress! + offset).copyMemory(from: memory.baseAddress!, byteCount: p.length)
            s.sequence += 1
            if p.operation == .writeFUA {
                (disk.durable.baseAddress! + offset).copyMemory(from: memory.baseAddress!, byteCount: p.length)
            } else {
                s.dirty.append((offset, p.length, s.sequence))
            }
        case .trim, .writeZeroes:
            (disk.data.baseAddress! + offset).initializeMemory(as: UInt8.self, repeating: 0, count: p.length)
            s.sequence += 1
            s.dirty.append((offset, p.length, s.sequence))
        case .flush:
            // Everything completed so far becomes durable (this flush was submitted after them).
            for d in s.dirty {
                (disk.durable.baseAddress! + d.offset).copyMemory(from: disk.data.baseAddress! + d.offset, byteCount: d.length)
            }
            s.dirty.removeAll()
        }
        return 0
    }

    mutating func release(_ buffer: BackendBuffer) {
        let options = disk.options
        disk.state.withLock { s in
            guard buffer.first >= 0, buffer.first + buffer.count <= options.slots else {
                s.violations.append("release of a buffer outside the pool: \(buffer)")
                return
            }
            for k in buffer.first..<(buffer.first + buffer.count) {
                if s.slotState[k] != 1 {
                    s.violations.append("release of slot \(k) in state \(s.slotState[k]) (\(buffer))")
                }
                s.slotState[k] = 0
            }
            s.releases += 1
        }
    }
}
