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
    /// All 64 offered feature bits (`device_feature` through `device_feature_select` 0 and 1).
    func readDeviceFeatures() -> Features
    /// Writes all 64 accepted feature bits (`driver_feature` through `driver_feature_select`).
    func writeDriverFeatures(_ features: Features)
    /// `num_queues`: how many virtqueues the device has.
    func queueCount() -> Int
    /// The maximum size of queue `index` (`queue_select`, then `queue_size`); 0 if unavailable.
    func queueMaxSize(_ index: Int) -> UInt16
    /// `config_generation` (§2.5.1, §4.1.4.3).
    func configGeneration() -> UInt8
}
