import ArgumentParser
import PCI
import PCINames
import Virtio

/// `virtio-vfio list`: every PCI function sysfs shows. Read-only; works without VFIO.
struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List PCI functions with their driver, IOMMU group and virtio device type.",
        discussion: "Reads sysfs only; never opens or writes a device. --virtio limits the list to virtio functions.")

    @OptionGroup var global: GlobalOptions
    @Flag(help: "Print JSON for scripts.") var json = false
    @Flag(help: "Only virtio functions.") var virtio = false

    struct Entry: Encodable {
        var address: String
        var vendorID: String
        var deviceID: String
        var name: String?
        var className: String?
        var driver: String?
        var iommuGroup: Int?
        var virtioType: String?
    }

    func run() throws {
        let sysfs = SysfsPCI(root: global.sysfsRoot)
        let functions: [PCIFunction]
        do { functions = try sysfs.functions() } catch { throw Failure.exit(error) }
        let names = PCINames()
        let entries = functions.compactMap { f -> Entry? in
            let type = DeviceType(pciVendor: f.vendorID, pciDevice: f.deviceID, subsystemDevice: f.subsystemDeviceID)
            if virtio && type == nil { return nil }
            return Entry(address: f.address.description, vendorID: hex(f.vendorID, width: 4),
                         deviceID: hex(f.deviceID, width: 4), name: names.fullName(of: f),
                         className: names.className(classCode: f.classCode), driver: f.driver,
                         iommuGroup: f.iommuGroup, virtioType: type?.description)
        }
        if json {
            try JSONOutput.print(entries)
            return
        }
        let header = ["ADDRESS", "IDS", "DRIVER", "GROUP", "VIRTIO", "NAME"]
        let rows = entries.map { e in
            [e.address, e.vendorID + ":" + e.deviceID, e.driver ?? "-", e.iommuGroup.map(String.init) ?? "-",
             e.virtioType ?? "-", e.name ?? e.className ?? "-"]
        }
        printTable(header: header, rows: rows)
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
func printTable(header: [String], rows: [[String]]) {
    let all = [header] + rows
    let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
    for row in all {
        var line = ""
        for (column, cell) in row.enumerated() {
            if column == row.count - 1 { line += cell } else {
                line += cell + String(repeating: " ", count: widths[column] - cell.count + 2)
            }
        }
        print(line)
    }
}
