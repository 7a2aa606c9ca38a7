import Virtio

/// virtio-rng (virtio 1.2 §5.4): one request queue; the device fills device-writable buffers with
/// entropy. Generic over the transport: the PCI transport in production, the emulator in tests.
///
/// Every buffer of the queue is kept posted; `read` hands out what the device wrote and posts the
/// buffer again. The data path allocates nothing.
public struct EntropyDevice<T: Transport & ~Copyable>: ~Copyable {
    public var transport: T
    public let negotiation: Lifecycle.Negotiation
    public let bufferSize: Int
    /// Bytes from one buffer to the next (`DMAArena.elementStride(bufferSize)`).
    let bufferStride: Int
    public let mode: CompletionMode
    var queue: Virtqueue
    /// Buffer slots not posted to the device (completed, waiting to be posted again).
    var idle: SlotStack
    let buffers: DMASlice
    let waiter: CompletionWaiter
    /// Bytes handed to the caller so far, and requests completed.
    public private(set) var bytesRead = 0
    public private(set) var completions = 0
    /// How waits for the device ended (polled, interrupt...).
    public private(set) var wakes = WakeCounts()

    /// Resets the device, negotiates `wanted` (what the device offers of it, plus VERSION_1 and
    /// ACCESS_PLATFORM, and RING_PACKED as `ring` says), builds the queue in the negotiated
    /// format with `bufferSize`-byte buffers and sets DRIVER_OK (spec 3.1.1 steps 1-8).
    public init(transport: consuming T, wanted: Features = [], ring: RingPreference = .auto, mode: CompletionMode = .poll,
                bufferSize: Int = 4096, queueSize: UInt16? = nil,
                completionTimeout: Duration = .seconds(10)) throws(VirtioError) {
        guard transport.deviceType == .entropy else {
            throw .queueSetup(queue: 0, "device is virtio-\(transport.deviceType), not virtio-rng")
        }
        try Lifecycle.reset(transport)
        let negotiation = try Lifecycle.negotiate(transport, wanted: ring.features(wanted))
        let format = try ring.format(negotiation)
        let maximum = transport.queueMaxSize(0)
        guard maximum > 0 else { throw .queueSetup(queue: 0, "the device reports no request queue") }
        // The largest power of two not above the device's maximum (or the size asked for).
        let size = SplitQueueLayout.queueSize(maximum: maximum, limit: queueSize)
        transport.dma.reset()
        let (memory, buffers) = try EntropyDevice.layout(arena: transport.dma, size: size, format: format, bufferSize: bufferSize, zeroed: true)
        var eventfd: Int32?
        if mode != .poll {
            eventfd = try transport.enableInterrupts(count: 1).first
        }
        try transport.setConfigVector(nil)
        let doorbell = try transport.enableQueue(0, size: size, rings: memory.rings, vector: mode == .poll ? nil : 0)
        var queue = Virtqueue(index: 0, memory: memory, features: negotiation.accepted, doorbell: doorbell)
        queue.suppressInterrupts()
        try Lifecycle.driverOK(transport)
        var idle = SlotStack(filledTo: Int(size))
        // Post every buffer (spec 5.4.6: the driver supplies device-writable buffers).
        try EntropyDevice.post(&idle, to: &queue, buffers: buffers, bufferSize: bufferSize, stride: transport.dma.elementStride(bufferSize))
        self.init(transport: transport, negotiation: negotiation, queue: queue, idle: idle, buffers: buffers,
                  bufferSize: bufferSize, mode: mode, eventfd: eventfd, completionTimeout: completionTimeout)
    }

