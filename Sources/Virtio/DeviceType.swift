/// Virtio device IDs (virtio 1.2 §5 "Device Types").
public struct DeviceType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let net = DeviceType(rawValue: 1)
    public static let block = DeviceType(rawValue: 2)
    public static let console = DeviceType(rawValue: 3)
    public static let entropy = DeviceType(rawValue: 4)
    public static let balloon = DeviceType(rawValue: 5)
    public static let scsi = DeviceType(rawValue: 8)
    public static let ninePTransport = DeviceType(rawValue: 9)
    public static let gpu = DeviceType(rawValue: 16)
    public static let input = DeviceType(rawValue: 18)
    public static let vsock = DeviceType(rawValue: 19)
    public static let crypto = DeviceType(rawValue: 20)
    public static let iommu = DeviceType(rawValue: 23)
    public static let memory = DeviceType(rawValue: 24)
    public static let sound = DeviceType(rawValue: 25)
    public static let filesystem = DeviceType(rawValue: 26)
    public static let pmem = DeviceType(rawValue: 27)

    /// The short names, as in tools/virtio-device-types.tsv, the table tools/vfio-bind reads at
    /// run time: VirtioTests (DeviceTypeTableTests) fails when the two disagree, so change both.
    static let names: [UInt16: String] = [
        1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 7: "rpmsg", 8: "scsi", 9: "9p",
        16: "gpu", 18: "input", 19: "vsock", 20: "crypto", 23: "iommu", 24: "mem", 25: "sound", 26: "fs",
        27: "pmem", 34: "i2c", 41: "gpio",
    ]

    /// Short name as used on the command line (`net`, `blk`, `rng`...), `type-N` if unknown.
    public var description: String { DeviceType.names[rawValue] ?? "type-\(rawValue)" }

    /// The device type of a PCI function, or nil if it is not a virtio function (virtio 1.2 §4.1.2).
    /// Modern IDs are 0x1040 + type; transitional IDs 0x1000-0x103f carry the type in the subsystem ID.
    /// tools/vfio-bind applies the same rule (its `virtio_type`).
    public init?(pciVendor: UInt16, pciDevice: UInt16, subsystemDevice: UInt16) {
        guard pciVendor == 0x1AF4 else { return nil }
        switch pciDevice {
        case 0x1040...0x107F: self.init(rawValue: pciDevice - 0x1040)
        case 0x1000...0x103F: self.init(rawValue: subsystemDevice)
        default: return nil
        }
    }

}
