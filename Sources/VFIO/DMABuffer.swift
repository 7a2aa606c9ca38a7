import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Device-visible memory: a memfd (so it can be handed to the next driver version), mapped into
/// this process and into the IOMMU at `iova`. One owner; returned with `VFIOSession.free(_:)`.
///
/// Dropping a buffer without `free` unmaps it from this process but leaves its IOMMU mapping and
/// IOVA range in place until the container closes (the pages stay pinned, so the device can never
/// reach freed memory); `free` is the way to give them back early.
///
/// Without an IOMMU (VFIO no-IOMMU mode) the memory is 2 MiB hugepages and the device uses their
/// physical addresses: `pageAddresses` holds one per hugepage (`pageShift`), `iova` is the first.
public struct DMABuffer: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let size: Int
    public let iova: UInt64
    public let memfd: OwnedFD
    /// The physical address of each hugepage, without an IOMMU; nil behind one (one IOVA range).
    public let pageAddresses: UnsafeMutablePointer<UInt64>?
    public let pageCount: Int
    public let pageShift: Int

    init(base: UnsafeMutableRawPointer, size: Int, iova: UInt64, memfd: consuming OwnedFD) {
        self.base = base
        self.size = size
        self.iova = iova
        self.memfd = memfd
        self.pageAddresses = nil
        self.pageCount = 0
        self.pageShift = 0
    }

    init(base: UnsafeMutableRawPointer, size: Int, physical: [UInt64], pageShift: Int, memfd: consuming OwnedFD) {
        precondition(!physical.isEmpty && physical.count << pageShift == size, "DMA buffer: one address per hugepage")
        let table = UnsafeMutablePointer<UInt64>.allocate(capacity: physical.count)
        table.initialize(from: physical, count: physical.count)
        self.base = base
        self.size = size
        self.iova = physical[0]
        self.memfd = memfd
        self.pageAddresses = table
        self.pageCount = physical.count
        self.pageShift = pageShift
    }

    /// The device address of byte `offset` of this buffer.
    public func deviceAddress(_ offset: Int) -> UInt64 {
        precondition(offset >= 0 && offset <= size, "offset \(offset) outside a \(size)-byte DMA buffer")
        guard let pageAddresses else { return iova + UInt64(offset) }
        precondition(offset < size, "the end of a buffer in hugepages is no device address")
        return pageAddresses[offset >> pageShift] + UInt64(offset & ((1 << pageShift) - 1))
    }

    deinit {
        Syscall.munmap(base, size)
        pageAddresses?.deallocate()
    }
}

/// Hugepages for DMA without an IOMMU: 2 MiB each, physically contiguous, never moved.
public enum HugePages {
    public static let shift = 21
    public static let size = 1 << shift
    /// memfd_create flags: MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB (linux/memfd.h).
    static let memfdFlags: UInt32 = 0x1 | 0x4 | (21 << 26)
    static let sysfs = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"

    /// What to tell a user who has too few: how many are free and how to reserve more.
    static func shortage(_ needed: Int) -> String {
        var free = "an unknown number"
        var bytes = [UInt8](repeating: 0, count: 32)
        if case .success(let raw) = Syscall.open(sysfs, O_RDONLY | O_CLOEXEC) {
            let fd = OwnedFD(adopting: raw)
            let descriptor = fd.raw
            if case .success(let n) = bytes.withUnsafeMutableBytes({ Syscall.pread(descriptor, $0, 0) }) {
                free = String(decoding: bytes.prefix(n), as: UTF8.self).trimmingWhitespace
            }
        }
        return "\(needed) free 2 MiB hugepages are needed for DMA memory without an IOMMU and \(free) are free; "
            + "reserve more with 'echo N > /proc/sys/vm/nr_hugepages' (or hugepages=N on the kernel command line)"
    }
}

extension String {
    fileprivate var trimmingWhitespace: String {
        String(self.drop(while: { $0 == " " || $0 == "\n" }).reversed().drop(while: { $0 == " " || $0 == "\n" }).reversed())
    }
}