    /// Takes over a running virtio-rng that a previous driver process left idle (live upgrade,
    /// after its `queueSnapshot()`): no reset, nothing zeroed, the queue not programmed again.
    /// Checks the device is live with exactly `features`, queue 0 is enabled with the snapshot's
    /// size and rings (and, in an interrupt mode, MSI-X vector 0), this version's layout puts the
    /// rings where the device has them, and used.idx is the snapshot's; each refusal names what
    /// differs, and the caller then starts with a reset. Then every buffer is posted again.
    public init(adopting transport: consuming T, features: Features, queue snapshot: QueueSnapshot,
                mode: CompletionMode = .poll, bufferSize: Int = 4096, queueSize: UInt16? = nil,
                completionTimeout: Duration = .seconds(10), verified: Adoption.Verified? = nil) throws(VirtioError) {
        guard transport.deviceType == .entropy else {
            throw .adoption(queue: nil, "device is virtio-\(transport.deviceType), not virtio-rng")
        }
        guard snapshot.index == 0 else {
            throw .adoption(queue: snapshot.index, "virtio-rng has one request queue, 0 (§5.4.2)")
        }
        let negotiation = try Adoption.live(transport, features: features, verified: verified)
        let doorbell = try Adoption.doorbell(transport, snapshot, verified: verified, vector: mode == .poll ? nil : 0)
        let size = SplitQueueLayout.queueSize(maximum: snapshot.size, limit: queueSize)
        guard size == snapshot.size else {
            throw .adoption(queue: 0, "this version would use \(size) entries (queue size \(queueSize.map(String.init) ?? "-")), the device runs \(snapshot.size)")
        }
        transport.dma.reset()
        let memory: QueueMemory, buffers: DMASlice
        do {
            (memory, buffers) = try EntropyDevice.layout(arena: transport.dma, size: size, format: RingFormat(features), bufferSize: bufferSize, zeroed: false)
        } catch {
            throw .adoption(queue: 0, "this version's layout does not fit the DMA memory (\(error))")
        }
        try Adoption.checkLayout(memory.rings, snapshot)
        var queue = try Virtqueue(adopting: memory, features: features, doorbell: doorbell, snapshot: snapshot)
        queue.suppressInterrupts()
        // MSI-X: new eventfds for this process; queue_msix_vector is still programmed and is not
        // written again, nor is queue_enable (§4.1.4.3.2).
        let eventfd = mode == .poll ? nil : try transport.enableInterrupts(count: 1).first
        var idle = SlotStack(filledTo: Int(size))
        // The device is live (DRIVER_OK, §3.1.1), so buffers may be made available at once (§5.4.6).
        try EntropyDevice.post(&idle, to: &queue, buffers: buffers, bufferSize: bufferSize, stride: transport.dma.elementStride(bufferSize))
        self.init(transport: transport, negotiation: negotiation, queue: queue, idle: idle, buffers: buffers,
                  bufferSize: bufferSize, mode: mode, eventfd: eventfd, completionTimeout: completionTimeout)
    }

    /// The queue's rings and the buffers, carved from `arena` in one order for both paths; with
    /// `zeroed: false` nothing is written (adoption recomputes a running queue's layout).
    static func layout(arena: DMAArena, size: UInt16, format: RingFormat, bufferSize: Int,
                       zeroed: Bool) throws(VirtioError) -> (QueueMemory, DMASlice) {
        let memory = try QueueMemory(format, arena: arena, size: size, zeroed: zeroed)
        let stride = arena.elementStride(bufferSize)
        let buffers = try arena.allocate(Int(size) * stride, alignment: 4096, element: stride, zeroed: zeroed)
        return (memory, buffers)
    }

    /// What both paths share: the fields.
    init(transport: consuming T, negotiation: Lifecycle.Negotiation, queue: consuming Virtqueue, idle: consuming SlotStack,
         buffers: DMASlice, bufferSize: Int, mode: CompletionMode, eventfd: Int32?, completionTimeout: Duration) {
        self.idle = idle
        self.waiter = CompletionWaiter(mode: mode, eventfd: eventfd, timeout: completionTimeout)
        self.queue = queue
        self.buffers = buffers
        self.bufferSize = bufferSize
        self.bufferStride = transport.dma.elementStride(bufferSize)
        self.mode = mode
        self.negotiation = negotiation
        self.transport = transport
    }

