/// What the driver needs of a virtio transport (virtio 1.2 §4): the status byte, feature words,
/// queue discovery and the configuration generation. The modern PCI transport over VFIO
/// implements it; so does the software device used in tests.
///
/// Implementations read each register once per call and do not cache: the device may change
/// any of these values (for example clear FEATURES_OK, or set DEVICE_NEEDS_RESET) at any time.
public protocol Transport: ~Copyable {
    /// The device's type, from its identity on the bus.
    var deviceType: DeviceType { get }
    /// Reads `device_status`.
    func readStatus() -> DeviceStatus
    /// Writes `device_status`. Writing 0 starts a reset (§2.4).
    func writeStatus(_ status: DeviceStatus)
    /// Whether the function can be reset below virtio: PCI, VFIO reports a reset method for it
    /// (FLR, PM or bus reset, `VFIO_DEVICE_FLAGS_RESET`); the emulator, its model has one.
    var canResetFunction: Bool { get }
    /// Resets the whole function below virtio (PCI: `VFIO_DEVICE_RESET`; vfio-pci restores the
    /// config space and MSI-X routing). The last way back for a device whose status reset does
    /// not complete; afterwards `device_status` reads 0 on a working device.
    func resetFunction() throws(VirtioError)
    /// All 64 offered feature bits (`device_feature` through `device_feature_select` 0 and 1).
    func readDeviceFeatures() -> Features
    /// Writes all 64 accepted feature bits (`driver_feature` through `driver_feature_select`).
    func writeDriverFeatures(_ features: Features)
    /// `num_queues`: how many virtqueues the device has.
    func queueCount() -> Int
    /// The maximum size of queue `index` (`queue_select`, then `queue_size`); 0 if unavailable.
    func queueMaxSize(_ index: Int) -> UInt16
    /// The programmed state of queue `index` as the device reports it now (size, enable, ring
    /// addresses, MSI-X vector, doorbell), or nil if the device has no such queue. For adopting a
    /// running device (live upgrade); nothing is written but `queue_select`.
    func queueState(_ index: Int) -> QueueState?
    /// The accepted feature bits as the device presents them (§4.1.4.3.1), meaningful once
    /// FEATURES_OK is set: a successor process compares them with what it was handed.
    func readDriverFeatures() -> Features
    /// `config_generation` (§2.5.1, §4.1.4.3).
    func configGeneration() -> UInt8

    // MARK: Queues, interrupts, memory (used after FEATURES_OK, before DRIVER_OK; spec 3.1.1 step 7)

    /// Device-visible memory for rings and request buffers.
    var dma: DMAArena { get }
    /// Programs and enables queue `index` with `size` entries at `rings`, completions signalled on
    /// MSI-X `vector` (nil: no interrupt, the driver polls). Returns the queue's doorbell.
    /// Fails if the queue does not exist, `size` exceeds its maximum, or the vector is refused.
    func enableQueue(_ index: Int, size: UInt16, rings: QueueRings, vector: UInt16?) throws(VirtioError) -> Doorbell
    /// Resets one queue (VIRTIO_F_RING_RESET, spec 2.6.1): the device stops using its buffers;
    /// `enableQueue` brings it back. Other queues keep running.
    func resetQueue(_ index: Int, timeout: Duration) throws(VirtioError)
    /// Routes configuration-change interrupts to MSI-X `vector` (nil: none).
    func setConfigVector(_ vector: UInt16?) throws(VirtioError)
    /// Reads (and so clears) the ISR status byte (spec 4.1.4.5).
    func readISR() -> UInt8
    /// Reads `width` (1, 2, 4) bytes of device-specific configuration at `offset`; nil if outside.
    func readDeviceConfig(_ offset: Int, width: Int) -> UInt32?
    /// Enables `count` interrupt vectors, each signalling one eventfd; returns their descriptors
    /// (owned by the transport, valid until `disableInterrupts` or the transport goes away).
    func enableInterrupts(count: Int) throws(VirtioError) -> [Int32]
    /// Disables every interrupt vector.
    func disableInterrupts()
}

/// Where a split virtqueue's three parts live, in device addresses (spec 2.7): the descriptor
/// table, the driver area (available ring) and the device area (used ring).
public struct QueueRings: Sendable, Equatable {
    public var descriptors: UInt64
    public var driver: UInt64
    public var device: UInt64

    public init(descriptors: UInt64, driver: UInt64, device: UInt64) {
        self.descriptors = descriptors
        self.driver = driver
        self.device = device
    }
}

/// `VIRTIO_MSI_NO_VECTOR` (spec 4.1.4.3): no interrupt for this queue or for config changes.
public let noMSIXVector: UInt16 = 0xFFFF
