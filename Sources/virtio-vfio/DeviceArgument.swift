import ArgumentParser
import PCI

/// A `BDF` argument, parsed and validated before anything is opened.
struct DeviceArgument: ParsableArguments {
    @Argument(help: ArgumentHelp("PCI address of the device, e.g. 0000:00:05.0 or 00:05.0.", valueName: "BDF"))
    var bdf: String

    func address() throws -> PCIAddress {
        do { return try PCIAddress(parsing: bdf) } catch { throw Failure.exit(error) }
    }
}

import Virtio
import VirtioPCI

extension GlobalOptions {
    /// Opens `address` through VFIO with `dmaBytes` of device memory; if `type` is given, refuses
    /// any other device type as a usage error (exit 64) before anything is written to it.
    func openTransport(_ address: PCIAddress, dmaBytes: Int = 0, expecting type: DeviceType? = nil,
                       announceLeftover: Bool = false) throws -> VirtioPCITransport {
        let transport: VirtioPCITransport
        do { transport = try VirtioPCITransport(address: address, sysfs: SysfsPCI(root: sysfsRoot), dmaBytes: dmaBytes) } catch {
            throw Failure.exit(error)
        }
        if let type, transport.deviceType != type {
            throw Failure.exit(ValidationError("\(address) is virtio-\(transport.deviceType), not virtio-\(type)"))
        }
        if dmaBytes > 0, transport.session.iommu == nil {
            // As the kernel taints itself when a no-IOMMU group is opened: say it once, every time.
            printError("\(address): driven without an IOMMU (VFIO no-IOMMU mode): the device reaches memory by physical "
                       + "address and nothing stops it from reaching any of it")
        }
        if announceLeftover {
            // A status other than 0 means a driver before this one did not shut the device down
            // (it crashed or was killed): the seed's third use of reset brings it back.
            let status = transport.readStatus()
            if status.rawValue != 0 {
                printError("\(address): found the device in status \(status) (left by a driver that did not shut it down); resetting it")
            }
        }
        return transport
    }
}

extension PCIAddress {
    /// The address in 32 bits (domain, bus, device, function), which the ublk device of this
    /// function carries so that the next driver finds it (`UBlkMark`).
    var ublkKey: UInt32 { UInt32(domain) << 16 | UInt32(bus) << 8 | UInt32(device) << 3 | UInt32(function) }
}
