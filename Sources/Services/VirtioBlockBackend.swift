import NBD
import Syscalls
import Virtio
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-blk device as an NBD export's backend.
///
/// Memory: the queue's request slots (each `maxTransfer` bytes of DMA memory, laid out back to
/// back) are handed out as contiguous runs, so an NBD request of up to `maxPayload` bytes lives in
/// one buffer that the socket reads into or writes from, and the device reads or writes in place.
/// Each slot of a run carries one virtio-blk request for its part. All bookkeeping is in fixed arrays
/// allocated once; a request allocates nothing.
///
/// Recovery: a device that breaks the queue (a used element the queue refuses), or goes quiet with
/// requests in flight for the queue's completion timeout (DEVICE_NEEDS_RESET or not), is brought
/// back by reset (`BlockDevice.recover`), and every request it held is given to it again in
/// submission order from its slot (writes as they were, reads read again, a flush after the writes
/// submitted before it); requests the server submits meanwhile are held and go after them. The
/// client sees a delay, not an error. Up to `recoveryLimit` recoveries in a row (none completing a
/// request in between), with a backoff of 1, 10, 100, 1000 ms before each, taken without blocking
/// the server; past that `poll` throws and the server answers everything EIO.
public struct VirtioBlockBackend<T: Transport & ~Copyable>: ~Copyable, BlockBackend {
    public var device: BlockDevice<T>
    let slots: Int
    let chunk: Int
    /// Per slot: its run, reservation, submission order and hold; per run (in its first slot):
    /// progress, first failure, tag and operation (`BlockBackendSlot`).
    let state: FixedArray<BlockBackendSlot>
    /// Completed slots and their status bytes collected during a drain, handled after it.
    let done: FixedArray<(slot: Int32, status: UInt8)>
    public let completionDescriptor: Int32?
    public let maxPayload: Int

    /// Room to sort the held slots by sequence.
    let order: FixedArray<Int>
    var nextSequence: UInt64 = 0
    /// Why the device needs a recovery (nil: healthy), and when the next attempt is due.
    var brokenBy: VirtioError?
    var recoverAt: UInt64 = 0
    var recoveriesInARow = 0
    /// When polls started finding nothing with requests in flight (0: not quiet).
    var quietSince: UInt64 = 0
    var quietPolls: UInt32 = 0
    /// Recoveries in a row before the backend gives up.
    public let recoveryLimit: Int
    /// How long a recovery waits for the reset to complete.
    public let resetTimeout: Duration
    /// Recoveries that brought the device back.
    public private(set) var recoveries = 0
    /// Told about each recovery and each failed attempt.
    let log: ((String) -> Void)?

    /// Serves `device`; in interrupt modes its queue's eventfd becomes the completion descriptor.
    /// A device that breaks is recovered up to `recoveryLimit` times in a row (see the type).
    public init(device: consuming BlockDevice<T>, recoveryLimit: Int = 5, resetTimeout: Duration = .seconds(5),
                log: ((String) -> Void)? = nil) {
        self.recoveryLimit = recoveryLimit
        self.resetTimeout = resetTimeout
        self.log = log
        slots = device.queue.slots
        chunk = device.queue.maxTransfer
        state = FixedArray(repeating: BlockBackendSlot(), count: slots)
        done = FixedArray(repeating: (slot: 0, status: 0), count: slots)
        order = FixedArray(repeating: 0, count: slots)
        // Half of all slots at most, so two large requests can be in flight together.
        maxPayload = max(chunk, slots / 2 * chunk)
        completionDescriptor = device.interruptDescriptor
        self.device = device
        // A queue starts with interrupts suppressed (set up, reset or adopted live), and `poll`
        // arms them only after it ran: arm now, so the server's first sleep ends with the first
        // completion and not with its 100 ms timeout (which a live takeover's first request used
        // to wait out: docs/PERFORMANCE.md). Completions already pending wake the server at once.
        if let fd = completionDescriptor, !self.device.queue.armForNextCompletion() {
            _ = Syscall.write64(fd, 1)
        }
    }

