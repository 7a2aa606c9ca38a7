import Testing
import PCI
import VFIO
import Virtio
import VirtioPCI

@Suite("HIL: VFIO against a real kernel", .enabled(if: HILDevice.rng != nil, "set VIRTIO_VFIO_HIL_RNG (done by Tests/HIL)"),
       .serialized)
struct VFIODMATests {
    @Test func dmaBuffersGetAlignedIOVAsInsideTheReportedRanges() throws {
        var transport = try VirtioPCITransport(address: HILDevice.rng!)
        let found = transport.session.iommu
        let iommu = try #require(found, "the HIL guest's devices are behind an IOMMU")
        let ranges = iommu.iovaRanges
        let page = iommu.minimumPageSize
        let a = try transport.allocateDMA(size: 2 << 20)
        let b = try transport.allocateDMA(size: 4096)
        let c = try transport.allocateDMA(size: 1)
        let placed: [(iova: UInt64, size: Int)] = [(a.iova, a.size), (b.iova, b.size), (c.iova, c.size)]
        for buffer in placed {
            let last = buffer.iova + UInt64(buffer.size) - 1
            #expect(buffer.iova % page == 0)
            #expect(ranges.contains { $0.start <= buffer.iova && last <= $0.end })
            #expect(buffer.iova >= IOVAAllocator.defaultFloor)
        }
        #expect(Set<UInt64>([a.iova, b.iova, c.iova]).count == 3)
        #expect(c.size == Int(page))
        // The memory is ours: zeroed, writable, readable.
        #expect(a.base.load(fromByteOffset: 12345, as: UInt8.self) == 0)
        a.base.storeBytes(of: 0xDEAD_BEEF, toByteOffset: 4096, as: UInt32.self)
        #expect(a.base.load(fromByteOffset: 4096, as: UInt32.self) == 0xDEAD_BEEF)
        let firstIOVA = a.iova
        try transport.free(a)
        try transport.free(b)
        try transport.free(c)
        // Freed ranges are reused: the allocator is back where it started.
        let again = try transport.allocateDMA(size: 2 << 20)
        #expect(again.iova == firstIOVA)
        try transport.free(again)
    }

    @Test func allocateAndFreeLeakNothing() throws {
        var transport = try VirtioPCITransport(address: HILDevice.rng!)
        let fds = HILDevice.openFDCount(), maps = HILDevice.mappingCount()
        for _ in 0..<200 {
            let buffer = try transport.allocateDMA(size: 64 << 10)
            try transport.free(buffer)
        }
        #expect(HILDevice.openFDCount() == fds)
        #expect(HILDevice.mappingCount() == maps)
    }

    @Test func openResetCloseLeaksNothing() throws {
        do { _ = try VirtioPCITransport(address: HILDevice.rng!) }  // warm up lazily loaded state
        let fds = HILDevice.openFDCount(), maps = HILDevice.mappingCount()
        for cycle in 0..<100 {
            let transport = try VirtioPCITransport(address: HILDevice.rng!)
            try Lifecycle.reset(transport)
            let negotiation = try Lifecycle.negotiate(transport, wanted: cycle % 2 == 0 ? [.ringEventIdx] : [])
            #expect(negotiation.accepted.contains(.ringEventIdx) == (cycle % 2 == 0))
            try Lifecycle.reset(transport)
        }
        #expect(HILDevice.openFDCount() == fds)
        #expect(HILDevice.mappingCount() == maps)
    }

    @Test func aSecondOpenOfTheSameGroupIsRefusedAsBusy() throws {
        let first = try VirtioPCITransport(address: HILDevice.rng!)
        #expect { try VirtioPCITransport(address: HILDevice.rng!) } throws: { error in
            "\(error)".contains("Device or resource busy")
        }
        _ = first.readStatus()
    }
}
