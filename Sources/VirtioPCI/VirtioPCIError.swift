import PCI
import VFIO
import Virtio

/// Everything that can go wrong opening and driving a virtio-pci function, by layer.
public enum VirtioPCIError: Error, CustomStringConvertible {
    case pci(PCIError)
    case vfio(VFIOError)
    case virtio(PCIAddress, VirtioError)
    /// The function is not a virtio device.
    case notVirtio(PCIFunction)
    /// The device offers ACCESS_PLATFORM and the function is in a VFIO no-IOMMU group.
    case needsIOMMU(PCIAddress)
    /// A capability could not be mapped although it validated against the BAR sizes.
    case mapping(PCIAddress, String)

    public var description: String {
        switch self {
        case .pci(let e): return e.description
        case .vfio(let e): return e.description
        case .virtio(let address, let e): return "\(address): \(e)"
        case .notVirtio(let f):
            return "\(f.address) (\(f.ids)) is not a virtio device (vendor 1af4, device 1000-107f); 'virtio-vfio list' shows which functions are"
        case .mapping(let address, let why): return "\(address): \(why)"
        case .needsIOMMU(let address):
            return "\(address): the device offers ACCESS_PLATFORM (§6.1): it expects the platform to translate its DMA, and "
                + "this function is in a VFIO no-IOMMU group, where it would get physical addresses; drive it behind an IOMMU "
                + "(intel_iommu=on), or use a device without ACCESS_PLATFORM (QEMU: iommu_platform=off)"
        }
    }
}
