/// What sysfs says about one PCI function. A plain value read once; nothing here touches the device.
public struct PCIFunction: Sendable, Equatable {
    public var address: PCIAddress
    public var vendorID: UInt16
    public var deviceID: UInt16
    public var subsystemVendorID: UInt16
    public var subsystemDeviceID: UInt16
    public var revision: UInt8
    /// The 24-bit class code: base class, subclass, programming interface.
    public var classCode: UInt32
    /// The bound driver's name (`virtio-pci`, `vfio-pci`...), nil if unbound.
    public var driver: String?
    /// The IOMMU group number, nil if the function has no IOMMU group (no IOMMU, or disabled).
    public var iommuGroup: Int?
    /// `driver_override` if set.
    public var driverOverride: String?

    public init(address: PCIAddress, vendorID: UInt16, deviceID: UInt16, subsystemVendorID: UInt16 = 0,
                subsystemDeviceID: UInt16 = 0, revision: UInt8 = 0, classCode: UInt32 = 0,
                driver: String? = nil, iommuGroup: Int? = nil, driverOverride: String? = nil) {
        self.address = address
        self.vendorID = vendorID
        self.deviceID = deviceID
        self.subsystemVendorID = subsystemVendorID
        self.subsystemDeviceID = subsystemDeviceID
        self.revision = revision
        self.classCode = classCode
        self.driver = driver
        self.iommuGroup = iommuGroup
        self.driverOverride = driverOverride
    }

    /// `1af4:1044` style.
    public var ids: String { hex(vendorID, width: 4) + ":" + hex(deviceID, width: 4) }
}
