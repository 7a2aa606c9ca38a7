import CVirtioShim
import Virtio

/// The control virtqueue of virtio-net (§5.1.6.5), with VIRTIO_NET_F_CTRL_VQ: one command at a
/// time, `{ u8 class; u8 command; u8 data[]; }` device-readable, then `u8 ack` device-writable.
/// Commands are rare (configuration), so each is waited for by polling, bounded by `timeout`.
public struct NetControlQueue: ~Copyable {
    public let index: Int
    var queue: Virtqueue
    /// Command bytes (readable) and the ack byte (writable), apart so neither shares a line.
    let command: DMASlice
    let ack: DMASlice
    let timeout: Duration

    // §5.1.6.5
    static let ok: UInt8 = 0          // VIRTIO_NET_OK
    static let err: UInt8 = 1         // VIRTIO_NET_ERR
    static let classRx: UInt8 = 0     // VIRTIO_NET_CTRL_RX
    static let rxPromisc: UInt8 = 0   // VIRTIO_NET_CTRL_RX_PROMISC
    static let rxAllMulti: UInt8 = 1  // VIRTIO_NET_CTRL_RX_ALLMULTI
    static let commandBytes = 64

    /// The rings, then the command bytes and the ack byte, in the order both initialisers
    /// allocate them (so a successor recomputes the previous driver's layout exactly).
    static func layout(arena: DMAArena, size: UInt16, format: RingFormat, zeroed: Bool) throws(VirtioError)
        -> (memory: QueueMemory, command: DMASlice, ack: DMASlice) {
        let memory = try QueueMemory(format, arena: arena, size: size, zeroed: zeroed)
        let command = try arena.allocate(NetControlQueue.commandBytes, alignment: 64, zeroed: zeroed)
        let ack = try arena.allocate(1, alignment: 64, zeroed: zeroed)
        return (memory, command, ack)
    }

    init<T: Transport & ~Copyable>(index: Int, transport: borrowing T, features: Features, timeout: Duration) throws(VirtioError) {
        let maximum = transport.queueMaxSize(index)
        guard maximum > 0 else { throw .queueSetup(queue: index, "the device reports no control queue (size 0)") }
        let size = SplitQueueLayout.queueSize(maximum: maximum, limit: 8)
        let layout = try NetControlQueue.layout(arena: transport.dma, size: size, format: RingFormat(features), zeroed: true)
        let doorbell = try transport.enableQueue(index, size: size, rings: layout.memory.rings, vector: nil)
        self.init(queue: Virtqueue(index: index, memory: layout.memory, features: features, doorbell: doorbell),
                  command: layout.command, ack: layout.ack, timeout: timeout)
    }

    /// Takes over the control queue of a running device (live upgrade). Commands are waited for
    /// one at a time, so a handed-over control queue is idle.
    init<T: Transport & ~Copyable>(adopting snapshot: QueueSnapshot, transport: borrowing T, features: Features,
                                   doorbell: Doorbell, timeout: Duration) throws(VirtioError) {
        let layout = try NetControlQueue.layout(arena: transport.dma, size: snapshot.size, format: RingFormat(features), zeroed: false)
        try Adoption.checkLayout(layout.memory.rings, snapshot)
        let queue = try Virtqueue(adopting: layout.memory, features: features, doorbell: doorbell, snapshot: snapshot)
        self.init(queue: queue, command: layout.command, ack: layout.ack, timeout: timeout)
    }

    /// What both initialisers end with; interrupts start suppressed (commands are polled).
    init(queue: consuming Virtqueue, command: DMASlice, ack: DMASlice, timeout: Duration) {
        self.index = queue.index
        self.queue = queue
        self.queue.suppressInterrupts()
        self.command = command
        self.ack = ack
        self.timeout = timeout
    }

    /// Sends one command and waits for the device's answer: true for VIRTIO_NET_OK, false for
    /// VIRTIO_NET_ERR. The used length must cover the ack byte and the ack must be one of the two
    /// values; anything else, or no answer within `timeout`, is an error.
    mutating func send(class cls: UInt8, command cmd: UInt8, data: UInt8) throws(VirtioError) -> Bool {
        let p = command.pointer
        p.storeBytes(of: cls, toByteOffset: 0, as: UInt8.self)
        p.storeBytes(of: cmd, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: data, toByteOffset: 2, as: UInt8.self)
        // An ack the device never writes must not read as OK.
        ack.pointer.storeBytes(of: 0xFF, as: UInt8.self)
        var segments = (BufferSegment(address: command.deviceAddress, length: 3, deviceWritable: false),
                        BufferSegment(address: ack.deviceAddress, length: 1, deviceWritable: true))
        let added = try withUnsafePointer(to: &segments) { (p) throws(VirtioError) in
            try p.withMemoryRebound(to: BufferSegment.self, capacity: 2) { (s) throws(VirtioError) in
                try queue.add(UnsafeBufferPointer(start: s, count: 2), token: 0)
            }
        }
        guard added else { throw .queueSetup(queue: index, "control queue full: an earlier command was never answered") }
        queue.publish()
        let waiter = CompletionWaiter(mode: .poll, eventfd: nil, timeout: timeout)
        try waiter.wait(for: &queue)
        var length: UInt32 = 0
        guard try queue.drainUsed(limit: 1, { _, used in length = used }) == 1 else {
            throw .brokenQueue(queue: index, "control command completion vanished")
        }
        // The ack byte is read once (the device may still scribble on it).
        let value = CVirtioShim_mmio_read8(ack.pointer)
        guard length == 1 else {
            throw .brokenQueue(queue: index, "control command answered with used length \(length): the ack byte was not written (§5.1.6.5)")
        }
        switch value {
        case NetControlQueue.ok: return true
        case NetControlQueue.err: return false
        default:
            throw .brokenQueue(queue: index, "control command ack \(value) is neither VIRTIO_NET_OK nor VIRTIO_NET_ERR (§5.1.6.5)")
        }
    }

    mutating func reclaimAll() { queue.reclaimAll { _ in } }

    mutating func enableAgain<T: Transport & ~Copyable>(on transport: borrowing T) throws(VirtioError) {
        _ = try transport.enableQueue(index, size: queue.size, rings: queue.rings, vector: nil)
        queue.suppressInterrupts()
    }
}

/// The control queue behind a reference, so the device can hold it or not (CTRL_VQ) and lend it
/// out; allocated once when the device is set up.
final class NetControlBox {
    var queue: NetControlQueue
    init(_ queue: consuming NetControlQueue) { self.queue = queue }
}
