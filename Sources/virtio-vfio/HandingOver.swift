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

// MARK: - The serving side: handing the device over

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
