import Upgrade
import Virtio

/// A transport whose device another driver process can take over: it lends the descriptors a
/// successor needs (for VFIO: container, group, device, the DMA memfd, the MSI-X eventfds) and
/// names its DMA range. The descriptors stay this transport's; the successor receives its own.
public protocol HandoverTransport: Transport, ~Copyable {
    /// The device's address as the record names it ("0000:00:05.0").
    var handoverAddress: String { get }
    /// What a successor needs to reach the device, each descriptor with its role, in order.
    var lentDescriptors: [LentDescriptor] { get }
    /// The roles a successor requires exactly once in the device part.
    static var requiredDeviceRoles: [StateRecord.DescriptorRole] { get }
}

/// A descriptor sent to a successor while its owner keeps it (and keeps using it until `go`).
public struct LentDescriptor: Sendable, Equatable {
    public var role: StateRecord.DescriptorRole
    public var fd: Int32
    public init(_ role: StateRecord.DescriptorRole, _ fd: Int32) {
        self.role = role
        self.fd = fd
    }
}

/// The device part of the state: what a successor maps while this driver still serves (no queue
/// indices yet: those change until the service quiesces).
public struct DevicePart: Sendable {
    public var record: StateRecord
    public var descriptors: [LentDescriptor]
}

extension HandoverTransport where Self: ~Copyable {
    /// The device part for a driver of `driverVersion` running the device with `features`.
    public func devicePart(driverVersion: String, features: Features) -> DevicePart {
        let lent = lentDescriptors
        let record = StateRecord(driverVersion: driverVersion, deviceAddress: handoverAddress,
                                 deviceType: deviceType.rawValue, features: features.rawValue,
                                 dmaIOVA: dma.memory.deviceAddress, dmaSize: UInt64(dma.memory.size), queues: [], inFlight: [],
                                 descriptors: lent.map(\.role))
        return DevicePart(record: record, descriptors: lent)
    }
}
