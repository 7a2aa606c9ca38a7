import Testing
@testable import VFIO

/// Builds VFIO_IOMMU_GET_INFO result buffers.
struct IOMMUInfoBuffer {
    var bytes = [UInt8](repeating: 0, count: 24)

    mutating func put32(_ at: Int, _ v: UInt32) {
        while bytes.count < at + 4 { bytes.append(0) }
        for i in 0..<4 { bytes[at + i] = UInt8((v >> (8 * UInt32(i))) & 0xFF) }
    }
    mutating func put64(_ at: Int, _ v: UInt64) { put32(at, UInt32(truncatingIfNeeded: v)); put32(at + 4, UInt32(v >> 32)) }

    init(flags: UInt32, pageSizes: UInt64, firstCap: UInt32) {
        put32(0, 24)
        put32(4, flags)
        put64(8, pageSizes)
        put32(16, firstCap)
    }

    mutating func iovaRanges(at: Int, next: UInt32, _ ranges: [(UInt64, UInt64)], count: UInt32? = nil) {
        put32(at, 1)  // id 1, version 0... (id is 16 bits, version 16 bits)
        put32(at + 4, next)
        put32(at + 8, count ?? UInt32(ranges.count))
        for (i, r) in ranges.enumerated() {
            put64(at + 16 + i * 16, r.0)
            put64(at + 24 + i * 16, r.1)
        }
    }

    mutating func dmaAvailable(at: Int, next: UInt32, _ available: UInt32) {
        put32(at, 3)
        put32(at + 4, next)
        put32(at + 8, available)
    }
}

@Suite("VFIO_IOMMU_GET_INFO parsing")
struct IOMMUInfoTests {
    @Test func parsesPageSizesRangesAndDMALimit() throws {
        // intel-iommu in QEMU: the interrupt range 0xfee00000-0xfeefffff is reserved.
        var b = IOMMUInfoBuffer(flags: 3, pageSizes: 0x4020_1000, firstCap: 24)
        b.iovaRanges(at: 24, next: 72, [(0, 0xFEDF_FFFF), (0xFEF0_0000, 0x7F_FFFF_FFFF)])
        b.dmaAvailable(at: 72, next: 0, 65535)
        let info = try IOMMUInfo(parsing: b.bytes)
        #expect(info.pageSizes == 0x4020_1000 && info.minimumPageSize == 4096)
        #expect(info.iovaRanges == [.init(start: 0, end: 0xFEDF_FFFF), .init(start: 0xFEF0_0000, end: 0x7F_FFFF_FFFF)])
        #expect(info.dmaMappingsAvailable == 65535)
    }

    @Test func withoutCapabilitiesTheWholeSpaceIsUsable() throws {
        let info = try IOMMUInfo(parsing: IOMMUInfoBuffer(flags: 1, pageSizes: 0x1000, firstCap: 0).bytes)
        #expect(info.iovaRanges == [.init(start: 0, end: .max)])
    }

    @Test func refusesACapabilityChainLoop() throws {
        var b = IOMMUInfoBuffer(flags: 3, pageSizes: 0x1000, firstCap: 24)
        b.dmaAvailable(at: 24, next: 24, 1)
        #expect(throws: VFIOError.self) { try IOMMUInfo(parsing: b.bytes) }
    }

    @Test func refusesARangeCountLargerThanTheBuffer() throws {
        var b = IOMMUInfoBuffer(flags: 3, pageSizes: 0x1000, firstCap: 24)
        b.iovaRanges(at: 24, next: 0, [(0, 0xFFFF)], count: 1000)
        #expect(throws: VFIOError.self) { try IOMMUInfo(parsing: b.bytes) }
    }

    @Test func refusesACapabilityPointingIntoTheHeader() throws {
        let b = IOMMUInfoBuffer(flags: 3, pageSizes: 0x1000, firstCap: 8)
        #expect(throws: VFIOError.self) { try IOMMUInfo(parsing: b.bytes) }
    }
}
