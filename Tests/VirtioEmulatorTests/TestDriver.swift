import CVirtioShim
import Testing
import Virtio
import VirtioEmulator
#if canImport(Glibc)
import Glibc
#endif

/// A deliberately tiny driver side of one split virtqueue (spec 2.7), written independently of
/// the driver's `SplitQueue` so the emulator is tested against its own reading of the spec. Byte
/// offsets come from `SplitQueueLayout`, which `SplitQueueLayoutTests` pins to the spec's numbers.
/// Descriptors are handed out round-robin; tests never have more than `size` in flight.
final class TestRing {
    let size: UInt16
    let descriptors: DMASlice
    let avail: DMASlice
    let used: DMASlice
    var doorbell: Doorbell?
    private(set) var availIdx: UInt16 = 0
    private var nextFree: UInt16 = 0

    init(_ arena: DMAArena, size: UInt16) throws {
        let n = Int(size)
        self.size = size
        descriptors = try arena.allocate(SplitQueueLayout.descriptorTableSize(n), alignment: SplitQueueLayout.descriptorAlignment)
        avail = try arena.allocate(SplitQueueLayout.availSize(n), alignment: SplitQueueLayout.availAlignment)
        used = try arena.allocate(SplitQueueLayout.usedSize(n), alignment: SplitQueueLayout.usedAlignment)
    }

    var rings: QueueRings {
        QueueRings(descriptors: descriptors.deviceAddress, driver: avail.deviceAddress, device: used.deviceAddress)
    }

    /// One element of a chain: a device address and length, device-readable or -writable.
    struct Part {
        var address: UInt64
        var length: UInt32
        var flags: UInt16 = 0
        static func readable(_ s: DMASlice) -> Part { Part(address: s.deviceAddress, length: UInt32(s.size)) }
        static func writable(_ s: DMASlice) -> Part { Part(address: s.deviceAddress, length: UInt32(s.size), flags: SplitQueueLayout.flagWrite) }
        static func indirect(_ s: DMASlice) -> Part { Part(address: s.deviceAddress, length: UInt32(s.size), flags: SplitQueueLayout.flagIndirect) }
    }

    static func writeDescriptor(_ table: UnsafeMutableRawPointer, _ i: Int, _ p: Part, next: UInt16?) {
        let d = table + SplitQueueLayout.descriptor(i)
        d.storeBytes(of: p.address.littleEndian, toByteOffset: SplitQueueLayout.descriptorAddress, as: UInt64.self)
        d.storeBytes(of: p.length.littleEndian, toByteOffset: SplitQueueLayout.descriptorLength, as: UInt32.self)
        d.storeBytes(of: (p.flags | (next == nil ? 0 : SplitQueueLayout.flagNext)).littleEndian,
                     toByteOffset: SplitQueueLayout.descriptorFlags, as: UInt16.self)
        d.storeBytes(of: (next ?? 0).littleEndian, toByteOffset: SplitQueueLayout.descriptorNext, as: UInt16.self)
    }

    /// Writes `parts` into free descriptors, chained with NEXT; returns the head.
    func chain(_ parts: [Part]) -> UInt16 {
        let head = nextFree
        for (k, p) in parts.enumerated() {
            let i = nextFree
            nextFree = (nextFree + 1) % size
            TestRing.writeDescriptor(descriptors.pointer, Int(i), p, next: k == parts.count - 1 ? nil : nextFree)
        }
        return head
    }

    /// Writes a raw descriptor (for malformed chains).
    func setDescriptor(_ i: UInt16, _ p: Part, next: UInt16?) {
        TestRing.writeDescriptor(descriptors.pointer, Int(i), p, next: next)
    }

    /// Puts `head` in the next available ring entry (not yet visible to the device).
    func makeAvailable(_ head: UInt16) {
        (avail.pointer + SplitQueueLayout.availRing(Int(availIdx % size))).storeBytes(of: head.littleEndian, as: UInt16.self)
        availIdx &+= 1
    }

    /// Publishes the available idx after the entries and descriptors (spec 2.7.13.3.1).
    func publish() {
        CVirtioShim_barrier_write()
        CVirtioShim_mmio_write16(avail.pointer + SplitQueueLayout.availIndex, availIdx.littleEndian)
    }

