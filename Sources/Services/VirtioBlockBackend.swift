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
/// Each slot of a run carries one virtio-blk request for its part. All bookkeeping is in arrays
/// allocated once; a request allocates nothing.
public struct VirtioBlockBackend<T: Transport & ~Copyable>: ~Copyable, BlockBackend {
    public var device: BlockDevice<T>
    let slots: Int
    let chunk: Int
    /// Per slot: in use (reserved) or free.
    let used: UnsafeMutablePointer<Bool>
    /// Per run (indexed by its first slot): chunks still in flight, first failure, caller tag,
    /// operation, and whether a FUA write is in its flush phase.
    let remaining: UnsafeMutablePointer<Int32>
    let failure: UnsafeMutablePointer<Int32>
    let tags: UnsafeMutablePointer<UInt64>
    let operations: UnsafeMutablePointer<UInt8>
    let flushing: UnsafeMutablePointer<Bool>
    /// Discard and write-zeroes ranges longer than the device's limit go as consecutive requests in
    /// the run's first slot: the next sector and the sectors still to do.
    let rangeNext: UnsafeMutablePointer<UInt64>
    let rangeLeft: UnsafeMutablePointer<Int>
    /// Which run each slot's request belongs to.
    let runOfSlot: UnsafeMutablePointer<Int32>
    /// Completed slots collected during a drain, handled after it.
    let done: UnsafeMutablePointer<Int32>
    let doneStatus: UnsafeMutablePointer<UInt8>
    public let completionDescriptor: Int32?
    public let maxPayload: Int

    /// Serves `device`; in interrupt modes its queue's eventfd becomes the completion descriptor.
    public init(device: consuming BlockDevice<T>) {
        slots = device.queue.slots
        chunk = device.queue.maxTransfer
        used = .allocate(capacity: slots); used.initialize(repeating: false, count: slots)
        remaining = .allocate(capacity: slots); remaining.initialize(repeating: 0, count: slots)
        failure = .allocate(capacity: slots); failure.initialize(repeating: 0, count: slots)
        tags = .allocate(capacity: slots); tags.initialize(repeating: 0, count: slots)
        operations = .allocate(capacity: slots); operations.initialize(repeating: 0, count: slots)
        flushing = .allocate(capacity: slots); flushing.initialize(repeating: false, count: slots)
        runOfSlot = .allocate(capacity: slots); runOfSlot.initialize(repeating: -1, count: slots)
        rangeNext = .allocate(capacity: slots); rangeNext.initialize(repeating: 0, count: slots)
        rangeLeft = .allocate(capacity: slots); rangeLeft.initialize(repeating: 0, count: slots)
        done = .allocate(capacity: slots)
        doneStatus = .allocate(capacity: slots)
        // Half of all slots at most, so two large requests can be in flight together.
        maxPayload = max(chunk, slots / 2 * chunk)
        completionDescriptor = device.interruptDescriptor
        self.device = device
    }

    deinit {
        for p in [remaining, failure] { p.deallocate() }
        used.deallocate(); tags.deallocate(); operations.deallocate(); flushing.deallocate()
        runOfSlot.deallocate(); done.deallocate(); doneStatus.deallocate()
        rangeNext.deallocate(); rangeLeft.deallocate()
    }

