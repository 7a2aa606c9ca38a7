#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls
import PCI

/// A device fd from `VFIO_GROUP_GET_DEVICE_FD`: regions, config space, BAR mappings, IRQs, reset.
public struct VFIODevice: ~Copyable {
    public let address: PCIAddress
    let fd: OwnedFD

    init(fd: consuming OwnedFD, address: PCIAddress) {
        self.fd = fd
        self.address = address
    }

    /// Adopts a device fd received from a previous driver instance.
    public init(adopting fd: consuming OwnedFD, address: PCIAddress) {
        self.fd = fd
        self.address = address
    }

    public var rawDescriptor: Int32 { fd.raw }

    /// `VFIO_DEVICE_GET_INFO`.
    public func info() throws(VFIOError) -> VFIODeviceInfo {
        var info = vfio_device_info()
        info.argsz = UInt32(MemoryLayout<vfio_device_info>.size)
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_DEVICE_GET_INFO, &info) {
            throw .ioctl(name: "VFIO_DEVICE_GET_INFO", target: address.description, errno: e.rawValue)
        }
        return VFIODeviceInfo(flags: info.flags, regionCount: Int(info.num_regions), irqCount: Int(info.num_irqs))
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for one region index.
    public func regionInfo(_ index: Int) throws(VFIOError) -> VFIORegionInfo {
        var region = vfio_region_info()
        region.argsz = UInt32(MemoryLayout<vfio_region_info>.size)
        region.index = UInt32(index)
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_DEVICE_GET_REGION_INFO, &region) {
            throw .ioctl(name: "VFIO_DEVICE_GET_REGION_INFO(\(index))", target: address.description, errno: e.rawValue)
        }
        return VFIORegionInfo(index: index, flags: region.flags, size: region.size, offset: region.offset)
    }

    /// `VFIO_DEVICE_GET_IRQ_INFO` for one IRQ index.
    public func irqInfo(_ index: Int) throws(VFIOError) -> VFIOIRQInfo {
        var irq = vfio_irq_info()
        irq.argsz = UInt32(MemoryLayout<vfio_irq_info>.size)
        irq.index = UInt32(index)
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_DEVICE_GET_IRQ_INFO, &irq) {
            throw .ioctl(name: "VFIO_DEVICE_GET_IRQ_INFO(\(index))", target: address.description, errno: e.rawValue)
        }
        return VFIOIRQInfo(index: index, flags: irq.flags, count: Int(irq.count))
    }

    /// Reads `count` bytes of a region at `offset` (through the device fd, not a mapping).
    public func read(region: VFIORegionInfo, offset: UInt64, count: Int) throws(VFIOError) -> [UInt8] {
        guard offset <= region.size, UInt64(count) <= region.size - offset else {
            throw .region("\(address): read of \(count) bytes at 0x\(String(offset, radix: 16)) is outside region \(region.index) (\(region.size) bytes)")
        }
        var bytes = [UInt8](repeating: 0, count: count)
        let result = bytes.withUnsafeMutableBytes { Syscall.pread(fd.raw, $0, region.offset + offset) }
        switch result {
        case .success(let n) where n == count: return bytes
        case .success(let n):
            throw .region("\(address): short read of region \(region.index): \(n) of \(count) bytes")
        case .failure(let e):
            throw .regionIO("\(address): read of region \(region.index) at 0x\(String(offset, radix: 16))", errno: e.rawValue)
        }
    }

    /// Writes bytes to a region at `offset` (through the device fd).
    public func write(region: VFIORegionInfo, offset: UInt64, bytes: [UInt8]) throws(VFIOError) {
        guard offset <= region.size, UInt64(bytes.count) <= region.size - offset else {
            throw .region("\(address): write of \(bytes.count) bytes at 0x\(String(offset, radix: 16)) is outside region \(region.index) (\(region.size) bytes)")
        }
        let result = bytes.withUnsafeBytes { Syscall.pwrite(fd.raw, $0, region.offset + offset) }
        switch result {
        case .success(let n) where n == bytes.count: return
        case .success(let n):
            throw .region("\(address): short write of region \(region.index): \(n) of \(bytes.count) bytes")
        case .failure(let e):
            throw .regionIO("\(address): write of region \(region.index) at 0x\(String(offset, radix: 16))", errno: e.rawValue)
        }
    }

    /// The whole PCI config space (VFIO region 7; 256 bytes for conventional PCI, 4096 for PCIe).
    public func configSpace() throws(VFIOError) -> (region: VFIORegionInfo, bytes: [UInt8]) {
        let region = try regionInfo(VFIORegionIndex.config)
        let bytes = try read(region: region, offset: 0, count: Int(min(region.size, 4096)))
        return (region, bytes)
    }

    /// Maps a BAR region for MMIO. The region must support mmap.
    public func map(region: VFIORegionInfo) throws(VFIOError) -> MappedRegion {
        guard region.isMappable else {
            throw .region("\(address): region \(region.index) (\(region.size) bytes) does not support mmap")
        }
        guard region.size > 0, region.size <= UInt64(Int.max) else {
            throw .region("\(address): region \(region.index) has size \(region.size), which cannot be mapped")
        }
        var protection: Int32 = 0
        if region.flags & UInt32(VFIO_REGION_INFO_FLAG_READ) != 0 { protection |= PROT_READ }
        if region.flags & UInt32(VFIO_REGION_INFO_FLAG_WRITE) != 0 { protection |= PROT_WRITE }
        switch Syscall.mmap(length: Int(region.size), protection: protection, flags: MAP_SHARED, fd: fd.raw, offset: region.offset) {
        case .success(let base): return MappedRegion(base: base, length: Int(region.size), regionIndex: region.index)
        case .failure(let e): throw .regionIO("\(address): mmap of region \(region.index)", errno: e.rawValue)
        }
    }

    /// `VFIO_DEVICE_SET_IRQS` with `ACTION_TRIGGER | DATA_EVENTFD`: vector `start + i` of IRQ
    /// `index` signals `eventfds[i]`. For MSI-X this also enables MSI-X in the function.
    public func setIRQs(index: Int, start: Int = 0, eventfds: [Int32]) throws(VFIOError) {
        let header = 20  // struct vfio_irq_set without its data
        var buffer = [UInt8](repeating: 0, count: header + 4 * eventfds.count)
        buffer.withUnsafeMutableBytes { b in
            b.storeBytes(of: UInt32(b.count), toByteOffset: 0, as: UInt32.self)
            b.storeBytes(of: UInt32(VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER), toByteOffset: 4, as: UInt32.self)
            b.storeBytes(of: UInt32(index), toByteOffset: 8, as: UInt32.self)
            b.storeBytes(of: UInt32(start), toByteOffset: 12, as: UInt32.self)
            b.storeBytes(of: UInt32(eventfds.count), toByteOffset: 16, as: UInt32.self)
            for (i, fd) in eventfds.enumerated() { b.storeBytes(of: fd, toByteOffset: header + 4 * i, as: Int32.self) }
        }
        let result = buffer.withUnsafeMutableBytes { Syscall.ioctl(fd.raw, CVirtioShim_VFIO_DEVICE_SET_IRQS, $0.baseAddress) }
        if case .failure(let e) = result {
            throw .ioctl(name: "VFIO_DEVICE_SET_IRQS(\(VFIOIRQIndex.name(index)), \(eventfds.count) eventfds)",
                         target: address.description, errno: e.rawValue)
        }
    }

    /// Disables every vector of IRQ `index` (`DATA_NONE | ACTION_TRIGGER` with count 0).
    public func disableIRQs(index: Int) throws(VFIOError) {
        var set = [UInt32](repeating: 0, count: 5)
        set[0] = 20
        set[1] = UInt32(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER)
        set[2] = UInt32(index)
        let result = set.withUnsafeMutableBytes { Syscall.ioctl(fd.raw, CVirtioShim_VFIO_DEVICE_SET_IRQS, $0.baseAddress) }
        if case .failure(let e) = result {
            throw .ioctl(name: "VFIO_DEVICE_SET_IRQS(\(VFIOIRQIndex.name(index)), disable)", target: address.description, errno: e.rawValue)
        }
    }

    /// `VFIO_DEVICE_RESET`: a function-level reset, where the device supports one.
    public func functionReset() throws(VFIOError) {
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_DEVICE_RESET, value: 0) {
            throw .ioctl(name: "VFIO_DEVICE_RESET", target: address.description, errno: e.rawValue)
        }
    }
}

