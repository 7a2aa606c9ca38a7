import Virtio

/// receiveq1 of virtio-net (§5.1.6.3, §5.1.6.4): every buffer kept posted to the device, each
/// completion validated before a byte of it is delivered.
///
/// Each slot is one device-writable buffer of `bufferSize` bytes in DMA memory; the slot number is
/// the token. Without MRG_RXBUF a buffer holds the 12-byte header and a whole frame (MTU + 18);
/// with it a frame may span `num_buffers` buffers, the header in the first (§5.1.6.4). A frame in
/// one buffer is handed out in place; a spread one is copied once into `assembly` (private memory,
/// allocated with the queue). Nothing here allocates per frame.
public struct NetReceiveQueue: ~Copyable {
    public let index: Int
    var queue: Virtqueue
    let buffers: DMASlice
    /// Bytes each posted buffer offers the device.
    public let bufferSize: Int
    let stride: Int
    let mergeable: Bool
    let guestChecksum: Bool
    /// The longest frame accepted (MTU + 18), header not counted.
    let maxFrame: Int
    var idle: SlotStack
    /// Continuation buffers of one frame (slot, used length), filled by one `drainUsed`.
    let spreadSlots: FixedArray<Int>
    let spreadLengths: FixedArray<UInt32>
    let assembly: UnsafeMutableRawPointer

    /// The buffer size this driver posts: with MRG_RXBUF `requested` (at least the header plus a
    /// minimal frame, §5.1.6.3.1: at least the header), without it room for the header and a
    /// whole frame (§5.1.6.3.1: "at least 1526 bytes" for MTU 1500 with no GSO).
    static func bufferSize(features: Features, config: NetConfig, requested: Int) -> Int {
        features.contains(.netMergeableRxBuffers)
            ? min(max(requested, NetHeader.size + 14), NetHeader.size + config.maxFrameBytes)
            : NetHeader.size + config.maxFrameBytes
    }

    /// Where queue memory goes in the DMA arena, in the order both initialisers allocate it (the
    /// rings, then `size` buffers of `bufferSize` bytes on 64-byte strides): a successor that
    /// adopts the queue recomputes exactly the layout the previous driver built. Receive buffers
    /// are never zeroed: the device writes them before a used length says so.
    static func layout(arena: DMAArena, size: UInt16, format: RingFormat, bufferSize: Int, zeroed: Bool) throws(VirtioError)
        -> (memory: QueueMemory, buffers: DMASlice, stride: Int) {
        let stride = arena.elementStride((bufferSize + 63) / 64 * 64)
        let memory = try QueueMemory(format, arena: arena, size: size, zeroed: zeroed)
        let buffers = try arena.allocate(Int(size) * stride, alignment: 4096, element: stride, zeroed: false)
        return (memory, buffers, stride)
    }

    /// Builds queue `index` on `transport` with `size` entries and buffers of `bufferSize` bytes
    /// from its DMA arena, and enables it. Nothing is posted until `post()` (after DRIVER_OK).
    init<T: Transport & ~Copyable>(index: Int, transport: borrowing T, size: UInt16, features: Features,
                                   config: NetConfig, bufferSize: Int, vector: UInt16?) throws(VirtioError) {
        let layout = try NetReceiveQueue.layout(arena: transport.dma, size: size, format: RingFormat(features), bufferSize: bufferSize, zeroed: true)
        let doorbell = try transport.enableQueue(index, size: size, rings: layout.memory.rings, vector: vector)
        self.init(queue: Virtqueue(index: index, memory: layout.memory, features: features, doorbell: doorbell),
                  buffers: layout.buffers, stride: layout.stride, bufferSize: bufferSize, features: features,
                  config: config, idle: SlotStack(filledTo: Int(size)))
    }

    /// Takes over receiveq1 of a running device (live upgrade): the same layout as `init`
    /// recomputed over the live DMA memory without writing it, the rings checked against
    /// `snapshot`, and the buffers the device holds (`snapshot.outstanding`, token = slot) kept
    /// posted: each must be a distinct slot offering exactly `bufferSize` bytes, as this version
    /// would post it. Frames the device wrote into them since the previous driver stopped are
    /// delivered by the next `receive`. Slots not outstanding are idle and posted by `post()`.
    init<T: Transport & ~Copyable>(adopting snapshot: QueueSnapshot, transport: borrowing T, features: Features,
                                   config: NetConfig, bufferSize: Int, doorbell: Doorbell) throws(VirtioError) {
        let layout = try NetReceiveQueue.layout(arena: transport.dma, size: snapshot.size, format: RingFormat(features), bufferSize: bufferSize, zeroed: false)
        try Adoption.checkLayout(layout.memory.rings, snapshot)
        let idle = try SlotStack(idleBesides: snapshot, writableBytes: UInt32(bufferSize), kind: "receive buffer")
        let queue = try Virtqueue(adopting: layout.memory, features: features, doorbell: doorbell, snapshot: snapshot)
        self.init(queue: queue, buffers: layout.buffers, stride: layout.stride, bufferSize: bufferSize, features: features,
                  config: config, idle: idle)
    }

