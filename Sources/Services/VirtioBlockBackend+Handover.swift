import NBD
import Upgrade
import Virtio
import VirtioDevices

/// What a `VirtioBlockBackend` hands to its successor when requests are still in flight (a live
/// upgrade does not wait for them): every reserved slot's bookkeeping (`BlockBackendSlot`), and
/// the request each slot still has in the device. The successor continues exactly there: in live
/// mode the device completes them to it (`BlockDevice.init(adopting:carried:)`), in reset mode it
/// gives them to the device again after the reset, in submission order, from these records.
///
/// Encoding (little-endian, Upgrade's codec), version 1:
///
///     magic "VBLK", version u16, length u32,
///     slots u32, slot bytes u32, next sequence u64, count u32, per reserved slot:
///       slot u32, run u32, sequence u64, remaining u32, failure u32, tag u64, operation u8,
///       flushing u8, range next u64, range left u32, in the device u8
///       [request type u32, sector u64, data bytes u32]
public struct BlockBackendHandoverState: Sendable, Equatable {
    public struct Slot: Sendable, Equatable {
        public var slot: Int
        /// The first slot of its run.
        public var run: Int
        public var sequence: UInt64
        /// Per run (the first slot's): chunks in flight, first failure, tag, operation, FUA
        /// flush phase, discard/write-zeroes range left.
        public var remaining: Int
        public var failure: Int32
        public var tag: UInt64
        public var operation: UInt8
        public var flushing: Bool
        public var rangeNext: UInt64
        public var rangeLeft: Int
        /// The request this slot has in the device, nil once it completed (a run waits for the rest).
        public var request: CarriedBlockRequest?

        public init(slot: Int, run: Int, sequence: UInt64, remaining: Int, failure: Int32, tag: UInt64, operation: UInt8,
                    flushing: Bool, rangeNext: UInt64, rangeLeft: Int, request: CarriedBlockRequest?) {
            self.slot = slot
            self.run = run
            self.sequence = sequence
            self.remaining = remaining
            self.failure = failure
            self.tag = tag
            self.operation = operation
            self.flushing = flushing
            self.rangeNext = rangeNext
            self.rangeLeft = rangeLeft
            self.request = request
        }
    }

    public static let format = BlobFormat(name: "virtio-blk backend hand-over state", magic: Array("VBLK".utf8), version: 1)

    /// The queue's slot count and bytes per slot: the successor's layout must be the same.
    public var slots: Int
    public var slotBytes: Int
    public var nextSequence: UInt64
    public var reserved: [Slot]

    /// The requests in the device, for `BlockDevice.init(adopting:carried:)`.
    public var carried: [CarriedBlockRequest] { reserved.compactMap(\.request) }
    /// The tag of each request (run) in flight, one per run.
    public var tags: [UInt64] { reserved.filter { $0.run == $0.slot }.map(\.tag) }

