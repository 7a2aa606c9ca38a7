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
    /// `vectors[i]` is the MSI-X vector queue i must still signal (nil: not checked).
    func chooseLive(_ transport: borrowing VirtioPCITransport, wanted: Features, snapshots: [QueueSnapshot],
                    vectors: [UInt16?]) throws -> Bool {
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
                    _ = try Adoption.checkQueue(transport, snapshot, vector: i < vectors.count ? vectors[i] : nil)
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

extension CompletionMode {
    /// One vector per queue, queue i on vector i (rng, blk), in an interrupt mode; none polling.
    func vectorPerQueue(_ count: Int) -> [UInt16?] {
        (0..<count).map { self == .poll ? nil : UInt16($0) }
    }
}

extension StateRecord.Queue {
    init(_ s: QueueSnapshot) {
        self.init(index: UInt16(s.index), size: s.size, descriptors: s.rings.descriptors, driver: s.rings.driver,
                  device: s.rings.device, availIndex: s.availIndex, lastUsedIndex: s.usedIndex)
    }
}

extension StateRecord {
    /// Records `snapshots`: each queue, and the requests the device still holds in the in-flight
    /// table (head, token as tag, device-writable bytes as length; no client).
    mutating func setQueues(_ snapshots: [QueueSnapshot]) {
        queues = snapshots.map(Queue.init)
        inFlight = snapshots.flatMap { s in
            s.outstanding.map {
                InFlight(queue: UInt16(s.index), head: $0.head, slot: UInt32(truncatingIfNeeded: $0.token), client: UInt32.max,
                         tag: $0.token, operation: 0, offset: 0, length: $0.writableBytes)
            }
        }
    }

    /// The queues as `setQueues` recorded them, each with its outstanding requests.
    var queueSnapshots: [QueueSnapshot] {
        queues.map { q in
            QueueSnapshot(index: Int(q.index), size: q.size,
                          rings: QueueRings(descriptors: q.descriptors, driver: q.driver, device: q.device),
                          availIndex: q.availIndex, usedIndex: q.lastUsedIndex,
                          outstanding: inFlight.filter { $0.queue == q.index }.map {
                              QueueSnapshot.Outstanding(head: $0.head, token: $0.tag, writableBytes: $0.length)
                          })
        }
    }
}
