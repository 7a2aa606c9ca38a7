import Logging
import Syscalls
import Upgrade
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// How a successor takes a device over, and the test faults it can act out.
public struct TakeOverOptions: Sendable {
    public var mode: HandoverMessage.Mode
    public var driverVersion: String
    /// How long to wait for each answer of the serving driver (ms).
    public var handoverTimeout: Int32 = 10_000
    /// Test hook: run right after the device is up, before the first request (crash, hang).
    public var afterDeviceUp: (@Sendable () -> Void)?
    /// Told once the takeover is confirmed: whether the rings were adopted (live mode) and the
    /// service gap (ns, from the old driver's quiesce; nil when the record does not say).
    public var tookOver: (@Sendable (_ live: Bool, _ gapNanoseconds: UInt64?) -> Void)?
    /// Test hook: report the first request as failed.
    public var failFirstRequest = false

    public init(mode: HandoverMessage.Mode, driverVersion: String) {
        self.mode = mode
        self.driverVersion = driverVersion
    }
}

/// The successor's side of a handover: the connection to the serving driver (kept until `go`),
/// the validated records (first the device part, then the service part) and the descriptors of
/// the current part, owned by role until taken.
public struct Successor: ~Copyable {
    public let connection: ControlConnection
    public let address: String
    public let deviceType: DeviceType
    public let options: TakeOverOptions
    let logger: Logger
    /// The device part until `prepared()`, then the service part.
    public private(set) var record: StateRecord
    /// The descriptors of `record`, each taken out by whoever adopts it.
    public var descriptors: HandedOverDescriptors
    let started = ContinuousClock().now
    /// Where the service gap goes: (phase, CLOCK_MONOTONIC ns at its end), from the quiesce start.
    var phases: [(String, UInt64)] = []
    /// Whether the device was adopted live (nil until `chooseLive`).
    public private(set) var live: Bool?

    /// Connects to the driver serving on `path`, asks for the device and validates the device part
    /// that arrives: its descriptors must include each of `requiredDeviceRoles` once. A record
    /// this build cannot read is declined before anything is touched or paused.
    public init(path: String, address: String, type: DeviceType, requiredDeviceRoles: [StateRecord.DescriptorRole],
                options: TakeOverOptions, logger: Logger) throws(UpgradeError) {
        let connection: ControlConnection
        do { connection = try ControlConnection(connectingTo: path) } catch {
            throw UpgradeError(.unavailable, "--take-over: \(error)")
        }
        do { try connection.send(.hello(mode: options.mode, driverVersion: options.driverVersion, pid: getpid())) } catch {
            throw UpgradeError(.protocolError, "--take-over: \(error)")
        }
        let part = try Self.receive(.deviceFollows, part: .device(requiring: requiredDeviceRoles), on: connection,
                                    address: address, type: type, timeout: options.handoverTimeout)
        self.record = part.record
        self.descriptors = HandedOverDescriptors(roles: part.record.descriptors, descriptors: part.descriptors)
        self.address = address
        self.deviceType = type
        self.options = options
        self.logger = logger
        self.connection = connection
    }

    /// Waits for `announcement`, then a record of `part` and its descriptors; validates them.
    static func receive(_ announcement: HandoverMessage, part: StateRecord.Part, on connection: borrowing ControlConnection,
                        address: String, type: DeviceType, timeout: Int32) throws(UpgradeError) -> ReceivedPart {
        do {
            switch try connection.receiveMessage(timeoutMilliseconds: timeout) {
            case announcement?: break
            case .refused(let why)?:
                throw UpgradeError(.busy, "the serving driver refused the handover: \(why)")
            case let other:
                throw UpgradeError(.protocolError, "the serving driver answered with \(other.map { "\($0)" } ?? "nothing (it closed the connection)"), not \(announcement)")
            }
        } catch let error as ControlSocketError {
            throw UpgradeError(.protocolError, "--take-over: \(error)")
        } catch let error as UpgradeError {
            throw error
        } catch {
            throw UpgradeError(.protocolError, "--take-over: \(error)")
        }
        let received: DescriptorPassing.Received
        do { received = try DescriptorPassing.receive(socket: connection.fd.raw) } catch {
            throw UpgradeError(.protocolError, "receiving the \(part == .service ? "service" : "device") part of the state: \(error)")
        }
        do throws(StateRecordError) {
            let record = try StateRecord(decoding: received.record, descriptorCount: received.descriptors.count, part: part)
            guard record.deviceAddress == address else {
                throw StateRecordError.invalid(field: "device address", "\(record.deviceAddress), not \(address)")
            }
            guard record.deviceType == type.rawValue else {
                throw StateRecordError.invalid(field: "device type", "\(record.deviceType), this service drives \(type)")
            }
            return ReceivedPart(record: record, descriptors: received.descriptors)
        } catch {
            // Nothing was touched: the old driver resumes (or never paused) as if nothing happened.
            // The received descriptors close with `received`.
            try? connection.send(.declined("\(error)", touchedDevice: false))
            throw UpgradeError(.protocolError, "\(error)")
        }
    }