    /// What both initialisers end with; interrupts start suppressed (the caller polls, or arms
    /// them before it sleeps).
    init(queue: consuming Virtqueue, buffers: DMASlice, stride: Int, bufferSize: Int, features: Features,
         config: NetConfig, idle: consuming SlotStack) {
        let size = Int(queue.size)
        self.index = queue.index
        self.queue = queue
        self.queue.suppressInterrupts()
        self.buffers = buffers
        self.bufferSize = bufferSize
        self.stride = stride
        self.mergeable = features.contains(.netMergeableRxBuffers)
        self.guestChecksum = features.contains(.netGuestChecksum)
        self.maxFrame = config.maxFrameBytes
        self.idle = idle
        self.spreadSlots = FixedArray(repeating: 0, count: size)
        self.spreadLengths = FixedArray(repeating: 0, count: size)
        self.assembly = .allocate(byteCount: max(config.maxFrameBytes, 1), alignment: 64)
    }

    /// The queue with every buffer the device holds, for a successor (live upgrade).
    func handoverSnapshot() throws(VirtioError) -> QueueSnapshot { try queue.handoverSnapshot() }

    deinit {
        assembly.deallocate()
    }

    /// Buffers the device holds now.
    public var posted: Int { queue.inFlight }
    public var size: Int { Int(queue.size) }

    /// Posts every idle buffer (device-writable, §5.1.6.3) and tells the device once.
    mutating func post() throws(VirtioError) {
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

    /// Whether the device returned buffers not consumed yet.
    func hasUsed() -> Bool { queue.hasUsed() }

    /// Takes up to `limit` frames from the used ring, validating each (§5.1.6.4): the first
    /// buffer's used length covers the header; with MRG_RXBUF `num_buffers` is at least 1, no more
    /// than the buffers still posted, and that many were returned; the frame is 14...MTU + 18
    /// bytes; the header's fields are ones the negotiated features allow. A frame failing any of
    /// it is dropped and counted, its buffers reused. Every buffer taken is posted again before
    /// returning. The bytes handed to `body` are valid only during the call.
    mutating func receive(limit: Int, counters: inout NetCounters,
                          _ body: (UnsafeRawBufferPointer, NetHeader) -> Void) throws(VirtioError) -> Int {
        var delivered = 0
        let base = buffers.pointer, stride = self.stride
        let spreadSlots = self.spreadSlots.unsafeElements, spreadLengths = self.spreadLengths.unsafeElements
        // Bounded: nothing is posted inside the loop, and each turn consumes at least one of the
        // at most `size` buffers the device held.
        while delivered < limit {
            var slot = 0
            var length: UInt32 = 0
            guard try queue.drainUsed(limit: 1, { token, used in slot = Int(token); length = used }) == 1 else { break }
            idle.push(slot)
            let first = base + slot * stride
            guard Int(length) >= NetHeader.size else { counters.drop(.shortUsedLength); continue }
            // The header is copied out once and only the copy is looked at.
            let header = NetHeader(loading: first)
            var total = Int(length) - NetHeader.size
            var spread = 0
            if mergeable {
                let count = Int(header.numBuffers)
                // The continuation buffers must be ones the device still holds (§5.1.6.4).
                guard count >= 1, count - 1 <= queue.inFlight else { counters.drop(.badNumBuffers); continue }
                if count > 1 {
                    var k = 0
                    _ = try queue.drainUsed(limit: count - 1) { token, used in
                        spreadSlots[k] = Int(token)
                        spreadLengths[k] = used
                        k += 1
                    }
                    spread = k
                    for j in 0..<spread {
                        idle.push(spreadSlots[j])
                        total += Int(spreadLengths[j])
                    }
                    // Fewer returned than announced: the rest is not there (Linux counts the
                    // same as rx_length_errors). Dropped with what did arrive.
                    guard spread == count - 1 else { counters.drop(.badNumBuffers); continue }
                }
            }
            guard total >= 14, total <= maxFrame else { counters.drop(.badLength); continue }
            if let problem = header.receiveProblem(frameBytes: total, guestChecksum: guestChecksum) {
                counters.drop(problem)
                continue
            }
            if spread == 0 {
                body(UnsafeRawBufferPointer(start: first + NetHeader.size, count: total), header)
            } else {
                // Lengths were each checked against the buffer (drainUsed) and summed to ≤ maxFrame.
                var at = Int(length) - NetHeader.size
                assembly.copyMemory(from: first + NetHeader.size, byteCount: at)
                for j in 0..<spread {
                    let n = Int(spreadLengths[j])
                    (assembly + at).copyMemory(from: base + spreadSlots[j] * stride, byteCount: n)
                    at += n
                }
                body(UnsafeRawBufferPointer(start: assembly, count: total), header)
            }
            counters.rxPackets += 1
            counters.rxBytes += total
            delivered += 1
        }
        try post()
        return delivered
    }

    /// After a device reset (§2.4: the device uses no buffer afterwards): every buffer is idle
    /// again and the rings are as new.
    mutating func reclaimAll() {
        queue.reclaimAll { slot in idle.push(Int(slot)) }
    }

    /// After a reset and `reclaimAll`: programs the queue again on the same ring memory.
    mutating func enableAgain<T: Transport & ~Copyable>(on transport: borrowing T, vector: UInt16?) throws(VirtioError) {
        _ = try transport.enableQueue(index, size: queue.size, rings: queue.rings, vector: vector)
        queue.suppressInterrupts()
    }
}
