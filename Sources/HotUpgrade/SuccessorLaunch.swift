import Logging
import Syscalls
import Upgrade
#if canImport(Glibc)
import Glibc
#endif

/// A successor this driver started for `virtio-vfio upgrade`, and the connection of the command
/// that asked, which hears how it ended (`HandoverMessage.upgradeOutcome`).
public struct SuccessorLaunch: ~Copyable, @unchecked Sendable {
    let requester: ControlConnection
    let pid: pid_t
    /// CLOCK_MONOTONIC (ns) after which a successor that has not asked for the device is killed.
    let deadline: UInt64

    /// The serving driver's command line with the options of an earlier takeover removed, then
    /// `--take-over --mode MODE`: how a successor is started.
    public static func arguments(replacing old: [String], mode: HandoverMessage.Mode) -> [String] {
        var result: [String] = []
        var skip = false
        for argument in old.dropFirst() {
            if skip { skip = false; continue }
            if argument == "--take-over" { continue }
            if ["--mode", "--debug-fault", "--debug-state-format"].contains(argument) { skip = true; continue }
            if ["--mode=", "--debug-fault=", "--debug-state-format="].contains(where: { argument.hasPrefix($0) }) { continue }
            result.append(argument)
        }
        return result + ["--take-over", "--mode", "\(mode)"]
    }
}

extension ControlService {
    /// `upgrade(binary, mode, arguments)`: starts the successor from this process, so it logs
    /// where this driver logs and stays in its service (cgroup, manager), and parks the asking
    /// connection until that successor's handover ends. Refused while a handover or another
    /// upgrade is in progress, and for a binary that cannot be run.
    func startSuccessor(_ connection: consuming ControlConnection, binary: String, mode: HandoverMessage.Mode, extra: [String]) {
        guard !quiesce.load(ordering: .relaxed), launch.withLock({ $0 == nil }) else {
            try? connection.send(.refused("another upgrade is in progress"))
            return
        }
        guard binary.hasPrefix("/"), case .success = Syscall.access(binary, X_OK) else {
            try? connection.send(.refused("\(binary) is not an executable file given by its absolute path"))
            return
        }
        guard case .described(_, _, _, let own) = configuration.describe() else {
            try? connection.send(.refused("this driver's command line cannot be described; start the successor with --take-over yourself"))
            return
        }
        let arguments = [binary] + SuccessorLaunch.arguments(replacing: own, mode: mode) + extra
        let pid: pid_t
        switch Syscall.spawn(arguments) {
        case .success(let p): pid = p
        case .failure(let e):
            try? connection.send(.refused("starting \(binary): \(e)"))
            return
        }
        logger.notice("upgrade: started \(arguments.joined(separator: " ")) as pid \(pid)")
        try? connection.send(.started(pid: pid))
        let deadline = monotonicNanoseconds() &+ UInt64(configuration.successorStartTimeout) * 1_000_000
        var parked: SuccessorLaunch? = SuccessorLaunch(requester: connection, pid: pid, deadline: deadline)
        launch.withLock { $0 = parked.take() }
    }

    /// Tells the command that started successor `pid` how its upgrade ended (nothing if another
    /// process took over, e.g. one started by hand).
    func reportUpgrade(of pid: Int32, upgraded: Bool, _ summary: String) {
        guard let waiting = launch.withLock({ slot -> SuccessorLaunch? in
            guard slot?.pid == pid else { return nil }
            return slot.take()
        }) else { return }
        ended.withLock { $0.append(pid) }
        try? waiting.requester.send(.upgradeOutcome(upgraded: upgraded, summary: summary))
    }

    /// Between requests: reaps the successors this driver started, and reports one that ended or
    /// missed its deadline before it asked for the device (killed then) while no handover runs.
    func watchSuccessors() {
        // Successors whose outcome was reported: reaped once they end (a rolled-back one exits).
        ended.withLock { pids in pids.removeAll { if case .success(nil) = Syscall.reap($0) { false } else { true } } }
        guard !quiesce.load(ordering: .relaxed) else { return }
        let now = monotonicNanoseconds()
        guard let (pid, ended) = launch.withLock({ slot -> (pid_t, String)? in
            guard let pid = slot?.pid, let deadline = slot?.deadline else { return nil }
            if case .success(let exit?) = Syscall.reap(pid) { return (pid, "\(exit) before taking the device over") }
            if now >= deadline {
                kill(pid, SIGKILL)
                return (pid, "did not ask for the device within \(configuration.successorStartTimeout) ms; killed it")
            }
            return nil
        }) else { return }
        let version = devicePart.record.driverVersion
        logger.warning("upgrade abandoned: the new driver (pid \(pid)) \(ended); driver \(version) keeps serving")
        reportUpgrade(of: pid, upgraded: false, "the new driver (pid \(pid)) \(ended); driver \(version) keeps serving")
    }
}
