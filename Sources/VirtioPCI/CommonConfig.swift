import VFIO
import Virtio

/// Register offsets of `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3).
public enum CommonConfig {
    public static let deviceFeatureSelect = 0x00  // le32, RW
    public static let deviceFeature = 0x04        // le32, RO
    public static let driverFeatureSelect = 0x08  // le32, RW
    public static let driverFeature = 0x0C        // le32, RW
    public static let configMSIXVector = 0x10     // le16, RW
    public static let numQueues = 0x12            // le16, RO
    public static let deviceStatus = 0x14         // u8, RW
    public static let configGeneration = 0x15     // u8, RO
    public static let queueSelect = 0x16          // le16, RW
    public static let queueSize = 0x18            // le16, RW
    public static let queueMSIXVector = 0x1A      // le16, RW
    public static let queueEnable = 0x1C          // le16, RW
    public static let queueNotifyOff = 0x1E       // le16, RO
    public static let queueDesc = 0x20            // le64, RW
    public static let queueDriver = 0x28          // le64, RW
    public static let queueDevice = 0x30          // le64, RW
    public static let queueNotifyData = 0x38      // le16, RO (1.2)
    public static let queueReset = 0x3A           // le16, RW (1.2, VIRTIO_F_RING_RESET)
}

/// Accessors for the common configuration structure over its MMIO window.
/// Each function is one register access (or one select + access pair) in the order the spec fixes.
struct CommonConfigRegisters {
    let mmio: MMIOWindow

    func status() -> UInt8 { mmio.load8(CommonConfig.deviceStatus) }
    func setStatus(_ value: UInt8) { mmio.store8(CommonConfig.deviceStatus, value) }

    /// 64 offered feature bits: select word 0, read; select word 1, read (§4.1.4.3).
    func deviceFeatures() -> UInt64 {
        mmio.store32(CommonConfig.deviceFeatureSelect, 0)
        let low = mmio.load32(CommonConfig.deviceFeature)
        mmio.store32(CommonConfig.deviceFeatureSelect, 1)
        let high = mmio.load32(CommonConfig.deviceFeature)
        return UInt64(low) | UInt64(high) << 32
    }

    /// 64 accepted feature bits: select word 0, write; select word 1, write (§4.1.4.3).
    func setDriverFeatures(_ value: UInt64) {
        mmio.store32(CommonConfig.driverFeatureSelect, 0)
        mmio.store32(CommonConfig.driverFeature, UInt32(truncatingIfNeeded: value))
        mmio.store32(CommonConfig.driverFeatureSelect, 1)
        mmio.store32(CommonConfig.driverFeature, UInt32(truncatingIfNeeded: value >> 32))
    }

    /// The accepted bits as the device presents them (§4.1.4.3.1: the device MUST present the valid
    /// feature bits the driver has written).
    func driverFeatures() -> UInt64 {
        mmio.store32(CommonConfig.driverFeatureSelect, 0)
        let low = mmio.load32(CommonConfig.driverFeature)
        mmio.store32(CommonConfig.driverFeatureSelect, 1)
        let high = mmio.load32(CommonConfig.driverFeature)
        return UInt64(low) | UInt64(high) << 32
    }

    func numQueues() -> UInt16 { mmio.load16(CommonConfig.numQueues) }
    func configGeneration() -> UInt8 { mmio.load8(CommonConfig.configGeneration) }

    /// Selects a queue; every queue_* access after this refers to it (§4.1.4.3).
    func select(queue: UInt16) { mmio.store16(CommonConfig.queueSelect, queue) }
    func queueSize() -> UInt16 { mmio.load16(CommonConfig.queueSize) }
    func queueNotifyOff() -> UInt16 { mmio.load16(CommonConfig.queueNotifyOff) }
    func queueEnable() -> UInt16 { mmio.load16(CommonConfig.queueEnable) }
    func setQueueSize(_ v: UInt16) { mmio.store16(CommonConfig.queueSize, v) }
    func queueVector() -> UInt16 { mmio.load16(CommonConfig.queueMSIXVector) }
    func setQueueVector(_ v: UInt16) { mmio.store16(CommonConfig.queueMSIXVector, v) }
    func configVector() -> UInt16 { mmio.load16(CommonConfig.configMSIXVector) }
    func setConfigVector(_ v: UInt16) { mmio.store16(CommonConfig.configMSIXVector, v) }
    /// 64-bit ring addresses as two 32-bit writes, low half first (§4.1.3.1).
    func setQueueAddresses(_ rings: QueueRings) {
        mmio.store64Split(CommonConfig.queueDesc, rings.descriptors)
        mmio.store64Split(CommonConfig.queueDriver, rings.driver)
        mmio.store64Split(CommonConfig.queueDevice, rings.device)
    }
    /// The ring addresses as programmed, each 64-bit register as two 32-bit reads (§4.1.3.1).
    func queueAddresses() -> QueueRings {
        QueueRings(descriptors: mmio.load64Split(CommonConfig.queueDesc),
                   driver: mmio.load64Split(CommonConfig.queueDriver),
                   device: mmio.load64Split(CommonConfig.queueDevice))
    }
    func enableQueue() { mmio.store16(CommonConfig.queueEnable, 1) }
    func queueReset() -> UInt16 { mmio.load16(CommonConfig.queueReset) }
    func startQueueReset() { mmio.store16(CommonConfig.queueReset, 1) }
}
