/// The two virtqueue formats (virtio 1.2 §2.6): split (§2.7), and packed (§2.8) when
/// VIRTIO_F_RING_PACKED is negotiated.
public enum RingFormat: String, Sendable, CaseIterable, CustomStringConvertible {
    case split, packed

    /// The format a negotiation gave: packed exactly when RING_PACKED was accepted (§2.8: "the
    /// packed virtqueue format is used" once the feature is negotiated).
    public init(_ features: Features) { self = features.contains(.ringPacked) ? .packed : .split }

    public var description: String { rawValue }
}

/// Which format a driver asks for: `auto` takes packed when the device offers it, `split` never
/// asks for it, `packed` requires it.
public enum RingPreference: String, Sendable, CaseIterable {
    case auto, split, packed

    /// Exactly `format`.
    public init(_ format: RingFormat) { self = format == .packed ? .packed : .split }

    /// `wanted` with RING_PACKED asked for or left out as this preference says.
    public func features(_ wanted: Features) -> Features {
        self == .split ? wanted.subtracting(.ringPacked) : wanted.union(.ringPacked)
    }

    /// The format `negotiation` gave, checked against the preference: `packed` on a device that did
    /// not accept RING_PACKED is refused by name (before DRIVER_OK; the device stays resettable).
    public func format(_ negotiation: Lifecycle.Negotiation) throws(VirtioError) -> RingFormat {
        let format = RingFormat(negotiation.accepted)
        if self == .packed && format != .packed {
            throw .missingFeature("RING_PACKED (the device does not offer the packed ring, §2.8; use --ring split or auto)")
        }
        return format
    }
}

/// A virtqueue's rings in either format, carved from a DMA arena in the format's own layout.
public enum QueueMemory: Sendable {
    case split(SplitQueueMemory)
    case packed(PackedQueueMemory)

    /// The rings of a `size`-entry queue (and `indirectEntries`-entry indirect tables, one per
    /// request), from `arena`; with `zeroed: false` nothing is written (adoption).
    public init(_ format: RingFormat, arena: DMAArena, size: UInt16, indirectEntries: Int = 0,
                zeroed: Bool = true) throws(VirtioError) {
        switch format {
        case .split: self = .split(try SplitQueueMemory(arena: arena, size: size, indirectEntries: indirectEntries, zeroed: zeroed))
        case .packed: self = .packed(try PackedQueueMemory(arena: arena, size: size, indirectEntries: indirectEntries, zeroed: zeroed))
        }
    }

    public var format: RingFormat {
        switch self { case .split: .split; case .packed: .packed }
    }
    public var size: UInt16 {
        switch self { case .split(let m): m.size; case .packed(let m): m.size }
    }
    /// Where the device finds the rings (queue_desc, queue_driver, queue_device, §4.1.4.3).
    public var rings: QueueRings {
        switch self { case .split(let m): m.rings; case .packed(let m): m.rings }
    }
}
