import HotUpgrade
import NBD
import Synchronization
import Syscalls
import Upgrade
import Virtio
import VirtioDevices

/// `serve blk`: a virtio-blk device exported over NBD. On a handover the NBD server quiesces
/// (no new requests read, those in flight finished, every reply sent) and hands over its
/// listeners and connections, each at a message boundary with its unparsed input.
public struct BlockExport<T: HandoverTransport & ~Copyable>: ~Copyable, UpgradableService {
    public var server: NBDServer<VirtioBlockBackend<T>>

    public init(server: consuming NBDServer<VirtioBlockBackend<T>>) { self.server = server }

    public func devicePart(driverVersion: String) -> DevicePart {
        server.withBackend { $0.device.transport.devicePart(driverVersion: driverVersion, features: $0.device.negotiation.accepted) }
    }

    public mutating func run(until stop: borrowing Atomic<Bool>, quiesceWhen quiesce: borrowing Atomic<Bool>) -> ServiceRun {
        do {
            switch try server.run(until: stop, quiesceWhen: quiesce) {
            case .stopped: return .stopped
            case .quiesced: return .quiesced
            case .quiesceFailed(let failure): return .quiesceFailed("\(failure)")
            }
        } catch { return .failed(error) }
    }

    public mutating func handoverState(for mode: HandoverMessage.Mode) throws(UpgradeError) -> ServicePart {
        let result: Result<[QueueSnapshot], VirtioError> = server.withBackend { backend in
            do throws(VirtioError) { return .success(try backend.device.queueSnapshots()) } catch { return .failure(error) }
        }
        let snapshots: [QueueSnapshot]
        switch result {
        case .success(let s): snapshots = s
        case .failure(let e): throw UpgradeError(.busy, "\(e)")
        }
        let connections = server.handoverState()
        let listeners = [connections.unixListener?.fd, connections.tcpListener?.fd].compactMap { $0 }
        return ServicePart(queues: snapshots, serviceState: connections.encoded(),
                           descriptors: connections.descriptors.map { LentDescriptor(listeners.contains($0) ? .listener : .client, $0) },
                           summary: "handed over \(connections.clients.count) NBD connections")
    }

    public mutating func recoverAfterRollback() throws(UpgradeError) {
        do throws(VirtioError) {
            try server.modifyBackend { backend throws(VirtioError) in try backend.device.recover() }
        } catch { throw UpgradeError(.protocolError, "\(error)") }
    }

    public consuming func relinquish() {
        server.release()
    }

    /// Reads sector 0.
    public mutating func probe() throws(UpgradeError) -> ProbeReport {
        let probe = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { probe.deallocate() }
        do throws(BlockError) {
            try server.modifyBackend { backend throws(BlockError) in try backend.device.read(sector: 0, into: probe) }
        } catch { throw UpgradeError(.protocolError, "\(error)") }
        let clients = server.connectedClients
        return ProbeReport(summary: "\(clients) NBD connections, first read ok", detail: " with \(clients) NBD connections")
    }
}

extension BlockExport where T: ~Copyable {
    /// The successor's `adopt` step: the device adopted (live) or reset, then the NBD listeners
    /// and connections handed over. Received sockets not adopted are closed; nothing leaks.
    public static func adopt(_ transport: consuming T, _ successor: inout Successor, wanted: Features, mode: CompletionMode,
                             configuration: NBDServerConfiguration,
                             log: @escaping @Sendable (String) -> Void) throws(UpgradeError) -> Self {
        var sockets = successor.descriptors.takeAll(.listener)
        var clients = successor.descriptors.takeAll(.client)
        let raw = (0..<sockets.count).map { sockets.peek($0) } + (0..<clients.count).map { clients.peek($0) }
        let connections: NBDHandoverState
        do { connections = try NBDHandoverState(decoding: successor.record.serviceState, descriptors: raw) } catch {
            throw successor.decline("NBD connection state: \(error)", touched: false)
        }
        let blk = try successor.bringUp(transport, wanted: wanted, vectors: mode.vectorPerQueue(successor.record.queues.count),
            adopt: { t, features, queues, verified throws(VirtioError) in
                try BlockDevice(adopting: t, features: features, queues: queues, mode: mode, verified: verified)
            },
            start: { t throws(VirtioError) in try BlockDevice(transport: t, wanted: wanted, mode: mode) })
        let server: NBDServer<VirtioBlockBackend<T>>
        do { server = try NBDServer(backend: VirtioBlockBackend(device: blk, log: log), configuration: configuration, adopting: connections) } catch {
            throw successor.decline("adopting the NBD connections: \(error)", touched: true)
        }
        // The server owns the sockets now.
        _ = sockets.release()
        _ = clients.release()
        successor.mark("nbd")
        return BlockExport(server: server)
    }
}