    /// Tells the old driver the device is mapped here; it quiesces and sends the service part,
    /// which must describe the same device and DMA memory. From here on the service is paused.
    public mutating func prepared() throws(UpgradeError) {
        do { try connection.send(.prepared) } catch {
            throw UpgradeError(.protocolError, "--take-over: \(error)")
        }
        let device = record
        let part = try Self.receive(.stateFollows, part: .service, on: connection, address: address,
                                    type: deviceType, timeout: options.handoverTimeout)
        let service = part.record
        // Device descriptors nobody took (e.g. interrupts a polling successor does not use) close here.
        descriptors = HandedOverDescriptors(roles: service.descriptors, descriptors: part.descriptors)
        record = service
        // The old driver's two steps (its clock is ours: same machine), then the transfer.
        phases = service.quiesceFinished > 0 ? [("quiesce", service.quiesceFinished), ("state", monotonicNanoseconds())]
                                             : [("quiesce+state", monotonicNanoseconds())]
        guard service.dmaIOVA == device.dmaIOVA, service.dmaSize == device.dmaSize else {
            throw decline("the service part names DMA memory 0x\(String(service.dmaIOVA, radix: 16))+\(service.dmaSize), the device part 0x\(String(device.dmaIOVA, radix: 16))+\(device.dmaSize)", touched: false)
        }
    }

    /// Tells the old driver why this successor gives up, waits until it serves again (its
    /// `resumed`, or the connection's end when it had not paused yet), and returns the error to
    /// throw, saying how the old driver resumed.
    public func decline(_ why: String, touched: Bool) -> UpgradeError {
        let resumed: String
        do {
            try connection.send(.declined(why, touchedDevice: touched))
            switch try connection.receiveMessage(timeoutMilliseconds: options.handoverTimeout) {
            case .resumed(let summary)?: resumed = summary
            case nil: resumed = touched ? "the old driver resets the device and resumes" : "the old driver resumes"
            case let other?: resumed = "the old driver answered \(other) (expected resumed)"
            }
        } catch {
            resumed = "the old driver did not confirm it resumed: \(error)"
        }
        return UpgradeError(.protocolError, "taking the device over failed: \(why); \(resumed)")
    }

    /// Reports healthy and waits for `go`. Returns normally when this instance owns the device.
    public func confirm(_ summary: String) throws(UpgradeError) {
        do {
            try connection.send(.ready(summary))
            switch try connection.receiveMessage(timeoutMilliseconds: options.handoverTimeout) {
            case .go?, nil:
                // nil: the old instance ended after sending the state; nobody else serves.
                return
            case .abort(let why)?:
                throw UpgradeError(.busy, "the old driver took the device back: \(why)")
            case let other?:
                throw UpgradeError(.protocolError, "the old driver answered \(other) to ready")
            }
        } catch let error as ControlSocketError {
            throw UpgradeError(.protocolError, "confirming the handover: \(error)")
        } catch let error as UpgradeError {
            throw error
        } catch {
            throw UpgradeError(.protocolError, "confirming the handover: \(error)")
        }
    }

