import Testing
import Virtio
import VirtioEmulator

/// A virtio-blk request laid out in device memory (spec 5.2.6).
struct BlockIO {
    let header: DMASlice
    let status: DMASlice

    init(_ r: Rig, type: UInt32, sector: UInt64) throws {
        header = try r.buffer(16)
        status = try r.buffer(1)
        header.pointer.storeBytes(of: type.littleEndian, toByteOffset: 0, as: UInt32.self)
        header.pointer.storeBytes(of: sector.littleEndian, toByteOffset: 8, as: UInt64.self)
        status.pointer.storeBytes(of: 0xEE, as: UInt8.self)
    }

    var statusByte: UInt8 { status.pointer.load(as: UInt8.self) }
}

enum BlockType {
    static let read: UInt32 = 0, write: UInt32 = 1, flush: UInt32 = 4, getID: UInt32 = 8
    static let discard: UInt32 = 11, writeZeroes: UInt32 = 13
}

@Suite("block device (spec 5.2)")
struct BlockTests {
    static let all: Features = [Features(bit: 9), Features(bit: 13), Features(bit: 14), Features(bit: 2)]

    /// Submits one request and waits for it; returns (status, used len).
    func run(_ r: Rig, _ type: UInt32, sector: UInt64 = 0, out: [DMASlice] = [], in inBuffers: [DMASlice] = [])
        throws -> (status: UInt8, length: UInt32)
    {
        let io = try BlockIO(r, type: type, sector: sector)
        let before = r.ring.usedIdx
        r.ring.submit([.readable(io.header)] + out.map { .readable($0) } + inBuffers.map { .writable($0) } + [.writable(io.status)])
        #expect(r.ring.waitUsed(before &+ 1))
        return (io.statusByte, r.ring.usedElement(before).length)
    }

