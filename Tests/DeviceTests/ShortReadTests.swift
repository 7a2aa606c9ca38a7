import Testing
import Foundation
import NBD
import Services
import Virtio
import VirtioDevices
import VirtioEmulator

/// A READ the device reports shorter than data + status (§5.2.6) while writing status OK: the
/// driver must fail it, never hand out what the slot's buffer held before.
@Suite("short reads from virtio-blk", .serialized)
struct ShortReadTests {
    enum ShortRead: String, CaseIterable, Sendable {
        /// All data written, used length half the data + 1.
        case shortLength
        /// Only the first 1000 bytes written, used length 1001.
        case partOfTheData
        /// No data written, used length 1 (the status byte alone).
        case noData

        func apply(_ faults: inout EmulatedDevice.Faults) {
            switch self {
            case .shortLength: faults.shortReadLength = true
            case .partOfTheData: faults.shortReadDataBytes = 1000
            case .noData: faults.shortReadDataBytes = 0
            }
        }
    }

    func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ Int(seed)) } }

    @Test(arguments: ShortRead.allCases)
    func blockDeviceReadFailsNamingTheSector(_ fault: ShortRead) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        var blk = try BlockDevice(transport: EmulatedTransport(device: device))
        // The slots' buffers hold `old` after this read; the disk then holds `new`.
        let old = pattern(300 * 1024, seed: 1), new = pattern(300 * 1024, seed: 2)
        try old.withUnsafeBytes { try blk.write(sector: 40, from: $0) }
        var back = [UInt8](repeating: 0, count: old.count)
        try back.withUnsafeMutableBytes { try blk.read(sector: 40, into: $0) }
        #expect(back == old)
        device.writeDisk(offset: 40 * 512, new)
        var faults = EmulatedDevice.Faults()
        fault.apply(&faults)
        device.faults = faults

        var destination = [UInt8](repeating: 0xEE, count: old.count)
        #expect(throws: BlockError.ioError(type: "read", sector: 40)) {
            try destination.withUnsafeMutableBytes { try blk.read(sector: 40, into: $0) }
        }
        // Nothing was copied out: neither the slot's stale bytes nor the part the device wrote.
        #expect(destination.allSatisfy { $0 == 0xEE })
        // A later chunk of the same read fails by its own sector.
        var one = [UInt8](repeating: 0xEE, count: 4096)
        #expect(throws: BlockError.ioError(type: "read", sector: 296)) {
            try one.withUnsafeMutableBytes { try blk.read(sector: 296, into: $0) }
        }
        #expect(one.allSatisfy { $0 == 0xEE })

        device.faults = .init()
        try destination.withUnsafeMutableBytes { try blk.read(sector: 40, into: $0) }
        #expect(destination == new)
        _ = try blk.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test(arguments: ShortRead.allCases)
    func theNBDClientGetsEIONotData(_ fault: ShortRead) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 8192))
        let disk = pattern(256 * 1024, seed: 7)
        device.writeDisk(offset: 0, disk)
        let backend = VirtioBlockBackend(device: try BlockDevice(transport: EmulatedTransport(device: device)))
        // First a good read (the slots now hold the disk's bytes), then the fault, a read of the
        // same range and of another, then the fault cleared and a read again.
        let (record, statistics, _, _) = try serveExport(backend, batches: [
            [.read(cookie: 1, offset: 0, length: 128 * 1024)],
            [.read(cookie: 2, offset: 0, length: 128 * 1024), .read(cookie: 3, offset: 128 * 1024, length: 4096)],
            [.read(cookie: 4, offset: 4096, length: 8192)],
        ], before: { batch in
            var faults = EmulatedDevice.Faults()
            if batch == 1 { fault.apply(&faults) }
            device.faults = faults
        })
        #expect(record.failure == nil, "\(record.failure ?? "")")
        #expect(record.replies[1]?.error == 0 && record.replies[1]?.data == Array(disk[0..<(128 * 1024)]))
        #expect(record.replies[2]?.error == NBDProtocol.Error.eio && record.replies[2]?.data == [])
        #expect(record.replies[3]?.error == NBDProtocol.Error.eio && record.replies[3]?.data == [])
        #expect(record.replies[4]?.error == 0 && record.replies[4]?.data == Array(disk[4096..<(3 * 4096)]))
        #expect(statistics.errorReplies == 2)
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}

/// A device with 4096-byte logical blocks (QEMU's logical_block_size=4096): the export says so
/// (NBD minimum block size) and refuses I/O that is not aligned to it before the device sees it.
@Suite("the NBD export of a virtio-blk with 4 KiB logical blocks", .serialized)
struct LogicalBlockExportTests {
    @Test func misalignedRequestsAreEINVALAndNeverReachTheDevice() throws {
        var model = EmulatedDevice.Model.blk(capacitySectors: 8192)
        model.block.blockSize = 4096
        let device = EmulatedDevice(model: model)
        let disk = (0..<(64 * 1024)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        device.writeDisk(offset: 0, disk)
        let backend = VirtioBlockBackend(device: try BlockDevice(transport: EmulatedTransport(device: device)))
        #expect(backend.minimumBlockSize == 4096 && backend.preferredBlockSize == 4096)
        let junk = [UInt8](repeating: 0xAB, count: 512)
        let (record, _, _, _) = try serveExport(backend, batches: [
            [.read(cookie: 1, offset: 512, length: 512), .write(cookie: 2, offset: 4096, data: junk, fua: false),
             .read(cookie: 3, offset: 8192, length: 4096)],
        ])
        #expect(record.failure == nil, "\(record.failure ?? "")")
        #expect(record.replies[1]?.error == NBDProtocol.Error.einval)
        #expect(record.replies[2]?.error == NBDProtocol.Error.einval)
        #expect(record.replies[3]?.error == 0 && record.replies[3]?.data == Array(disk[8192..<(3 * 4096)]))
        #expect(device.readDisk(offset: 4096, count: 512) == Array(disk[4096..<4608]), "the refused write reached the disk")
        #expect(device.violations.isEmpty, "\(device.violations)")
    }
}
