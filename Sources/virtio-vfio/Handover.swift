import ArgumentParser
import PCI
import Synchronization
import Syscalls
import Upgrade
import VFIO
import Virtio
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

extension HandoverMessage.Mode: ExpressibleByArgument {
    public init?(argument: String) {
        guard let mode = Self.allCases.first(where: { $0.description == argument }) else { return nil }
        self = mode
    }
}

/// Test hooks of the upgrade path (hidden options): a successor that fails on purpose.
enum HandoverFault: String, ExpressibleByArgument {
    /// Dies (SIGKILL) right after it brought the device up, before reporting healthy.
    case crashAfterDeviceUp = "crash-after-device-up"
    /// Reports its first request as failed.
    case firstRequestFails = "first-request-fails"
    /// Hangs right after it brought the device up (the old driver's deadline must end it).
    case hangAfterDeviceUp = "hang-after-device-up"
}

extension HandoverFault? {
    /// Acts out the faults that strike once the device is up.
    func strikeAfterDeviceUp() {
        switch self {
        case .crashAfterDeviceUp?: kill(getpid(), SIGKILL)
        case .hangAfterDeviceUp?: while true { sleep(60) }
        default: break
        }
    }
}

/// The options every `serve` command has for hot upgrades.
struct HandoverOptions: ParsableArguments {
    @Flag(help: "Take the device over from the driver serving it now (a hot upgrade) instead of opening it.")
    var takeOver = false
    @Option(help: "With --take-over: reset (reset, renegotiate, rebuild), live (adopt the rings; refused if the features differ) or auto (live when possible).")
    var mode: HandoverMessage.Mode = .auto
    @Option(help: ArgumentHelp("How long this driver waits for a successor to report healthy before it takes the device back (milliseconds).", valueName: "ms"))
    var handoverTimeout: Int32 = 10_000
    @Option(help: ArgumentHelp("Directory of the control sockets.", valueName: "dir"))
    var controlDirectory = ControlListener.directory
    @Option(help: .hidden) var debugStateFormat: UInt16?
    @Option(help: .hidden) var debugFault: HandoverFault?

    func validate() throws {
        guard handoverTimeout > 0 else { throw ValidationError("--handover-timeout must be positive") }
    }

    func controlPath(_ address: PCIAddress) -> String {
        ControlListener.path(for: "\(address)", directory: controlDirectory)
    }
}

// MARK: - The serving side

/// A handover a successor asked for, waiting for the service to quiesce.
struct HandoverRequest: Sendable {
    let connection: Int32
    let peer: Int32
    let mode: HandoverMessage.Mode
    let version: String
}

/// The control socket of a serving driver, answered by a thread of its own: `describe` at once;
/// `hello` with the device part of the state (the service keeps running while the successor maps
/// the device); `prepared` is parked for the service loop (`take()`), which is woken through
/// `wake`, quiesces and sends the service part.
final class ControlService: @unchecked Sendable {
    let listener: ControlListener
    /// Written (eventfd) when a handover request is parked, so a poll loop wakes at once.
    let wake: Int32?
    /// Set while a handover request is parked: the service quiesces.
    let quiesce = Atomic<Bool>(false)
    let pending = Mutex<HandoverRequest?>(nil)
    let stopping = Atomic<Bool>(false)
    let description: @Sendable () -> HandoverMessage
    /// The device part of the state and its descriptors (constant while this driver serves).
    let deviceState: DeviceState
    let options: HandoverOptions
    var thread = pthread_t()

    struct DeviceState: Sendable {
        let record: StateRecord
        let descriptors: [Int32]
    }

