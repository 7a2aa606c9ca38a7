#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls

/// `/dev/vfio/vfio`: an IOMMU context (one address space) that groups are attached to.
public struct VFIOContainer: ~Copyable {
    public static let path = "/dev/vfio/vfio"
    let fd: OwnedFD

    /// Opens the container and checks the API version and that type1v2 IOMMU is supported (with
    /// `noIOMMU`: VFIO's unsafe no-IOMMU mode instead).
    public init(path: String = VFIOContainer.path, noIOMMU: Bool = false) throws(VFIOError) {
        let raw: Int32
        switch Syscall.open(path, O_RDWR) {
        case .success(let f): raw = f
        case .failure(let e): throw .open(path: path, errno: e.rawValue)
        }
        let fd = OwnedFD(adopting: raw)
        let version = try VFIOContainer.call(fd.raw, CVirtioShim_VFIO_GET_API_VERSION, "VFIO_GET_API_VERSION")
        guard version == Int(VFIO_API_VERSION) else { throw .apiVersion(version) }
        if noIOMMU {
            let unsafe = try VFIOContainer.call(fd.raw, CVirtioShim_VFIO_CHECK_EXTENSION, "VFIO_CHECK_EXTENSION",
                                                value: UInt(VFIO_NOIOMMU_IOMMU))
            guard unsafe == 1 else {
                throw .unavailable("the VFIO container does not offer no-IOMMU mode: the vfio module needs "
                                   + "CONFIG_VFIO_NOIOMMU and enable_unsafe_noiommu_mode=1")
            }
            self.fd = fd
            return
        }
        let type1v2 = try VFIOContainer.call(fd.raw, CVirtioShim_VFIO_CHECK_EXTENSION, "VFIO_CHECK_EXTENSION",
                                             value: UInt(VFIO_TYPE1v2_IOMMU))
        guard type1v2 == 1 else {
            throw .unavailable("the VFIO container does not support the type1v2 IOMMU; this kernel lacks vfio_iommu_type1 ('modprobe vfio_iommu_type1')")
        }
        self.fd = fd
    }

    /// Adopts a container fd received from a previous driver instance.
    public init(adopting fd: consuming OwnedFD) {
        self.fd = fd
    }

    public var rawDescriptor: Int32 { fd.raw }

    /// Selects the type1v2 IOMMU (with `noIOMMU`: no IOMMU at all, VFIO_NOIOMMU_IOMMU). Valid once
    /// at least one group is attached.
    public func setIOMMU(noIOMMU: Bool = false) throws(VFIOError) {
        _ = try VFIOContainer.call(fd.raw, CVirtioShim_VFIO_SET_IOMMU, "VFIO_SET_IOMMU",
                                   value: UInt(noIOMMU ? VFIO_NOIOMMU_IOMMU : VFIO_TYPE1v2_IOMMU))
    }

    /// IOMMU page sizes and usable IOVA ranges.
    public func iommuInfo() throws(VFIOError) -> IOMMUInfo {
        var size = MemoryLayout<vfio_iommu_type1_info>.size
        for _ in 0..<4 {
            var buffer = [UInt8](repeating: 0, count: size)
            buffer.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(size), toByteOffset: 0, as: UInt32.self) }
            let result = buffer.withUnsafeMutableBytes {
                Syscall.ioctl(fd.raw, CVirtioShim_VFIO_IOMMU_GET_INFO, $0.baseAddress)
            }
            if case .failure(let e) = result {
                throw .ioctl(name: "VFIO_IOMMU_GET_INFO", target: VFIOContainer.path, errno: e.rawValue)
            }
            // The kernel raises argsz when the capability chain does not fit; ask again with room.
            let needed = Int(buffer.withUnsafeBytes { $0.load(fromByteOffset: 0, as: UInt32.self) })
            if needed <= size { return try IOMMUInfo(parsing: buffer) }
            size = needed
        }
        throw .region("VFIO_IOMMU_GET_INFO kept asking for a larger buffer")
    }

    /// Maps `size` bytes at `vaddr` to `iova` for device reads and writes.
    public func mapDMA(vaddr: UnsafeMutableRawPointer, iova: UInt64, size: UInt64) throws(VFIOError) {
        var map = vfio_iommu_type1_dma_map()
        map.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_map>.size)
        map.flags = UInt32(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)
        map.vaddr = UInt64(UInt(bitPattern: vaddr))
        map.iova = iova
        map.size = size
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_IOMMU_MAP_DMA, &map) {
            throw .dma("VFIO_IOMMU_MAP_DMA of \(size) bytes at IOVA 0x\(String(iova, radix: 16))"
                       + (e.rawValue == ENOMEM ? " (RLIMIT_MEMLOCK too low? see udev/README.md)" : ""), errno: e.rawValue)
        }
    }

    /// Removes the mapping of `[iova, iova + size)`.
    public func unmapDMA(iova: UInt64, size: UInt64) throws(VFIOError) {
        var unmap = vfio_iommu_type1_dma_unmap()
        unmap.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_unmap>.size)
        unmap.iova = iova
        unmap.size = size
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_IOMMU_UNMAP_DMA, &unmap) {
            throw .dma("VFIO_IOMMU_UNMAP_DMA of \(size) bytes at IOVA 0x\(String(iova, radix: 16))", errno: e.rawValue)
        }
    }

    static func call(_ fd: Int32, _ request: UInt, _ name: String, value: UInt = 0) throws(VFIOError) -> Int {
        switch Syscall.ioctl(fd, request, value: value) {
        case .success(let r): return r
        case .failure(let e): throw .ioctl(name: name, target: VFIOContainer.path, errno: e.rawValue)
        }
    }
}
