import NBD
import Syscalls
import SystemPackage
import UBlk
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// `serve blk --ublk`: the virtio-blk device as /dev/ublkbN, served by the NBD server's loop from
/// the same backend as its NBD clients (`BackendCompanion`).
///
/// Each tag owns one buffer reserved from the backend for good (for virtio-blk: request slots in
/// DMA memory), so the kernel copies a write's data straight into the memory the device reads,
/// and a read's data straight out of the memory the device wrote: nothing is copied in this
/// process and nothing is allocated per request. The device is added with UBLK_F_USER_RECOVERY
/// and USER_RECOVERY_REISSUE: when this process dies, the kernel keeps /dev/ublkbN, holds new
/// I/O and gives the requests it had handed out to the next server (`UBlkSetup.attach`). A hot
/// upgrade goes the same way: the quiesce finishes this export's requests in the backend and
/// takes no new ones; once the successor has the device this process exits, and the successor
/// recovers the ublk device.
public final class UBlkExport: BackendCompanion, @unchecked Sendable {
    public let deviceID: UInt32
    public let depth: Int
    /// What a request is checked against.
    public let export: UBlkRequestMapping.Export
    /// START_DEV for a new device, END_USER_RECOVERY for one recovered.
    let startCommand: UBlkABI.Command
    var queue: UBlkQueue?
    let buffers: [BackendBuffer]
    /// Per tag: the result to commit when its backend request succeeds (≥ 0); `idle` while the
    /// kernel has the tag (fetching), `aborted` once the kernel said it has no more requests for it.
    let answers: UnsafeMutablePointer<Int32>
    /// A request in the backend has its answer here (≥ 0): the bytes done, or 0.
    static let idle = Int32.min, aborted = Int32.min + 1
    /// Requests taken from the ring in one round, submitted after it.
    let arrived: UnsafeMutablePointer<(tag: Int, descriptor: UBlkABI.IODescriptor)>
    var arrivedCount = 0
    public private(set) var inFlight = 0
    var abortedTags = 0
    var begun = false
    var stopping = false
    var stopAnswered = false
    /// The first failure of a command, thrown by the next `service`.
    var failure: String?
    public private(set) var live = false
    /// Taken over from an earlier server (END_USER_RECOVERY) rather than added (START_DEV).
    public var recovered: Bool { startCommand == .endUserRecovery }
    /// Recovered: how long the kernel took to let this driver have the device (the previous
    /// server's rings going away, the disk quiescing), ns.
    public internal(set) var letGoAfter: UInt64 = 0
    /// When the serving loop sent FETCH_REQ for every tag and START_DEV or END_USER_RECOVERY
    /// (CLOCK_MONOTONIC ns; 0 before).
    public private(set) var fetchedAt: UInt64 = 0
    public private(set) var statistics = UBlkStatistics()
    let log: @Sendable (String) -> Void
    /// Told once, when the kernel answered START_DEV or END_USER_RECOVERY (the disk serves).
    let ready: @Sendable (UBlkExport) -> Void

    init(deviceID: UInt32, depth: Int, export: UBlkRequestMapping.Export, startCommand: UBlkABI.Command, queue: consuming UBlkQueue,
         buffers: [BackendBuffer], log: @escaping @Sendable (String) -> Void, ready: @escaping @Sendable (UBlkExport) -> Void) {
        self.deviceID = deviceID
        self.depth = depth
        self.export = export
        self.startCommand = startCommand
        self.queue = Optional(queue)
        self.buffers = buffers
        self.log = log
        self.ready = ready
        answers = .allocate(capacity: depth)
        answers.initialize(repeating: Self.idle, count: depth)
        arrived = .allocate(capacity: depth)
    }

    deinit {
        answers.deallocate()
        arrived.deallocate()
    }

    public var descriptor: Int32? { queue?.descriptor }
    public var finished: Bool { !begun || queue == nil || (stopAnswered && abortedTags == depth && inFlight == 0) }

    /// Runs `body` on the queue (it is moved out of the optional and back: a few words).
    func withQueue(_ body: (inout UBlkQueue) throws(UBlkError) -> Void) {
        guard failure == nil, var q = queue.take() else { return }
        do throws(UBlkError) { try body(&q) } catch { failure = "\(error)" }
        queue = consume q
    }