    init(path: String, replacing: Bool, wake: Int32? = nil, deviceState: DeviceState, options: HandoverOptions,
         describe: @escaping @Sendable () -> HandoverMessage) throws {
        self.deviceState = deviceState
        self.options = options
        do { listener = try ControlListener(path: path, replacing: replacing) } catch {
            printError("virtio-vfio: error: control socket: \(error)")
            throw ExitCode(error.isInUse ? Failure.busy : Failure.ioError)
        }
        self.wake = wake
        description = describe
        let box = Unmanaged.passRetained(self).toOpaque()
        pthread_create(&thread, nil, { raw in
            let service = Unmanaged<ControlService>.fromOpaque(raw!).takeRetainedValue()
            service.serve()
            return nil
        }, box)
    }

    var path: String { listener.path }
    var requested: Bool { pending.withLock { $0 != nil } }

    /// Ends the thread (the process is about to exit or hand over).
    func stop() {
        stopping.store(true, ordering: .relaxed)
        pthread_join(thread, nil)
    }

    /// The parked handover request, if any (the service has quiesced and handles it now). It
    /// stays parked, so no second request is taken, until `finished()`.
    func take() -> HandoverRequest? {
        pending.withLock { $0 }
    }

    /// The parked request was handled (handed over, refused or rolled back): serve on.
    func finished() {
        quiesce.store(false, ordering: .relaxed)
        pending.withLock { $0 = nil }
    }

    /// Refuses the parked request (the service could not quiesce) and serves on.
    func refuse(_ why: String) {
        if let request = take() {
            let connection = ControlConnection(adopting: OwnedFD(adopting: request.connection), peerPID: request.peer)
            try? connection.send(.refused(why))
        }
        finished()
    }

    func serve() {
        while !stopping.load(ordering: .relaxed) {
            guard case .success(let ready) = Syscall.pollIn(listener.fd.raw, timeoutMilliseconds: 100), ready else { continue }
            guard let connection = listener.accept(log: { printError("virtio-vfio: \($0)") }) else { continue }
            let message: HandoverMessage?
            do { message = try connection.receiveMessage(timeoutMilliseconds: 2000) } catch {
                printError("virtio-vfio: control socket: \(error)")
                continue
            }
            switch message {
            case .describe?:
                try? connection.send(description())
            case .hello(let mode, let version, let pid)?:
                guard !quiesce.load(ordering: .relaxed) else {
                    try? connection.send(.refused("another handover is in progress"))
                    continue
                }
                printError("virtio-vfio: handover requested by pid \(pid) (driver \(version), \(mode) mode); sending the device")
                // The device part goes out while this driver keeps serving: the successor maps the
                // device (regions, BARs, DMA memory: nothing written to it) before anything pauses.
                do {
                    try connection.send(.deviceFollows)
                    try DescriptorPassing.send(socket: connection.fd.raw,
                                               record: deviceState.record.encoded(format: options.debugStateFormat ?? StateRecord.formatVersion),
                                               descriptors: deviceState.descriptors)
                } catch {
                    printError("virtio-vfio: handover to pid \(pid) abandoned while sending the device: \(error)")
                    continue
                }
                let answer: HandoverMessage?
                do { answer = try connection.receiveMessage(timeoutMilliseconds: options.handoverTimeout) } catch {
                    printError("virtio-vfio: handover to pid \(pid) abandoned before the service paused: \(error)")
                    continue
                }
                guard case .prepared? = answer else {
                    let why = if case .declined(let reason, _)? = answer { reason } else { "\(answer.map { "\($0)" } ?? "it went away")" }
                    printError("virtio-vfio: upgrade abandoned before the service paused (nothing was touched): pid \(pid): \(why)")
                    continue
                }
                let peer = connection.peer.pid
                let fd = connection.releaseDescriptor()
                pending.withLock { $0 = HandoverRequest(connection: fd, peer: peer, mode: mode, version: version) }
                printError("virtio-vfio: pid \(pid) mapped the device; quiescing")
                quiesce.store(true, ordering: .relaxed)
                if let wake { _ = Syscall.write64(wake, 1) }
            default:
                try? connection.send(.refused("expected hello or describe"))
            }
        }
    }
}

extension ControlSocketError {
    var isInUse: Bool { if case .inUse = self { return true } else { return false } }
}

