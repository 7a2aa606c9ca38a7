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
public struct DMABuffer: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let size: Int
    public let iova: UInt64
    public let memfd: OwnedFD

    init(base: UnsafeMutableRawPointer, size: Int, iova: UInt64, memfd: consuming OwnedFD) {
        self.base = base
        self.size = size
        self.iova = iova
        self.memfd = memfd
    }

    /// The device address of byte `offset` of this buffer.
    public func deviceAddress(_ offset: Int) -> UInt64 {
        precondition(offset >= 0 && offset <= size, "offset \(offset) outside a \(size)-byte DMA buffer")
        return iova + UInt64(offset)
    }

    deinit {
        Syscall.munmap(base, size)
    }
}

extension VFIOSession {
    /// Allocates `size` bytes (rounded up to the IOMMU page) of zeroed device-visible memory.
    public mutating func allocateDMA(size: Int, name: String = "virtio-vfio-dma") throws(VFIOError) -> DMABuffer {
        guard size > 0 else { throw .dma("DMA buffer of \(size) bytes", errno: EINVAL) }
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
    public static func adoptDMA(memfd: consuming OwnedFD, iova: UInt64, size: Int) throws(VFIOError) -> DMABuffer {
        let actual: Int
        switch Syscall.fileSize(memfd.raw) {
        case .success(let n): actual = n
        case .failure(let e): throw .dma("fstat of the handed-over DMA memfd", errno: e.rawValue)
        }
        guard size > 0, actual >= size else {
            throw .handover("the DMA memfd holds \(actual) bytes, the record says \(size)")
        }
        let base: UnsafeMutableRawPointer
        switch Syscall.mmap(length: size, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: memfd.raw, offset: 0) {
        case .success(let p): base = p
        case .failure(let e): throw .dma("mmap of \(size) bytes of handed-over DMA memory", errno: e.rawValue)
        }
        return DMABuffer(base: base, size: size, iova: iova, memfd: memfd)
    }

    /// Removes the IOMMU mapping of `buffer`, returns its IOVA range and frees its memory.
    /// Only call this once the device can no longer use the buffer (after a reset, §2.4).
    public mutating func free(_ buffer: consuming DMABuffer) throws(VFIOError) {
        let iova = buffer.iova, size = UInt64(buffer.size)
        try container.unmapDMA(iova: iova, size: size)
        iovaAllocator.release(iova, size: size)
    }
}
