/// Hands out device addresses (IOVAs) for DMA mappings, only from the ranges the IOMMU allows,
/// aligned to the IOMMU page size. First fit over a sorted free list; freed ranges coalesce.
///
/// IOVA 0 up to `floor` is never handed out, so that a zero address in a descriptor is always a bug.
public struct IOVAAllocator: Sendable {
    /// Free ranges, half-open `[start, end)`, sorted and non-adjacent.
    public private(set) var free: [(start: UInt64, end: UInt64)]
    public let alignment: UInt64

    public static let defaultFloor: UInt64 = 0x10_0000

    public init(ranges: [IOMMUInfo.Range], alignment: UInt64 = 4096, floor: UInt64 = IOVAAllocator.defaultFloor) {
        precondition(alignment > 0 && alignment & (alignment - 1) == 0, "alignment must be a power of two")
        self.alignment = alignment
        var free: [(start: UInt64, end: UInt64)] = []
        for range in ranges.sorted(by: { $0.start < $1.start }) {
            // Inclusive kernel ranges to half-open, clipped below the floor and to whole pages.
            let start = IOVAAllocator.alignUp(max(range.start, floor), alignment)
            let endInclusive = range.end
            guard let start, endInclusive >= start else { continue }
            let end = endInclusive == UInt64.max ? UInt64.max & ~(alignment - 1)
                                                 : (endInclusive + 1) & ~(alignment - 1)
            if end > start { free.append((start, end)) }
        }
        self.free = free
    }

    /// `value` rounded up to `alignment`, or nil on overflow.
    static func alignUp(_ value: UInt64, _ alignment: UInt64) -> UInt64? {
        let (sum, overflow) = value.addingReportingOverflow(alignment - 1)
        return overflow ? nil : sum & ~(alignment - 1)
    }

    /// Allocates `size` bytes (rounded up to the alignment).
    public mutating func allocate(_ size: UInt64) throws(VFIOError) -> UInt64 {
        guard size > 0, let rounded = IOVAAllocator.alignUp(size, alignment) else {
            throw .iovaExhausted(requested: size)
        }
        for i in free.indices where free[i].end - free[i].start >= rounded {
            let start = free[i].start
            if free[i].end - free[i].start == rounded { free.remove(at: i) } else { free[i].start += rounded }
            return start
        }
        throw .iovaExhausted(requested: size)
    }

    /// Takes `[iova, iova + size)` out of the free list: a range already mapped by someone else
    /// (a predecessor's DMA memory). It must lie inside one free range and be aligned.
    public mutating func reserve(_ iova: UInt64, size: UInt64) throws(VFIOError) {
        guard size > 0, iova & (alignment - 1) == 0, let rounded = IOVAAllocator.alignUp(size, alignment),
              iova.addingReportingOverflow(rounded).overflow == false else {
            throw .handover("IOVA range 0x\(String(iova, radix: 16))+\(size) is not aligned to \(alignment) bytes")
        }
        let end = iova + rounded
        guard let i = free.firstIndex(where: { $0.start <= iova && end <= $0.end }) else {
            throw .handover("IOVA range 0x\(String(iova, radix: 16))+\(size) is outside the IOMMU's ranges or overlaps another")
        }
        let range = free.remove(at: i)
        if end < range.end { free.insert((end, range.end), at: i) }
        if range.start < iova { free.insert((range.start, iova), at: i) }
    }

    /// Returns `[iova, iova + size)` to the free list. Freeing what was not allocated is a bug.
    public mutating func release(_ iova: UInt64, size: UInt64) {
        guard let rounded = IOVAAllocator.alignUp(size, alignment) else { preconditionFailure("bad IOVA size") }
        let end = iova + rounded
        let index = free.firstIndex { $0.start >= end } ?? free.count
        precondition(index == 0 || free[index - 1].end <= iova, "IOVA range freed twice or never allocated")
        free.insert((iova, end), at: index)
        // Coalesce with the neighbours.
        if index + 1 < free.count, free[index].end == free[index + 1].start {
            free[index].end = free[index + 1].end
            free.remove(at: index + 1)
        }
        if index > 0, free[index - 1].end == free[index].start {
            free[index - 1].end = free[index].end
            free.remove(at: index)
        }
    }
}