    /// Notifies the device after a full barrier (spec 2.7.13.4.1).
    func kick() {
        CVirtioShim_barrier_full()
        doorbell!.ring()
    }

    /// chain + makeAvailable + publish + kick.
    @discardableResult
    func submit(_ parts: [Part], kick doKick: Bool = true) -> UInt16 {
        let head = chain(parts)
        makeAvailable(head)
        publish()
        if doKick { kick() }
        return head
    }

    var usedIdx: UInt16 {
        let v = UInt16(littleEndian: CVirtioShim_mmio_read16(used.pointer + SplitQueueLayout.usedIndex))
        CVirtioShim_barrier_read()
        return v
    }

    func usedElement(_ i: UInt16) -> (id: UInt32, length: UInt32) {
        let e = used.pointer + SplitQueueLayout.usedElement(Int(i % size))
        return (UInt32(littleEndian: CVirtioShim_mmio_read32(e + SplitQueueLayout.usedElementID)),
                UInt32(littleEndian: CVirtioShim_mmio_read32(e + SplitQueueLayout.usedElementLength)))
    }

    var availEvent: UInt16 { UInt16(littleEndian: CVirtioShim_mmio_read16(used.pointer + SplitQueueLayout.availEvent(Int(size)))) }

    func setUsedEvent(_ v: UInt16) {
        CVirtioShim_mmio_write16(avail.pointer + SplitQueueLayout.usedEvent(Int(size)), v.littleEndian)
        CVirtioShim_barrier_full()
    }

    func setAvailFlags(_ v: UInt16) {
        CVirtioShim_mmio_write16(avail.pointer + SplitQueueLayout.availFlags, v.littleEndian)
        CVirtioShim_barrier_full()
    }

    /// Waits (bounded, generous) until the used idx reaches `target`. False on timeout.
    func waitUsed(_ target: UInt16, timeout: Duration = .seconds(5)) -> Bool {
        poll(timeout: timeout) { usedIdx == target }
    }
}

/// Polls `condition` until it holds or `timeout` passes.
func poll(timeout: Duration = .seconds(5), _ condition: () -> Bool) -> Bool {
    let clock = ContinuousClock()
    let deadline = clock.now + timeout
    var spins = 0
    while !condition() {
        if clock.now > deadline { return false }
        spins += 1
        if spins < 1000 { sched_yield() } else { usleep(50) }
    }
    return true
}

/// Gives the device thread time to do something it must not do.
func settle() { usleep(30_000) }

/// A device, its transport and queue `queue` set up by `Lifecycle` and the test ring.
struct Rig {
    let device: EmulatedDevice
    let transport: EmulatedTransport
    let ring: TestRing
    let vectors: [Int32]

    var dma: DMAArena { transport.dma }

    init(_ model: EmulatedDevice.Model, wanted: Features = [], queue: Int = 0, size: UInt16? = nil,
         vector: UInt16? = 0, driverOK: Bool = true) throws {
        device = EmulatedDevice(model: model)
        transport = EmulatedTransport(device: device)
        try Lifecycle.reset(transport)
        _ = try Lifecycle.negotiate(transport, wanted: wanted)
        vectors = try transport.enableInterrupts(count: 2)
        ring = try TestRing(transport.dma, size: size ?? model.queueMaxSizes[queue])
        ring.doorbell = try transport.enableQueue(queue, size: ring.size, rings: ring.rings, vector: vector)
        if driverOK { try Lifecycle.driverOK(transport) }
    }

    func buffer(_ count: Int) throws -> DMASlice { try dma.allocate(count, alignment: 16) }
}

func bytes(_ s: DMASlice) -> [UInt8] { Array(UnsafeRawBufferPointer(start: s.pointer, count: s.size)) }

func fill(_ s: DMASlice, _ b: [UInt8]) {
    precondition(b.count <= s.size)
    b.withUnsafeBytes { s.pointer.copyMemory(from: $0.baseAddress!, byteCount: b.count) }
}

/// Counts entries of a /proc directory (open descriptors, threads).
func countEntries(_ path: String) -> Int {
    guard let dir = opendir(path) else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { n += 1 }
    }
    return n
}

extension EmulatedDevice {
    func hasViolation(_ fragment: String) -> Bool { violations.contains { $0.rule.contains(fragment) } }
}