    /// Whether to adopt the device as it runs (live) or reset it. Live needs the features this
    /// build would accept to be the ones the device runs with, and the device and every queue in
    /// the state the record describes (checked by reading only). `live` mode refuses otherwise
    /// (nothing touched, the old driver resumes); `auto` falls back to reset.
    /// `vectors[i]` is the MSI-X vector queue i must still signal (nil: not checked).
    /// Returns what was read for live adoption (pass it to the adopting initialiser, which then
    /// reads no register twice), or nil for reset mode.
    public mutating func chooseLive<T: Transport & ~Copyable>(_ transport: borrowing T, wanted: Features,
                                                             vectors: [UInt16?]) throws(UpgradeError) -> Adoption.Verified? {
        guard options.mode != .reset else { live = false; return nil }
        var problem: String?
        let mine = Lifecycle.acceptable(offered: transport.readDeviceFeatures(), wanted: wanted)
        let theirs = Features(rawValue: record.features)
        var verified: Adoption.Verified?
        if mine != theirs {
            problem = "this driver accepts features 0x\(String(mine.rawValue, radix: 16)), the device runs with 0x\(String(theirs.rawValue, radix: 16)) (live mode needs the same features)"
        } else {
            do throws(VirtioError) {
                verified = try Adoption.verify(transport, features: theirs, snapshots: record.queueSnapshots, vectors: vectors)
            } catch { problem = "\(error)" }
        }
        if let verified { live = true; return verified }
        if options.mode == .live { throw decline("live mode refused: \(problem ?? "?")", touched: false) }
        logger.notice("live mode not possible (\(problem ?? "?")); taking over in reset mode")
        live = false
        return nil
    }

    /// Brings the device up the chosen way: `chooseLive`, then `adopt` (live: features, queues
    /// and what was verified handed over) or `start` (reset, renegotiate, rebuild). A refusal
    /// declines, saying whether the device was touched; the phase is marked.
    public mutating func bringUp<T: Transport & ~Copyable, D: ~Copyable>(
        _ transport: consuming T, wanted: Features, vectors: [UInt16?],
        adopt: (consuming T, _ features: Features, _ queues: [QueueSnapshot], Adoption.Verified) throws(VirtioError) -> D,
        start: (consuming T) throws(VirtioError) -> D
    ) throws(UpgradeError) -> D {
        let verified = try chooseLive(transport, wanted: wanted, vectors: vectors)
        if verified != nil { mark("verify") }
        let device: D
        do throws(VirtioError) {
            if let verified {
                device = try adopt(transport, Features(rawValue: record.features), record.queueSnapshots, verified)
            } else {
                device = try start(transport)
            }
        } catch { throw decline("\(error)", touched: verified == nil) }
        mark(verified != nil ? "adopt" : "reset+rebuild")
        return device
    }

    public var elapsed: Duration { ContinuousClock().now - started }

    /// Marks the end of a phase of the takeover.
    public mutating func mark(_ phase: String) { phases.append((phase, monotonicNanoseconds())) }

    /// "quiesce 9.0 ms, state 3.1 ms, adopt 3.0 ms, ..." (each phase's own duration).
    public var phaseSummary: String {
        var previous = record.quiesceStarted
        return phases.map { name, end in
            defer { previous = end }
            return previous > 0 && end >= previous ? "\(name) \(milliseconds(end - previous))" : "\(name) ?"
        }.joined(separator: ", ")
    }

    /// From the moment the old driver was asked to quiesce until now.
    public var gap: String { gapNanoseconds.map(milliseconds) ?? "unknown" }

    /// From the old driver's quiesce until now (nil: the record does not say when it started).
    public var gapNanoseconds: UInt64? {
        let now = monotonicNanoseconds()
        guard record.quiesceStarted > 0, now >= record.quiesceStarted else { return nil }
        return now - record.quiesceStarted
    }
}

/// One part of the state as it arrived: the validated record and its descriptors.
struct ReceivedPart: ~Copyable {
    let record: StateRecord
    var descriptors: OwnedFDList
}

/// Nanoseconds as "12.3 ms".
public func milliseconds(_ nanoseconds: UInt64) -> String {
    let tenths = (nanoseconds + 50_000) / 100_000
    return "\(tenths / 10).\(tenths % 10) ms"
}
