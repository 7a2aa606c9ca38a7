/// What the net device counted: traffic, drops by reason, device faults.
public struct NetCounters: Sendable, Equatable {
    public var rxPackets = 0
    public var rxBytes = 0
    public var txPackets = 0
    public var txBytes = 0
    /// Transmitted frames the device has completed (their slots reclaimed).
    public var txCompleted = 0
    /// `transmit` calls refused because every slot was in flight (backpressure, not loss).
    public var txRingFull = 0
    /// Frames in flight on the transmit queue when a reset took them back (lost).
    public var txLostToReset = 0
    /// Received frames dropped, by reason (never delivered).
    public var rxShortUsedLength = 0
    public var rxBadNumBuffers = 0
    public var rxBadHeader = 0
    public var rxBadLength = 0
    /// Rings the device broke (a used element the queue refused: §2.7.8), and the resets that
    /// brought the device back.
    public var brokenRings = 0
    public var recoveries = 0
    /// Changes of the link status seen by `refreshStatus`.
    public var linkChanges = 0

    public init() {}

    /// Every counter by a stable name, for reports (`virtio-vfio info`) and for handing the
    /// counts to a successor driver, which continues them.
    public static let fields: [(name: String, path: WritableKeyPath<NetCounters, Int> & Sendable)] = [
        ("rx_packets", \.rxPackets), ("rx_bytes", \.rxBytes), ("tx_packets", \.txPackets), ("tx_bytes", \.txBytes),
        ("tx_completed", \.txCompleted), ("tx_ring_full", \.txRingFull), ("tx_lost_to_reset", \.txLostToReset),
        ("rx_drop_short_used_length", \.rxShortUsedLength), ("rx_drop_bad_num_buffers", \.rxBadNumBuffers),
        ("rx_drop_bad_header", \.rxBadHeader), ("rx_drop_bad_length", \.rxBadLength),
        ("broken_rings", \.brokenRings), ("recoveries", \.recoveries), ("link_changes", \.linkChanges),
    ]

    public var rxDropped: Int { rxShortUsedLength + rxBadNumBuffers + rxBadHeader + rxBadLength }

    public func drops(_ reason: NetDropReason) -> Int {
        switch reason {
        case .shortUsedLength: return rxShortUsedLength
        case .badNumBuffers: return rxBadNumBuffers
        case .badHeader: return rxBadHeader
        case .badLength: return rxBadLength
        }
    }

    @inline(__always)
    mutating func drop(_ reason: NetDropReason) {
        switch reason {
        case .shortUsedLength: rxShortUsedLength += 1
        case .badNumBuffers: rxBadNumBuffers += 1
        case .badHeader: rxBadHeader += 1
        case .badLength: rxBadLength += 1
        }
    }
}