    public var size: UInt64 { device.config.capacityBytes }
    public var readOnly: Bool { device.config.readOnly }
    public var canFlush: Bool { device.config.flush }
    public var canTrim: Bool { device.config.maxDiscardSectors != nil }
    public var canWriteZeroes: Bool { device.config.maxWriteZeroesSectors != nil }
    /// The device's logical block (blk_size when it offers one, §5.2.4, else 512): NBD clients
    /// are told it is the minimum, and requests not aligned to it are refused (EINVAL) before
    /// they reach the device, which would fail them.
    public var minimumBlockSize: Int { Int(device.config.blockSize) }
    public var preferredBlockSize: Int { max(4096, Int(device.config.blockSize)) }
    /// Not answering while a recovery is due (the device broke a queue, needs a reset or went quiet).
    public var health: BackendHealth { BackendHealth(recoveries: recoveries, answering: brokenBy == nil) }

    /// How many slots an operation on `length` bytes takes: data operations one per `chunk` bytes;
    /// flush, discard and write-zeroes one (long ranges run one after the other in it).
    func slotsNeeded(_ operation: BackendOperation, length: Int) -> Int {
        switch operation {
        case .read, .write, .writeFUA: return max(1, (length + chunk - 1) / chunk)
        case .flush, .trim, .writeZeroes: return 1
        }
    }

    /// The largest range one discard or write-zeroes request may carry (§5.2.4 limits).
    func rangeLimit(_ operation: BackendOperation) -> Int {
        let limit = operation == .trim ? device.config.maxDiscardSectors : device.config.maxWriteZeroesSectors
        return max(1, Int(limit ?? 1))
    }

    /// Submits the next range of a discard or write-zeroes run in its first slot.
    mutating func submitNextRange(_ operation: BackendOperation, first: Int) throws(VirtioError) {
        let n = min(state[first].rangeLeft, rangeLimit(operation))
        // struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; } (§5.2.6);
        // flags 0: write-zeroes never deallocates (NBD's NO_HOLE is always honoured).
        let range = device.queue.buffer(first).baseAddress!
        range.storeBytes(of: state[first].rangeNext.littleEndian, toByteOffset: 0, as: UInt64.self)
        range.storeBytes(of: UInt32(n).littleEndian, toByteOffset: 8, as: UInt32.self)
        range.storeBytes(of: UInt32(0), toByteOffset: 12, as: UInt32.self)
        state[first].rangeNext += UInt64(n)
        state[first].rangeLeft -= n
        state[first].remaining = 1
        _ = try start(operation == .trim ? .discard : .writeZeroes, sector: 0, bytes: 16, slot: first)
    }

    /// Gives one request to the device, or holds it while the device waits for a recovery.
    mutating func start(_ type: BlockRequestType, sector: UInt64, bytes: Int, slot: Int) throws(VirtioError) -> Bool {
        state[slot].sequence = nextSequence
        nextSequence &+= 1
        if brokenBy == nil {
            do throws(VirtioError) {
                return try device.queue.submit(type, sector: sector, bytes: bytes, slot: slot)
            } catch {
                // Only a queue the device broke refuses a request; anything else is ours.
                guard let reason = device.queue.brokenReason else { throw error }
                needsRecovery(reason)
            }
        }
        device.queue.hold(type, sector: sector, bytes: bytes, slot: slot)
        state[slot].held = true
        return true
    }

    /// The device must be recovered: the first attempt after the backoff for this many in a row.
    mutating func needsRecovery(_ reason: VirtioError) {
        guard brokenBy == nil else { return }
        brokenBy = reason
        let milliseconds: UInt64 = recoveriesInARow == 0 ? 1 : recoveriesInARow == 1 ? 10 : recoveriesInARow == 2 ? 100 : 1000
        recoverAt = monotonicNanoseconds() + milliseconds * 1_000_000
        log?("virtio-blk: \(reason); recovering by reset (\(recoveriesInARow + 1) of \(recoveryLimit) in a row)")
    }

    /// Resets and rebuilds the device, then gives it every request it held, in submission order.
    /// Throws once `recoveryLimit` attempts in a row failed to bring it back.
    mutating func recover() throws(BackendError) {
        guard let reason = brokenBy else { return }
        guard recoveriesInARow < recoveryLimit else {
            throw BackendError("virtio-blk: \(reason); \(recoveryLimit) recoveries by reset in a row did not bring the device back")
        }
        recoveriesInARow += 1
        let slotMemory = state.unsafeElements
        do throws(VirtioError) {
            try device.recover(resetTimeout: resetTimeout) { _, slot in slotMemory[slot].held = true }
        } catch {
            brokenBy = nil
            needsRecovery(error)
            return
        }
        recoveries += 1
        brokenBy = nil
        quietSince = 0
        log?("virtio-blk: device recovered by reset (\(recoveries) so far)")
        resubmitHeld()
    }

