import Testing
@testable import VFIO

@Suite("IOVA allocation")
struct IOVAAllocatorTests {
    let qemuRanges: [IOMMUInfo.Range] = [.init(start: 0, end: 0xFEDF_FFFF), .init(start: 0xFEF0_0000, end: 0x7F_FFFF_FFFF)]

    @Test func startsAboveTheFloorAndAligns() throws {
        var a = IOVAAllocator(ranges: qemuRanges)
        #expect(try a.allocate(1) == 0x10_0000)
        #expect(try a.allocate(4097) == 0x10_1000)
        #expect(try a.allocate(4096) == 0x10_3000)
    }

    @Test func neverCrossesAReservedHole() throws {
        var a = IOVAAllocator(ranges: [.init(start: 0x10_0000, end: 0x10_3FFF), .init(start: 0x20_0000, end: 0x2F_FFFF)])
        #expect(try a.allocate(0x3000) == 0x10_0000)
        // 0x2000 bytes no longer fit in the first range's last page: the next range is used.
        #expect(try a.allocate(0x2000) == 0x20_0000)
        #expect(try a.allocate(0x1000) == 0x10_3000)
    }

    @Test func reportsExhaustion() throws {
        var a = IOVAAllocator(ranges: [.init(start: 0x10_0000, end: 0x10_1FFF)])
        _ = try a.allocate(0x2000)
        #expect(throws: VFIOError.self) { try a.allocate(1) }
        var b = IOVAAllocator(ranges: qemuRanges)
        #expect(throws: VFIOError.self) { try b.allocate(0) }
    }

    @Test func releasedRangesCoalesceAndAreReused() throws {
        var a = IOVAAllocator(ranges: [.init(start: 0x10_0000, end: 0x10_3FFF)])
        let x = try a.allocate(0x1000), y = try a.allocate(0x1000), z = try a.allocate(0x2000)
        #expect(throws: VFIOError.self) { try a.allocate(0x1000) }
        a.release(y, size: 0x1000)
        a.release(x, size: 0x1000)
        a.release(z, size: 0x2000)
        #expect(a.free.count == 1)
        #expect(try a.allocate(0x4000) == 0x10_0000)
    }

    @Test func honoursALargerIOMMUPage() throws {
        var a = IOVAAllocator(ranges: qemuRanges, alignment: 0x20_0000)
        #expect(try a.allocate(4096) == 0x20_0000)
        #expect(try a.allocate(4096) == 0x40_0000)
    }

    @Test func rangesBelowTheFloorAreDropped() {
        let a = IOVAAllocator(ranges: [.init(start: 0, end: 0xF_FFFF)])
        #expect(a.free.isEmpty)
    }
}