extension VFIOSession {
    /// Allocates `size` bytes (rounded up to the IOMMU page) of zeroed device-visible memory.
    /// Without an IOMMU: hugepages, by physical address (`allocateHugePageDMA`).
    public mutating func allocateDMA(size: Int, name: String = "virtio-vfio-dma") throws(VFIOError) -> DMABuffer {
        guard size > 0 else { throw .dma("DMA buffer of \(size) bytes", errno: EINVAL) }
        guard let iommu else { return try Self.allocateHugePageDMA(size: size, name: name) }
        let page = Int(iommu.minimumPageSize)
        let rounded = (size + page - 1) / page * page
        let fd: OwnedFD
        switch Syscall.memfdCreate(name, 0) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e): throw .dma("memfd_create for \(rounded) bytes of DMA memory", errno: e.rawValue)
        }
        if case .failure(let e) = Syscall.ftruncate(fd.raw, rounded) {
            throw .dma("sizing DMA memfd to \(rounded) bytes", errno: e.rawValue)
        }
        let base: UnsafeMutableRawPointer
        switch Syscall.mmap(length: rounded, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: fd.raw, offset: 0) {
        case .success(let p): base = p
        case .failure(let e): throw .dma("mmap of \(rounded) bytes of DMA memory", errno: e.rawValue)
        }
        let iova: UInt64
        do throws(VFIOError) {
            iova = try iovaAllocator.allocate(UInt64(rounded))
            do throws(VFIOError) { try container.mapDMA(vaddr: base, iova: iova, size: UInt64(rounded)) } catch {
                iovaAllocator.release(iova, size: UInt64(rounded))
                throw error
            }
        } catch {
            Syscall.munmap(base, rounded)
            throw error
        }
        return DMABuffer(base: base, size: rounded, iova: iova, memfd: fd)
    }

    /// Maps DMA memory a predecessor handed over: `memfd` is already mapped in the container at
    /// `iova` (its pages pinned there), so only this process's view is created. The memfd must be
    /// at least `size` bytes, and the range must have been reserved in `iovaAllocator`
    /// (`init(adoptingContainer:...)`).
    ///
    /// Without an IOMMU (`noIOMMU`) the memfd holds hugepages: their physical addresses are read
    /// again from /proc/self/pagemap, and the first must be the `iova` the predecessor gave the
    /// device (the same pages, so the same addresses).
    public static func adoptDMA(memfd: consuming OwnedFD, iova: UInt64, size: Int, noIOMMU: Bool = false) throws(VFIOError) -> DMABuffer {
        let actual: Int
        switch Syscall.fileSize(memfd.raw) {
        case .success(let n): actual = n
        case .failure(let e): throw .dma("fstat of the handed-over DMA memfd", errno: e.rawValue)
        }
        guard size > 0, actual >= size else {
            throw .handover("the DMA memfd holds \(actual) bytes, the record says \(size)")
        }
        let base: UnsafeMutableRawPointer
        // Without an IOMMU, MAP_POPULATE maps every (already resident) hugepage now, so pagemap
        // shows its physical address below.
        let flags = noIOMMU ? MAP_SHARED | MAP_POPULATE : MAP_SHARED
        switch Syscall.mmap(length: size, protection: PROT_READ | PROT_WRITE, flags: flags, fd: memfd.raw, offset: 0) {
        case .success(let p): base = p
        case .failure(let e): throw .dma("mmap of \(size) bytes of handed-over DMA memory", errno: e.rawValue)
        }
        guard noIOMMU else { return DMABuffer(base: base, size: size, iova: iova, memfd: memfd) }
        let physical: [UInt64]
        do throws(VFIOError) {
            guard size % HugePages.size == 0 else {
                throw .handover("the handed-over DMA memory of \(size) bytes is not whole 2 MiB hugepages")
            }
            physical = try PageMap.physicalAddresses(of: base, size: size, chunk: HugePages.size)
            guard physical[0] == iova else {
                throw .handover("the handed-over DMA memory starts at physical 0x\(String(physical[0], radix: 16)), "
                                + "the record says 0x\(String(iova, radix: 16))")
            }
        } catch {
            Syscall.munmap(base, size)
            throw error
        }
        return DMABuffer(base: base, size: size, physical: physical, pageShift: HugePages.shift, memfd: memfd)
    }

    /// `size` bytes (rounded up to 2 MiB) of zeroed hugepages in a memfd, mapped and faulted in,
    /// with the physical address of each page from /proc/self/pagemap: DMA memory for a device
    /// without an IOMMU. Hugetlb pages stay where they are while mapped (never migrated or
    /// swapped), so the addresses hold for the buffer's life and for a successor's mapping.
    static func allocateHugePageDMA(size: Int, name: String) throws(VFIOError) -> DMABuffer {
        let rounded = (size + HugePages.size - 1) / HugePages.size * HugePages.size
        let pages = rounded / HugePages.size
        let fd: OwnedFD
        switch Syscall.memfdCreate(name, HugePages.memfdFlags) {
        case .success(let raw): fd = OwnedFD(adopting: raw)
        case .failure(let e) where e.rawValue == EINVAL:
            throw .unavailable("this kernel has no 2 MiB hugetlb memory (memfd_create with MFD_HUGETLB failed), "
                               + "which DMA without an IOMMU needs")
        case .failure(let e): throw .dma("memfd_create of hugepages for \(rounded) bytes of DMA memory", errno: e.rawValue)
        }
        if case .failure(let e) = Syscall.ftruncate(fd.raw, rounded) {
            throw e.rawValue == ENOMEM || e.rawValue == ENOSPC ? .unavailable(HugePages.shortage(pages))
                : .dma("sizing the hugepage memfd to \(rounded) bytes", errno: e.rawValue)
        }
        // MAP_POPULATE faults every page in now: a shortage shows here, not as SIGBUS later.
        let base: UnsafeMutableRawPointer
        switch Syscall.mmap(length: rounded, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED | MAP_POPULATE, fd: fd.raw, offset: 0) {
        case .success(let p): base = p
        case .failure(let e) where e.rawValue == ENOMEM: throw .unavailable(HugePages.shortage(pages))
        case .failure(let e): throw .dma("mmap of \(rounded) bytes of hugepages", errno: e.rawValue)
        }
        base.initializeMemory(as: UInt8.self, repeating: 0, count: rounded)
        let physical: [UInt64]
        do throws(VFIOError) {
            physical = try PageMap.physicalAddresses(of: base, size: rounded, chunk: HugePages.size)
        } catch {
            Syscall.munmap(base, rounded)
            throw error
        }
        return DMABuffer(base: base, size: rounded, physical: physical, pageShift: HugePages.shift, memfd: fd)
    }

    /// Removes the IOMMU mapping of `buffer`, returns its IOVA range and frees its memory.
    /// Only call this once the device can no longer use the buffer (after a reset, §2.4).
    public mutating func free(_ buffer: consuming DMABuffer) throws(VFIOError) {
        guard iommu != nil else { return }  // no IOMMU mapping: the memory goes with the buffer
        let iova = buffer.iova, size = UInt64(buffer.size)
        try container.unmapDMA(iova: iova, size: size)
        iovaAllocator.release(iova, size: size)
    }
}
