import PCI
import Syscalls

/// What a driver process hands its successor to drive the same device (a hot upgrade), as the
/// successor received it: the container, group and device descriptors, the DMA memfd with where
/// it is mapped in the container, and the MSI-X eventfds. One owner; consumed by
/// `VirtioPCITransport(adopting:)`.
@frozen public struct VFIOHandover: ~Copyable {
    public let address: PCIAddress
    public let container: OwnedFD
    public let group: OwnedFD
    public let groupNumber: Int
    public let device: OwnedFD
    public let dmaMemory: OwnedFD
    public let dmaIOVA: UInt64
    public let dmaSize: Int
    /// Eventfds of MSI-X vectors 0..<count, in order (owned: closed unless adopted).
    public let interrupts: OwnedFDList

    public init(address: PCIAddress, container: consuming OwnedFD, group: consuming OwnedFD, groupNumber: Int,
                device: consuming OwnedFD, dmaMemory: consuming OwnedFD, dmaIOVA: UInt64, dmaSize: Int, interrupts: consuming OwnedFDList) {
        self.address = address
        self.container = container
        self.group = group
        self.groupNumber = groupNumber
        self.device = device
        self.dmaMemory = dmaMemory
        self.dmaIOVA = dmaIOVA
        self.dmaSize = dmaSize
        self.interrupts = interrupts
    }
}

/// The descriptors a serving driver hands over (it keeps them open until the successor is healthy).
public struct VFIODescriptors: Sendable, Equatable {
    public var container: Int32
    public var group: Int32
    public var groupNumber: Int
    public var device: Int32
    public var dmaMemory: Int32
    public var dmaIOVA: UInt64
    public var dmaSize: Int
    public var interrupts: [Int32]

    public init(container: Int32, group: Int32, groupNumber: Int, device: Int32, dmaMemory: Int32, dmaIOVA: UInt64,
                dmaSize: Int, interrupts: [Int32]) {
        self.container = container; self.group = group; self.groupNumber = groupNumber; self.device = device
        self.dmaMemory = dmaMemory; self.dmaIOVA = dmaIOVA; self.dmaSize = dmaSize; self.interrupts = interrupts
    }
}
