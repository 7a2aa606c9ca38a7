import HotUpgrade
import Synchronization
import Syscalls
import Upgrade
import Virtio
import VirtioDevices

/// `serve net`: a virtio-net device bridged to a TAP interface. A handover stops the bridge
/// (no TAP read, no used element consumed); in reset (or auto) mode received frames go to the TAP
/// and transmitted ones are waited for first, so the successor's reset loses none; in live mode
/// the receive buffers stay posted and transmit frames in flight travel with the rings. The TAP
/// descriptor and the counters go along.
public struct NetBridgeService<T: HandoverTransport & ~Copyable>: ~Copyable, UpgradableService {
    public internal(set) var bridge: TapBridge<T>
    /// The TAP whose descriptor the bridge uses (kept open as long as the bridge is).
    public let tap: TapInterface
    /// Set (by SIGUSR1) to log the counters; cleared here.
    let countersRequested: (@Sendable () -> Bool)?

    public init(bridge: consuming TapBridge<T>, tap: consuming TapInterface, countersRequested: (@Sendable () -> Bool)? = nil) {
        self.bridge = bridge
        self.tap = tap
        self.countersRequested = countersRequested
    }

    public func devicePart(driverVersion: String) -> DevicePart {
        bridge.device.transport.devicePart(driverVersion: driverVersion, features: bridge.device.negotiation.accepted)
    }

    public mutating func run(until stop: borrowing Atomic<Bool>, quiesceWhen quiesce: borrowing Atomic<Bool>) -> ServiceRun {
        while true {
            do throws(NetError) {
                let outcome = try bridge.run(until: stop) {
                    countersRequested?() == true || quiesce.load(ordering: .relaxed)
                }
                if outcome == .stopped { return .stopped }
            } catch { return .failed(error) }
            if quiesce.load(ordering: .relaxed) { return .quiesced }
            bridge.configuration.log("counters\n\(bridge.summary)")
        }
    }

    public mutating func handoverState(for mode: HandoverMessage.Mode) throws(UpgradeError) -> ServicePart {
        var unsent = 0
        let snapshots: [QueueSnapshot]
        do throws(NetError) {
            if mode != .live { unsent = try bridge.drainForReset(timeout: .seconds(1)) }
            do { snapshots = try bridge.device.handoverSnapshots() } catch { throw .virtio(error) }
        } catch { throw UpgradeError(.busy, "\(error)") }
        if unsent > 0 { bridge.configuration.log("\(unsent) transmitted frames not completed within 1 s; a reset loses them") }
        let state = TapBridgeHandoverState(tapName: tap.name, vnetHeaderSize: bridge.vnetHeaderSize,
                                           receiveBufferSize: bridge.device.receiveBufferSize,
                                           promiscuous: bridge.device.promiscuous, allMulticast: bridge.device.allMulticast,
                                           deviceCounters: bridge.device.counters, bridgeCounters: bridge.counters)
        let held = snapshots[0].outstanding.count, sending = snapshots[1].outstanding.count
        return ServicePart(queues: snapshots, serviceState: state.encoded(), descriptors: [LentDescriptor(.tap, tap.raw)],
                           summary: "handed over TAP \(tap.name) with \(held) receive buffers posted and \(sending) frames in flight\n\(bridge.summary)")
    }

    public mutating func recoverAfterRollback() throws(UpgradeError) {
        do { try bridge.device.recover() } catch { throw UpgradeError(.protocolError, "\(error)") }
    }

    public consuming func relinquish() {
        _ = bridge.detach()
    }

    /// Stops for good: the device is reset and closed; the TAP goes with this service.
    public consuming func shutdown() throws(VirtioError) {
        _ = try bridge.shutdown()
    }

    /// The device's status and link read back without DEVICE_NEEDS_RESET.
    public mutating func probe() throws(UpgradeError) -> ProbeReport {
        do throws(NetError) { try bridge.refreshStatus() } catch { throw UpgradeError(.protocolError, "device status: \(error)") }
        return ProbeReport(summary: "TAP \(tap.name), \(bridge.device.receivePosted) receive buffers posted, \(bridge.device.transmitInFlight) frames in flight",
                           object: " TAP \(tap.name)")
    }
}

extension NetBridgeService where T: ~Copyable {
    /// The successor's `adopt` step: the TAP descriptor adopted (its name and header size
    /// checked), the device adopted (live: receive buffers and transmit frames as the old driver
    /// left them) or reset and rebuilt with the receive modes set again, the bridge continued
    /// with the counters.
    public static func adopt(_ transport: consuming T, _ successor: inout Successor, wanted: Features, mode: CompletionMode,
                             tapName: String, configuration: TapBridgeConfiguration,
                             countersRequested: (@Sendable () -> Bool)? = nil) throws(UpgradeError) -> Self {
        let taps = successor.descriptors.count(.tap)
        guard taps == 1, let tapFD = successor.descriptors.take(.tap) else {
            throw successor.decline("\(taps) TAP descriptors handed over, 1 expected", touched: false)
        }
        let state: TapBridgeHandoverState
        do { state = try TapBridgeHandoverState(decoding: successor.record.serviceState) } catch {
            throw successor.decline("TAP state: \(error)", touched: false)
        }
        guard state.tapName.utf8.elementsEqual(tapName.utf8) else {
            throw successor.decline("the serving driver bridges TAP \(state.tapName), this one was started with --tap \(tapName)", touched: false)
        }
        let tap: TapInterface
        do { tap = try TapInterface(adopting: tapFD, vnetHeaderSize: state.vnetHeaderSize) } catch {
            throw successor.decline("\(error)", touched: false)
        }
        var net = try successor.bringUp(transport, wanted: wanted,
                                        vectors: NetDevice<T>.queueVectors(mode: mode, count: successor.record.queues.count),
            adopt: { t, features, queues, verified throws(VirtioError) in
                try NetDevice(adopting: t, features: features, queues: queues, rxBufferSize: state.receiveBufferSize,
                              counters: state.deviceCounters, promiscuous: state.promiscuous, allMulticast: state.allMulticast,
                              mode: mode, verified: verified)
            },
            start: { t throws(VirtioError) in
                try NetDevice(transport: t, wanted: wanted, rxBufferSize: state.receiveBufferSize, counters: state.deviceCounters, mode: mode)
            })
        let live = successor.live == true
        let headerSize = TapBridge<T>.vnetHeaderSize(for: net.negotiation.accepted)
        guard headerSize == state.vnetHeaderSize else {
            throw successor.decline("the features negotiated now need a \(headerSize)-byte header on the TAP, it carries \(state.vnetHeaderSize) (restart serve net instead)", touched: true)
        }
        if !live {
            // A reset returned the receive modes to the device's defaults.
            do throws(NetError) {
                if let on = state.promiscuous { try net.setPromiscuous(on) }
                if let on = state.allMulticast { try net.setAllMulticast(on) }
            } catch { throw successor.decline("receive modes after the reset: \(error)", touched: true) }
        }
        let bridge = TapBridge(device: net, fd: tap.raw, vnetHeaderSize: headerSize, configuration: configuration,
                               counters: state.bridgeCounters)
        return NetBridgeService(bridge: bridge, tap: tap, countersRequested: countersRequested)
    }
}
