/// Checks a new driver process makes before it takes over a running device without a reset
/// (live upgrade). Everything is read from the device once and compared with the handed-over
/// state; nothing is written. Each refusal names what differs, and the caller falls back to
/// starting the device with a reset.
public enum Adoption {
    /// The device is live and runs with exactly `features`: status has ACKNOWLEDGE, DRIVER,
    /// FEATURES_OK and DRIVER_OK and neither DEVICE_NEEDS_RESET nor FAILED (§2.1, §3.1.1), the
    /// accepted features the device presents equal `features` (§4.1.4.3.1) and it offers them all.
    /// Returns the negotiation as it stands (no transitions: nothing was written).
    public static func checkLive<T: Transport & ~Copyable>(
        _ transport: borrowing T, features: Features
    ) throws(VirtioError) -> Lifecycle.Negotiation {
        let status = transport.readStatus()
        let live: DeviceStatus = [.acknowledge, .driver, .featuresOK, .driverOK]
        guard status.isSuperset(of: live) else {
            throw .adoption(queue: nil, "status is \(status), not \(live) (the device was reset or never started)")
        }
        guard status.isDisjoint(with: [.deviceNeedsReset, .failed]) else {
            throw .adoption(queue: nil, "status is \(status): the device needs a reset (§2.1.2)")
        }
        let accepted = transport.readDriverFeatures()
        guard accepted == features else {
            throw .adoption(queue: nil, "the device runs with features 0x\(String(accepted.rawValue, radix: 16)), "
                            + "the handed-over state says 0x\(String(features.rawValue, radix: 16))")
        }
        // Before anything about the queues: a packed ring is not adopted live (`Virtqueue`).
        guard !accepted.contains(.ringPacked) else { throw Virtqueue.packedAdoption(queue: nil) }
        let offered = transport.readDeviceFeatures()
        guard features.isSubset(of: offered) else {
            throw .adoption(queue: nil, "features 0x\(String(features.subtracting(offered).rawValue, radix: 16)) "
                            + "are accepted but not offered (offered 0x\(String(offered.rawValue, radix: 16)))")
        }
        return Lifecycle.Negotiation(offered: offered, accepted: features, transitions: [])
    }

    /// Queue `snapshot.index` is enabled with the snapshot's size and rings; in an interrupt mode
    /// (`vector` not nil) it must still signal MSI-X `vector`. Returns its doorbell.
    public static func checkQueue<T: Transport & ~Copyable>(
        _ transport: borrowing T, _ snapshot: QueueSnapshot, vector: UInt16?
    ) throws(VirtioError) -> Doorbell {
        let i = snapshot.index
        guard let state = transport.queueState(i) else {
            throw .adoption(queue: i, "the device has no such queue (it has \(transport.queueCount()))")
        }
        guard state.enabled else { throw .adoption(queue: i, "queue_enable reads 0 (the queue was reset)") }
        guard state.size == snapshot.size else {
            throw .adoption(queue: i, "queue_size is \(state.size), the handed-over state says \(snapshot.size)")
        }
        guard state.rings == snapshot.rings else {
            throw .adoption(queue: i, "rings are at \(describe(state.rings)) on the device, the handed-over state says \(describe(snapshot.rings))")
        }
        if let vector, state.msixVector != vector {
            let found = state.msixVector == noMSIXVector ? "NO_VECTOR (the previous driver polled)" : "\(state.msixVector)"
            throw .adoption(queue: i, "queue_msix_vector is \(found), interrupt mode needs \(vector): adopt in poll mode")
        }
        guard let doorbell = state.doorbell else {
            throw .adoption(queue: i, "queue_notify_off points outside the notification structure")
        }
        return doorbell
    }

    /// The rings this version's layout puts queue `snapshot.index` at must be where the device
    /// has them: otherwise this version lays out memory differently and cannot adopt.
    public static func checkLayout(_ computed: QueueRings, _ snapshot: QueueSnapshot) throws(VirtioError) {
        guard computed == snapshot.rings else {
            throw .adoption(queue: snapshot.index, "this version lays the rings out at \(describe(computed)), "
                            + "the device has them at \(describe(snapshot.rings)) (a different memory layout)")
        }
    }

    /// What `checkLive` and `checkQueue` found for a whole device: the decision to adopt it live
    /// is made on these reads, and the adopting initialiser takes them instead of reading every
    /// register a second time inside the service gap.
    public struct Verified: Sendable {
        public let features: Features
        public let negotiation: Lifecycle.Negotiation
        /// Each checked queue's doorbell and the MSI-X vector it was checked against, by index.
        let queues: [Int: (doorbell: Doorbell, vector: UInt16?)]
    }

    /// `checkLive`, then `checkQueue` for each snapshot (`vectors[i]` for the i-th, nil: unchecked).
    public static func verify<T: Transport & ~Copyable>(
        _ transport: borrowing T, features: Features, snapshots: [QueueSnapshot], vectors: [UInt16?]
    ) throws(VirtioError) -> Verified {
        let negotiation = try checkLive(transport, features: features)
        var queues: [Int: (doorbell: Doorbell, vector: UInt16?)] = [:]
        for (i, snapshot) in snapshots.enumerated() {
            let vector = i < vectors.count ? vectors[i] : nil
            queues[snapshot.index] = (try checkQueue(transport, snapshot, vector: vector), vector)
        }
        return Verified(features: features, negotiation: negotiation, queues: queues)
    }

    /// The device-wide check: taken from `verified` when it covers `features`, else read now.
    public static func live<T: Transport & ~Copyable>(_ transport: borrowing T, features: Features,
                                               verified: Verified?) throws(VirtioError) -> Lifecycle.Negotiation {
        if let verified, verified.features == features { return verified.negotiation }
        return try checkLive(transport, features: features)
    }

    /// The per-queue check: taken from `verified` when it checked the same vector, else read now.
    public static func doorbell<T: Transport & ~Copyable>(_ transport: borrowing T, _ snapshot: QueueSnapshot, verified: Verified?,
                                                   vector: UInt16?) throws(VirtioError) -> Doorbell {
        if let checked = verified?.queues[snapshot.index], checked.vector == vector { return checked.doorbell }
        return try checkQueue(transport, snapshot, vector: vector)
    }

    static func describe(_ r: QueueRings) -> String {
        "desc 0x\(String(r.descriptors, radix: 16)) driver 0x\(String(r.driver, radix: 16)) device 0x\(String(r.device, radix: 16))"
    }
}
