import Virtio

/// The driver's view of an `EmulatedDevice`: the same `Transport` the PCI transport implements.
/// Any number of transports may be made for one device; they share its registers and its DMA
/// memory, as a successor process on a live upgrade shares the VFIO device and the memfd.
public struct EmulatedTransport: Transport {
    public let device: EmulatedDevice

    public init(device: EmulatedDevice) { self.device = device }

    /// A second view of the device `other` drives: same registers, same DMA memory.
    public init(sharing other: borrowing EmulatedTransport) { self.device = other.device }

    public var deviceType: DeviceType { device.model.type }
    public func readStatus() -> DeviceStatus { device.readStatus() }
    public func writeStatus(_ status: DeviceStatus) { device.writeStatus(status) }
    public var canResetFunction: Bool { device.model.functionLevelReset }
    public func resetFunction() throws(VirtioError) { try device.resetFunction() }
    public func readDeviceFeatures() -> Features { device.readDeviceFeatures() }
    public func writeDriverFeatures(_ features: Features) { device.writeDriverFeatures(features) }
    public func queueCount() -> Int { device.queueCount() }
    public func queueMaxSize(_ index: Int) -> UInt16 { device.queueMaxSize(index) }
    public func queueState(_ index: Int) -> QueueState? { device.queueState(index) }
    public func readDriverFeatures() -> Features { device.driverFeatures }
    public func configGeneration() -> UInt8 { device.configGeneration() }

    public var dma: DMAArena { device.dma }
    public func enableQueue(_ index: Int, size: UInt16, rings: QueueRings, vector: UInt16?) throws(VirtioError) -> Doorbell {
        try device.enableQueue(index, size: size, rings: rings, vector: vector)
    }
    public func resetQueue(_ index: Int, timeout: Duration) throws(VirtioError) {
        try device.resetQueue(index, timeout: timeout)
    }
    public func setConfigVector(_ vector: UInt16?) throws(VirtioError) { try device.setConfigVector(vector) }
    public func readISR() -> UInt8 { device.readISR() }
    public func readDeviceConfig(_ offset: Int, width: Int) -> UInt32? { device.readDeviceConfig(offset, width: width) }
    public func enableInterrupts(count: Int) throws(VirtioError) -> [Int32] { try device.enableInterrupts(count: count) }
    public func disableInterrupts() { device.disableInterrupts() }
}
