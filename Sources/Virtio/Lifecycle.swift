/// The device lifecycle of virtio 1.2 §3.1, in order, over any `Transport`.
///
/// The seed's rule holds throughout: reset is the only way back. Features are only ever removed by
/// a reset followed by a new negotiation, and queues are only torn down after a reset.
public enum Lifecycle {
    /// One status write and what the device showed afterwards.
    public struct Transition: Sendable, Equatable {
        public var wrote: DeviceStatus
        public var readBack: DeviceStatus
    }

    /// The outcome of a negotiation.
    public struct Negotiation: Sendable, Equatable {
        public var offered: Features
        public var accepted: Features
        public var transitions: [Transition]
    }

    /// How a reset went: how long until status read 0, and whether the function had to be reset
    /// below virtio for it.
    public struct ResetOutcome: Sendable, Equatable {
        public var microseconds: Int64
        /// The status reset did not complete within the timeout; a function-level reset
        /// (`Transport.resetFunction`) did, and `microseconds` includes both waits.
        public var byFunctionReset: Bool
    }

    /// Resets the device: write 0 to `device_status`, then wait until it reads back 0.
    /// Returns the time it took in microseconds (`resetDevice` also says how).
    @discardableResult
    public static func reset<T: Transport & ~Copyable>(
        _ transport: borrowing T, timeout: Duration = .seconds(5)
    ) throws(VirtioError) -> Int64 {
        try resetDevice(transport, timeout: timeout).microseconds
    }

    /// Resets the device: write 0 to `device_status`, then wait until it reads back 0.
    ///
    /// Virtio 1.2 §4.1.4.3.2: "After writing 0 to device_status, the driver MUST wait for a read of
    /// device_status to return 0 before reinitializing the device." The wait is bounded by `timeout`;
    /// polling starts tight and backs off to 1 ms sleeps. A device that does not get there is
    /// reset below virtio when the transport can (a PCIe FLR through VFIO), and waited for again:
    /// the function reset clears the status too, so the same rule decides when it is done.
    public static func resetDevice<T: Transport & ~Copyable>(
        _ transport: borrowing T, timeout: Duration = .seconds(5)
    ) throws(VirtioError) -> ResetOutcome {
        let clock = ContinuousClock()
        let start = clock.now
        transport.writeStatus([])
        if case .readZero = waitForZero(transport, timeout: timeout) {
            return ResetOutcome(microseconds: microseconds(clock.now - start), byFunctionReset: false)
        }
        guard transport.canResetFunction else {
            throw .resetTimeout(lastStatus: transport.readStatus().rawValue, waitedMicroseconds: microseconds(clock.now - start),
                                afterFunctionReset: false)
        }
        try transport.resetFunction()
        if case .stillReads(let status) = waitForZero(transport, timeout: timeout) {
            throw .resetTimeout(lastStatus: status.rawValue, waitedMicroseconds: microseconds(clock.now - start),
                                afterFunctionReset: true)
        }
        return ResetOutcome(microseconds: microseconds(clock.now - start), byFunctionReset: true)
    }

    private enum Wait { case readZero, stillReads(DeviceStatus) }

    /// Polls `device_status` until it reads 0 or `timeout` passes: tight at first (most devices
    /// finish at once), then sleeps backing off to 1 ms.
    private static func waitForZero<T: Transport & ~Copyable>(_ transport: borrowing T, timeout: Duration) -> Wait {
        let clock = ContinuousClock()
        let start = clock.now
        var pause = Duration.microseconds(1)
        var polls = 0
        while true {
            let status = transport.readStatus()
            if status.rawValue == 0 { return .readZero }
            if clock.now - start > timeout { return .stillReads(status) }
            polls += 1
            if polls > 64 {
                sleep(pause)
                pause = min(pause * 2, .milliseconds(1))
            }
        }
    }

