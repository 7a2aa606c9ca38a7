import NBD
import Services
import Testing
import UBlk
import VirtioDevices

/// Every ublk request the kernel can hand over, mapped to what the backend does, and every
/// descriptor that does not fit the export answered without touching the device.
@Suite("ublk request mapping")
struct UBlkRequestMappingTests {
    static let export = UBlkRequestMapping.Export(sectors: 2048, bufferBytes: 131072, readOnly: false,
                                                  canFlush: true, canTrim: true, canWriteZeroes: true)

    func d(_ op: UInt8, _ sectors: UInt32, _ start: UInt64, flags: UInt32 = 0) -> UBlkABI.IODescriptor {
        UBlkABI.IODescriptor(operationFlags: UInt32(op) | flags, sectors: sectors, startSector: start, address: 0)
    }

    @Test func readsAndWritesAreCommittedWithEveryByte() {
        #expect(UBlkRequestMapping.map(d(0, 8, 16), Self.export) == .submit(.read, offset: 8192, length: 4096, answer: 4096))
        #expect(UBlkRequestMapping.map(d(1, 256, 0), Self.export) == .submit(.write, offset: 0, length: 131072, answer: 131072))
        #expect(UBlkRequestMapping.map(d(1, 1, 2047, flags: UBlkABI.RequestFlag.fua), Self.export)
                == .submit(.writeFUA, offset: 2047 * 512, length: 512, answer: 512))
    }

    @Test func flushDiscardAndWriteZeroes() {
        #expect(UBlkRequestMapping.map(d(2, 0, 0), Self.export) == .submit(.flush, offset: 0, length: 0, answer: 0))
        #expect(UBlkRequestMapping.map(d(3, 1024, 1024), Self.export) == .submit(.trim, offset: 1024 * 512, length: 1024 * 512, answer: 0))
        #expect(UBlkRequestMapping.map(d(5, 2048, 0, flags: UBlkABI.RequestFlag.noUnmap), Self.export)
                == .submit(.writeZeroes, offset: 0, length: 2048 * 512, answer: 0))
        var writeThrough = Self.export
        writeThrough.canFlush = false
        writeThrough.canTrim = false
        writeThrough.canWriteZeroes = false
        #expect(UBlkRequestMapping.map(d(2, 0, 0), writeThrough) == .answer(0))
        #expect(UBlkRequestMapping.map(d(3, 8, 0), writeThrough) == .answer(-95))  // EOPNOTSUPP
        #expect(UBlkRequestMapping.map(d(5, 8, 0), writeThrough) == .answer(-95))
    }

    @Test func descriptorsThatDoNotFitTheExportAreRefused() {
        #expect(UBlkRequestMapping.map(d(0, 0, 0), Self.export) == .answer(-22))  // no sectors
        #expect(UBlkRequestMapping.map(d(0, 257, 0), Self.export) == .answer(-22))  // past the tag's buffer
        #expect(UBlkRequestMapping.map(d(1, 8, 2044), Self.export) == .answer(-5))  // past the end
        #expect(UBlkRequestMapping.map(d(0, 1, 2048), Self.export) == .answer(-5))
        #expect(UBlkRequestMapping.map(d(0, 8, .max), Self.export) == .answer(-5))  // start + sectors overflows
        #expect(UBlkRequestMapping.map(d(3, 8, .max - 2), Self.export) == .answer(-5))
        #expect(UBlkRequestMapping.map(d(4, 8, 0), Self.export) == .answer(-95))  // WRITE_SAME
        #expect(UBlkRequestMapping.map(d(13, 8, 0), Self.export) == .answer(-95))  // ZONE_APPEND
        var readOnly = Self.export
        readOnly.readOnly = true
        #expect(UBlkRequestMapping.map(d(1, 8, 0), readOnly) == .answer(-30))  // EROFS
        #expect(UBlkRequestMapping.map(d(3, 8, 0), readOnly) == .answer(-30))
        #expect(UBlkRequestMapping.map(d(0, 8, 0), readOnly) == .submit(.read, offset: 0, length: 4096, answer: 4096))
    }

    @Test func parametersFollowTheVirtioConfig() {
        var config = BlockConfig(capacitySectors: 2048, blockSize: 4096, maxDiscardSectors: 4096)
        let p = UBlkSetup.parameters(config, maxIOBytes: 131072)
        #expect(p.deviceSectors == 2048 && p.maxSectors == 256 && p.logicalBlockShift == 12 && p.physicalBlockShift == 12)
        #expect(p.attributes == UBlkABI.Attribute.volatileCache | UBlkABI.Attribute.fua)
        #expect(p.discard?.maxDiscardSectors == 4096 && p.discard?.maxWriteZeroesSectors == 0 && p.discard?.granularity == 4096)
        config.readOnly = true
        config.flush = false
        config.maxDiscardSectors = nil
        config.maxWriteZeroesSectors = nil
        let q = UBlkSetup.parameters(config, maxIOBytes: 65536)
        #expect(q.attributes == UBlkABI.Attribute.readOnly && q.discard == nil && q.maxSectors == 128)
    }
}
