import ArgumentParser
import PCI
import Upgrade
import VFIO
import Virtio
import VirtioPCI

/// `virtio-vfio info BDF`: what the device is and offers, read through VFIO.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Open a device through VFIO and show its regions, virtio capabilities, features and queues.",
        discussion: """
            The device must be bound to vfio-pci ('tools/vfio-bind bind BDF'). Nothing is reset or \
            negotiated: the device's status is shown as found. Reading features and queue sizes \
            writes the select registers, as any driver does.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Flag(help: "Print JSON for scripts.") var json = false

    struct Report: Encodable {
        struct Region: Encodable { var index: Int; var name: String; var size: UInt64; var flags: [String] }
        struct IRQ: Encodable { var index: Int; var name: String; var count: Int; var flags: [String] }
        struct Capability: Encodable {
            var type: String; var bar: Int; var offset: UInt64; var length: UInt64
            var capabilityOffset: Int; var notifyOffMultiplier: UInt32?
        }
        struct Queue: Encodable { var index: Int; var maxSize: UInt16; var notifyOffset: UInt16 }
        var address: String
        var virtioType: String
        var driverVersion: String
        var iommuGroup: Int?
        var vfioReset: Bool
        /// VFIO's unsafe no-IOMMU mode: no IOVA ranges, the device uses physical addresses.
        var noIOMMU: Bool
        var iovaRanges: [[UInt64]]
        var iommuPageSizes: UInt64
        var regions: [Region]
        var irqs: [IRQ]
        var capabilities: [Capability]
        var ignoredCapabilities: [String]
        var status: String
        var statusValue: UInt8
        var deviceFeatures: UInt64
        var deviceFeatureNames: [String]
        /// What a driver negotiated, if the device is past FEATURES_OK (as the device presents it).
        var negotiatedFeatures: UInt64?
        var negotiatedFeatureNames: [String]?
        /// The virtqueue format `--ring auto` drives this device with, and the one negotiated.
        var ring: String
        var negotiatedRing: String?
        var queueCount: Int
        var queues: [Queue]
    }

    /// `num_queues` comes from the device: list at most this many.
    static let maxQueuesShown = 1024

    struct ServedReport: Encodable {
        var address: String
        var servedByPID: Int32
        var driverVersion: String
        var negotiatedFeatures: UInt64
        var negotiatedFeatureNames: [String]
        var command: [String]
        /// The service's counters ("name" or "name{label=value,...}", as the metrics endpoint
        /// names them without its virtio_vfio_ prefix and _total suffix), in the order it reports them.
        var counters: [ServedCounter]?
    }

    struct ServedCounter: Encodable {
        var name: String
        var value: UInt64
    }

    func run() throws {
        let address = try device.address()
        // A device a driver serves is busy in VFIO (one open per group): ask the driver instead.
        if let served = askServingDriver(ControlListener.path(for: "\(address)")) {
            let type = (try? SysfsPCI(root: global.sysfsRoot).function(at: address)).flatMap {
                DeviceType(pciVendor: $0.vendorID, pciDevice: $0.deviceID, subsystemDevice: $0.subsystemDeviceID)
            }
            let report = ServedReport(address: "\(address)", servedByPID: served.pid, driverVersion: served.version,
                                      negotiatedFeatures: served.features,
                                      negotiatedFeatureNames: Features(rawValue: served.features).names(for: type),
                                      command: served.arguments,
                                      counters: askServingDriverCounters(ControlListener.path(for: "\(address)"))?.map {
                                          ServedCounter(name: $0.name, value: $0.value)
                                      })
            if json { try JSONOutput.print(report); return }
            print("\(address): served by pid \(served.pid), driver virtio-vfio \(served.version) (\(served.arguments.dropFirst().joined(separator: " ")))")
            print("Negotiated features 0x\(hex(served.features, width: 16)):")
            print("  " + report.negotiatedFeatureNames.joined(separator: " "))
            if let counters = report.counters, !counters.isEmpty {
                let width = counters.map(\.name.count).max() ?? 0
                print("Counters (as of the driver's last status look, at most 0.5 s ago):")
                for c in counters { print("  \(c.name.padding(toLength: width, withPad: " ", startingAt: 0))  \(c.value)") }
            }
            return
        }
        let transport = try global.openTransport(address)
        let report = Self.report(transport)
        if json { try JSONOutput.print(report) } else { Self.printText(report) }
    }

    /// What `--ring auto` picks: packed where the device offers it, except virtio-net, whose
    /// driver keeps to the split ring.
    static func autoRing(_ offered: Features, _ type: DeviceType) -> RingFormat {
        type == .net ? .split : RingFormat(offered.intersection(.ringPacked))
    }

    static func report(_ t: borrowing VirtioPCITransport) -> Report {
        let features = t.readDeviceFeatures()
        let queueCount = t.queueCount()
        let queues = (0..<min(queueCount, maxQueuesShown)).map {
            Report.Queue(index: $0, maxSize: t.queueMaxSize($0), notifyOffset: t.queueNotifyOffset($0))
        }
        let status = t.readStatus()
        let negotiated = status.contains(.featuresOK) ? t.readDriverFeatures() : nil
        return Report(
            address: t.address.description,
            virtioType: t.deviceType.description,
            driverVersion: DriverVersion.string,
            iommuGroup: t.function.iommuGroup,
            vfioReset: t.deviceInfo.supportsReset,
            noIOMMU: t.session.iommu == nil,
            iovaRanges: (t.session.iommu?.iovaRanges ?? []).map { [$0.start, $0.end] },
            iommuPageSizes: t.session.iommu?.pageSizes ?? 0,
            regions: t.regions.filter { $0.size > 0 }.map {
                Report.Region(index: $0.index, name: VFIORegionIndex.name($0.index), size: $0.size, flags: $0.flagNames)
            },
            irqs: t.irqs.map { Report.IRQ(index: $0.index, name: VFIOIRQIndex.name($0.index), count: $0.count, flags: $0.flagNames) },
            capabilities: t.capabilities.all.map {
                Report.Capability(type: $0.type.name, bar: $0.bar, offset: $0.offset, length: $0.length,
                                  capabilityOffset: $0.capabilityOffset, notifyOffMultiplier: $0.notifyOffMultiplier)
            },
            ignoredCapabilities: t.capabilities.ignored.map { "0x\(hex($0.capabilityOffset, width: 2)): \($0.reason)" },
            status: status.description,
            statusValue: status.rawValue,
            deviceFeatures: features.rawValue,
            deviceFeatureNames: features.names(for: t.deviceType),
            negotiatedFeatures: negotiated?.rawValue,
            negotiatedFeatureNames: negotiated?.names(for: t.deviceType),
            ring: autoRing(features, t.deviceType).rawValue,
            negotiatedRing: negotiated.map { RingFormat($0).rawValue },
            queueCount: queueCount,
            queues: queues
        )
    }

    static func printText(_ r: Report) {
        print("\(r.address): virtio-\(r.virtioType), IOMMU group \(r.iommuGroup.map(String.init) ?? "-"), driver virtio-vfio \(r.driverVersion)")
        if r.noIOMMU {
            print("VFIO: device reset \(r.vfioReset ? "supported" : "not supported"); NO IOMMU (VFIO no-IOMMU mode): the device "
                  + "reaches memory by physical address, unprotected; DMA memory is hugepages (the kernel is tainted)")
        } else {
            print("VFIO: device reset \(r.vfioReset ? "supported" : "not supported"); IOMMU page sizes 0x\(String(r.iommuPageSizes, radix: 16)); IOVA ranges "
                  + r.iovaRanges.map { "0x\(String($0[0], radix: 16))-0x\(String($0[1], radix: 16))" }.joined(separator: ", "))
        }
        print("Regions:")
        for region in r.regions {
            print("  \(region.name.padding(6))  size 0x\(String(region.size, radix: 16).padding(8))  \(region.flags.joined(separator: ","))")
        }
        print("IRQs:")
        for irq in r.irqs where irq.count > 0 {
            print("  \(irq.name.padding(6))  \(irq.count) vector\(irq.count == 1 ? "" : "s")  \(irq.flags.joined(separator: ","))")
        }
        print("Virtio capabilities:")
        for c in r.capabilities {
            var line = "  \(c.type.padding(13)) BAR\(c.bar) offset 0x\(String(c.offset, radix: 16).padding(6)) length 0x\(String(c.length, radix: 16).padding(6)) (cap at 0x\(hex(c.capabilityOffset, width: 2)))"
            if let m = c.notifyOffMultiplier { line += " notify_off_multiplier \(m)" }
            print(line)
        }
        for ignored in r.ignoredCapabilities { print("  ignored \(ignored)") }
        print("Status: \(r.status)")
        print("Device features 0x\(hex(r.deviceFeatures, width: 16)):")
        print("  " + r.deviceFeatureNames.joined(separator: " "))
        if let negotiated = r.negotiatedFeatures, let names = r.negotiatedFeatureNames {
            print("Negotiated features 0x\(hex(negotiated, width: 16)):")
            print("  " + names.joined(separator: " "))
        } else {
            print("Negotiated features: none (status has no FEATURES_OK)")
        }
        let offered = r.deviceFeatureNames.contains("RING_PACKED")
        print("Ring: \(r.ring) with --ring auto (RING_PACKED \(offered ? "offered" : "not offered"))"
              + (r.negotiatedRing.map { "; negotiated: \($0)" } ?? ""))
        print("Queues: \(r.queueCount)")
        for q in r.queues { print("  queue \(q.index): max size \(q.maxSize), notify offset \(q.notifyOffset)") }
    }
}

extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }
}
