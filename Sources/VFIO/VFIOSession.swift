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
