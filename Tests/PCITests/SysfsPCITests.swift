import Testing
import Glibc
@testable import PCI

/// A throwaway sysfs-shaped tree: /bus/pci/devices/BDF with attributes and driver/iommu_group links.
final class FakeSysfs {
    let root: String

    init() {
        var template = Array("/tmp/virtio-vfio-sysfs-XXXXXX".utf8CString)
        root = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        mkdirs(root + "/bus/pci/devices")
    }

    deinit { _ = system("rm -rf '\(root)'") }

    func mkdirs(_ path: String) { _ = system("mkdir -p '\(path)'") }

    func write(_ path: String, _ text: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }
        close(fd)
    }

    func addDevice(_ bdf: String, vendor: String, device: String, subsystemDevice: String = "0x1100",
                   driver: String?, group: Int?) {
        let dir = root + "/bus/pci/devices/" + bdf
        mkdirs(dir)
        write(dir + "/vendor", vendor + "\n")
        write(dir + "/device", device + "\n")
        write(dir + "/subsystem_vendor", "0x1af4\n")
        write(dir + "/subsystem_device", subsystemDevice + "\n")
        write(dir + "/class", "0x00ff00\n")
        write(dir + "/driver_override", "(null)\n")
        if let driver {
            mkdirs(root + "/bus/pci/drivers/" + driver)
            symlink("../../../bus/pci/drivers/" + driver, dir + "/driver")
        }
        if let group {
            mkdirs(root + "/kernel/iommu_groups/\(group)/devices")
            symlink("../../../kernel/iommu_groups/\(group)", dir + "/iommu_group")
            symlink("../../../../bus/pci/devices/" + bdf, root + "/kernel/iommu_groups/\(group)/devices/" + bdf)
        }
    }
}

@Suite("sysfs enumeration")
struct SysfsPCITests {
    @Test func enumeratesFunctionsWithDriverAndGroup() throws {
        let fake = FakeSysfs()
        fake.addDevice("0000:00:05.0", vendor: "0x1af4", device: "0x1042", driver: "vfio-pci", group: 4)
        fake.addDevice("0000:00:04.0", vendor: "0x1af4", device: "0x1044", driver: "virtio-pci", group: 3)
        fake.addDevice("0000:00:1f.0", vendor: "0x8086", device: "0x2918", driver: nil, group: nil)
        fake.mkdirs(fake.root + "/bus/pci/devices/not-a-bdf")
        let sysfs = SysfsPCI(root: fake.root)
        let functions = try sysfs.functions()
        #expect(functions.map(\.address.description) == ["0000:00:04.0", "0000:00:05.0", "0000:00:1f.0"])
        let blk = functions[1]
        #expect(blk.vendorID == 0x1AF4 && blk.deviceID == 0x1042)
        #expect(blk.driver == "vfio-pci" && blk.iommuGroup == 4)
        #expect(blk.driverOverride == nil)
        #expect(functions[2].driver == nil && functions[2].iommuGroup == nil)
        #expect(sysfs.iommuGroupMembers(4).map(\.description) == ["0000:00:05.0"])
    }

    @Test func namesTheMissingDevice() throws {
        let fake = FakeSysfs()
        let address = try PCIAddress(parsing: "0000:00:09.0")
        #expect(throws: PCIError.noSuchDevice(address, sysfsRoot: fake.root)) {
            try SysfsPCI(root: fake.root).function(at: address)
        }
    }

    @Test func reportsAnUnreadableAttribute() throws {
        let fake = FakeSysfs()
        fake.mkdirs(fake.root + "/bus/pci/devices/0000:00:06.0")  // no vendor file
        #expect { try SysfsPCI(root: fake.root).functions() } throws: { error in
            "\(error)".contains("0000:00:06.0/vendor")
        }
    }
}
