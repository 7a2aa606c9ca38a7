import PCI

/// Errors of the VFIO layer. Each names the node or device, the operation, and what to do.
public enum VFIOError: Error, CustomStringConvertible {
    /// The kernel has no VFIO (no /dev/vfio/vfio).
    case unavailable(String)
    /// The device is not bound to vfio-pci or has no IOMMU group.
    case notBound(PCIAddress, String)
    /// Opening a VFIO node failed.
    case open(path: String, errno: Int32)
    /// An ioctl failed.
    case ioctl(name: String, target: String, errno: Int32)
    /// The IOMMU group has a member that is not bound to vfio-pci (or unbound).
    case groupNotViable(group: Int, String)
    /// The kernel's VFIO API version is not the one this driver speaks.
    case apiVersion(Int)
    /// A region is missing, too small or cannot be mapped.
    case region(String)
    /// Reading or writing a region failed.
    case regionIO(String, errno: Int32)
    /// No IOVA space left in the ranges the IOMMU allows.
    case iovaExhausted(requested: UInt64)
    /// Creating or mapping DMA memory failed.
    case dma(String, errno: Int32)
    /// Descriptors or memory handed over by a predecessor do not check out.
    case handover(String)

    public var description: String {
        switch self {
        case .unavailable(let why): return why
        case .notBound(let address, let why): return "\(address): \(why)"
        case .open(let path, let errno):
            var text = "cannot open \(path): \(describeErrno(errno))"
            if errno == EACCES || errno == EPERM {
                text += "; run as root or install udev/60-vfio.rules and join the 'vfio' group (see udev/README.md)"
            } else if errno == EBUSY {
                text += "; another process (another virtio-vfio instance?) holds this VFIO group or device"
            } else if errno == ENOENT {
                text += "; is the device bound to vfio-pci? ('tools/vfio-bind bind BDF')"
            }
            return text
        case .ioctl(let name, let target, let errno):
            return "\(name) on \(target) failed: \(describeErrno(errno))"
        case .groupNotViable(let group, let why):
            return "IOMMU group \(group) is not viable: \(why); bind every member to vfio-pci or unbind it ('tools/vfio-bind status')"
        case .apiVersion(let version):
            return "unsupported VFIO API version \(version) (this driver speaks version 0)"
        case .region(let why): return why
        case .regionIO(let why, let errno): return "\(why): \(describeErrno(errno))"
        case .iovaExhausted(let requested):
            return "no free IOVA range of \(requested) bytes in the ranges the IOMMU reports"
        case .dma(let why, let errno): return "\(why): \(describeErrno(errno))"
        case .handover(let why): return "handed-over VFIO state refused: \(why)"
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
