import Logging
import Synchronization
import Syscalls
import Upgrade
#if canImport(Glibc)
import Glibc
#endif

/// How a serving driver's handover ended.
public enum HandoverOutcome: Equatable {
    /// The successor reported healthy and was told `go`: from here on nothing of this process may
    /// touch the device, the clients or the socket files (the command line ends with `_exit(0)`;
    /// a test relinquishes the service).
    case handedOver
    /// The successor failed; this driver serves on (after a reset and rebuild if `deviceTouched`).
    case rolledBack(deviceTouched: Bool, reason: String)
}

/// How `ControlService.serve` ended.
public enum ServeOutcome {
    case stopped
    /// To the successor with this pid: the caller ends without touching anything.
    case handedOver(successor: Int32)
    case failed(any Error)
}

extension ControlService {
    /// Runs `service` until `stop`, handing it over whenever a successor asks: quiesce, service
    /// part, verdict; on a rollback the service resumes (reset and rebuilt first if touched).
    public func serve<S: UpgradableService & ~Copyable>(_ service: inout S, until stop: borrowing Atomic<Bool>) -> ServeOutcome {
        while true {
            switch service.run(until: stop, quiesceWhen: quiesce) {
            case .stopped:
                return .stopped
            case .failed(let error):
                return .failed(error)
            case .quiesceFailed(let why):
                logger.warning("handover refused: \(why)")
                if let request = take() { refuse(request, why) } else { finished() }
            case .quiesced:
                guard let request = take() else { finished(); continue }
                let quiesced = monotonicNanoseconds()
                let part: ServicePart
                do { part = try service.handoverState(for: request.mode) } catch {
                    logger.warning("handover refused: \(error)")
                    refuse(request, "\(error)")
                    continue
                }
                switch handOver(request, service: part, quiesced: quiesced) {
                case .handedOver:
                    reportUpgrade(of: request.peer, upgraded: true, "pid \(request.peer) (driver \(request.version)) serves \(devicePart.record.deviceAddress)")
                    return .handedOver(successor: request.peer)
                case .rolledBack(let touched, let reason):
                    logger.warning("upgrade rolled back, this driver (\(devicePart.record.driverVersion)) keeps serving: \(reason)")
                    var summary = "driver \(devicePart.record.driverVersion) serves again"
                    if touched {
                        do throws(UpgradeError) {
                            try service.recoverAfterRollback()
                            logger.notice("\(devicePart.record.deviceAddress): device reset and rebuilt after the failed upgrade")
                            summary += " (device reset and rebuilt)"
                        } catch {
                            logger.error("bringing the device back after the failed upgrade: \(error)")
                            summary += ", but bringing the device back failed: \(error)"
                        }
                    }
                    // The next hello is accepted before the successor hears of it: a retry right
                    // after a failed upgrade is not refused as "in progress".
                    reportUpgrade(of: request.peer, upgraded: false, "rolled back: \(reason); \(summary)")
                    finished()
                    try? request.connection.send(.resumed(summary))
                }
            }
        }
    }

    /// Sends the service part to the successor that asked in `request`, then waits for its
    /// verdict. On `ready` it answers `go`. A successor that misses the deadline is killed first
    /// (unless it is this very process, as in tests), so it can never race the resumed service.
    func handOver(_ request: borrowing HandoverRequest, service part: ServicePart, quiesced: UInt64) -> HandoverOutcome {
        let peer = request.peer
        let timeout = configuration.handoverTimeout
        var record = devicePart.record
        record.setQueues(part.queues)
        record.descriptors = part.descriptors.map(\.role)
        record.quiesceStarted = request.quiesceRequested
        record.quiesceFinished = max(quiesced, request.quiesceRequested)
        record.serviceState = part.serviceState
        func end(_ why: String) -> HandoverOutcome {
            if peer != getpid() { kill(peer, SIGKILL) }
            return .rolledBack(deviceTouched: true, reason: why)
        }
        do {
            try request.connection.send(.stateFollows)
            do { try DescriptorPassing.send(socket: request.connection.fd.raw, record: record.encoded(), descriptors: part.descriptors.map(\.fd)) } catch {
                return .rolledBack(deviceTouched: false, reason: "sending the state to pid \(peer): \(error)")
            }
            switch try request.connection.receiveMessage(timeoutMilliseconds: timeout) {
            case .ready(let summary)?:
                try? request.connection.send(.go)
                logger.notice("handed over to pid \(peer) (driver \(request.version)): \(summary)")
                logger.notice("\(record.deviceAddress): \(part.summary)")
                return .handedOver
            case .declined(let why, let touched)?:
                return .rolledBack(deviceTouched: touched, reason: "the successor (pid \(peer)) declined: \(why)")
            case nil:
                return .rolledBack(deviceTouched: true, reason: "the successor (pid \(peer)) went away before reporting healthy")
            case let other?:
                return end("the successor (pid \(peer)) sent \(other); killed it")
            }
        } catch .timedOut {
            try? request.connection.send(.abort("not healthy within \(timeout) ms"))
            let outcome = end("the successor (pid \(peer)) was not healthy within \(timeout) ms; killed it")
            // Its descriptors (and its hold on the device) are gone once the connection reports the end.
            _ = try? request.connection.receiveMessage(timeoutMilliseconds: 5000)
            return outcome
        } catch {
            return end("control connection to pid \(peer): \(error)")
        }
    }
}
