import Virtio

/// The driver's version, shown by `--version`, `info` and the upgrade log, and the ring features
/// this build accepts. A second build for upgrade tests (`swift build -Xswiftc -DVIRTIO_VFIO_NO_EVENT_IDX`,
/// see tools/build-variant) stamps another version and does not accept VIRTIO_F_EVENT_IDX, so an
/// upgrade between the two renegotiates a different feature set (reset mode only: live mode
/// needs equal features).
enum DriverVersion {
#if VIRTIO_VFIO_NO_EVENT_IDX
    static let string = "0.3.0+no-event-idx"
    static let ringFeatures: Features = []
#else
    static let string = "0.3.0"
    static let ringFeatures: Features = [.ringEventIdx]
#endif
    /// The virtio-blk features this build accepts (`supported` is `BlockDevice.supported`).
    static func blockFeatures(_ supported: Features) -> Features { supported.subtracting(.ringEventIdx).union(ringFeatures) }
}
