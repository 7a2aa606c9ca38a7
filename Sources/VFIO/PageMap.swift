import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Physical addresses of this process's memory, from `/proc/self/pagemap`
/// (Documentation/admin-guide/mm/pagemap.rst): one little-endian 64-bit entry per virtual page of
/// `sysconf(_SC_PAGESIZE)` bytes; bit 63 says the page is present, bits 0-54 hold its page frame
/// number, which the kernel shows only to CAP_SYS_ADMIN (0 otherwise).
///
/// Without an IOMMU (VFIO no-IOMMU mode) the device uses these addresses, so they are read once
/// for memory that cannot move (hugetlb pages, which are never migrated or swapped while mapped).
public enum PageMap {
    static let present: UInt64 = 1 << 63
    static let frameMask: UInt64 = (1 << 55) - 1

    /// The physical address of the page an entry describes, or why it cannot be used.
    public static func physicalAddress(entry: UInt64, pageSize: Int) throws(VFIOError) -> UInt64 {
        guard entry & present != 0 else {
            throw .dma("/proc/self/pagemap: the page is not present (not faulted in)", errno: EFAULT)
        }
        let frame = entry & frameMask
        guard frame != 0 else {
            throw .unavailable("/proc/self/pagemap shows no physical addresses to this process: reading them needs "
                               + "CAP_SYS_ADMIN (run as root), and without an IOMMU the device needs them")
        }
        return frame * UInt64(pageSize)
    }

    /// The physical address of each `chunk`-byte piece of `[base, base + size)` (`chunk` a multiple
    /// of the page size, `base` aligned to it), checking that each piece is physically contiguous.
    public static func physicalAddresses(of base: UnsafeRawPointer, size: Int, chunk: Int,
                                         path: String = "/proc/self/pagemap") throws(VFIOError) -> [UInt64] {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        precondition(chunk % page == 0 && Int(bitPattern: base) % chunk == 0 && size % chunk == 0, "pagemap: unaligned range")
        let fd: OwnedFD
        switch Syscall.open(path, O_RDONLY | O_CLOEXEC) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw .open(path: path, errno: e.rawValue)
        }
        let pagesPerChunk = chunk / page
        var entries = [UInt64](repeating: 0, count: pagesPerChunk)
        var addresses: [UInt64] = []
        addresses.reserveCapacity(size / chunk)
        for c in 0..<(size / chunk) {
            let firstPage = UInt64((Int(bitPattern: base) + c * chunk) / page)
            let bytes = pagesPerChunk * 8
            let raw = fd.raw
            let read = entries.withUnsafeMutableBytes { Syscall.pread(raw, $0, firstPage * 8) }
            switch read {
            case .success(let n) where n == bytes: break
            case .success(let n): throw .dma("\(path): \(n) of \(bytes) bytes read", errno: EIO)
            case .failure(let e): throw .dma("reading \(path)", errno: e.rawValue)
            }
            let first = try physicalAddress(entry: UInt64(littleEndian: entries[0]), pageSize: page)
            for i in 1..<max(pagesPerChunk, 1) {
                guard try physicalAddress(entry: UInt64(littleEndian: entries[i]), pageSize: page) == first + UInt64(i * page) else {
                    throw .dma("\(path): page \(i) of the \(chunk)-byte piece at 0x\(String(first, radix: 16)) is not physically "
                               + "contiguous with it (not a hugepage?)", errno: EINVAL)
                }
            }
            addresses.append(first)
        }
        return addresses
    }
}
