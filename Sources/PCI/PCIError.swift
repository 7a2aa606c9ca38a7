/// Errors of the PCI layer. Each message names the device or path and, where there is one, the fix.
public enum PCIError: Error, Equatable, CustomStringConvertible {
    /// A PCI address that does not parse.
    case badAddress(String)
    /// No such function in sysfs.
    case noSuchDevice(PCIAddress, sysfsRoot: String)
    /// A sysfs attribute could not be read.
    case unreadable(path: String, errno: Int32)
    /// Config space is malformed (too short, a capability that points outside it, a loop...).
    case malformedConfigSpace(String)
    /// A virtio capability is malformed or points outside its BAR.
    case malformedVirtioCapability(String)

    public var description: String {
        switch self {
        case .badAddress(let why): return why
        case .noSuchDevice(let address, let root):
            return "no PCI function \(address) in \(root)/bus/pci/devices; 'virtio-vfio list' shows the functions present"
        case .unreadable(let path, let errno):
            return "cannot read \(path): \(describeErrno(errno))"
        case .malformedConfigSpace(let why): return "malformed PCI config space: \(why)"
        case .malformedVirtioCapability(let why): return "malformed virtio capability: \(why)"
        }
    }
}