/// How a handover ended for the serving driver when it did not end the process.
struct Rollback {
    /// The successor may have written to the device: reset and rebuild before serving again.
    let deviceTouched: Bool
    let reason: String
}

/// Sends the state and descriptors to the successor in `request`, then waits for its verdict.
/// On `ready` it answers `go` and ends this process at once with _exit(0): from then on nothing
/// here may touch the device, the sockets or the socket files, which belong to the successor
/// (no deinit runs, so no reset and no unlink). Otherwise returns why it rolled back; a successor
/// that misses `timeout` is killed first, so it can never race the resumed service.
func handOverDevice(_ request: HandoverRequest, record: StateRecord, descriptors: [Int32],
              timeoutMilliseconds: Int32, beforeExit: () -> Void) -> Rollback {
    let connection = ControlConnection(adopting: OwnedFD(adopting: request.connection), peerPID: request.peer)
    do {
        try connection.send(.stateFollows)
        do { try DescriptorPassing.send(socket: connection.fd.raw, record: record.encoded(), descriptors: descriptors) } catch {
            return Rollback(deviceTouched: false, reason: "sending the state to pid \(request.peer): \(error)")
        }
        switch try connection.receiveMessage(timeoutMilliseconds: timeoutMilliseconds) {
        case .ready(let summary)?:
            try? connection.send(.go)
            printError("virtio-vfio: handed over to pid \(request.peer) (driver \(request.version)): \(summary)")
            beforeExit()
            _exit(0)
        case .declined(let why, let touched)?:
            return Rollback(deviceTouched: touched, reason: "the successor (pid \(request.peer)) declined: \(why)")
        case nil:
            return Rollback(deviceTouched: true, reason: "the successor (pid \(request.peer)) went away before reporting healthy")
        case let other?:
            kill(request.peer, SIGKILL)
            return Rollback(deviceTouched: true, reason: "the successor (pid \(request.peer)) sent \(other); killed it")
        }
    } catch .timedOut {
        try? connection.send(.abort("not healthy within \(timeoutMilliseconds) ms"))
        kill(request.peer, SIGKILL)
        // Its descriptors (and its hold on the device) are gone once the connection reports the end.
        _ = try? connection.receiveMessage(timeoutMilliseconds: 5000)
        return Rollback(deviceTouched: true, reason: "the successor (pid \(request.peer)) was not healthy within \(timeoutMilliseconds) ms; killed it")
    } catch {
        kill(request.peer, SIGKILL)
        return Rollback(deviceTouched: true, reason: "control connection to pid \(request.peer): \(error)")
    }
}

/// The device part of the state: what a successor maps before this driver pauses.
func deviceState(_ transport: borrowing VirtioPCITransport, features: Features) -> ControlService.DeviceState {
    let (fds, roles) = transportDescriptors(transport.handoverDescriptors)
    let memory = transport.dma.memory
    let record = StateRecord(driverVersion: DriverVersion.string, deviceAddress: "\(transport.address)",
                             deviceType: transport.deviceType.rawValue, features: features.rawValue,
                             dmaIOVA: memory.deviceAddress, dmaSize: UInt64(memory.size), queues: [], inFlight: [],
                             descriptors: roles)
    return ControlService.DeviceState(record: record, descriptors: fds)
}

/// The descriptors of a VFIO transport in the order the record lists their roles.
func transportDescriptors(_ d: VFIODescriptors) -> (fds: [Int32], roles: [StateRecord.DescriptorRole]) {
    var fds = [d.container, d.group, d.device, d.dmaMemory]
    var roles: [StateRecord.DescriptorRole] = [.container, .group, .device, .dmaMemory]
    for fd in d.interrupts { fds.append(fd); roles.append(.interrupt) }
    return (fds, roles)
}

// MARK: - The successor's side