    public var size: UInt64 { device.config.capacityBytes }
    public var readOnly: Bool { device.config.readOnly }
    public var canFlush: Bool { device.config.flush }
    public var canTrim: Bool { device.config.maxDiscardSectors != nil }
    public var canWriteZeroes: Bool { device.config.maxWriteZeroesSectors != nil }
    public var minimumBlockSize: Int { BlockConfig.sectorSize }
    public var preferredBlockSize: Int { max(4096, Int(device.config.blockSize)) }

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
        let n = min(rangeLeft[first], rangeLimit(operation))
        // struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; } (§5.2.6);
        // flags 0: write-zeroes never deallocates (NBD's NO_HOLE is always honoured).
        let range = device.queue.buffer(first).baseAddress!
        range.storeBytes(of: rangeNext[first].littleEndian, toByteOffset: 0, as: UInt64.self)
        range.storeBytes(of: UInt32(n).littleEndian, toByteOffset: 8, as: UInt32.self)
        range.storeBytes(of: UInt32(0), toByteOffset: 12, as: UInt32.self)
        rangeNext[first] += UInt64(n)
        rangeLeft[first] -= n
        remaining[first] = 1
        _ = try device.queue.submit(operation == .trim ? .discard : .writeZeroes, sector: 0, bytes: 16, slot: first)
    }

    public mutating func reserve(length: Int) -> BackendBuffer? {
        let count = max(1, (length + chunk - 1) / chunk)
        guard count <= slots else { return nil }
        // First fit over the slot map: a contiguous run of `count` free slots.
        var run = 0
        for slot in 0..<slots {
            run = used[slot] ? 0 : run + 1
            if run == count {
                let first = slot - count + 1
                for s in first...slot { used[s] = true }
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
        for s in buffer.first..<(buffer.first + buffer.count) { used[s] = false; runOfSlot[s] = -1 }
    }

    public mutating func submit(_ operation: BackendOperation, offset: UInt64, length: Int, buffer: BackendBuffer,
                                tag: UInt64) throws(BackendError) {
        let first = buffer.first
        guard offset % UInt64(BlockConfig.sectorSize) == 0, length % BlockConfig.sectorSize == 0 else {
            throw BackendError("offset \(offset) and length \(length) must be multiples of 512")
        }
        let needed = slotsNeeded(operation, length: length)
        guard needed <= buffer.count else { throw BackendError("buffer of \(buffer.count) slots too small for \(needed)") }
        tags[first] = tag
        failure[first] = 0
        flushing[first] = false
        operations[first] = VirtioBlockBackend.code(operation)
        remaining[first] = Int32(needed)
        let sector = offset / UInt64(BlockConfig.sectorSize)
        do throws(VirtioError) {
            switch operation {
            case .read, .write, .writeFUA:
                let type: BlockRequestType = operation == .read ? .read : .write
                var done = 0
                for i in 0..<needed {
                    let bytes = min(chunk, length - done)
                    runOfSlot[first + i] = Int32(first)
                    guard try device.queue.submit(type, sector: sector + UInt64(done / BlockConfig.sectorSize),
                                                  bytes: bytes, slot: first + i) else {
                        throw VirtioError.queueSetup(queue: 0, "ring full with free slots: slot accounting is wrong")
                    }
                    done += bytes
                }
            case .flush:
                runOfSlot[first] = Int32(first)
                _ = try device.queue.submit(.flush, sector: 0, bytes: 0, slot: first)
            case .trim, .writeZeroes:
                runOfSlot[first] = Int32(first)
                rangeNext[first] = sector
                rangeLeft[first] = length / BlockConfig.sectorSize
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
        let doneSlots = done, statuses = doneStatus
        do throws(VirtioError) {
            count = try device.queue.complete { slot, status, _ in
                doneSlots[count] = Int32(slot); statuses[count] = status; count += 1
            }
        } catch {
            throw BackendError("\(error)")
        }
        var reported = 0
        for i in 0..<count {
            let first = Int(runOfSlot[Int(done[i])])
            guard first >= 0 else { continue }
            if doneStatus[i] != BlockStatus.ok && failure[first] == 0 {
                failure[first] = doneStatus[i] == BlockStatus.unsupported ? ENOTSUP : EIO
            }
            remaining[first] -= 1
            guard remaining[first] == 0 else { continue }
            // A long discard or write-zeroes range continues in the same slot.
            let code = operations[first]
            if (code == VirtioBlockBackend.code(.trim) || code == VirtioBlockBackend.code(.writeZeroes))
                && rangeLeft[first] > 0 && failure[first] == 0 {
                do throws(VirtioError) {
                    try submitNextRange(code == VirtioBlockBackend.code(.trim) ? .trim : .writeZeroes, first: first)
                    device.queue.publish()
                } catch { throw BackendError("\(error)") }
                continue
            }
            // A FUA write is durable only after a flush of the device's cache (virtio-blk has no FUA).
            if operations[first] == VirtioBlockBackend.code(.writeFUA) && !flushing[first] && failure[first] == 0 && canFlush {
                flushing[first] = true
                remaining[first] = 1
                do throws(VirtioError) {
                    _ = try device.queue.submit(.flush, sector: 0, bytes: 0, slot: first)
                    device.queue.publish()
                } catch { throw BackendError("\(error)") }
                continue
            }
            body(tags[first], failure[first])
            reported += 1
        }
        // In interrupt mode, arm for the next completion; if some are already pending, make the
        // descriptor readable ourselves so the server polls again instead of sleeping.
        if completionDescriptor != nil, !device.queue.armForNextCompletion() {
            _ = Syscall.write64(completionDescriptor!, 1)
        }
        return reported
    }

    static func code(_ operation: BackendOperation) -> UInt8 {
        switch operation {
        case .read: return 0
        case .write: return 1
        case .writeFUA: return 2
        case .flush: return 3
        case .trim: return 4
        case .writeZeroes: return 5
        }
    }
}
