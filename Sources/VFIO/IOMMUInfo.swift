/// What `VFIO_IOMMU_GET_INFO` reports for a type1 container: supported page sizes and the IOVA
/// ranges devices may use (from the IOVA-range capability; the whole 64-bit space if absent).
public struct IOMMUInfo: Sendable, Equatable {
    /// An inclusive IOVA range, as the kernel reports it.
    public struct Range: Sendable, Equatable {
        public var start: UInt64
        public var end: UInt64
        public init(start: UInt64, end: UInt64) { self.start = start; self.end = end }
    }

    /// Bitmap of supported IOMMU page sizes.
    public var pageSizes: UInt64
    public var iovaRanges: [Range]
    /// How many more DMA mappings the container allows, if the kernel says (DMA_AVAIL capability).
    public var dmaMappingsAvailable: UInt32?

    /// The smallest supported page size (4096 if the kernel reports none).
    public var minimumPageSize: UInt64 {
        pageSizes == 0 ? 4096 : UInt64(1) << UInt64(pageSizes.trailingZeroBitCount)
    }

    // Layout of struct vfio_iommu_type1_info and its capability chain (linux/vfio.h).
    static let flagPageSizes: UInt32 = 1 << 0, flagCaps: UInt32 = 1 << 1
    static let capIOVARange: UInt16 = 1, capDMAAvailable: UInt16 = 3
    static let headerSize = 24, capHeaderSize = 8, maxCaps = 64

    /// Parses the raw ioctl buffer. The kernel is trusted less than usual here only in that every
    /// offset is bounds-checked and the capability chain length is bounded.
    public init(parsing buffer: [UInt8]) throws(VFIOError) {
        func u16(_ o: Int) throws(VFIOError) -> UInt16 {
            guard o >= 0, o + 2 <= buffer.count else { throw .region("VFIO_IOMMU_GET_INFO: capability chain points past the buffer") }
            return UInt16(buffer[o]) | UInt16(buffer[o + 1]) << 8
        }
        func u32(_ o: Int) throws(VFIOError) -> UInt32 {
            guard o >= 0, o + 4 <= buffer.count else { throw .region("VFIO_IOMMU_GET_INFO: capability chain points past the buffer") }
            return (0..<4).reduce(UInt32(0)) { $0 | UInt32(buffer[o + $1]) << (8 * $1) }
        }
        func u64(_ o: Int) throws(VFIOError) -> UInt64 { UInt64(try u32(o)) | UInt64(try u32(o + 4)) << 32 }

        guard buffer.count >= 16 else { throw .region("VFIO_IOMMU_GET_INFO returned \(buffer.count) bytes") }
        let flags = try u32(4)
        pageSizes = flags & IOMMUInfo.flagPageSizes != 0 ? try u64(8) : 0
        iovaRanges = []
        dmaMappingsAvailable = nil
        guard flags & IOMMUInfo.flagCaps != 0, buffer.count >= IOMMUInfo.headerSize else {
            iovaRanges = [Range(start: 0, end: UInt64.max)]
            return
        }
        var next = Int(try u32(16))
        var seen = 0
        while next != 0 {
            guard seen < IOMMUInfo.maxCaps, next >= IOMMUInfo.headerSize else {
                throw .region("VFIO_IOMMU_GET_INFO: malformed capability chain at offset \(next)")
            }
            seen += 1
            let id = try u16(next)
            let following = Int(try u32(next + 4))
            switch id {
            case IOMMUInfo.capIOVARange:
                let count = Int(try u32(next + IOMMUInfo.capHeaderSize))
                guard count <= (buffer.count - next) / 16 else {
                    throw .region("VFIO_IOMMU_GET_INFO: \(count) IOVA ranges do not fit the buffer")
                }
                for i in 0..<count {
                    let at = next + IOMMUInfo.capHeaderSize + 8 + i * 16
                    let range = Range(start: try u64(at), end: try u64(at + 8))
                    guard range.start <= range.end else {
                        throw .region("VFIO_IOMMU_GET_INFO: IOVA range \(i) ends before it starts")
                    }
                    iovaRanges.append(range)
                }
            case IOMMUInfo.capDMAAvailable:
                dmaMappingsAvailable = try u32(next + IOMMUInfo.capHeaderSize)
            default:
                break
            }
            next = following
        }
        if iovaRanges.isEmpty { iovaRanges = [Range(start: 0, end: UInt64.max)] }
        iovaRanges.sort { $0.start < $1.start }
    }
}
