import Logging
import Synchronization
import Syscalls
import Upgrade
#if canImport(Glibc)
import Glibc
#endif

/// A handover a successor asked for, parked until the service has quiesced. It owns the control
/// connection to the successor.
public struct HandoverRequest: ~Copyable, @unchecked Sendable {
    public let connection: ControlConnection
    public var peer: Int32 { connection.peer.pid }
    public let mode: HandoverMessage.Mode
    public let version: String
    /// CLOCK_MONOTONIC (ns) when the service was asked to quiesce: the service gap starts here.
    public let quiesceRequested: UInt64
}

/// What the control socket needs to know of the service it fronts.
public struct ControlServiceConfiguration: Sendable {
    /// The answer to `describe` (who serves, which version, features, command line).
    public var describe: @Sendable () -> HandoverMessage
    /// The service's counters by name, for `statistics` (nil: it keeps none).
    public var counters: (@Sendable () -> [(String, Int)])?
    /// An eventfd written when a handover request is parked, so a sleeping service loop wakes.
    public var wake: Int32?
    /// How long the successor may take to map the device before this driver gives up on it (ms).
    public var handoverTimeout: Int32 = 10_000
    /// How long a successor started for `upgrade` may take to ask for the device (ms).
    public var successorStartTimeout: Int32 = 60_000
    /// Tests of the refusal path only: the format the device part is written in.
    public var debugStateFormat: UInt16?
    /// Called from the control socket's thread about once a second, whatever the service loop
    /// is doing (a service manager's STATUS and watchdog are told from here).
    public var tick: (@Sendable () -> Void)?

    public init(describe: @escaping @Sendable () -> HandoverMessage) { self.describe = describe }
}

/// The control socket of a serving driver, answered by a thread of its own: `describe` and
/// `statistics` at once; `hello` with the device part of the state (the service keeps running
/// while the successor maps the device); then, once the successor says `prepared`, the request is
/// parked for the service loop, which is woken, quiesces and hands over (`serve(_:until:)`).
public final class ControlService: @unchecked Sendable {
    let listener: ControlListener
    let configuration: ControlServiceConfiguration
    let devicePart: DevicePart
    let logger: Logger
    /// Set while a handover request is parked: the service quiesces.
    public let quiesce = Atomic<Bool>(false)
    let pending = Mutex<HandoverRequest?>(nil)
    /// The successor started for `upgrade`, until its outcome is reported.
    let launch = Mutex<SuccessorLaunch?>(nil)
    /// Successors whose outcome was reported, until they are reaped.
    let ended = Mutex<[pid_t]>([])
    let stopping = Atomic<Bool>(false)
    var thread = pthread_t()
    var running = false

    /// Listens on `path` (replacing a running driver's socket when `replacing`: the successor
    /// does) and starts answering on a thread of its own.
    public init(path: String, replacing: Bool, devicePart: DevicePart, configuration: ControlServiceConfiguration,
                logger: Logger) throws(UpgradeError) {
        do { listener = try ControlListener(path: path, replacing: replacing) } catch {
            throw UpgradeError(error.isInUse ? .busy : .ioError, "control socket: \(error)")
        }
        self.devicePart = devicePart
        self.configuration = configuration
        self.logger = logger
        let box = Unmanaged.passRetained(self).toOpaque()
        let created = pthread_create(&thread, nil, { raw in
            let service = Unmanaged<ControlService>.fromOpaque(raw!).takeRetainedValue()
            // Stop and counter signals go to the service loop's thread, whose ppoll they end at
            // once (here they would only set a flag the loop sees at its next wake-up).
            _ = Syscall.blockSignalsInThisThread([SIGINT, SIGTERM, SIGUSR1])
            service.answer()
            return nil
        }, box)
        guard created == 0 else {
            Unmanaged<ControlService>.fromOpaque(box).release()
            throw UpgradeError(.ioError, "control socket \(path): cannot start its thread (error \(created))")
        }
        running = true
    }

    public var path: String { listener.path }