/// What a successor received: the connection (kept until `go`), the validated records (first the
/// device part, then the service part), and the descriptors of the current part by role.
struct TakeOver: ~Copyable {
    let connection: ControlConnection
    let address: PCIAddress
    let type: DeviceType
    let options: HandoverOptions
    /// The device part until `prepared()`, then the service part.
    var record: StateRecord
    /// Received descriptors of `record`, in its order; each taken out (set to -1) when adopted.
    var descriptors: [Int32]
    let started: ContinuousClock.Instant
    let mode: HandoverMessage.Mode
    /// Where the service gap goes: (phase, CLOCK_MONOTONIC ns at its end), from the quiesce start.
    var phases: [(String, UInt64)] = []

    /// Connects to the driver serving `address`, asks for the device and validates the device part
    /// of the state that arrives. A record this build cannot read is declined before anything is
    /// touched (and before the old driver pauses anything).
    init(address: PCIAddress, options: HandoverOptions, expecting type: DeviceType) throws {
        let started = ContinuousClock().now
        let path = options.controlPath(address)
        let connection: ControlConnection
        do { connection = try ControlConnection(connectingTo: path) } catch {
            printError("virtio-vfio: error: --take-over: \(error)")
            throw ExitCode(Failure.unavailable)
        }
        do { try connection.send(.hello(mode: options.mode, driverVersion: DriverVersion.string, pid: getpid())) } catch {
            printError("virtio-vfio: error: --take-over: \(error)")
            throw ExitCode(Failure.protocolError)
        }
        let (record, descriptors) = try Self.receive(.deviceFollows, part: .device, on: connection, address: address,
                                                     type: type, timeout: options.handoverTimeout)
        self.record = record
        self.descriptors = descriptors
        self.started = started
        self.mode = options.mode
        self.address = address
        self.type = type
        self.options = options
        self.connection = connection
    }

    /// Waits for `announcement`, then a record of `part` and its descriptors; validates them.
    static func receive(_ announcement: HandoverMessage, part: StateRecord.Part, on connection: borrowing ControlConnection,
                        address: PCIAddress, type: DeviceType, timeout: Int32) throws -> (StateRecord, [Int32]) {
        do {
            switch try connection.receiveMessage(timeoutMilliseconds: timeout) {
            case announcement?: break
            case .refused(let why)?:
                printError("virtio-vfio: error: the serving driver refused the handover: \(why)")
                throw ExitCode(Failure.busy)
            case let other:
                printError("virtio-vfio: error: the serving driver answered with \(other.map { "\($0)" } ?? "nothing (it closed the connection)"), not \(announcement)")
                throw ExitCode(Failure.protocolError)
            }
        } catch let error as ControlSocketError {
            printError("virtio-vfio: error: --take-over: \(error)")
            throw ExitCode(Failure.protocolError)
        }
        let received: (record: [UInt8], descriptors: [Int32])
        do { received = try DescriptorPassing.receive(socket: connection.fd.raw) } catch {
            printError("virtio-vfio: error: receiving the \(part) part of the state: \(error)")
            throw ExitCode(Failure.protocolError)
        }
        do {
            let record = try StateRecord(decoding: received.record, descriptorCount: received.descriptors.count, part: part)
            guard record.deviceAddress == "\(address)" else {
                throw StateRecordError.invalid(field: "device address", "\(record.deviceAddress), not \(address)")
            }
            guard record.deviceType == type.rawValue else {
                throw StateRecordError.invalid(field: "device type", "\(record.deviceType), this service drives \(type)")
            }
            return (record, received.descriptors)
        } catch {
            // Nothing was touched: the old driver resumes (or never paused) as if nothing happened.
            for fd in received.descriptors { Syscall.close(fd) }
            try? connection.send(.declined("\(error)", touchedDevice: false))
            printError("virtio-vfio: error: \(error)")
            throw ExitCode(Failure.protocolError)
        }
    }

