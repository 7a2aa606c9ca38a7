/// What a transport reports about one virtqueue's registers (virtio 1.2 §4.1.4.3: `queue_size`,
/// `queue_enable`, `queue_desc`/`queue_driver`/`queue_device`, `queue_msix_vector`), read from
/// the device, not remembered. A new driver process compares it with the state record before it
/// adopts a running queue; like everything the device says, it is untrusted until compared.
public struct QueueState: Sendable, Equatable {
    /// `queue_size`: the size programmed by the driver (the maximum until one was written).
    public var size: UInt16
    /// `queue_enable` reads 1.
    public var enabled: Bool
    /// The three ring addresses as programmed.
    public var rings: QueueRings
    /// `queue_msix_vector` (`noMSIXVector` for none).
    public var msixVector: UInt16
    /// Where the driver notifies this queue (from `queue_notify_off`, §4.1.4.4), nil if the
    /// device reports a notify offset outside its notification structure.
    public var doorbell: Doorbell?

    public init(size: UInt16, enabled: Bool, rings: QueueRings, msixVector: UInt16, doorbell: Doorbell?) {
        self.size = size
        self.enabled = enabled
        self.rings = rings
        self.msixVector = msixVector
        self.doorbell = doorbell
    }

    public static func == (a: QueueState, b: QueueState) -> Bool {
        a.size == b.size && a.enabled == b.enabled && a.rings == b.rings && a.msixVector == b.msixVector
            && a.doorbell?.address == b.doorbell?.address && a.doorbell?.value == b.doorbell?.value
    }
}
