import Foundation
import Testing
@testable import Virtio

/// tools/virtio-device-types.tsv is the table of virtio device types tools/vfio-bind reads at run
/// time; `DeviceType.names` is the binary's copy. They must agree line for line, both ways.
@Suite("device type table")
struct DeviceTypeTableTests {
    /// The table's path in the source tree (this file is Tests/VirtioTests/DeviceTypeTableTests.swift).
    static let tablePath = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("tools/virtio-device-types.tsv").path

    /// ID -> name from the table, in the format vfio-bind accepts (ID<TAB>NAME, '#' comments).
    static func readTable() throws -> [UInt16: String] {
        let text = try String(contentsOfFile: tablePath, encoding: .utf8)
        var table: [UInt16: String] = [:]
        for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated()
        where !line.isEmpty && !line.hasPrefix("#") {
            let fields = line.split(separator: "\t", omittingEmptySubsequences: false)
            let id = fields.count == 2 ? UInt16(fields[0]) : nil
            let name = fields.count == 2 ? String(fields[1]) : ""
            #expect(id != nil && !name.isEmpty && name.allSatisfy { $0.isLowercase || $0.isNumber },
                    "\(tablePath):\(number + 1): not ID<TAB>NAME: \(line)")
            guard let id else { continue }
            #expect(table[id] == nil, "\(tablePath):\(number + 1): type \(id) listed twice")
            table[id] = name
        }
        return table
    }

    @Test func theBinaryNamesEveryTypeOfTheTable() throws {
        let table = try Self.readTable()
        #expect(table.count >= 16)
        for (id, name) in table.sorted(by: { $0.key < $1.key }) {
            #expect(DeviceType(rawValue: id).description == name, "type \(id): the table says \(name)")
        }
    }

    @Test func theTableHasEveryTypeTheBinaryNames() throws {
        let table = try Self.readTable()
        for (id, name) in DeviceType.names.sorted(by: { $0.key < $1.key }) {
            #expect(table[id] == name, "type \(id) (\(name)) is not in \(Self.tablePath) as \(name)")
        }
    }

    @Test func theNamedConstantsHaveTheTablesNames() throws {
        let table = try Self.readTable()
        let constants: [(DeviceType, String)] = [
            (.net, "net"), (.block, "blk"), (.console, "console"), (.entropy, "rng"), (.balloon, "balloon"),
            (.scsi, "scsi"), (.ninePTransport, "9p"), (.gpu, "gpu"), (.input, "input"), (.vsock, "vsock"),
            (.crypto, "crypto"), (.iommu, "iommu"), (.memory, "mem"), (.sound, "sound"), (.filesystem, "fs"),
            (.pmem, "pmem"),
        ]
        for (type, name) in constants {
            #expect(table[type.rawValue] == name, "DeviceType \(type.rawValue) is \(name) in the binary")
        }
    }
}
