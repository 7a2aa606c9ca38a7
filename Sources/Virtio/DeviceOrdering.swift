import CVirtioShim

/// The memory barriers a queue orders its accesses against the device with, chosen once when the
/// queue is built from the negotiated features (virtio 1.2 §6, VIRTIO_F_ORDER_PLATFORM): with the
/// feature, the platform's barriers for a hardware device (Linux's mb/dma_rmb/dma_wmb); without
/// it the device may be assumed to be software on an SMP peer, and the SMP barriers suffice
/// (virt_mb/virt_rmb/virt_wmb). Each call site names the spec section that needs the order.
public struct DeviceOrdering: Sendable, Equatable {
    /// VIRTIO_F_ORDER_PLATFORM was negotiated.
    public let platform: Bool

    public init(_ features: Features) { platform = features.contains(.orderPlatform) }

    /// Earlier loads and stores before later loads and stores.
    @inline(__always) public func full() {
        if platform { CVirtioShim_platform_barrier_full() } else { CVirtioShim_barrier_full() }
    }
    /// Earlier loads before later loads.
    @inline(__always) public func read() {
        if platform { CVirtioShim_platform_barrier_read() } else { CVirtioShim_barrier_read() }
    }
    /// Earlier stores visible before later stores.
    @inline(__always) public func write() {
        if platform { CVirtioShim_platform_barrier_write() } else { CVirtioShim_barrier_write() }
    }
}