    /// Why this state cannot be continued, or nil: slots in range and distinct, each in a run
    /// whose first slot is reserved, each run with as many requests in the device as it waits
    /// for (at least one: a finished run was answered and released before the quiesce), a known
    /// operation, the carried requests within a slot.
    public func problem() -> String? {
        guard slots > 0, slots <= 1 << 16, slotBytes > 0, slotBytes <= 1 << 26 else { return "\(slots) slots of \(slotBytes) bytes" }
        var bySlot = [Slot?](repeating: nil, count: slots)
        for s in reserved {
            guard s.slot >= 0, s.slot < slots else { return "slot \(s.slot) of \(slots)" }
            guard bySlot[s.slot] == nil else { return "slot \(s.slot) listed twice" }
            bySlot[s.slot] = s
        }
        var inDevice = [Int](repeating: 0, count: slots)
        for s in reserved {
            guard s.run >= 0, s.run < slots, let first = bySlot[s.run], first.run == s.run else {
                return "slot \(s.slot) belongs to run \(s.run), which is not a reserved first slot"
            }
            if let request = s.request {
                guard request.slot == s.slot else { return "slot \(s.slot) carries the request of slot \(request.slot)" }
                if let problem = request.problem(maxTransfer: slotBytes) { return "the request in slot \(s.slot) \(problem)" }
                inDevice[s.run] += 1
            }
        }
        var tags = Set<UInt64>()
        for s in reserved where s.run == s.slot {
            guard s.operation <= BlockBackendSlot.code(.writeZeroes) else { return "slot \(s.slot): operation \(s.operation)" }
            guard s.remaining >= 1, s.remaining == inDevice[s.slot] else {
                return "run \(s.slot) waits for \(s.remaining) requests, \(inDevice[s.slot]) are in the device"
            }
            guard s.rangeLeft >= 0 else { return "run \(s.slot): \(s.rangeLeft) sectors left" }
            guard tags.insert(s.tag).inserted else { return "tag \(s.tag) in flight twice" }
        }
        return nil
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 32 + reserved.count * 72)
        w.header(Self.format)
        w.lengthPrefixed { w in
            w.u32(UInt32(slots))
            w.u32(UInt32(slotBytes))
            w.u64(nextSequence)
            w.u32(UInt32(reserved.count))
            for s in reserved {
                w.u32(UInt32(s.slot)); w.u32(UInt32(s.run)); w.u64(s.sequence)
                w.u32(UInt32(s.remaining)); w.u32(UInt32(bitPattern: s.failure)); w.u64(s.tag)
                w.u8(s.operation); w.u8(s.flushing ? 1 : 0); w.u64(s.rangeNext); w.u32(UInt32(s.rangeLeft))
                if let r = s.request {
                    w.u8(1); w.u32(r.type); w.u64(r.sector); w.u32(UInt32(r.bytes))
                } else {
                    w.u8(0)
                }
            }
        }
        return w.bytes
    }

    /// Decodes `encoded()`'s output and checks it (`problem()`); every failure names the field.
    public init(decoding bytes: [UInt8]) throws(StateRecordError) {
        var r = ByteReader(bytes)
        try r.header(Self.format)
        _ = try r.length("body length")
        slots = Int(try r.u32("slots"))
        slotBytes = Int(try r.u32("slot bytes"))
        nextSequence = try r.u64("next sequence")
        let count = Int(try r.u32("reserved slot count"))
        // Each slot takes at least 47 bytes: bounds the count by the input before allocating.
        guard count <= r.remaining / 47 else { throw .invalid(field: "reserved slot count", "\(count) with \(r.remaining) bytes left") }
        reserved = []
        reserved.reserveCapacity(count)
        for k in 0..<count {
            let slot = Int(try r.u32("slot \(k)")), run = Int(try r.u32("slot \(k) run"))
            let sequence = try r.u64("slot \(k) sequence")
            let remaining = Int(try r.u32("slot \(k) remaining"))
            let failure = Int32(bitPattern: try r.u32("slot \(k) failure"))
            let tag = try r.u64("slot \(k) tag")
            let operation = try r.u8("slot \(k) operation")
            let flushing = try r.u8("slot \(k) flushing")
            guard flushing <= 1 else { throw .invalid(field: "slot \(k) flushing", "\(flushing) (0 or 1)") }
            let rangeNext = try r.u64("slot \(k) range next")
            let rangeLeft = Int(try r.u32("slot \(k) range left"))
            var request: CarriedBlockRequest?
            switch try r.u8("slot \(k) in the device") {
            case 0: break
            case 1:
                request = CarriedBlockRequest(slot: slot, type: try r.u32("slot \(k) request type"), sector: try r.u64("slot \(k) sector"),
                                              bytes: Int(try r.u32("slot \(k) data bytes")))
            case let v: throw .invalid(field: "slot \(k) in the device", "\(v) (0 or 1)")
            }
            reserved.append(Slot(slot: slot, run: run, sequence: sequence, remaining: remaining, failure: failure, tag: tag,
                                 operation: operation, flushing: flushing == 1, rangeNext: rangeNext, rangeLeft: rangeLeft,
                                 request: request))
        }
        if let problem = problem() { throw .invalid(field: Self.format.name, problem) }
    }

    public init(slots: Int, slotBytes: Int, nextSequence: UInt64, reserved: [Slot]) {
        self.slots = slots
        self.slotBytes = slotBytes
        self.nextSequence = nextSequence
        self.reserved = reserved
    }
}

