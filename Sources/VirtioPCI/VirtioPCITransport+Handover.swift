import HotUpgrade
import PCI
import Syscalls
import Upgrade
import VFIO

extension VirtioPCITransport: HandoverTransport {
    public var handoverAddress: String { "\(address)" }

    public static var requiredDeviceRoles: [StateRecord.DescriptorRole] { StateRecord.vfioRoles }

    public var lentDescriptors: [LentDescriptor] {
        let d = handoverDescriptors
        return [LentDescriptor(.container, d.container), LentDescriptor(.group, d.group), LentDescriptor(.device, d.device),
                LentDescriptor(.dmaMemory, d.dmaMemory)] + d.interrupts.map { LentDescriptor(.interrupt, $0) }
    }
}

extension Successor {
    /// Maps the device handed over through VFIO (regions, capabilities, BARs, DMA memory): the
    /// `attach` step of `takeOver` for a virtio-pci device. Nothing is written to the device.
    public mutating func attachVFIO(_ address: PCIAddress, sysfs: SysfsPCI) throws(UpgradeError) -> VirtioPCITransport {
        guard let container = descriptors.take(.container), let group = descriptors.take(.group),
              let device = descriptors.take(.device), let memory = descriptors.take(.dmaMemory) else {
            throw UpgradeError(.protocolError, "the device part lacks a VFIO descriptor")
        }
        let interrupts = descriptors.takeAll(.interrupt)
        let groupNumber: Int
        do { groupNumber = try VFIOAvailability.boundGroup(of: try sysfs.function(at: address)) } catch {
            throw UpgradeError(.unavailable, "\(error)")
        }
        guard record.dmaSize <= UInt64(Int.max) else { throw UpgradeError(.protocolError, "DMA size \(record.dmaSize)") }
        let handover = VFIOHandover(address: address, container: container, group: group, groupNumber: groupNumber, device: device,
                                    dmaMemory: memory, dmaIOVA: record.dmaIOVA, dmaSize: Int(record.dmaSize), interrupts: interrupts)
        do { return try VirtioPCITransport(adopting: handover, sysfs: sysfs) } catch {
            throw UpgradeError(.protocolError, "\(error)")
        }
    }
}
