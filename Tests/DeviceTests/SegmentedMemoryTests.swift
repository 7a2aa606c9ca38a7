import Testing
import Foundation
import Glibc
import Virtio
import VirtioDevices
import VirtioEmulator

/// DMA memory the device sees in pieces, as without an IOMMU (VFIO no-IOMMU mode: physical
/// addresses, contiguous only within each hugepage). The emulator puts each segment at its own bus
/// address, reversed and with gaps, and refuses any access across one; every device then runs
/// on it as on one range.
@Suite("DMA memory in segments (no IOMMU)", .serialized)
struct SegmentedMemoryTests {
    static let segment = 1 << 21

    func model(_ base: EmulatedDevice.Model, memory: Int = 16 << 20) -> EmulatedDevice.Model {
        var m = base
        m.memorySize = memory
        m.memorySegmentSize = Self.segment
        return m
    }

    /// The arena over segmented memory: no piece crosses a segment, an array keeps each element in
    /// one, an element that cannot be contiguous is refused by name, and device addresses map
    /// back to the right bytes.
    @Test func theArenaKeepsEveryPieceInsideOneSegment() throws {
        let count = 4, size = count * Self.segment
        let block = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { block.deallocate() }
        let table = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
        defer { table.deallocate() }
        for i in 0..<count { table[i] = 0x1_0000_0000 + UInt64((count - 1 - i) * 3 * Self.segment) }
        let arena = DMAArena(memory: DMASlice(pointer: block, size: size,
                                              segments: DMASegments(addresses: table, count: count, shift: 21)))
        func segmentOf(_ slice: DMASlice, _ offset: Int) -> Int { (slice.pointer + offset - block) / Self.segment }

        for bytes in [100, 4096, 1 << 20, 1 << 20, 3000, 1 << 21] {
            let piece = try arena.allocate(bytes, alignment: 64, zeroed: false)
            #expect(segmentOf(piece, 0) == segmentOf(piece, bytes - 1), "\(bytes) bytes cross a segment")
            #expect(piece.deviceAddress == table[segmentOf(piece, 0)] + UInt64((piece.pointer - block) % Self.segment))
            #expect(arena.pointer(deviceAddress: piece.deviceAddress(at: bytes - 1), length: 1) == piece.pointer + bytes - 1)
        }
        arena.reset()
        #expect(arena.elementStride(1536) == 2048 && arena.elementStride(4096) == 4096 && arena.elementStride(1) == 1)
        let stride = arena.elementStride(12 * 1024)
        _ = try arena.allocate(100, zeroed: false)
        let array = try arena.allocate(300 * stride, alignment: 4096, element: stride, zeroed: false)
        for i in 0..<300 {
            #expect(segmentOf(array, i * stride) == segmentOf(array, i * stride + stride - 1))
            #expect(arena.pointer(deviceAddress: array.deviceAddress(at: i * stride), length: stride) == array.pointer + i * stride)
        }
        #expect(throws: VirtioError.notContiguous(requested: 4 << 20, segment: Self.segment)) {
            _ = try arena.allocate(8 << 20, element: 4 << 20, zeroed: false)
        }
        // An address in a gap between segments, or a range across a segment's end, is not ours.
        #expect(arena.pointer(deviceAddress: table[0] + UInt64(Self.segment), length: 1) == nil)
        #expect(arena.pointer(deviceAddress: table[0] + UInt64(Self.segment) - 8, length: 16) == nil)
    }

    @Test func entropyReadsOnSegmentedMemory() throws {
        let device = EmulatedDevice(model: model(.rng(seed: 11), memory: 4 << 20))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), mode: .poll, bufferSize: 3000)
        var bytes: [UInt8] = []
        try rng.read(200_000) { bytes.append(contentsOf: $0) }
        #expect(bytes.count == 200_000 && Set(bytes).count > 200)
        _ = try rng.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    /// Writes and reads with the slots of every segment in use (a queue of 256 slots of 128 KiB
    /// spans 16 segments of 2 MiB; 12 MiB in flight at once use half of them): each byte comes back, and the disk holds it.
    @Test(arguments: [true, false])
    func blockRoundTripsOnSegmentedMemory(indirect: Bool) throws {
        var m = model(.blk(capacitySectors: 65536), memory: 48 << 20)
        if !indirect { m.offeredFeatures.remove(.ringIndirectDesc) }
        let device = EmulatedDevice(model: m)
        var blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: .poll, maxTransfer: 96 * 1024)
        let data = (0..<(12 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ $0 >> 12) }
        try data.withUnsafeBytes { try blk.write(sector: 8, from: $0) }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 8, into: $0) }
        #expect(back == data)
        #expect(device.readDisk(offset: 8 * 512 + (5 << 20), count: 4096) == Array(data[(5 << 20)..<(5 << 20) + 4096]))
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func netFramesBothWaysOnSegmentedMemory() throws {
        let device = EmulatedDevice(model: model(.net(features: [NetFeature.mac, NetFeature.status]), memory: 8 << 20))
        var net = try NetDevice(transport: EmulatedTransport(device: device))
        let frames = (0..<300).map { NetFixture.frame(60 + $0 * 4, sequence: UInt32($0)) }
        for f in frames {
            while try !f.withUnsafeBytes({ try net.transmit(frame: $0) }) { _ = try net.reclaimTransmitted() }
            _ = try net.reclaimTransmitted()
        }
        #expect(NetFixture.transmitted(device, count: frames.count).map(\.frame) == frames)
        for f in frames.prefix(200) { #expect(device.injectFrame(f)) }
        let received = try NetFixture.receive(&net, count: 200)
        #expect(received.map(\.frame) == Array(frames.prefix(200)))
        _ = try net.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