    /// Tells the old driver the device is mapped here; it quiesces and sends the service part,
    /// which must describe the same device and DMA memory. From here on the service is paused.
    mutating func prepared() throws {
        do { try connection.send(.prepared) } catch {
            printError("virtio-vfio: error: --take-over: \(error)")
            throw ExitCode(Failure.protocolError)
        }
        let device = record
        let (service, sockets) = try Self.receive(.stateFollows, part: .service, on: connection, address: address,
                                                  type: type, timeout: options.handoverTimeout)
        for fd in descriptors where fd >= 0 { Syscall.close(fd) }
        record = service
        descriptors = sockets
        phases = [("quiesce+state", monotonicNanoseconds())]
        guard service.dmaIOVA == device.dmaIOVA, service.dmaSize == device.dmaSize else {
            throw decline("the service part names DMA memory 0x\(String(service.dmaIOVA, radix: 16))+\(service.dmaSize), the device part 0x\(String(device.dmaIOVA, radix: 16))+\(device.dmaSize)", touched: false)
        }
    }

    /// Descriptors of `role` in order, taken out of the received set (the caller owns them now).
    mutating func take(_ role: StateRecord.DescriptorRole) -> [Int32] {
        var result: [Int32] = []
        for (i, r) in record.descriptors.enumerated() where r == role && descriptors[i] >= 0 {
            result.append(descriptors[i])
            descriptors[i] = -1
        }
        return result
    }

    /// The VFIO part of the handover, ready for `VirtioPCITransport(adopting:)`.
    mutating func vfio(_ address: PCIAddress, sysfs: SysfsPCI) throws -> VFIOHandover {
        let container = take(.container)[0], group = take(.group)[0], device = take(.device)[0], memory = take(.dmaMemory)[0]
        let interrupts = take(.interrupt)
        let groupNumber: Int
        do { groupNumber = try VFIOAvailability.boundGroup(of: try sysfs.function(at: address)) } catch {
            for fd in [container, group, device, memory] + interrupts { Syscall.close(fd) }
            throw decline("\(error)", touched: false)
        }
        guard record.dmaSize <= UInt64(Int.max) else { throw decline("DMA size \(record.dmaSize)", touched: false) }
        return VFIOHandover(address: address, container: OwnedFD(adopting: container), group: OwnedFD(adopting: group),
                            groupNumber: groupNumber, device: OwnedFD(adopting: device), dmaMemory: OwnedFD(adopting: memory),
                            dmaIOVA: record.dmaIOVA, dmaSize: Int(record.dmaSize), interrupts: interrupts)
    }

    /// Tells the old driver why this successor gives up, and returns the error to exit with.
    func decline(_ why: String, touched: Bool) -> ExitCode {
        try? connection.send(.declined(why, touchedDevice: touched))
        printError("virtio-vfio: error: taking the device over failed: \(why)\(touched ? "; the old driver resets the device and resumes" : "; the old driver resumes")")
        return ExitCode(Failure.protocolError)
    }

    /// Reports healthy and waits for `go`. Returns normally when this instance owns the device.
    func confirm(_ summary: String, timeoutMilliseconds: Int32) throws {
        do {
            try connection.send(.ready(summary))
            switch try connection.receiveMessage(timeoutMilliseconds: timeoutMilliseconds) {
            case .go?, nil:
                // nil: the old instance ended after sending the state; nobody else serves.
                return
            case .abort(let why)?:
                printError("virtio-vfio: error: the old driver took the device back: \(why)")
                throw ExitCode(Failure.busy)
            default:
                throw ExitCode(Failure.protocolError)
            }
        } catch let error as ControlSocketError {
            printError("virtio-vfio: error: confirming the handover: \(error)")
            throw ExitCode(Failure.protocolError)
        }
    }

    deinit {
        for fd in descriptors where fd >= 0 { Syscall.close(fd) }
    }

