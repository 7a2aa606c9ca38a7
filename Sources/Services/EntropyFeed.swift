#if canImport(Glibc)
import Glibc
#endif
import HotUpgrade
import Synchronization
import Syscalls
import Upgrade
import Virtio
import VirtioDevices

/// `serve rng`: entropy from a virtio-rng device fed to a sink (the kernel pool through
/// RNDADDENTROPY on the command line; a buffer in tests) at a bounded rate, and handed over to a
/// successor between two reads, when nothing is in flight from the sink's side.
public struct EntropyFeed<T: HandoverTransport & ~Copyable>: ~Copyable, UpgradableService {
    public var rng: EntropyDevice<T>
    /// Bytes per second at most, bytes per sink call at most, stop after `limit` bytes (0: never).
    public let rate: Int, chunk: Int, limit: Int
    /// Takes one chunk; an error ends the service (e.g. RNDADDENTROPY refused).
    let sink: (UnsafeRawBufferPointer) throws -> Void
    public private(set) var fed = 0
    /// Device reads that returned entropy.
    public private(set) var reads = 0
    /// Called from the loop at most every `statusInterval` (and once when it starts) with the
    /// bytes fed, the reads and the device's recoveries so far.
    public var status: (@Sendable (_ fed: Int, _ reads: Int, _ recoveries: Int) -> Void)?
    public var statusInterval: Duration = .milliseconds(500)
    /// Called with each read's time from request to answer (ns).
    public var readAnswered: (@Sendable (UInt64) -> Void)?
    var lastStatus: UInt64 = 0
    let clock = ContinuousClock()
    var start: ContinuousClock.Instant

    public init(rng: consuming EntropyDevice<T>, rate: Int, limit: Int,
                sink: @escaping (UnsafeRawBufferPointer) throws -> Void) {
        self.rng = rng
        self.rate = max(rate, 1)
        self.chunk = min(max(rate, 1), 512)
        self.limit = limit
        self.sink = sink
        start = clock.now
    }

    public func devicePart(driverVersion: String) -> DevicePart {
        rng.transport.devicePart(driverVersion: driverVersion, features: rng.negotiation.accepted)
    }

    public mutating func run(until stop: borrowing Atomic<Bool>, quiesceWhen quiesce: borrowing Atomic<Bool>) -> ServiceRun {
        withUnsafeTemporaryAllocation(byteCount: chunk, alignment: 8) { feed(into: $0, until: stop, quiesceWhen: quiesce) }
    }

    mutating func feed(into buffer: UnsafeMutableRawBufferPointer, until stop: borrowing Atomic<Bool>,
                       quiesceWhen quiesce: borrowing Atomic<Bool>) -> ServiceRun {
        // Paced from `fed`, so a pause (a handover that rolled back) is not made up in a burst.
        start = clock.now - .milliseconds(fed * 1000 / rate)
        while !stop.load(ordering: .relaxed) && (limit == 0 || fed < limit) {
            if quiesce.load(ordering: .relaxed) { return .quiesced }
            let n = limit == 0 ? chunk : min(chunk, limit - fed)
            var filled = 0
            let asked = readAnswered == nil ? 0 : monotonicNanoseconds()
            do throws(VirtioError) {
                // A misbehaving device is reset and brought back (up to 5 times in a row): the
                // consumer sees a pause, not an end of supply.
                try rng.read(n, recoveries: 5) { piece in
                    (buffer.baseAddress! + filled).copyMemory(from: piece.baseAddress!, byteCount: piece.count)
                    filled += piece.count
                }
            } catch { return .failed(error) }
            reads += 1
            if let readAnswered { readAnswered(monotonicNanoseconds() - asked) }
            if let status {
                let now = monotonicNanoseconds()
                if now &- lastStatus >= UInt64(statusInterval.nanoseconds) {
                    lastStatus = now
                    status(fed + filled, reads, rng.recoveries)
                }
            }
            do { try sink(UnsafeRawBufferPointer(rebasing: buffer[..<filled])) } catch { return .failed(error) }
            fed += filled
            let due = start + .milliseconds(fed * 1000 / rate)
            while clock.now < due && !stop.load(ordering: .relaxed) && !quiesce.load(ordering: .relaxed) {
                let left = min(due - clock.now, .milliseconds(50))
                if left > .zero { sleepThread(left) }
            }
        }
        return .stopped
    }

    public mutating func handoverState(for mode: HandoverMessage.Mode) throws(UpgradeError) -> ServicePart {
        // Between two reads nothing is in flight from the sink's side; the snapshot collects the
        // buffers the device still holds (§2.7.14).
        let snapshot: QueueSnapshot
        do { snapshot = try rng.queueSnapshot() } catch {
            if case .brokenQueue = error { try? rng.recover() }
            throw UpgradeError(.busy, "the queue did not drain: \(error)")
        }
        return ServicePart(queues: [snapshot], summary: "fed \(fed) bytes before the handover")
    }

    public mutating func recoverAfterRollback() throws(UpgradeError) {
        do { try rng.recover() } catch { throw UpgradeError(.protocolError, "\(error)") }
    }

    public consuming func relinquish() {
        _ = rng.detach()
    }

    /// Stops for good: the device is reset (its buffers reclaimed, §2.4) and closed.
    public consuming func shutdown() throws(VirtioError) {
        _ = try rng.shutdown()
    }

    public mutating func probe() throws(UpgradeError) -> ProbeReport {
        var got = 0
        do { try rng.read(16) { got += $0.count } } catch { throw UpgradeError(.protocolError, "\(error)") }
        return ProbeReport(summary: "first read \(got) bytes")
    }
}

extension EntropyFeed where T: ~Copyable {
    /// The successor's `adopt` step: the rng adopted as it runs (live) or reset and rebuilt.
    public static func adopt(_ transport: consuming T, _ successor: inout Successor, wanted: Features, ring: RingPreference = .auto,
                             mode: CompletionMode,
                             rate: Int, limit: Int, sink: @escaping (UnsafeRawBufferPointer) throws -> Void) throws(UpgradeError) -> Self {
        let rng = try successor.bringUp(transport, wanted: ring.features(wanted), vectors: mode.vectorPerQueue(successor.record.queues.count),
            adopt: { t, features, queues, verified throws(VirtioError) in
                guard queues.count == 1 else { throw VirtioError.adoption(queue: nil, "\(queues.count) queues handed over, virtio-rng has 1") }
                return try EntropyDevice(adopting: t, features: features, queue: queues[0], mode: mode, verified: verified)
            },
            start: { t throws(VirtioError) in try EntropyDevice(transport: t, wanted: wanted, ring: ring, mode: mode) })
        return EntropyFeed(rng: rng, rate: rate, limit: limit, sink: sink)
    }
}

extension CompletionMode {
    /// One vector per queue, queue i on vector i (rng, blk), in an interrupt mode; none polling.
    public func vectorPerQueue(_ count: Int) -> [UInt16?] {
        (0..<count).map { self == .poll ? nil : UInt16($0) }
    }
}

/// Sleeps the calling thread (services are synchronous; no Task).
func sleepThread(_ duration: Duration) {
    let (s, a) = duration.components
    var ts = timespec(tv_sec: Int(s), tv_nsec: Int(a / 1_000_000_000))
    // A signal (stop, a handover's wake-up) ends the sleep early: the caller looks again.
    _ = nanosleep(&ts, nil)
}
