import Virtio

/// transmitq1 of virtio-net (§5.1.6.2): a fixed set of slots in DMA memory, one per ring entry.
/// A frame is copied into a free slot behind its 12-byte header and posted as one device-readable
/// buffer (VERSION_1 implies any layout, §2.7.4.1); the slot comes back when the device has used
/// it. Nothing here allocates per frame.
public struct NetTransmitQueue: ~Copyable {
    public let index: Int
    var queue: Virtqueue
    let slots: DMASlice
    let stride: Int
    var idle: SlotStack

    /// Where queue memory goes in the DMA arena, in the order both initialisers allocate it (the
    /// rings, then one slot per entry for a header and a whole frame, on 64-byte strides), so a
    /// successor recomputes the previous driver's layout exactly. Slots are written before use.
    static func layout(arena: DMAArena, size: UInt16, format: RingFormat, config: NetConfig, zeroed: Bool) throws(VirtioError)
        -> (memory: QueueMemory, slots: DMASlice, stride: Int) {
        let stride = arena.elementStride((NetHeader.size + config.maxFrameBytes + 63) / 64 * 64)
        let memory = try QueueMemory(format, arena: arena, size: size, zeroed: zeroed)
        let slots = try arena.allocate(Int(size) * stride, alignment: 4096, element: stride, zeroed: false)
        return (memory, slots, stride)
    }

    init<T: Transport & ~Copyable>(index: Int, transport: borrowing T, size: UInt16, features: Features,
                                   config: NetConfig, vector: UInt16?) throws(VirtioError) {
        let layout = try NetTransmitQueue.layout(arena: transport.dma, size: size, format: RingFormat(features), config: config, zeroed: true)
        let doorbell = try transport.enableQueue(index, size: size, rings: layout.memory.rings, vector: vector)
        self.init(queue: Virtqueue(index: index, memory: layout.memory, features: features, doorbell: doorbell),
                  slots: layout.slots, stride: layout.stride, idle: SlotStack(filledTo: Int(size)))
    }

    /// Takes over transmitq1 of a running device (live upgrade): the same layout as `init` over
    /// the live memory, unwritten; the frames still in flight (`snapshot.outstanding`, token =
    /// slot, nothing device-writable) stay in flight and are reclaimed when the device uses them.
    init<T: Transport & ~Copyable>(adopting snapshot: QueueSnapshot, transport: borrowing T, features: Features,
                                   config: NetConfig, doorbell: Doorbell) throws(VirtioError) {
        let layout = try NetTransmitQueue.layout(arena: transport.dma, size: snapshot.size, format: RingFormat(features), config: config, zeroed: false)
        try Adoption.checkLayout(layout.memory.rings, snapshot)
        let idle = try SlotStack(idleBesides: snapshot, writableBytes: 0, kind: "transmit")
        let queue = try Virtqueue(adopting: layout.memory, features: features, doorbell: doorbell, snapshot: snapshot)
        self.init(queue: queue, slots: layout.slots, stride: layout.stride, idle: idle)
    }

    /// What both initialisers end with; interrupts start suppressed.
    init(queue: consuming Virtqueue, slots: DMASlice, stride: Int, idle: consuming SlotStack) {
        self.index = queue.index
        self.queue = queue
        self.queue.suppressInterrupts()
        self.slots = slots
        self.stride = stride
        self.idle = idle
    }

    /// The queue with the frames still in flight, for a successor (live upgrade).
    func handoverSnapshot() throws(VirtioError) -> QueueSnapshot { try queue.handoverSnapshot() }

    /// Frames handed to the device and not yet reclaimed.
    public var inFlight: Int { queue.inFlight }
    public var size: Int { Int(queue.size) }

    /// Copies `header` (num_buffers 0, §5.1.6.2) and `frame` into a free slot and makes it
    /// available; with `publish` the device is told at once, else at the next `publish()`.
    /// Reclaims completed slots first when none is free. False when every slot is in flight.
    /// The frame's size and the header were checked by the caller.
    mutating func transmit(_ frame: UnsafeRawBufferPointer, header: NetHeader, publish: Bool) throws(VirtioError) -> Bool {
        var free = idle.pop()
        if free == nil {
            _ = try reclaim()
            free = idle.pop()
        }
        guard let slot = free else { return false }
        let p = slots.pointer + slot * stride
        var h = header
        h.numBuffers = 0
        h.store(to: p)
        if frame.count > 0 { (p + NetHeader.size).copyMemory(from: frame.baseAddress!, byteCount: frame.count) }
        var segment = BufferSegment(address: slots.deviceAddress(at: slot * stride),
                                    length: UInt32(NetHeader.size + frame.count), deviceWritable: false)
        let added = try withUnsafePointer(to: &segment) { (p) throws(VirtioError) in
            try queue.add(UnsafeBufferPointer(start: p, count: 1), token: UInt64(slot))
        }
        guard added else { idle.push(slot); return false }
        if publish { queue.publish() }
        return true
    }

    mutating func publish() { queue.publish() }

    /// Takes back every slot the device has used (§2.7.14; the used length must be 0: nothing
    /// of a transmit buffer is device-writable, and `drainUsed` refuses more). Returns how many.
    mutating func reclaim() throws(VirtioError) -> Int {
        try queue.drainUsed { token, _ in idle.push(Int(token)) }
    }

    /// After a device reset: every slot idle again, rings as new. Returns the frames that were
    /// in flight (lost: the device will not send them).
    mutating func reclaimAll() -> Int {
        var lost = 0
        queue.reclaimAll { slot in idle.push(Int(slot)); lost += 1 }
        return lost
    }

    mutating func enableAgain<T: Transport & ~Copyable>(on transport: borrowing T, vector: UInt16?) throws(VirtioError) {
        _ = try transport.enableQueue(index, size: queue.size, rings: queue.rings, vector: vector)
        queue.suppressInterrupts()
    }
}
