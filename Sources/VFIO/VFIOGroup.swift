#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls
import PCI

/// `/dev/vfio/N`: an IOMMU group, the unit of isolation. All its devices belong to one owner.
/// `/dev/vfio/noiommu-N` in VFIO's unsafe no-IOMMU mode: a group of one device without an IOMMU.
public struct VFIOGroup: ~Copyable {
    public let number: Int
    let fd: OwnedFD
    /// The group has no IOMMU (`/dev/vfio/noiommu-N`): its device uses physical addresses.
    public let isNoIOMMU: Bool

    public var path: String { isNoIOMMU ? "/dev/vfio/noiommu-\(number)" : "/dev/vfio/\(number)" }
    public var rawDescriptor: Int32 { fd.raw }

    /// Opens the group node and checks that it is viable (every member bound to vfio-pci or unbound).
    public init(number: Int, devDirectory: String = "/dev/vfio") throws(VFIOError) {
        var path = "\(devDirectory)/\(number)"
        var noIOMMU = false
        // VFIO's unsafe no-IOMMU mode names the group noiommu-N (the device has no IOMMU).
        let unsafe = "\(devDirectory)/noiommu-\(number)"
        if case .failure(let e) = Syscall.access(path, F_OK), e.rawValue == ENOENT, case .success = Syscall.access(unsafe, F_OK) {
            path = unsafe
            noIOMMU = true
        }
        let raw: Int32
        switch Syscall.open(path, O_RDWR) {
        case .success(let f): raw = f
        case .failure(let e) where noIOMMU && (e.rawValue == EPERM || e.rawValue == EACCES):
            throw .unavailable("\(path): a VFIO no-IOMMU group opens only with CAP_SYS_RAWIO (run as root): "
                               + "the device reaches all memory by physical address")
        case .failure(let e): throw .open(path: path, errno: e.rawValue)
        }
        let fd = OwnedFD(adopting: raw)
        let flags = try VFIOGroup.status(fd.raw, path: path)
        guard flags & UInt32(VFIO_GROUP_FLAGS_VIABLE) != 0 else {
            throw .groupNotViable(group: number, "a member is bound to a host driver")
        }
        self.fd = fd
        self.number = number
        self.isNoIOMMU = noIOMMU
    }

    /// Adopts a group fd received from a previous driver instance.
    public init(adopting fd: consuming OwnedFD, number: Int, noIOMMU: Bool = false) {
        self.fd = fd
        self.number = number
        self.isNoIOMMU = noIOMMU
    }

    /// `VFIO_GROUP_GET_STATUS` flags.
    public func status() throws(VFIOError) -> UInt32 {
        try VFIOGroup.status(fd.raw, path: path)
    }

    static func status(_ fd: Int32, path: String) throws(VFIOError) -> UInt32 {
        var status = vfio_group_status()
        status.argsz = UInt32(MemoryLayout<vfio_group_status>.size)
        if case .failure(let e) = Syscall.ioctl(fd, CVirtioShim_VFIO_GROUP_GET_STATUS, &status) {
            throw .ioctl(name: "VFIO_GROUP_GET_STATUS", target: path, errno: e.rawValue)
        }
        return status.flags
    }

    public var isAttachedToContainer: Bool {
        ((try? status()) ?? 0) & UInt32(VFIO_GROUP_FLAGS_CONTAINER_SET) != 0
    }

    /// Attaches the group to a container (the container then owns its IOMMU context).
    public func attach(to container: borrowing VFIOContainer) throws(VFIOError) {
        var containerFD = container.rawDescriptor
        if case .failure(let e) = Syscall.ioctl(fd.raw, CVirtioShim_VFIO_GROUP_SET_CONTAINER, &containerFD) {
            throw .ioctl(name: "VFIO_GROUP_SET_CONTAINER", target: path, errno: e.rawValue)
        }
    }

    /// A device fd for one function of the group.
    public func openDevice(_ address: PCIAddress) throws(VFIOError) -> VFIODevice {
        let name = address.description
        let result = name.withCString { Syscall.ioctl(fd.raw, CVirtioShim_VFIO_GROUP_GET_DEVICE_FD, UnsafeMutableRawPointer(mutating: $0)) }
        switch result {
        case .success(let raw): return VFIODevice(fd: OwnedFD(adopting: Int32(raw)), address: address)
        case .failure(let e):
            if e.rawValue == EBUSY {
                throw .open(path: "\(path) (device \(name))", errno: e.rawValue)
            }
            throw .ioctl(name: "VFIO_GROUP_GET_DEVICE_FD(\(name))", target: path, errno: e.rawValue)
        }
    }
}
