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
    public let iommu: IOMMUInfo
    /// Hands out device addresses inside the IOVA ranges the IOMMU reports.
    public internal(set) var iovaAllocator: IOVAAllocator

    /// Opens `function`, which must be bound to vfio-pci: container, viable group, type1v2 IOMMU, device.
    public init(function: PCIFunction, sysfs: SysfsPCI = SysfsPCI()) throws(VFIOError) {
        try VFIOAvailability.check(sysfs: sysfs)
        let groupNumber = try VFIOAvailability.boundGroup(of: function)
        let container = try VFIOContainer()
        let group = try VFIOGroup(number: groupNumber)
        try group.attach(to: container)
        try container.setIOMMU()
        let iommu = try container.iommuInfo()
        let device = try group.openDevice(function.address)
        self.device = device
        self.group = group
        self.container = container
        self.iommu = iommu
        self.iovaAllocator = IOVAAllocator(ranges: iommu.iovaRanges, alignment: iommu.minimumPageSize)
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
        let group = VFIOGroup(adopting: group, number: groupNumber)
        let device = VFIODevice(adopting: device, address: address)
        let status = try group.status()
        guard status & UInt32(VFIO_GROUP_FLAGS_VIABLE) != 0 else {
            throw .groupNotViable(group: groupNumber, "the group handed over is no longer viable")
        }
        guard status & UInt32(VFIO_GROUP_FLAGS_CONTAINER_SET) != 0 else {
            throw .handover("group \(groupNumber) handed over without a container")
        }
        let iommu = try container.iommuInfo()
        _ = try device.info()
        var allocator = IOVAAllocator(ranges: iommu.iovaRanges, alignment: iommu.minimumPageSize)
        for range in reservedIOVA { try allocator.reserve(range.iova, size: range.size) }
        self.device = device
        self.group = group
        self.container = container
        self.iommu = iommu
        self.iovaAllocator = allocator
    }
}