    /// Gives the device every held request, in submission order, and publishes them. One that
    /// the device refuses puts itself and those after it back on hold for the next recovery.
    mutating func resubmitHeld() {
        // Submission order: insertion sort of the held slots by sequence (at most `slots` of them).
        var n = 0
        for slot in 0..<slots where state[slot].held {
            var i = n
            while i > 0 && state[order[i - 1]].sequence > state[slot].sequence { order[i] = order[i - 1]; i -= 1 }
            order[i] = slot
            n += 1
        }
        if n > 0 { log?("virtio-blk: resubmitting \(n) requests") }
        for i in 0..<n {
            let slot = order[i]
            state[slot].held = false
            do throws(VirtioError) {
                guard try device.queue.resubmit(slot) else {
                    throw VirtioError.queueSetup(queue: 0, "ring full while resubmitting: slot accounting is wrong")
                }
            } catch {
                // Put it (and those after it) back on hold for the next attempt.
                state[slot].held = true
                needsRecovery(error)
                break
            }
        }
        device.queue.publish()
    }

    public mutating func reserve(length: Int) -> BackendBuffer? {
        let count = max(1, (length + chunk - 1) / chunk)
        guard count <= slots else { return nil }
        // First fit over the slot map: a contiguous run of `count` free slots.
        var run = 0
        for slot in 0..<slots {
            run = state[slot].inUse ? 0 : run + 1
            if run == count {
                let first = slot - count + 1
                for s in first...slot { state[s].inUse = true }
                return BackendBuffer(first: first, count: count, length: length)
            }
        }
        return nil
    }

    public func memory(of buffer: BackendBuffer) -> UnsafeMutableRawBufferPointer {
        let base = device.queue.buffer(buffer.first).baseAddress!
        return UnsafeMutableRawBufferPointer(start: base, count: buffer.length)
    }

    public mutating func release(_ buffer: BackendBuffer) {
        for s in buffer.first..<(buffer.first + buffer.count) { state[s].inUse = false; state[s].run = -1 }
    }

    public mutating func submit(_ operation: BackendOperation, offset: UInt64, length: Int, buffer: BackendBuffer,
                                tag: UInt64) throws(BackendError) {
        let first = buffer.first
        guard offset % UInt64(BlockConfig.sectorSize) == 0, length % BlockConfig.sectorSize == 0 else {
            throw BackendError("offset \(offset) and length \(length) must be multiples of 512")
        }
        let needed = slotsNeeded(operation, length: length)
        guard needed <= buffer.count else { throw BackendError("buffer of \(buffer.count) slots too small for \(needed)") }
        state[first].tag = tag
        state[first].failure = 0
        state[first].flushing = false
        state[first].operation = BlockBackendSlot.code(operation)
        state[first].remaining = Int32(needed)
        let sector = offset / UInt64(BlockConfig.sectorSize)
        do throws(VirtioError) {
            switch operation {
            case .read, .write, .writeFUA:
                let type: BlockRequestType = operation == .read ? .read : .write
                var done = 0
                for i in 0..<needed {
                    let bytes = min(chunk, length - done)
                    state[first + i].run = Int32(first)
                    guard try start(type, sector: sector + UInt64(done / BlockConfig.sectorSize),
                                                  bytes: bytes, slot: first + i) else {
                        throw VirtioError.queueSetup(queue: 0, "ring full with free slots: slot accounting is wrong")
                    }
                    done += bytes
                }
            case .flush:
                state[first].run = Int32(first)
                _ = try start(.flush, sector: 0, bytes: 0, slot: first)
            case .trim, .writeZeroes:
                state[first].run = Int32(first)
                state[first].rangeNext = sector
                state[first].rangeLeft = length / BlockConfig.sectorSize
                try submitNextRange(operation, first: first)
            }
        } catch {
            throw BackendError("\(error)")
        }
        device.queue.publish()
    }

