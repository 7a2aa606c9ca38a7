import Synchronization
import Syscalls

/// One value a service reports: a counter (only grows while this driver serves) or a gauge, with
/// labels. Names follow Prometheus' rules (`[a-z_][a-z0-9_]*`) without the exporter's prefix.
public struct TelemetrySample: Sendable, Equatable {
    /// `seconds`: a gauge whose value is in nanoseconds, shown in seconds (a time, e.g. the last
    /// upgrade's service gap).
    public enum Kind: Sendable, Equatable { case counter, gauge, seconds }
    public var name: String
    public var help: String
    public var kind: Kind
    /// (name, value) pairs, in the order they are shown.
    public var labels: [Label]
    public var value: Int

    public struct Label: Sendable, Equatable {
        public var name: String
        public var value: String
        public init(_ name: String, _ value: String) { self.name = name; self.value = value }
    }

    public init(_ name: String, _ kind: Kind, _ value: Int, labels: [Label] = [], help: String) {
        self.name = name
        self.kind = kind
        self.value = value
        self.labels = labels
        self.help = help
    }

    /// "name" or "name{queue=0,op=read}": how `statistics` (and `info`) names it.
    public var qualifiedName: String {
        labels.isEmpty ? name : name + "{" + labels.map { "\($0.name)=\($0.value)" }.joined(separator: ",") + "}"
    }
}

/// What a service's loop last said about itself, kept for the threads that report it (the
/// control socket's `statistics`, a metrics endpoint, the service manager's STATUS and
/// watchdog). The loop publishes at its status looks (about twice a second, never per request);
/// readers take the latest copy under a lock.
public final class ServiceTelemetry: Sendable {
    struct Latest {
        var samples: [TelemetrySample] = []
        var summary = ""
    }
    let latest = Mutex(Latest())
    /// CLOCK_MONOTONIC (ns) of the last status look that found the device answering (0: none yet).
    let lastAnswered = Atomic<UInt64>(0)
    /// CLOCK_MONOTONIC (ns) of the last status look.
    let lastLook = Atomic<UInt64>(0)
    /// Samples the command line adds to every report (driver info, the takeover's gap).
    let fixed = Mutex<[TelemetrySample]>([])

    public init() {}

    /// The loop's report: its samples, a one-line summary ("1 NBD client, 1691 reads, ..."), and
    /// whether the device answered since the last look.
    public func publish(_ samples: [TelemetrySample], summary: String, deviceAnswers: Bool) {
        let now = monotonicNanoseconds()
        latest.withLock { $0 = Latest(samples: samples, summary: summary) }
        lastLook.store(now, ordering: .releasing)
        if deviceAnswers { lastAnswered.store(now, ordering: .releasing) }
    }

    /// Adds samples reported with every later snapshot (replacing one of the same qualified name).
    public func setFixed(_ sample: TelemetrySample) {
        fixed.withLock { list in
            list.removeAll { $0.qualifiedName == sample.qualifiedName }
            list.append(sample)
        }
    }

    /// The fixed samples, then the loop's latest.
    public var samples: [TelemetrySample] {
        fixed.withLock { $0 } + latest.withLock { $0.samples }
    }

    public var summary: String { latest.withLock { $0.summary } }

    /// Whether the loop looked within `nanoseconds` and found the device answering then: what a
    /// watchdog is kept alive by. A loop that hangs, or a device that stopped answering, lets it lapse.
    public func answered(within nanoseconds: UInt64, now: UInt64 = monotonicNanoseconds()) -> Bool {
        let last = lastAnswered.load(ordering: .acquiring)
        return last != 0 && now &- last <= nanoseconds
    }

    /// The samples by qualified name, for the control socket's `statistics`.
    public var namedCounters: [(String, Int)] { samples.map { ($0.qualifiedName, $0.value) } }
}