    /// Ends the thread (the process is about to exit or has handed over). A request still
    /// parked is refused; a command waiting for an upgrade's outcome hears that this driver stops.
    public func stop() {
        guard running else { return }
        running = false
        stopping.store(true, ordering: .relaxed)
        pthread_join(thread, nil)
        if let request = pending.withLock({ $0.take() }) { try? request.connection.send(.refused("the driver is stopping")) }
        if let waiting = launch.withLock({ $0.take() }) {
            try? waiting.requester.send(.upgradeOutcome(upgraded: false, summary: "the serving driver stopped before the new driver (pid \(waiting.pid)) took over"))
        }
    }

    deinit { stop() }

    /// The parked handover request, taken out (nil if none: the service quiesced for nothing).
    func take() -> HandoverRequest? {
        pending.withLock { $0.take() }
    }

    /// The handover was handled (handed over, refused or rolled back): accept the next one.
    func finished() {
        quiesce.store(false, ordering: .relaxed)
    }

    /// Refuses `request` (the service could not quiesce or snapshot) and serves on.
    func refuse(_ request: consuming HandoverRequest, _ why: String) {
        finished()
        try? request.connection.send(.refused(why))
    }

    func answer() {
        var lastTick: UInt64 = 0
        while !stopping.load(ordering: .relaxed) {
            watchSuccessors()
            if let tick = configuration.tick, monotonicNanoseconds() &- lastTick >= 1_000_000_000 {
                lastTick = monotonicNanoseconds()
                tick()
            }
            guard case .success(let ready) = Syscall.pollIn(listener.fd.raw, timeoutMilliseconds: 100), ready else { continue }
            guard let connection = listener.accept(log: { logger.warning("\($0)") }) else { continue }
            answer(connection)
        }
    }

    /// Answers one connection: one request, or a whole handover up to the quiesce.
    func answer(_ connection: consuming ControlConnection) {
        let message: HandoverMessage?
        do { message = try connection.receiveMessage(timeoutMilliseconds: 2000) } catch {
            logger.warning("control socket: \(error)")
            return
        }
        switch message {
        case .describe?:
            try? connection.send(configuration.describe())
        case .statistics?:
            if let counters = configuration.counters {
                try? connection.send(.counters(counters().prefix(HandoverMessage.maxCounters).map {
                    HandoverMessage.Counter(name: $0.0, value: UInt64(max($0.1, 0)))
                }))
            } else {
                try? connection.send(.refused("this service keeps no counters"))
            }
        case .hello(let mode, let version, let pid)?:
            guard !quiesce.load(ordering: .relaxed) else {
                try? connection.send(.refused("another handover is in progress"))
                return
            }
            logger.notice("handover requested by pid \(pid) (driver \(version), \(mode) mode); sending the device")
            // The device part goes out while this driver keeps serving: the successor maps the
            // device (regions, BARs, DMA memory: nothing written to it) before anything pauses.
            do {
                try connection.send(.deviceFollows)
                let format = configuration.debugStateFormat ?? StateRecord.formatVersion
                try DescriptorPassing.send(socket: connection.fd.raw, record: devicePart.record.encoded(format: format),
                                           descriptors: devicePart.descriptors.map(\.fd))
            } catch {
                logger.warning("handover to pid \(pid) abandoned while sending the device: \(error)")
                return
            }
            let answer: HandoverMessage?
            do { answer = try connection.receiveMessage(timeoutMilliseconds: configuration.handoverTimeout) } catch {
                logger.warning("handover to pid \(pid) abandoned before the service paused: \(error)")
                return
            }
            guard case .prepared? = answer else {
                let why = if case .declined(let reason, _)? = answer { reason } else { "\(answer.map { "\($0)" } ?? "it went away")" }
                logger.warning("upgrade abandoned before the service paused (nothing was touched): pid \(pid): \(why)")
                return
            }
            let request = HandoverRequest(connection: connection, mode: mode, version: version,
                                          quiesceRequested: monotonicNanoseconds())
            var parked: HandoverRequest? = request
            pending.withLock { $0 = parked.take() }
            logger.notice("pid \(pid) mapped the device; quiescing")
            quiesce.store(true, ordering: .relaxed)
            if let wake = configuration.wake { _ = Syscall.write64(wake, 1) }
        case .upgrade(let binary, let mode, let extra)?:
            startSuccessor(connection, binary: binary, mode: mode, extra: extra)
        default:
            try? connection.send(.refused("expected hello, upgrade, describe or statistics"))
        }
    }
}

extension ControlSocketError {
    var isInUse: Bool { if case .inUse = self { return true } else { return false } }
}