    /// Whether to adopt the device as it runs (live) or reset it. Live needs the features this
    /// build would accept to be the ones the device runs with, and the device and every queue in
    /// the state the record describes (checked by reading only). `--mode live` refuses otherwise
    /// (nothing touched, the old driver resumes); `auto` falls back to reset.
    func chooseLive(_ transport: borrowing VirtioPCITransport, wanted: Features, snapshots: [QueueSnapshot],
                    interrupts: Bool) throws -> Bool {
        guard mode != .reset else { return false }
        var problem: String?
        let mine = Lifecycle.acceptable(offered: transport.readDeviceFeatures(), wanted: wanted)
        let theirs = Features(rawValue: record.features)
        if mine != theirs {
            problem = "this driver accepts features 0x\(String(mine.rawValue, radix: 16)), the device runs with 0x\(String(theirs.rawValue, radix: 16)) (live mode needs the same features)"
        } else {
            do throws(VirtioError) {
                _ = try Adoption.checkLive(transport, features: theirs)
                for (i, snapshot) in snapshots.enumerated() {
                    _ = try Adoption.checkQueue(transport, snapshot, vector: interrupts ? UInt16(i) : nil)
                }
            } catch { problem = "\(error)" }
        }
        guard let problem else { return true }
        if mode == .live { throw decline("live mode refused: \(problem)", touched: false) }
        printError("virtio-vfio: live mode not possible (\(problem)); taking over in reset mode")
        return false
    }

    var elapsed: Duration { ContinuousClock().now - started }

    /// Marks the end of a phase of the takeover.
    mutating func mark(_ phase: String) { phases.append((phase, monotonicNanoseconds())) }

    /// "quiesce+state 12.1 ms, vfio 3.0 ms, ..." (each phase's own duration).
    var phaseSummary: String {
        var previous = record.quiesceStarted
        return phases.map { name, end in
            defer { previous = end }
            return previous > 0 && end >= previous ? "\(name) \(milliseconds(end - previous))" : "\(name) ?"
        }.joined(separator: ", ")
    }
    /// From the moment the old driver stopped taking work until now.
    var gap: String {
        let now = monotonicNanoseconds()
        guard record.quiesceStarted > 0, now >= record.quiesceStarted else { return "unknown" }
        return milliseconds(now - record.quiesceStarted)
    }
}

extension StateRecord.Queue {
    init(_ s: QueueSnapshot) {
        self.init(index: UInt16(s.index), size: s.size, descriptors: s.rings.descriptors, driver: s.rings.driver,
                  device: s.rings.device, availIndex: s.availIndex, lastUsedIndex: s.usedIndex)
    }
}

extension QueueSnapshot {
    init(_ q: StateRecord.Queue) {
        self.init(index: Int(q.index), size: q.size, rings: QueueRings(descriptors: q.descriptors, driver: q.driver, device: q.device),
                  availIndex: q.availIndex, usedIndex: q.lastUsedIndex)
    }
}

/// What the driver serving a control socket says about itself (nil: nobody answers).
func askServingDriver(_ path: String) -> (pid: Int32, version: String, features: UInt64, arguments: [String])? {
    guard let connection = try? ControlConnection(connectingTo: path, timeoutMilliseconds: 2000) else { return nil }
    guard (try? connection.send(.describe)) != nil,
          case .described(let pid, let version, let features, let arguments)?? = try? connection.receiveMessage(timeoutMilliseconds: 2000)
    else { return nil }
    return (pid, version, features, arguments)
}

/// Nanoseconds as "12.3 ms".
func milliseconds(_ nanoseconds: UInt64) -> String {
    let tenths = (nanoseconds + 50_000) / 100_000
    return "\(tenths / 10).\(tenths % 10) ms"
}

/// The answer to `describe`: this driver's pid, version, features and command line, or a
/// refusal if the command line cannot travel (then `upgrade` cannot repeat it; start the
/// successor with `--take-over` by hand).
func describeThisDriver(features: Features, arguments: [String]) -> HandoverMessage {
    if let problem = HandoverMessage.problem(describing: arguments) {
        return .refused("this driver's command line cannot be described (\(problem)); start the successor with --take-over yourself")
    }
    return .described(pid: getpid(), driverVersion: DriverVersion.string, features: features.rawValue, arguments: arguments)
}
