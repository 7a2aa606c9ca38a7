import Testing
import Glibc
import NBD
import Services
import Virtio
import VirtioDevices
import VirtioEmulator

@Suite("virtio-blk as an NBD backend, against the emulator", .serialized)
struct VirtioBlockBackendTests {
    func backend(_ device: EmulatedDevice, mode: CompletionMode = .poll) throws -> VirtioBlockBackend<EmulatedTransport> {
        let transport = EmulatedTransport(device: device)
        let blk = try BlockDevice(transport: transport, mode: mode)
        return VirtioBlockBackend(device: blk)
    }

    struct NoRoom: Error {}
    func reserve(_ b: inout VirtioBlockBackend<EmulatedTransport>, _ length: Int) throws -> BackendBuffer {
        guard let buffer = b.reserve(length: length) else { throw NoRoom() }
        return buffer
    }

    /// Polls until `tag` completes; returns its result.
    func wait(_ b: inout VirtioBlockBackend<EmulatedTransport>, for tag: UInt64) throws -> Int32 {
        var result: Int32?
        for _ in 0..<2_000_000 where result == nil {
            _ = try b.poll { t, e in if t == tag { result = e } }
        }
        guard let result else { throw NoRoom() }
        return result
    }

    /// Buffers reserved for good (a ublk export's, one per tag) are not handed over: only the
    /// slots of requests in flight are, so a successor does not inherit reservations nobody owns.
    @Test func standingReservationsStayBehindAtAHandover() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1 << 16))
        var b = try backend(device)
        let standing = try reserve(&b, 4096)
        let used = try reserve(&b, 4096)
        try b.submit(.write, offset: 0, length: 4096, buffer: used, tag: 7)
        #expect(try wait(&b, for: 7) == 0)
        let busy = try reserve(&b, 8192)
        device.faults.stopCompleting = true
        try b.submit(.read, offset: 0, length: 8192, buffer: busy, tag: 9)
        let (_, state) = try b.handoverState()
        #expect(state.reserved.map(\.slot) == Array(busy.first..<busy.first + busy.count))
        #expect(state.tags == [9])
        #expect(standing.first != busy.first && used.first != busy.first)
        device.faults.stopCompleting = false
    }

    /// A server sleeps on the completion descriptor as soon as it submitted: the first completion
    /// of a new (or adopted) backend must signal it before `poll` ever ran.
    @Test(arguments: [false, true])
    func theFirstCompletionSignalsTheDescriptor(adopted: Bool) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1 << 16))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: .msix)
        if adopted {
            let snapshots = try blk.queueSnapshots()
            let features = blk.negotiation.accepted
            blk = try BlockDevice(adopting: EmulatedTransport(sharing: blk.detach()), features: features, queues: snapshots, mode: .msix)
        }
        var b = VirtioBlockBackend(device: blk)
        guard let fd = b.completionDescriptor else { Issue.record("no completion descriptor in msix mode"); return }
        let r = try reserve(&b, 4096)
        try b.submit(.read, offset: 0, length: 4096, buffer: r, tag: 1)
        var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        #expect(Glibc.poll(&ready, 1, 5000) == 1, "the completion did not signal the descriptor (interrupts left suppressed)")
        let result = try wait(&b, for: 1)
        #expect(result == 0)
        b.release(r)
    }

    @Test(arguments: [CompletionMode.poll, .msix])
    func largeWriteReadFlushTrimAndZeroes(_ mode: CompletionMode) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1 << 16))
        var b = try backend(device, mode: mode)
        let (size, readOnly, flush, trim, zeroes) = (b.size, b.readOnly, b.canFlush, b.canTrim, b.canWriteZeroes)
        #expect(size == 32 << 20 && !readOnly && flush && trim && zeroes)
        let length = 1 << 20  // eight 128 KiB chunks in one contiguous buffer
        let w = try reserve(&b, length)
        let memory = b.memory(of: w)
        for i in 0..<length { memory[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        try b.submit(.writeFUA, offset: 4096, length: length, buffer: w, tag: 1)
        do { let result = try wait(&b, for: 1); #expect(result == 0) }
        b.release(w)
        #expect(device.readDisk(offset: 4096, count: 16) == (0..<16).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })

        let r = try reserve(&b, length)
        try b.submit(.read, offset: 4096, length: length, buffer: r, tag: 2)
        do { let result = try wait(&b, for: 2); #expect(result == 0) }
        let back = b.memory(of: r)
        #expect((0..<length).allSatisfy { back[$0] == UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })
        b.release(r)

        let z = try reserve(&b, 0)
        try b.submit(.writeZeroes, offset: 4096, length: 8192, buffer: z, tag: 3)
        do { let result = try wait(&b, for: 3); #expect(result == 0) }
        #expect(device.readDisk(offset: 4096, count: 8192).allSatisfy { $0 == 0 })
        try b.submit(.trim, offset: 1 << 20, length: 1 << 20, buffer: z, tag: 4)
        do { let result = try wait(&b, for: 4); #expect(result == 0) }
        try b.submit(.flush, offset: 0, length: 0, buffer: z, tag: 5)
        do { let result = try wait(&b, for: 5); #expect(result == 0) }
        b.release(z)
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func reservationsAreContiguousAndBounded() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1 << 16, queueSize: 16))
        var b = try backend(device)
        let a = try reserve(&b, 4 * 128 * 1024)
        let c = try reserve(&b, 12 * 128 * 1024)
        #expect(a.first == 0 && a.count == 4 && c.first == 4 && c.count == 12)
        let none = b.reserve(length: 1)
        #expect(none == nil)   // every slot is taken
        b.release(a)
        let five = b.reserve(length: 5 * 128 * 1024)
        #expect(five == nil)  // no run of 5 is free
        let four = b.reserve(length: 4 * 128 * 1024)
        #expect(four?.first == 0)
    }

    @Test func unalignedRequestsAreRefusedBeforeTheDevice() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1024))
        var b = try backend(device)
        let buffer = try reserve(&b, 1000)
        do { try b.submit(.write, offset: 0, length: 1000, buffer: buffer, tag: 1); Issue.record("unaligned length accepted") } catch {}
        do { try b.submit(.read, offset: 100, length: 512, buffer: buffer, tag: 1); Issue.record("unaligned offset accepted") } catch {}
    }

    @Test func deviceIOErrorsBecomeEIO() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1024, readOnly: true))
        var b = try backend(device)
        let readOnly = b.readOnly
        #expect(readOnly)
        let buffer = try reserve(&b, 512)
        try b.submit(.write, offset: 0, length: 512, buffer: buffer, tag: 9)  // the device refuses writes
        do { let result = try wait(&b, for: 9); #expect(result == 5) }  // EIO
    }
}