/// `VFIO_DEVICE_GET_INFO` result.
public struct VFIODeviceInfo: Sendable, Equatable {
    public var flags: UInt32
    public var regionCount: Int
    public var irqCount: Int

    public var isPCI: Bool { flags & UInt32(VFIO_DEVICE_FLAGS_PCI) != 0 }
    public var supportsReset: Bool { flags & UInt32(VFIO_DEVICE_FLAGS_RESET) != 0 }
}

/// Region indices of a vfio-pci device (`VFIO_PCI_*_REGION_INDEX`).
public enum VFIORegionIndex {
    public static let bar0 = 0, bar5 = 5, rom = 6, config = 7, vga = 8

    public static func name(_ index: Int) -> String {
        switch index {
        case 0...5: return "BAR\(index)"
        case rom: return "ROM"
        case config: return "config"
        case vga: return "VGA"
        default: return "region \(index)"
        }
    }
}

/// IRQ indices of a vfio-pci device (`VFIO_PCI_*_IRQ_INDEX`).
public enum VFIOIRQIndex {
    public static let intx = 0, msi = 1, msix = 2, err = 3, req = 4

    public static func name(_ index: Int) -> String {
        ["INTx", "MSI", "MSI-X", "ERR", "REQ"].indices.contains(index) ? ["INTx", "MSI", "MSI-X", "ERR", "REQ"][index] : "irq \(index)"
    }
}

