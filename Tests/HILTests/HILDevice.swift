import Glibc
import PCI

/// HIL tests run only inside the guest (tools/hil/run), against a device a script bound to vfio-pci
/// and named in the environment; elsewhere they are skipped, never faked.
enum HILDevice {
    static var rng: PCIAddress? {
        guard let value = getenv("VIRTIO_VFIO_HIL_RNG") else { return nil }
        return try? PCIAddress(parsing: String(cString: value))
    }

    /// Open descriptors of this process.
    static func openFDCount() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(dir) }
        var count = 0
        while readdir(dir) != nil { count += 1 }
        return count
    }

    /// Lines of /proc/self/maps (one per mapping).
    static func mappingCount() -> Int {
        guard let file = fopen("/proc/self/maps", "r") else { return -1 }
        defer { fclose(file) }
        var count = 0
        while true {
            let c = fgetc(file)
            if c == EOF { break }
            if c == 0x0A { count += 1 }
        }
        return count
    }
}