    /// The features a driver wanting `wanted` accepts from a device offering `offered`: what both
    /// have, plus VERSION_1 (§6.1) and ACCESS_PLATFORM whenever offered (§6.1: the device then
    /// may need it, and VFIO's IOMMU translates every address this driver hands out), and
    /// ORDER_PLATFORM and NOTIFICATION_DATA whenever offered (both are handled by every queue).
    public static func acceptable(offered: Features, wanted: Features) -> Features {
        var accepted = offered.intersection(wanted).union(.version1)
        if offered.contains(.accessPlatform) { accepted.insert(.accessPlatform) }
        // §6: "A driver SHOULD accept VIRTIO_F_ORDER_PLATFORM if it is offered"; the queues then
        // use the platform's barriers (`DeviceOrdering`).
        if offered.contains(.orderPlatform) { accepted.insert(.orderPlatform) }
        // §2.9: every queue of this driver can say where its next available buffer goes, so
        // NOTIFICATION_DATA is accepted when offered (the doorbell then takes 32-bit writes).
        if offered.contains(.notificationData) { accepted.insert(.notificationData) }
        return accepted
    }

    /// Steps 2-6 of §3.1.1 after a reset: ACKNOWLEDGE, DRIVER, read the offered features, write the
    /// accepted subset (`acceptable(offered:wanted:)`), set FEATURES_OK and re-read status to
    /// confirm the device kept it.
    ///
    /// On failure the FAILED bit is set (§3.1.1: "the driver SHOULD set the FAILED status bit")
    /// and the device stays recoverable by reset.
    public static func negotiate<T: Transport & ~Copyable>(
        _ transport: borrowing T, wanted: Features
    ) throws(VirtioError) -> Negotiation {
        var transitions: [Transition] = []
        func set(_ status: DeviceStatus) -> DeviceStatus {
            transport.writeStatus(status)
            let readBack = transport.readStatus()
            transitions.append(Transition(wrote: status, readBack: readBack))
            return readBack
        }
        func fail(_ error: VirtioError) -> VirtioError {
            let current = transport.readStatus()
            transport.writeStatus(current.union(.failed))
            return error
        }

        // §3.1.1 step 2: the guest OS has noticed the device.
        var status = set(.acknowledge)
        // Step 3: the guest OS knows how to drive the device.
        status = set([.acknowledge, .driver])
        if !status.isDisjoint(with: [.deviceNeedsReset, .failed]) {
            throw fail(.deviceFailed(status: status.rawValue, during: "ACKNOWLEDGE|DRIVER"))
        }
        // Step 4: read the feature bits, accept a subset.
        let offered = transport.readDeviceFeatures()
        guard offered.contains(.version1) else { throw fail(.legacyOnly(offered: offered.rawValue)) }
        let accepted = acceptable(offered: offered, wanted: wanted)
        transport.writeDriverFeatures(accepted)
        // Step 5: no new feature bits after this.
        status = set([.acknowledge, .driver, .featuresOK])
        // Step 6: re-read status to ensure FEATURES_OK is still set.
        guard status.contains(.featuresOK), !status.contains(.failed) else {
            throw fail(.featuresRejected(offered: offered.rawValue, accepted: accepted.rawValue, status: status.rawValue))
        }
        return Negotiation(offered: offered, accepted: accepted, transitions: transitions)
    }

    /// Step 8 of §3.1.1: the driver is set up; the device is live from here on.
    public static func driverOK<T: Transport & ~Copyable>(_ transport: borrowing T) throws(VirtioError) {
        transport.writeStatus([.acknowledge, .driver, .featuresOK, .driverOK])
        let status = transport.readStatus()
        if !status.isDisjoint(with: [.deviceNeedsReset, .failed]) || !status.contains(.driverOK) {
            throw .deviceFailed(status: status.rawValue, during: "DRIVER_OK")
        }
    }

    /// Reads device configuration consistently (§2.5.1): repeat while `config_generation` changes,
    /// at most `attempts` times.
    public static func readConfig<T: Transport & ~Copyable, R>(
        _ transport: borrowing T, attempts: Int = 64, _ body: () throws(VirtioError) -> R
    ) throws(VirtioError) -> R {
        for _ in 0..<attempts {
            let before = transport.configGeneration()
            let value = try body()
            if transport.configGeneration() == before { return value }
        }
        throw .deviceFailed(status: transport.readStatus().rawValue,
                            during: "configuration read: config_generation changed on each of \(attempts) attempts")
    }

    static func microseconds(_ d: Duration) -> Int64 {
        let (seconds, attoseconds) = d.components
        return seconds * 1_000_000 + attoseconds / 1_000_000_000_000
    }

    /// Sleeps the calling thread (EINTR-safe); the driver's only blocking wait outside poll(2).
    public static func sleep(_ d: Duration) {
        let (seconds, attoseconds) = d.components
        var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
