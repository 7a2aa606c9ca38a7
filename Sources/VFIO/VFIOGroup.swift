#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls
import PCI

/// `/dev/vfio/N`: an IOMMU group, the unit of isolation. All its devices belong to one owner.
public struct VFIOGroup: ~Copyable {
    public let number: Int
    let fd: OwnedFD

    public var path: String { "/dev/vfio/\(number)" }
    public var rawDescriptor: Int32 { fd.raw }

    /// Opens the group node and checks that it is viable (every member bound to vfio-pci or unbound).
    public init(number: Int, devDirectory: String = "/dev/vfio") throws(VFIOError) {
        let path = "\(devDirectory)/\(number)"
        let raw: Int32
        switch Syscall.open(path, O_RDWR) {
        case .success(let f): raw = f
        case .failure(let e):
            // VFIO's unsafe no-IOMMU mode names the group noiommu-N: the device would reach all
            // memory with physical addresses, which this driver does not do (it maps IOVAs).
            let noiommu = "\(devDirectory)/noiommu-\(number)"
            if e.rawValue == ENOENT, case .success = Syscall.access(noiommu, F_OK) {
                throw .unavailable("IOMMU group \(number) is a VFIO no-IOMMU group (\(noiommu)): the device has no IOMMU "
                                   + "and would use physical addresses; this driver drives devices behind an IOMMU only "
                                   + "(boot with intel_iommu=on or amd_iommu=on, or give the VM a virtual IOMMU)")
            }
            throw .open(path: path, errno: e.rawValue)
        }
        let fd = OwnedFD(adopting: raw)
        let flags = try VFIOGroup.status(fd.raw, path: path)
        guard flags & UInt32(VFIO_GROUP_FLAGS_VIABLE) != 0 else {
            throw .groupNotViable(group: number, "a member is bound to a host driver")
        }
        self.fd = fd
        self.number = number
    }

    /// Adopts a group fd received from a previous driver instance.
    public init(adopting fd: consuming OwnedFD, number: Int) {
        self.fd = fd
        self.number = number
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