    /// Collects every posted buffer (waiting for the device to fill them; the entropy in them is
    /// discarded) and posts none again, then returns the idle queue's state for a successor
    /// process. Reads after this post the buffers again, so the device stays usable here too.
    public mutating func queueSnapshot() throws(VirtioError) -> QueueSnapshot {
        // Bounded: every wait ends within the completion timeout or throws.
        while queue.inFlight > 0 {
            wakes.count(try waiter.wait(for: &queue))
            _ = try queue.drainUsed { token, _ in idle.push(Int(token)) }
        }
        guard queue.isIdle else { throw .adoption(queue: 0, "the queue is broken: \(queue.brokenReason.map { "\($0)" } ?? "")") }
        return try queue.idleSnapshot()
    }

    /// Gives the transport back with the device still running (live upgrade): no reset, nothing
    /// written to the device; the successor adopts it with `init(adopting:)`. Only after
    /// `queueSnapshot()`. The queue's private memory is freed.
    public consuming func detach() -> T {
        return transport
    }

    /// Resets that brought the device back during reads.
    public private(set) var recoveries = 0

    /// Reads exactly `count` bytes of entropy, passing each piece the device produced to `body`.
    ///
    /// A device that breaks the queue protocol, stops answering or asks for a reset is recovered
    /// up to `recoveries` times (reset, renegotiate, rebuild, post again; entropy has no state to
    /// lose, so nothing is resubmitted), with a backoff of 1, 10, 100 ms...; the caller sees a
    /// delay, not an error. Past that the error is thrown.
    public mutating func read(_ count: Int, recoveries allowed: Int = 0, _ body: (UnsafeRawBufferPointer) -> Void) throws(VirtioError) {
        var remaining = count
        var attempts = 0
        while true {
            do throws(VirtioError) {
                try readSome(&remaining, body)
                return
            } catch {
                switch error {
                case .brokenQueue, .deviceFailed, .interrupts:
                    guard attempts < allowed else { throw error }
                    Lifecycle.sleep(.milliseconds(attempts >= 3 ? 1000 : [1, 10, 100][attempts]))
                    attempts += 1
                    try recover()
                default:
                    throw error
                }
            }
        }
    }

    /// Brings a misbehaving device back, the seed's third use of reset: reset (after which the
    /// device uses none of the buffers, §2.4), reclaim them all, renegotiate the same features,
    /// rebuild the queue on the same memory, DRIVER_OK, post every buffer.
    public mutating func recover() throws(VirtioError) {
        try Lifecycle.reset(transport)
        queue.reclaimAll { slot in idle.push(Int(slot)) }
        let again = try Lifecycle.negotiate(transport, wanted: negotiation.accepted)
        guard again.accepted == negotiation.accepted else {
            throw .featuresRejected(offered: again.offered.rawValue, accepted: negotiation.accepted.rawValue,
                                    status: transport.readStatus().rawValue)
        }
        try transport.setConfigVector(nil)
        _ = try transport.enableQueue(0, size: queue.size, rings: queue.rings, vector: mode == .poll ? nil : 0)
        queue.suppressInterrupts()
        try Lifecycle.driverOK(transport)
        try EntropyDevice.post(&idle, to: &queue, buffers: buffers, bufferSize: bufferSize, stride: bufferStride)
        recoveries += 1
    }

