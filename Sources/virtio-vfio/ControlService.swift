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

// MARK: - The serving side: its control socket

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
    /// The service's counters by name, for `statistics` (nil: the service keeps none).
    let counters: (@Sendable () -> [(String, Int)])?
    /// The device part of the state and its descriptors (constant while this driver serves).
    let deviceState: DeviceState
    let options: HandoverOptions
    var thread = pthread_t()

    struct DeviceState: Sendable {
        let record: StateRecord
        let descriptors: [Int32]
    }

    init(path: String, replacing: Bool, wake: Int32? = nil, deviceState: DeviceState, options: HandoverOptions,
         counters: (@Sendable () -> [(String, Int)])? = nil,
         describe: @escaping @Sendable () -> HandoverMessage) throws {
        self.counters = counters
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
            // Stop and counter signals go to the service loop's thread, whose ppoll they end at
            // once (here they would only set a flag the loop sees at its next wake-up).
            _ = Syscall.blockSignalsInThisThread([SIGINT, SIGTERM, SIGUSR1])
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
            case .statistics?:
                if let counters {
                    try? connection.send(.counters(counters().prefix(HandoverMessage.maxCounters).map {
                        HandoverMessage.Counter(name: $0.0, value: UInt64(max($0.1, 0)))
                    }))
                } else {
                    try? connection.send(.refused("this service keeps no counters"))
                }
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
                try? connection.send(.refused("expected hello, describe or statistics"))
            }
        }
    }
}

extension ControlSocketError {
    var isInUse: Bool { if case .inUse = self { return true } else { return false } }
}

/// What the driver serving a control socket says about itself (nil: nobody answers).
func askServingDriver(_ path: String) -> (pid: Int32, version: String, features: UInt64, arguments: [String])? {
    guard let connection = try? ControlConnection(connectingTo: path, timeoutMilliseconds: 2000) else { return nil }
    guard (try? connection.send(.describe)) != nil,
          case .described(let pid, let version, let features, let arguments)?? = try? connection.receiveMessage(timeoutMilliseconds: 2000)
    else { return nil }
    return (pid, version, features, arguments)
}

/// The counters of the driver serving a control socket (nil: nobody answers, or it keeps none).
func askServingDriverCounters(_ path: String) -> [HandoverMessage.Counter]? {
    guard let connection = try? ControlConnection(connectingTo: path, timeoutMilliseconds: 2000) else { return nil }
    guard (try? connection.send(.statistics)) != nil,
          case .counters(let counters)?? = try? connection.receiveMessage(timeoutMilliseconds: 2000)
    else { return nil }
    return counters
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
