import HotUpgrade
import NBD
import Synchronization
import Syscalls
import Upgrade
import Virtio
import VirtioDevices

/// `serve blk`: a virtio-blk device exported over NBD. On a handover the NBD server quiesces
/// (no new requests read, every reply sent) and hands over its listeners and connections, each
/// at a message boundary with its unparsed input. Requests in flight travel with them when each
/// takes one descriptor (RING_INDIRECT_DESC; `VirtioBlockBackend.handsOverInFlight`): the
/// successor collects their completions (live mode) or gives them to the device again after its
/// reset; otherwise the quiesce waits for them.
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
        let carrying = server.withBackend { $0.handsOverInFlight }
        let result: Result<([QueueSnapshot], BlockBackendHandoverState?), VirtioError> = server.withBackend { backend in
            do throws(VirtioError) {
                if carrying {
                    let (queues, state) = try backend.handoverState()
                    return .success((queues, state))
                }
                return .success((try backend.device.queueSnapshots(), nil))
            } catch { return .failure(error) }
        }
        let queues: [QueueSnapshot], backendState: BlockBackendHandoverState?
        switch result {
        case .success(let s): (queues, backendState) = s
        case .failure(let e): throw UpgradeError(.busy, "\(e)")
        }
        let connections = server.handoverState()
        let listeners = [connections.unixListener?.fd, connections.tcpListener?.fd].compactMap { $0 }
        let carried = backendState?.tags.count ?? 0
        return ServicePart(queues: queues, serviceState: BlockExportState(connections: connections, backend: backendState).encoded(),
                           descriptors: connections.descriptors.map { LentDescriptor(listeners.contains($0) ? .listener : .client, $0) },
                           summary: "handed over \(connections.clients.count) NBD connections" + (carried > 0 ? " with \(carried) requests in flight" : ""))
    }

    public mutating func recoverAfterRollback() throws(UpgradeError) {
        do throws(BackendError) {
            try server.modifyBackend { backend throws(BackendError) in try backend.recoverAfterFailedHandover() }
        } catch { throw UpgradeError(.protocolError, "\(error)") }
    }

    public consuming func relinquish() {
        server.release()
    }

    /// Reads the first block through the NBD server's backend (requests carried in flight that
    /// complete meanwhile are answered once the server runs).
    public mutating func probe() throws(UpgradeError) -> ProbeReport {
        do throws(BackendError) { try server.readFirstBlock() } catch { throw UpgradeError(.protocolError, "\(error)") }
        let clients = server.connectedClients
        let adopted = server.statistics.requestsAdopted
        let carried = adopted > 0 ? ", \(adopted) requests in flight carried" : ""
        return ProbeReport(summary: "\(clients) NBD connections\(carried), first read ok", detail: " with \(clients) NBD connections\(carried)")
    }
}

extension BlockExport where T: ~Copyable {
    /// The successor's `adopt` step: the device adopted (live) or reset, then the NBD listeners
    /// and connections handed over. Received sockets not adopted are closed; nothing leaks.
    public static func adopt(_ transport: consuming T, _ successor: inout Successor, wanted: Features, ring: RingPreference = .auto,
                             mode: CompletionMode,
                             configuration: NBDServerConfiguration,
                             log: @escaping @Sendable (String) -> Void) throws(UpgradeError) -> Self {
        var sockets = successor.descriptors.takeAll(.listener)
        var clients = successor.descriptors.takeAll(.client)
        let raw = (0..<sockets.count).map { sockets.peek($0) } + (0..<clients.count).map { clients.peek($0) }
        let state: BlockExportState
        do { state = try BlockExportState(decoding: successor.record.serviceState, descriptors: raw) } catch {
            throw successor.decline("serve blk state: \(error)", touched: false)
        }
        let carried = state.backend?.carried ?? []
        let blk = try successor.bringUp(transport, wanted: ring.features(wanted), vectors: mode.vectorPerQueue(successor.record.queues.count),
            adopt: { t, features, queues, verified throws(VirtioError) in
                try BlockDevice(adopting: t, features: features, queues: queues, mode: mode, verified: verified, carried: carried)
            },
            start: { t throws(VirtioError) in try BlockDevice(transport: t, wanted: wanted, ring: ring, mode: mode) })
        let backend: VirtioBlockBackend<T>
        do throws(BackendError) {
            if let handed = state.backend {
                // Reset mode: the device forgot them; they go to it again, in submission order.
                backend = try VirtioBlockBackend(device: blk, continuing: handed, resubmit: successor.live != true, log: log)
            } else {
                backend = VirtioBlockBackend(device: blk, log: log)
            }
        } catch {
            throw successor.decline("continuing the requests in flight: \(error)", touched: true)
        }
        let server: NBDServer<VirtioBlockBackend<T>>
        do { server = try NBDServer(backend: backend, configuration: configuration, adopting: state.connections) } catch {
            throw successor.decline("adopting the NBD connections: \(error)", touched: true)
        }
        // The server owns the sockets now.
        _ = sockets.release()
        _ = clients.release()
        successor.mark("nbd")
        return BlockExport(server: server)
    }
}