/// `VFIO_DEVICE_GET_REGION_INFO` result.
public struct VFIORegionInfo: Sendable, Equatable {
    public var index: Int
    public var flags: UInt32
    public var size: UInt64
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    public var offset: UInt64

    public var isReadable: Bool { flags & UInt32(VFIO_REGION_INFO_FLAG_READ) != 0 }
    public var isWritable: Bool { flags & UInt32(VFIO_REGION_INFO_FLAG_WRITE) != 0 }
    public var isMappable: Bool { flags & UInt32(VFIO_REGION_INFO_FLAG_MMAP) != 0 }

    public var flagNames: [String] {
        var names: [String] = []
        if isReadable { names.append("read") }
        if isWritable { names.append("write") }
        if isMappable { names.append("mmap") }
        if flags & UInt32(VFIO_REGION_INFO_FLAG_CAPS) != 0 { names.append("caps") }
        return names
    }
}

/// `VFIO_DEVICE_GET_IRQ_INFO` result.
public struct VFIOIRQInfo: Sendable, Equatable {
    public var index: Int
    public var flags: UInt32
    public var count: Int

    public var flagNames: [String] {
        var names: [String] = []
        if flags & UInt32(VFIO_IRQ_INFO_EVENTFD) != 0 { names.append("eventfd") }
        if flags & UInt32(VFIO_IRQ_INFO_MASKABLE) != 0 { names.append("maskable") }
        if flags & UInt32(VFIO_IRQ_INFO_AUTOMASKED) != 0 { names.append("automasked") }
        if flags & UInt32(VFIO_IRQ_INFO_NORESIZE) != 0 { names.append("noresize") }
        return names
    }
}