@Suite("long discard and write-zeroes ranges", .serialized)
struct LongRangeTests {
    @Test func rangesLongerThanTheDeviceLimitRunInPieces() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 1 << 16)
        model.block.maxWriteZeroesSectors = 64
        model.block.maxDiscardSectors = 32
        let device = EmulatedDevice(model: model)
        device.writeDisk(offset: 0, [UInt8](repeating: 0xAB, count: 1 << 20))
        var b = VirtioBlockBackend(device: try BlockDevice(transport: EmulatedTransport(device: device)))
        guard let z = b.reserve(length: 0) else { Issue.record("no room"); return }
        try b.submit(.writeZeroes, offset: 512, length: 1000 * 512, buffer: z, tag: 7)   // 16 pieces of 64 sectors
        var result: Int32?
        for _ in 0..<2_000_000 where result == nil { _ = try b.poll { t, e in if t == 7 { result = e } } }
        #expect(result == 0)
        let disk = device.readDisk(offset: 0, count: 1002 * 512)
        #expect(disk[0..<512].allSatisfy { $0 == 0xAB })
        #expect(disk[512..<(1001 * 512)].allSatisfy { $0 == 0 })
        #expect(disk[(1001 * 512)...].allSatisfy { $0 == 0xAB })
        result = nil
        try b.submit(.trim, offset: 0, length: 200 * 512, buffer: z, tag: 8)            // 7 pieces of 32 sectors
        for _ in 0..<2_000_000 where result == nil { _ = try b.poll { t, e in if t == 8 { result = e } } }
        #expect(result == 0)
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
