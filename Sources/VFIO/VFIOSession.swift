#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls
import PCI

/// Everything one driver instance holds to talk to one device: container, group and device fds.
///
/// Stored properties are destroyed in declaration order, so the device fd is closed before the
/// group and the group before the container, as VFIO expects (rust-vmm's vfio-ioctls does the same).
public struct VFIOSession: ~Copyable {
    public let device: VFIODevice
    public let group: VFIOGroup
    public let container: VFIOContainer
    /// The IOMMU's page sizes and IOVA ranges; nil in VFIO's unsafe no-IOMMU mode, where the
    /// device uses physical addresses (DMA memory then comes from hugepages, `allocateDMA`).
    public let iommu: IOMMUInfo?
    /// Hands out device addresses inside the IOVA ranges the IOMMU reports.
    public internal(set) var iovaAllocator: IOVAAllocator

    /// Opens `function`, which must be bound to vfio-pci: container, viable group, type1v2 IOMMU
    /// (or none, for a no-IOMMU group), device.
    public init(function: PCIFunction, sysfs: SysfsPCI = SysfsPCI()) throws(VFIOError) {
        try VFIOAvailability.check(sysfs: sysfs)
        let groupNumber = try VFIOAvailability.boundGroup(of: function)
        let group = try VFIOGroup(number: groupNumber)
        let container = try VFIOContainer(noIOMMU: group.isNoIOMMU)
        try group.attach(to: container)
        try container.setIOMMU(noIOMMU: group.isNoIOMMU)
        let iommu = group.isNoIOMMU ? nil : try container.iommuInfo()
        let device = try group.openDevice(function.address)
        self.device = device
        self.group = group
        self.container = container
        self.iommu = iommu
        self.iovaAllocator = IOVAAllocator(ranges: iommu?.iovaRanges ?? [], alignment: iommu?.minimumPageSize ?? 4096)
    }
}

extension VFIOSession {
    /// Takes over the descriptors of a session another process opened (a driver upgrade): the
    /// container (IOMMU already set, DMA already mapped), the group attached to it and the device.
    /// Checked before use: the group is viable and attached, the container answers with its IOMMU
    /// info, the device answers VFIO_DEVICE_GET_INFO. `reservedIOVA` are ranges already mapped in
    /// the container (the predecessor's DMA memory): the allocator never hands them out.
    public init(adoptingContainer container: consuming OwnedFD, group: consuming OwnedFD, groupNumber: Int,
                device: consuming OwnedFD, address: PCIAddress,
                reservedIOVA: [(iova: UInt64, size: UInt64)]) throws(VFIOError) {
        let container = VFIOContainer(adopting: container)
        // A no-IOMMU group has only its noiommu-N node (VFIOGroup.init): no IOMMU info to ask for.
        var noIOMMU = false
        if case .failure = Syscall.access("/dev/vfio/\(groupNumber)", F_OK),
           case .success = Syscall.access("/dev/vfio/noiommu-\(groupNumber)", F_OK) {
            noIOMMU = true
        }
        let group = VFIOGroup(adopting: group, number: groupNumber, noIOMMU: noIOMMU)
        let device = VFIODevice(adopting: device, address: address)
        let status = try group.status()
        guard status & UInt32(VFIO_GROUP_FLAGS_VIABLE) != 0 else {
            throw .groupNotViable(group: groupNumber, "the group handed over is no longer viable")
        }
        guard status & UInt32(VFIO_GROUP_FLAGS_CONTAINER_SET) != 0 else {
            throw .handover("group \(groupNumber) handed over without a container")
        }
        let iommu = noIOMMU ? nil : try container.iommuInfo()
        _ = try device.info()
        var allocator = IOVAAllocator(ranges: iommu?.iovaRanges ?? [], alignment: iommu?.minimumPageSize ?? 4096)
        if iommu != nil { for range in reservedIOVA { try allocator.reserve(range.iova, size: range.size) } }
        self.device = device
        self.group = group
        self.container = container
        self.iommu = iommu
        self.iovaAllocator = allocator
    }
}
