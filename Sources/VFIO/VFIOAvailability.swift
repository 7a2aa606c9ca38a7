import Syscalls
#if canImport(Glibc)
import Glibc
#endif
import PCI

/// Checks made before any VFIO node is opened, so that a machine without VFIO, or a device that
/// is not bound to vfio-pci, gets a clear error and nothing is touched.
public enum VFIOAvailability {
    /// Throws `.unavailable` if this kernel has no VFIO, naming the fix.
    public static func check(sysfs: SysfsPCI = SysfsPCI(), containerPath: String = VFIOContainer.path) throws(VFIOError) {
        if case .success = Syscall.access(containerPath, F_OK) { return }
        if sysfs.moduleLoaded("vfio") {
            throw .unavailable("VFIO is loaded but \(containerPath) is missing; is devtmpfs mounted and udev running?")
        }
        throw .unavailable(
            "VFIO is not available in this kernel (no \(containerPath), no vfio module loaded). "
            + "Load it with 'modprobe vfio-pci' if the kernel has CONFIG_VFIO_PCI, "
            + "or run the driver in the HIL guest: tools/hil/run virtio-vfio ...")
    }

    /// The device's IOMMU group if it is bound to vfio-pci; otherwise a clear error.
    public static func boundGroup(of function: PCIFunction) throws(VFIOError) -> Int {
        guard let group = function.iommuGroup else {
            throw .notBound(function.address,
                            "has no IOMMU group; boot with intel_iommu=on (or amd_iommu=on) so VFIO can isolate it")
        }
        guard function.driver == "vfio-pci" else {
            let current = function.driver.map { "bound to \($0)" } ?? "not bound to any driver"
            throw .notBound(function.address, "is \(current), not vfio-pci; bind it with 'tools/vfio-bind bind \(function.address)'")
        }
        return group
    }
}