    public mutating func poll(_ body: (UInt64, Int32) -> Void) throws(BackendError) -> Int {
        // Consume the interrupt count, if any, without blocking: the used ring is the truth.
        if let fd = completionDescriptor, case .success(true) = Syscall.pollIn(fd, timeoutMilliseconds: 0) {
            _ = Syscall.read64(fd)
        }
        var count = 0
        let done = self.done.unsafeElements
        if brokenBy == nil {
            do throws(VirtioError) {
                count = try device.queue.complete { slot, status, _ in
                    done[count] = (slot: Int32(slot), status: status); count += 1
                }
            } catch {
                // What was completed before the device broke the queue is handled below; the
                // rest is resubmitted after the recovery (and anything submitted meanwhile held).
                needsRecovery(error)
            }
        }
        var reported = 0
        for i in 0..<count {
            let slot = Int(done[i].slot), status = done[i].status, first = Int(state[slot].run)
            guard first >= 0 else { continue }
            if status == BlockStatus.invalid {
                // Completed without a status: the device did not do it (a used id naming the
                // wrong request, say). Held and resubmitted after the recovery it calls for.
                state[slot].held = true
                needsRecovery(.brokenQueue(queue: device.queue.index, "request in slot \(slot) completed without a valid status byte (§5.2.6)"))
                continue
            }
            recoveriesInARow = 0  // the device answered a request: recoveries in a row start again
            if status != BlockStatus.ok && state[first].failure == 0 {
                state[first].failure = status == BlockStatus.unsupported ? ENOTSUP : EIO
            }
            state[first].remaining -= 1
            guard state[first].remaining == 0 else { continue }
            // A long discard or write-zeroes range continues in the same slot.
            let code = state[first].operation
            if (code == BlockBackendSlot.code(.trim) || code == BlockBackendSlot.code(.writeZeroes))
                && state[first].rangeLeft > 0 && state[first].failure == 0 {
                do throws(VirtioError) {
                    try submitNextRange(code == BlockBackendSlot.code(.trim) ? .trim : .writeZeroes, first: first)
                    device.queue.publish()
                } catch { throw BackendError("\(error)") }
                continue
            }
            // A FUA write is durable only after a flush of the device's cache (virtio-blk has no FUA).
            if state[first].operation == BlockBackendSlot.code(.writeFUA) && !state[first].flushing && state[first].failure == 0 && canFlush {
                state[first].flushing = true
                state[first].remaining = 1
                do throws(VirtioError) {
                    _ = try start(.flush, sector: 0, bytes: 0, slot: first)
                    device.queue.publish()
                } catch { throw BackendError("\(error)") }
                continue
            }
            body(state[first].tag, state[first].failure)
            reported += 1
        }
        try watchForSilence(completed: count)
        if brokenBy != nil {
            if monotonicNanoseconds() >= recoverAt { try recover() }
            if brokenBy != nil { return reported }
        }
        // In interrupt mode, arm for the next completion; if some are already pending, make the
        // descriptor readable ourselves so the server polls again instead of sleeping.
        if completionDescriptor != nil, !device.queue.armForNextCompletion() {
            _ = Syscall.write64(completionDescriptor!, 1)
        }
        return reported
    }

    /// DEVICE_NEEDS_RESET (§2.1.2), or a device that stopped answering, is looked for only when
    /// the device goes quiet with requests in flight (a status read is an MMIO exit): after the
    /// queue's completion timeout without a completion, the device is recovered either way.
    mutating func watchForSilence(completed: Int) throws(BackendError) {
        guard brokenBy == nil, completed == 0, device.queue.inFlight > 0 else {
            quietSince = 0
            return
        }
        // Polling, the server calls this back to back: the clock is read every 64th quiet call.
        quietPolls &+= 1
        if completionDescriptor == nil && quietSince != 0 && quietPolls & 63 != 0 { return }
        let now = monotonicNanoseconds()
        guard quietSince != 0 else { quietSince = now; return }
        let timeout = device.queue.completionTimeout
        guard now - quietSince >= UInt64(timeout.nanoseconds) else { return }
        let status = device.transport.readStatus()
        if status.contains(.deviceNeedsReset) {
            needsRecovery(.deviceFailed(status: status.rawValue, during: "NBD requests (DEVICE_NEEDS_RESET)"))
        } else {
            needsRecovery(.brokenQueue(queue: device.queue.index, "no completion within \(timeout) with \(device.queue.inFlight) requests in flight: the device stopped answering"))
        }
    }

}
