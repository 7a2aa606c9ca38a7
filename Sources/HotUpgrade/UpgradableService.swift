import Synchronization
import Upgrade
import Virtio

/// A device service that can hand its device and clients to a successor process and take them
/// over from a predecessor: the serving side quiesces, describes its queues and clients, and
/// resumes after a rollback; the successor side proves the adopted device healthy. The generic
/// parts (control socket, state records, descriptor passing, rollback, live-or-reset choice) are
/// `ControlService`, `handOver`, `Successor` and `takeOver`; a service supplies only these.
public protocol UpgradableService: ~Copyable {
    /// The device part of the state (constant while this instance serves).
    func devicePart(driverVersion: String) -> DevicePart

    /// Serves until `stop` is set or `quiesce` asks for a pause. `.quiesced` means the service
    /// stopped taking new work and reached a state `handoverState` can describe.
    mutating func run(until stop: borrowing Atomic<Bool>, quiesceWhen quiesce: borrowing Atomic<Bool>) -> ServiceRun

    /// After `.quiesced`: the queues and the service's own state and descriptors, for a
    /// successor in `mode`. Throwing refuses the handover (nothing was sent; service resumes).
    mutating func handoverState(for mode: HandoverMessage.Mode) throws(UpgradeError) -> ServicePart

    /// After a rollback in which the successor may have written to the device: reset and rebuild.
    mutating func recoverAfterRollback() throws(UpgradeError)

    /// After a completed handover: lets go of the device and the clients without touching
    /// either (no reset, no reply, no socket file removed): they are the successor's now.
    consuming func relinquish()

    /// The successor's first request through the device it brought up (adopted or reset): the
    /// proof of health the old driver waits for.
    mutating func probe() throws(UpgradeError) -> ProbeReport
}

/// What a successor says once its first request succeeded.
public struct ProbeReport: Sendable {
    /// For the old driver's log (`ready`): "2 NBD connections, first read ok".
    public var summary: String
    /// Named after "took over" in this driver's log: "" or " TAP vtap0".
    public var object: String
    /// Named after the mode: "" or " with 2 NBD connections".
    public var detail: String

    public init(summary: String, object: String = "", detail: String = "") {
        self.summary = summary
        self.object = object
        self.detail = detail
    }
}

/// How one `run` of a service ended.
public enum ServiceRun {
    /// `stop` was set: the service shut down.
    case stopped
    /// The service paused for a handover.
    case quiesced
    /// The service could not pause in time; it resumes (the handover is refused with `why`).
    case quiesceFailed(String)
    /// The service cannot go on.
    case failed(any Error)
}

/// The service part of the state, read once the service quiesced.
public struct ServicePart: Sendable {
    /// Every queue as the successor adopts it (with the requests the device still holds).
    public var queues: [QueueSnapshot]
    /// The service's own state, encoded by the service (opaque to the record).
    public var serviceState: [UInt8]
    /// Sockets, a TAP: lent until `go`.
    public var descriptors: [LentDescriptor]
    /// One line the old driver logs once the successor took over ("handed over 2 NBD connections").
    public var summary: String

    public init(queues: [QueueSnapshot], serviceState: [UInt8] = [], descriptors: [LentDescriptor] = [], summary: String) {
        self.queues = queues
        self.serviceState = serviceState
        self.descriptors = descriptors
        self.summary = summary
    }
}