    func pattern(_ count: Int, _ seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ seed } }

    @Test func writesThenReadsBackTheSameBytes() throws {
        let r = try Rig(.blk(capacitySectors: 2048), wanted: BlockTests.all)
        let data = try r.buffer(4096)
        let written = pattern(4096, 0x5A)
        fill(data, written)
        let w = try run(r, BlockType.write, sector: 10, out: [data])
        #expect(w.status == 0 && w.length == 1)
        #expect(r.device.readDisk(offset: 10 * 512, count: 4096) == written)

        // Read it back split over three descriptors of odd sizes.
        let a = try r.buffer(100), b = try r.buffer(3000), c = try r.buffer(996)
        let rd = try run(r, BlockType.read, sector: 10, in: [a, b, c])
        #expect(rd.status == 0 && rd.length == 4097)
        #expect(bytes(a) + bytes(b) + bytes(c) == written)
        #expect(r.device.violations.isEmpty)
    }

    @Test func headerAndDataInOneDescriptor() throws {
        // §2.7.4.1: the device makes no assumption about the framing.
        let r = try Rig(.blk(capacitySectors: 64))
        let request = try r.buffer(16 + 512), status = try r.buffer(1)
        request.pointer.storeBytes(of: UInt32(1).littleEndian, toByteOffset: 0, as: UInt32.self)
        request.pointer.storeBytes(of: UInt64(3).littleEndian, toByteOffset: 8, as: UInt64.self)
        fill(request.slice(16, 512), pattern(512, 1))
        r.ring.submit([.readable(request), .writable(status)])
        #expect(r.ring.waitUsed(1))
        #expect(status.pointer.load(as: UInt8.self) == 0)
        #expect(r.device.readDisk(offset: 3 * 512, count: 512) == pattern(512, 1))
    }

    @Test func flushAndGetID() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 64)
        model.block.serial = "disk-0123456789-abcdefgh"  // cut at 20 bytes
        let r = try Rig(model, wanted: BlockTests.all)
        #expect(try run(r, BlockType.flush).status == 0)
        let id = try r.buffer(20)
        let g = try run(r, BlockType.getID, in: [id])
        #expect(g.status == 0 && g.length == 21)
        #expect(bytes(id) == Array("disk-0123456789-abcd".utf8))
        #expect(r.device.violations.isEmpty)
    }

    @Test func outOfRangeIsAnIOError() throws {
        let r = try Rig(.blk(capacitySectors: 16))
        let data = try r.buffer(1024)
        #expect(try run(r, BlockType.read, sector: 15, in: [data]).status == 1)  // 2 sectors from 15
        #expect(try run(r, BlockType.write, sector: 16, out: [data]).status == 1)
        #expect(try run(r, BlockType.read, sector: UInt64.max, in: [data]).status == 1)  // no overflow
        #expect(try run(r, BlockType.read, sector: 14, in: [data]).status == 0)
        #expect(r.device.hasViolation("beyond capacity 16"))
    }

    @Test func unsupportedTypesAndUnnegotiatedCommands() throws {
        let r = try Rig(.blk(capacitySectors: 16))  // DISCARD/WRITE_ZEROES offered, not negotiated
        #expect(try run(r, 99).status == 2)
        let seg = try r.buffer(16)
        #expect(try run(r, BlockType.discard, out: [seg]).status == 2)
        #expect(try run(r, BlockType.writeZeroes, out: [seg]).status == 2)
    }

    @Test func readOnlyDeviceFailsWritesAndWritesNothing() throws {
        let r = try Rig(.blk(capacitySectors: 16, readOnly: true))
        let data = try r.buffer(512)
        fill(data, pattern(512, 9))
        #expect(try run(r, BlockType.write, sector: 0, out: [data]).status == 1)
        #expect(r.device.readDisk(offset: 0, count: 512).allSatisfy { $0 == 0 })
        #expect(try run(r, BlockType.read, sector: 0, in: [data]).status == 0)
    }

    @Test func discardAndWriteZeroesZeroTheirRanges() throws {
        let r = try Rig(.blk(capacitySectors: 64), wanted: BlockTests.all)
        r.device.writeDisk(offset: 0, Array(repeating: 0xAB, count: 64 * 512))
        func segment(_ sector: UInt64, _ count: UInt32, flags: UInt32 = 0) throws -> DMASlice {
            let s = try r.buffer(16)
            s.pointer.storeBytes(of: sector.littleEndian, toByteOffset: 0, as: UInt64.self)
            s.pointer.storeBytes(of: count.littleEndian, toByteOffset: 8, as: UInt32.self)
            s.pointer.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt32.self)
            return s
        }
        #expect(try run(r, BlockType.writeZeroes, out: [segment(3, 9, flags: 1)]).status == 0)
        let disk = r.device.readDisk(offset: 0, count: 64 * 512)
        #expect(disk[0..<(3 * 512)].allSatisfy { $0 == 0xAB })
        #expect(disk[(3 * 512)..<(12 * 512)].allSatisfy { $0 == 0 })
        #expect(disk[(12 * 512)...].allSatisfy { $0 == 0xAB })
        #expect(try run(r, BlockType.discard, out: [segment(40, 8)]).status == 0)
        #expect(try run(r, BlockType.discard, out: [segment(40, 8, flags: 1)]).status == 2)  // unmap on discard
        #expect(try run(r, BlockType.writeZeroes, out: [segment(40, 8, flags: 2)]).status == 2)  // unknown flag
        #expect(try run(r, BlockType.discard, out: [segment(60, 8)]).status == 1)  // past the end
    }

    @Test func configurationSpace() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 0x1_2345_6789, queues: 2, queueSize: 128)
        model.block.segMax = 0
        let r = try Rig(model)
        let t = r.transport
        #expect(t.readDeviceConfig(0, width: 4) == 0x2345_6789)
        #expect(t.readDeviceConfig(4, width: 4) == 0x1)
        #expect(t.readDeviceConfig(12, width: 4) == 0)       // seg_max 0, as the model says
        #expect(t.readDeviceConfig(20, width: 4) == 512)     // blk_size
        #expect(t.readDeviceConfig(34, width: 2) == 2)       // num_queues
        #expect(t.readDeviceConfig(56, width: 4) == 1)       // write_zeroes_may_unmap + unused1
        #expect(t.readDeviceConfig(60, width: 1) == nil)     // past the end
        #expect(t.readDeviceConfig(2, width: 4) == nil)      // unaligned
        #expect(r.device.hasViolation("unaligned offset 2"))
        #expect(EmulatedTransport(device: EmulatedDevice(model: .rng)).readDeviceConfig(0, width: 1) == nil)
        #expect(r.transport.readDeviceFeatures().contains(Features(bit: 12)))  // MQ
    }

    @Test func secondRequestQueue() throws {
        let r = try Rig(.blk(capacitySectors: 64, queues: 2), queue: 1)
        let data = try r.buffer(512)
        fill(data, pattern(512, 3))
        #expect(try run(r, BlockType.write, sector: 1, out: [data]).status == 0)
        #expect(r.device.readDisk(offset: 512, count: 512) == pattern(512, 3))
        #expect(r.device.statistics(queue: 1).completed == 1)
    }

    @Test func capacityZeroAndHuge() throws {
        let zero = try Rig(.blk(capacitySectors: 0))
        #expect(try run(zero, BlockType.read, sector: 0, in: [zero.buffer(512)]).status == 1)
        #expect(zero.transport.readDeviceConfig(0, width: 4) == 0)

        let huge = try Rig(.blk(capacitySectors: 1 << 50))  // storage is sparse
        let data = try huge.buffer(512)
        fill(data, pattern(512, 7))
        #expect(try run(huge, BlockType.write, sector: (1 << 50) - 1, out: [data]).status == 0)
        let back = try huge.buffer(512)
        #expect(try run(huge, BlockType.read, sector: (1 << 50) - 1, in: [back]).status == 0)
        #expect(bytes(back) == pattern(512, 7))

        let absurd = try Rig(.blk(capacitySectors: UInt64.max))  // byte offsets would overflow
        #expect(try run(absurd, BlockType.read, sector: UInt64.max - 1, in: [absurd.buffer(512)]).status == 1)
    }

    @Test func capacityChangeIsAConfigurationChange() throws {
        let r = try Rig(.blk(capacitySectors: 64))
        try r.transport.setConfigVector(1)
        let generation = r.transport.configGeneration()
        r.device.setCapacity(sectors: 128)
        #expect(r.transport.configGeneration() != generation)
        #expect(r.transport.readDeviceConfig(0, width: 4) == 128)
        #expect(r.device.waitForInterrupt(vector: 1, timeout: .seconds(5)) == 1)
        #expect(r.transport.readISR() & 2 == 2)
    }
}