extension VirtioBlockBackend where T: ~Copyable {
    /// Whether requests in flight can go to a successor as they are (each one descriptor, the
    /// device healthy, none held for a recovery); otherwise a quiesce completes them first.
    public var handsOverInFlight: Bool {
        brokenBy == nil && device.queue.usesOneDescriptorPerRequest
    }

    /// This backend's requests in flight and their slots, and the queues' state for the
    /// successor. Valid after the server quiesced. Slots reserved with no request in flight (a
    /// ublk export's standing buffers) stay behind: the successor reserves its own.
    public func handoverState() throws(VirtioError) -> (queues: [QueueSnapshot], state: BlockBackendHandoverState) {
        let (queues, carried) = try device.handoverSnapshots()
        var request = [CarriedBlockRequest?](repeating: nil, count: slots)
        for c in carried { request[c.slot] = c }
        var reserved: [BlockBackendHandoverState.Slot] = []
        for slot in 0..<slots where state[slot].inUse {
            let s = state[slot]
            guard s.run >= 0, state[Int(s.run)].remaining > 0 else { continue }
            reserved.append(.init(slot: slot, run: Int(s.run), sequence: s.sequence, remaining: Int(s.remaining), failure: s.failure,
                                  tag: s.tag, operation: s.operation, flushing: s.flushing, rangeNext: s.rangeNext,
                                  rangeLeft: s.rangeLeft, request: request[slot]))
        }
        return (queues, BlockBackendHandoverState(slots: slots, slotBytes: chunk, nextSequence: nextSequence, reserved: reserved))
    }

    /// Continues the requests a previous backend left in flight (`handed`) on `device`: adopted
    /// live (the device completes them here), or started afresh by a reset (`resubmit`: each is
    /// given to the device again from its record, in submission order). The device's queue must
    /// have the same slots of the same size.
    public init(device: consuming BlockDevice<T>, continuing handed: BlockBackendHandoverState, resubmit: Bool,
                recoveryLimit: Int = 5, resetTimeout: Duration = .seconds(5), log: ((String) -> Void)? = nil) throws(BackendError) {
        self.init(device: device, recoveryLimit: recoveryLimit, resetTimeout: resetTimeout, log: log)
        guard handed.slots == slots, handed.slotBytes == chunk else {
            throw BackendError("\(handed.reserved.count) slots were handed over in a queue of \(handed.slots) slots of \(handed.slotBytes) bytes; this one has \(slots) of \(chunk)")
        }
        if let problem = handed.problem() { throw BackendError("virtio-blk backend state: \(problem)") }
        nextSequence = handed.nextSequence
        for s in handed.reserved {
            state[s.slot] = BlockBackendSlot(inUse: true, run: Int32(s.run), sequence: s.sequence, held: false,
                                             remaining: Int32(s.remaining), failure: s.failure, tag: s.tag, operation: s.operation,
                                             flushing: s.flushing, rangeNext: s.rangeNext, rangeLeft: s.rangeLeft)
        }
        guard resubmit else { return }
        for case let r? in handed.reserved.map(\.request) {
            self.device.queue.hold(BlockRequestType(rawValue: r.type)!, sector: r.sector, bytes: r.bytes, slot: r.slot)
            state[r.slot].held = true
        }
        resubmitHeld()
    }

    /// Brings the device back by reset after a successor touched it in a failed upgrade, and gives
    /// it every request in flight again (as a recovery does). If the reset fails, the usual
    /// recovery with backoff continues from `poll`.
    public mutating func recoverAfterFailedHandover() throws(BackendError) {
        brokenBy = nil
        recoveriesInARow = 0
        needsRecovery(.adoption(queue: nil, "a successor touched the device in a failed upgrade"))
        try recover()
    }
}
