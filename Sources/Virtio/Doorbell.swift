import CVirtioShim

/// Where the driver writes to notify the device of new available buffers (spec 2.9 "Driver
/// Notifications"; for PCI the queue's address in the notification structure, spec 4.1.4.4).
/// A plain value so the hot path rings it without any dispatch or reference counting.
public struct Doorbell: @unchecked Sendable {
    public let address: UnsafeMutableRawPointer
    /// The value written: the queue index (spec 4.1.5.2 without VIRTIO_F_NOTIFICATION_DATA).
    public let value: UInt16

    public init(address: UnsafeMutableRawPointer, value: UInt16) {
        self.address = address
        self.value = value
    }

    /// One 16-bit volatile store (spec 4.1.5.2: the driver writes the 16-bit virtqueue index).
    @inline(__always)
    public func ring() {
        CVirtioShim_mmio_write16(address, value.littleEndian)
    }

    /// With VIRTIO_F_NOTIFICATION_DATA (spec 2.9, 4.1.5.2): one 32-bit volatile store of
    /// `{ vqn: 16; next_off: 15; next_wrap: 1 }`, `next` being the upper 16 bits: a split ring's
    /// next available index, a packed ring's next available position with its wrap counter in
    /// bit 15.
    @inline(__always)
    public func ring(next: UInt16) {
        CVirtioShim_mmio_write32(address, (UInt32(value) | UInt32(next) << 16).littleEndian)
    }
}
