/// PCI functions as Linux's sysfs shows them (`/sys/bus/pci/devices`). Read-only.
///
/// `root` is `/sys` on a real system; tests point it at a fixture tree with the same layout.
public struct SysfsPCI: Sendable {
    public let root: String

    public init(root: String = "/sys") {
        self.root = root
    }

    public var devicesDirectory: String { root + "/bus/pci/devices" }

    public func path(of address: PCIAddress) -> String { devicesDirectory + "/" + address.description }

    /// Every PCI function, sorted by address. Entries whose name is not a PCI address are skipped.
    public func functions() throws(PCIError) -> [PCIFunction] {
        var result: [PCIFunction] = []
        for name in SysfsFiles.list(devicesDirectory) {
            guard let address = try? PCIAddress(parsing: name) else { continue }
            result.append(try function(at: address))
        }
        return result.sorted { $0.address < $1.address }
    }

    /// One function; `noSuchDevice` if sysfs has no such directory.
    public func function(at address: PCIAddress) throws(PCIError) -> PCIFunction {
        let dir = path(of: address)
        guard SysfsFiles.exists(dir) else { throw .noSuchDevice(address, sysfsRoot: root) }
        func id(_ name: String) throws(PCIError) -> UInt16 {
            UInt16(truncatingIfNeeded: try SysfsFiles.readHex(dir + "/" + name))
        }
        func optionalID(_ name: String) -> UInt16 {
            (try? SysfsFiles.readHex(dir + "/" + name)).map { UInt16(truncatingIfNeeded: $0) } ?? 0
        }
        let override = try? SysfsFiles.readText(dir + "/driver_override")
        return PCIFunction(
            address: address,
            vendorID: try id("vendor"),
            deviceID: try id("device"),
            subsystemVendorID: optionalID("subsystem_vendor"),
            subsystemDeviceID: optionalID("subsystem_device"),
            revision: UInt8(truncatingIfNeeded: optionalID("revision")),
            classCode: (try? SysfsFiles.readHex(dir + "/class")) ?? 0,
            driver: SysfsFiles.linkBasename(dir + "/driver"),
            iommuGroup: SysfsFiles.linkBasename(dir + "/iommu_group").flatMap { Int($0) },
            driverOverride: (override == nil || override == "(null)" || override == "") ? nil : override
        )
    }

    /// The functions sharing an IOMMU group (`/sys/kernel/iommu_groups/N/devices`).
    public func iommuGroupMembers(_ group: Int) -> [PCIAddress] {
        SysfsFiles.list(root + "/kernel/iommu_groups/\(group)/devices").compactMap { try? PCIAddress(parsing: $0) }
    }

    /// The function's config space as sysfs exposes it (64 bytes unprivileged, 256 or 4096 as root).
    public func configSpace(of address: PCIAddress) throws(PCIError) -> [UInt8] {
        try SysfsFiles.readBytes(path(of: address) + "/config", limit: 4096)
    }

    /// Whether a kernel module or built-in driver is present (`/sys/module/NAME`).
    public func moduleLoaded(_ name: String) -> Bool {
        SysfsFiles.exists(root + "/module/" + name)
    }

    /// Whether a PCI driver is registered (`/sys/bus/pci/drivers/NAME`).
    public func driverRegistered(_ name: String) -> Bool {
        SysfsFiles.exists(root + "/bus/pci/drivers/" + name)
    }
}