    public func service<B: BlockBackend & ~Copyable>(_ backend: inout B, failed: Bool, holding: Bool) throws(BackendError) {
        if !begun {
            begun = true
            fetchedAt = monotonicNanoseconds()
            // FETCH_REQ for every tag, then the command that waits for them (and, for a new disk,
            // reads its partition table through this loop); all from this thread, as ublk requires.
            withQueue { q throws(UBlkError) in
                try q.fetchAll()
                try q.send(startCommand, data: UInt64(getpid()))
            }
        }
        if failed && inFlight > 0 {
            // The backend gave up: what it held will never complete.
            for tag in 0..<depth where answers[tag] >= 0 { commit(tag, -EIO) }
            inFlight = 0
        }
        // Holding (a hand-over is being prepared): what arrives stays in the ring. If the hand-over
        // goes through, this process exits and the kernel gives those requests to the successor
        // (USER_RECOVERY_REISSUE); if it is rolled back, they are taken here after all.
        if !holding {
            arrivedCount = 0
            withQueue { q throws(UBlkError) in
                try q.events { (event) throws(UBlkError) in self.take(event) }
            }
            for i in 0..<arrivedCount { start(arrived[i].tag, arrived[i].descriptor, &backend, failed: failed) }
        }
        withQueue { q throws(UBlkError) in try q.submit() }
        if let failure { throw BackendError(failure) }
    }

    func take(_ event: UBlkQueue.Event) {
        switch event {
        case .request(let tag, let descriptor):
            // One request per tag at a time: at most `depth` arrive in a round.
            guard arrivedCount < depth else { failure = "ublk: more requests than tags in one round"; return }
            arrived[arrivedCount] = (tag, descriptor)
            arrivedCount += 1
        case .aborted(let tag):
            if answers[tag] != Self.aborted { abortedTags += 1 }
            answers[tag] = Self.aborted
        case .refused(let tag, let e):
            failure = "ublk: the kernel refused a command for tag \(tag) of /dev/ublkb\(deviceID): \(e) (errno \(e.rawValue))"
        case .answered(let command, let result):
            if result < 0 {
                failure = "\(UBlkError.command(command, deviceID: deviceID, Errno(rawValue: -result)))"
            } else if command == .stopDevice {
                stopAnswered = true
            } else if command == startCommand {
                live = true
                ready(self)
            }
        }
    }

    func start<B: BlockBackend & ~Copyable>(_ tag: Int, _ d: UBlkABI.IODescriptor, _ backend: inout B, failed: Bool) {
        switch UBlkRequestMapping.map(d, export) {
        case .answer(let result):
            if result < 0 { statistics.refused += 1 }
            commit(tag, result)
        case .submit(let operation, let offset, let length, let answer):
            if failed { commit(tag, -EIO); return }
            do throws(BackendError) {
                try backend.submit(operation, offset: offset, length: length, buffer: buffers[tag], tag: companionTagBit | UInt64(tag))
            } catch {
                log("ublk: the backend refused \(operation) of \(length) bytes at \(offset): \(error)")
                commit(tag, -EIO)
                return
            }
            statistics.count(operation, bytes: length)
            answers[tag] = answer
            inFlight += 1
        }
    }

    public func completed(tag: UInt64, result: Int32) {
        let t = Int(tag & 0xFFFF)
        guard t < depth, answers[t] >= 0 else { return }  // answered already (the backend failed)
        inFlight -= 1
        if result != 0 { statistics.failed += 1 }
        commit(t, result == 0 ? answers[t] : -result)
    }

    func commit(_ tag: Int, _ result: Int32) {
        answers[tag] = Self.idle
        withQueue { q throws(UBlkError) in try q.commit(tag: tag, result: result) }
    }

    public func beginStop() {
        guard begun, !stopping else { return }
        stopping = true
        // STOP_DEV removes the disk once the kernel has drained it through this loop; then every
        // tag is aborted.
        withQueue { q throws(UBlkError) in try q.send(.stopDevice) }
    }

    /// Closes /dev/ublkcN, its mapping and the ring (the kernel then quiesces the device if it was
    /// not stopped, keeping its I/O for the next server).
    public func close() { queue = nil }
}

/// Requests a ublk export took, by kind.
public struct UBlkStatistics: Sendable, Equatable {
    public var reads = 0, writes = 0, flushes = 0, discards = 0, writeZeroes = 0
    public var bytesRead: UInt64 = 0, bytesWritten: UInt64 = 0
    /// Refused before reaching the device (bad range, unsupported operation).
    public var refused = 0
    /// Completed by the device with an error.
    public var failed = 0

    mutating func count(_ operation: BackendOperation, bytes: Int) {
        switch operation {
        case .read: reads += 1; bytesRead += UInt64(bytes)
        case .write, .writeFUA: writes += 1; bytesWritten += UInt64(bytes)
        case .flush: flushes += 1
        case .trim: discards += 1
        case .writeZeroes: writeZeroes += 1
        }
    }
}
