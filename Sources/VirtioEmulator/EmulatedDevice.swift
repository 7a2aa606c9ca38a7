import Synchronization
import Virtio

/// A spec-strict software virtio device: the device side of the status and feature protocol of
/// virtio 1.2 §2.1, §2.2 and §3.1, with the reset semantics of §2.4 and §4.1.4.3.
///
/// It is a second, real implementation of what the PCI transport talks to, so every layer above
/// `Transport` runs in unit tests. It refuses drivers that break the spec (and records why in
/// `violations`), and has fault switches for the hardening tests.
public final class EmulatedDevice: Sendable {
    /// What the device is and offers.
    public struct Model: Sendable {
        public var type: DeviceType
        public var offeredFeatures: Features
        public var queueMaxSizes: [UInt16]

        public init(type: DeviceType, offeredFeatures: Features, queueMaxSizes: [UInt16]) {
            self.type = type
            self.offeredFeatures = offeredFeatures
            self.queueMaxSizes = queueMaxSizes
        }

        /// Like QEMU's virtio-rng-pci with iommu_platform=on: one queue of 8 entries.
        public static let rng = Model(
            type: .entropy,
            offeredFeatures: [.ringIndirectDesc, .ringEventIdx, .version1, .accessPlatform, .ringPacked, .ringReset],
            queueMaxSizes: [8])
    }

    /// Faults a test can switch on.
    public struct Faults: Sendable {
        /// Status keeps reading back its old value this many times after a reset is written.
        public var resetLatencyReads = 0
        /// A reset never completes: status never reads back 0.
        public var resetNeverCompletes = false
        /// The device refuses FEATURES_OK whatever the driver accepted.
        public var refuseFeaturesOK = false
        /// `config_generation` changes on every read.
        public var unstableConfigGeneration = false

        public init() {}
    }

    /// A driver action the spec forbids, as the device saw it.
    public struct Violation: Sendable, Equatable, CustomStringConvertible {
        public var rule: String
        public var description: String { rule }
    }

    struct State {
        var status: DeviceStatus = []
        var driverFeatures: Features = []
        var pendingResetReads: Int?
        var configGeneration: UInt8 = 0
        var resets = 0
        var violations: [Violation] = []
        var faults = Faults()
    }

    public let model: Model
    private let state = Mutex(State())

    public init(model: Model) {
        self.model = model
    }

    public var faults: Faults {
        get { state.withLock { $0.faults } }
        set { state.withLock { $0.faults = newValue } }
    }

    public var violations: [Violation] { state.withLock { $0.violations } }
    /// Features the driver accepted (what the device runs with once FEATURES_OK is set).
    public var driverFeatures: Features { state.withLock { $0.driverFeatures } }
    /// Completed resets.
    public var resetCount: Int { state.withLock { $0.resets } }

    // MARK: Device side of the registers

    public func readStatus() -> DeviceStatus {
        state.withLock { s in
            if let pending = s.pendingResetReads {
                if s.faults.resetNeverCompletes { return s.status }
                if pending > 0 { s.pendingResetReads = pending - 1; return s.status }
                s.pendingResetReads = nil
                s.status = []
                s.driverFeatures = []
                s.resets += 1
            }
            return s.status
        }
    }

    public func writeStatus(_ new: DeviceStatus) {
        state.withLock { s in
            // §2.4 / §4.1.4.3.1: writing 0 resets the device. The driver waits for 0 (§4.1.4.3.2).
            if new.rawValue == 0 {
                s.pendingResetReads = s.faults.resetLatencyReads
                return
            }
            func violation(_ rule: String) { s.violations.append(Violation(rule: rule)) }
            if s.pendingResetReads != nil {
                return violation("status written before a reset read back 0 (§4.1.4.3.2)")
            }
            if s.status.contains(.failed) {
                return violation("status \(new) written after FAILED without a reset (§2.1.1)")
            }
            // §2.1.1: the driver MUST NOT clear a device status bit.
            if !new.isSuperset(of: s.status.subtracting(.deviceNeedsReset)) {
                return violation("status \(new) clears bits of \(s.status) (§2.1.1)")
            }
            if new.contains(.driver) && !new.contains(.acknowledge) {
                return violation("DRIVER set without ACKNOWLEDGE (§3.1.1)")
            }
            if new.contains(.featuresOK) && !s.status.contains(.featuresOK) {
                guard new.contains(.driver) else { return violation("FEATURES_OK set before DRIVER (§3.1.1)") }
                // §3.1.1 step 5-6: the device refuses FEATURES_OK for a subset it cannot support.
                let ok = s.driverFeatures.isSubset(of: model.offeredFeatures)
                    && s.driverFeatures.contains(.version1) && !s.faults.refuseFeaturesOK
                if !ok {
                    s.status = new.subtracting([.featuresOK, .driverOK])
                    return
                }
            }
            if new.contains(.driverOK) && !new.contains(.featuresOK) {
                return violation("DRIVER_OK set before FEATURES_OK (§3.1.1)")
            }
            s.status = new
        }
    }

    public func readDeviceFeatures() -> Features { model.offeredFeatures }

    public func writeDriverFeatures(_ features: Features) {
        state.withLock { s in
            // §3.1.1 step 4: features are written after DRIVER and before FEATURES_OK, and only then.
            guard s.status.contains(.driver), !s.status.contains(.featuresOK), !s.status.contains(.failed) else {
                s.violations.append(Violation(rule: "driver features written in status \(s.status) (§3.1.1)"))
                return
            }
            s.driverFeatures = features
        }
    }

    public func queueCount() -> Int { model.queueMaxSizes.count }

    public func queueMaxSize(_ index: Int) -> UInt16 {
        model.queueMaxSizes.indices.contains(index) ? model.queueMaxSizes[index] : 0
    }

    public func configGeneration() -> UInt8 {
        state.withLock { s in
            if s.faults.unstableConfigGeneration { s.configGeneration &+= 1 }
            return s.configGeneration
        }
    }
}

/// The driver's view of an `EmulatedDevice`: the same `Transport` the PCI transport implements.
public struct EmulatedTransport: Transport {
    public let device: EmulatedDevice

    public init(device: EmulatedDevice) { self.device = device }

    public var deviceType: DeviceType { device.model.type }
    public func readStatus() -> DeviceStatus { device.readStatus() }
    public func writeStatus(_ status: DeviceStatus) { device.writeStatus(status) }
    public func readDeviceFeatures() -> Features { device.readDeviceFeatures() }
    public func writeDriverFeatures(_ features: Features) { device.writeDriverFeatures(features) }
    public func queueCount() -> Int { device.queueCount() }
    public func queueMaxSize(_ index: Int) -> UInt16 { device.queueMaxSize(index) }
    public func configGeneration() -> UInt8 { device.configGeneration() }
}