    mutating func readSome(_ remaining: inout Int, _ body: (UnsafeRawBufferPointer) -> Void) throws(VirtioError) {
        // Buffers left unposted (by `queueSnapshot`) go to the device first, or the wait would not end.
        if remaining > 0 && idle.count > 0 { try EntropyDevice.post(&idle, to: &queue, buffers: buffers, bufferSize: bufferSize, stride: bufferStride) }
        while remaining > 0 {
            // DEVICE_NEEDS_RESET (§2.1.2) is checked when the device goes quiet, not per request:
            // a status read is an MMIO exit on real hardware.
            do throws(VirtioError) {
                wakes.count(try waiter.wait(for: &queue))
            } catch {
                let status = transport.readStatus()
                if status.contains(.deviceNeedsReset) { throw .deviceFailed(status: status.rawValue, during: "reads (DEVICE_NEEDS_RESET)") }
                throw error
            }
            let base = buffers.pointer, stride = bufferStride
            var handed = 0
            var done = 0
            var empty = 0
            // What was handed out counts even when the drain then stops on a bad completion: a
            // recovery must not ask for those bytes again.
            defer {
                remaining -= handed
                bytesRead += handed
                completions += done
            }
            _ = try queue.drainUsed { token, length in
                // The queue checked length against the buffer's size; the token is our slot number.
                if length == 0 { empty += 1 }
                let n = min(Int(length), remaining - handed)
                if n > 0 { body(UnsafeRawBufferPointer(start: base + Int(token) * stride, count: n)) }
                handed += n
                done += 1
                idle.push(Int(token))
            }
            // §5.4.6.2: "The device MUST place one or more random bytes into the buffer". A
            // device that gives buffers back empty would keep this loop going for ever.
            if empty > 0 {
                throw .brokenQueue(queue: 0, "the device gave back \(empty) buffer\(empty == 1 ? "" : "s") with no entropy in \(empty == 1 ? "it" : "them") (§5.4.6.2: one or more random bytes)")
            }
            try EntropyDevice.post(&idle, to: &queue, buffers: buffers, bufferSize: bufferSize, stride: bufferStride)
        }
    }

    /// Posts every idle buffer slot as one device-writable buffer and tells the device.
    /// `stride`: bytes from one buffer to the next (`DMAArena.elementStride(bufferSize)`).
    static func post(_ idle: inout SlotStack, to queue: inout Virtqueue, buffers: DMASlice, bufferSize: Int, stride: Int) throws(VirtioError) {
        while let slot = idle.pop() {
            var segment = BufferSegment(address: buffers.deviceAddress(at: slot * stride),
                                        length: UInt32(bufferSize), deviceWritable: true)
            let added = try withUnsafePointer(to: &segment) { (p) throws(VirtioError) in
                try queue.add(UnsafeBufferPointer(start: p, count: 1), token: UInt64(slot))
            }
            if !added { idle.push(slot); break }
        }
        queue.publish()
    }

    /// Resets only the request queue (VIRTIO_F_RING_RESET, spec 2.6.1) while the device stays live:
    /// the device stops using the queue's buffers, every one of them is reclaimed, and the queue is
    /// rebuilt on the same memory and enabled again. Returns how many buffers were reclaimed.
    public mutating func resetQueue(timeout: Duration = .seconds(5)) throws(VirtioError) -> Int {
        guard negotiation.accepted.contains(.ringReset) else {
            throw .missingFeature("RING_RESET (negotiate it with --feature RING_RESET)")
        }
        try transport.resetQueue(0, timeout: timeout)
        // After the queue reset the device uses none of its buffers: reclaim them all, which
        // leaves the queue as new on the same (zeroed) memory. The doorbell does not move
        // (queue_notify_off is fixed), so the queue keeps it.
        var reclaimed = 0
        queue.reclaimAll { slot in idle.push(Int(slot)); reclaimed += 1 }
        _ = try transport.enableQueue(0, size: queue.size, rings: queue.rings, vector: mode == .poll ? nil : 0)
        queue.suppressInterrupts()
        try EntropyDevice.post(&idle, to: &queue, buffers: buffers, bufferSize: bufferSize, stride: bufferStride)
        return reclaimed
    }

    /// Shuts down as the seed says: reset first (the device then uses no buffer), then reclaim the
    /// buffers and free the queue. Returns the transport for the next user.
    public consuming func shutdown() throws(VirtioError) -> T {
        try Lifecycle.reset(transport)
        var cancelled = 0
        queue.cancelAll { _ in cancelled += 1 }
        transport.disableInterrupts()
        transport.dma.reset()
        return transport
    }
}
