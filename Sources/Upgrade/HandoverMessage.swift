/// The messages of a handover on the control socket, in the order they travel:
///
///     successor                         serving driver
///     hello(mode, version) ───────────▶ (keeps serving)
///                          ◀─────────── deviceFollows, then the device part of the state and its
///                                       descriptors: VFIO container, group, device, DMA memfd,
///                                       MSI-X eventfds (DescriptorPassing); or refused(reason)
///     maps the device (read-only work:
///     regions, BARs, DMA memory)
///     prepared ───────────────────────▶ quiesces the service (no new work, in flight finished)
///                          ◀─────────── stateFollows, then the service part: queue indices,
///                                       features, the service's state and its sockets
///     validates it, brings the device up (reset mode: reset + renegotiate + rebuild; live mode:
///     adopt the rings), completes a first request
///     ready(summary) ─────────────────▶ go: it ends at once, touching nothing (exit)
///     or declined(reason, touched) ───▶ it resumes: resets and rebuilds first if `touched`
///                          ◀─────────── resumed(summary): it serves again and accepts the next
///                                       hello (so a failed upgrade returns only once rolled back)
///                          ◀─────────── abort (the deadline passed first): the successor exits
///
/// `virtio-vfio upgrade` does not start the successor itself: it asks the serving driver with
/// `upgrade(binary, mode, arguments)`, which starts it (so the successor logs where the driver
/// logs and, under a service manager, belongs to the service), answers `started(pid)` or
/// `refused(reason)`, and once that successor's handover ended, `upgradeOutcome`.
///
/// The serving driver keeps every descriptor and the device until it sends `go`; a successor that
/// dies, declines or misses the deadline leaves it serving (rollback). `describe` is answered at
/// any time with what `virtio-vfio upgrade` needs to start a successor, `statistics` with the
/// service's counters by name (`virtio-vfio info` on a served device).
public enum HandoverMessage: Equatable, Sendable {
    public enum Mode: UInt8, Sendable, CaseIterable, CustomStringConvertible {
        /// The seed's way: reset, renegotiate (features may differ), rebuild the queues.
        case reset = 1
        /// Same features: adopt the rings and indices as they are, no reset.
        case live = 2
        /// Live when the features match, reset otherwise.
        case auto = 3
        public var description: String { self == .reset ? "reset" : self == .live ? "live" : "auto" }
    }

    case hello(mode: Mode, driverVersion: String, pid: Int32)
    case refused(String)
    /// The device part of the state and its descriptors follow (DescriptorPassing).
    case deviceFollows
    /// The successor mapped the device: the serving driver may quiesce now.
    case prepared
    /// The service part of the state and its descriptors follow (DescriptorPassing).
    case stateFollows
    case ready(String)
    case declined(String, touchedDevice: Bool)
    /// After `declined`: the serving driver took the service back (and the device, by reset, if
    /// it was touched) and accepts the next handover.
    case resumed(String)
    case go
    case abort(String)
    case describe
    case described(pid: Int32, driverVersion: String, features: UInt64, arguments: [String])
    case statistics
    case counters([Counter])
    /// Start `binary` as this driver's successor: this driver's own arguments, then
    /// `--take-over --mode mode`, then `arguments`.
    case upgrade(binary: String, mode: Mode, arguments: [String])
    /// The successor `upgrade` asked for runs as `pid`.
    case started(pid: Int32)
    /// How that successor's upgrade ended: upgraded, or not (rolled back, or it never took over).
    case upgradeOutcome(upgraded: Bool, summary: String)

    /// One counter of a serving driver, by a stable name (`rx_packets`, ...).
    public struct Counter: Equatable, Sendable {
        public var name: String
        public var value: UInt64
        public init(name: String, value: UInt64) { self.name = name; self.value = value }
    }

    /// At most this many counters in one `counters` message, each name at most `maxCounterName` bytes.
    public static let maxCounters = 256, maxCounterName = 64

    /// The decoder's limits, which the encoder keeps too (so every message it writes decodes to
    /// itself): texts of at most 4096 UTF-8 bytes, at most 256 arguments.
    public static let maxText = 4096, maxArguments = 256

    /// Why `arguments` cannot travel in `.described` (too many, or one too long), or nil.
    public static func problem(describing arguments: [String]) -> String? {
        if arguments.count > maxArguments { return "\(arguments.count) arguments (at most \(maxArguments))" }
        if let long = arguments.first(where: { $0.utf8.count > maxText }) {
            return "an argument of \(long.utf8.count) bytes (at most \(maxText))"
        }
        return nil
    }

    /// A reason or summary cut to `maxText` UTF-8 bytes at a character boundary.
    static func clipped(_ text: String) -> String {
        guard text.utf8.count > maxText else { return text }
        var result = ""
        var bytes = 0
        for character in text {
            let n = character.utf8.count
            if bytes + n > maxText - 3 { break }
            result.append(character)
            bytes += n
        }
        return result + "..."
    }

    enum Kind: UInt8 {
        case hello = 1, refused, stateFollows, ready, declined, go, abort, describe, described, deviceFollows, prepared
        case statistics, counters, resumed, upgrade, started, upgradeOutcome
    }

    /// The message's bytes. Reasons and summaries longer than `maxText` are clipped; a driver
    /// version or arguments past the limits are a programming error (`problem(describing:)`).
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        switch self {
        case .hello(let mode, let version, let pid):
            precondition(version.utf8.count <= Self.maxText, "driver version longer than \(Self.maxText) bytes")
            w.u8(Kind.hello.rawValue); w.u8(mode.rawValue); w.string(version); w.u32(UInt32(bitPattern: pid))
        case .refused(let why): w.u8(Kind.refused.rawValue); w.string(Self.clipped(why))
        case .stateFollows: w.u8(Kind.stateFollows.rawValue)
        case .deviceFollows: w.u8(Kind.deviceFollows.rawValue)
        case .prepared: w.u8(Kind.prepared.rawValue)
        case .ready(let summary): w.u8(Kind.ready.rawValue); w.string(Self.clipped(summary))
        case .declined(let why, let touched): w.u8(Kind.declined.rawValue); w.string(Self.clipped(why)); w.u8(touched ? 1 : 0)
        case .resumed(let summary): w.u8(Kind.resumed.rawValue); w.string(Self.clipped(summary))
        case .go: w.u8(Kind.go.rawValue)
        case .abort(let why): w.u8(Kind.abort.rawValue); w.string(Self.clipped(why))
        case .describe: w.u8(Kind.describe.rawValue)
        case .described(let pid, let version, let features, let arguments):
            precondition(Self.problem(describing: arguments) == nil && version.utf8.count <= Self.maxText,
                         "describe: \(Self.problem(describing: arguments) ?? "driver version too long")")
            w.u8(Kind.described.rawValue); w.u32(UInt32(bitPattern: pid)); w.string(version); w.u64(features)
            w.u16(UInt16(arguments.count))
            for a in arguments { w.string(a) }
        case .statistics: w.u8(Kind.statistics.rawValue)
        case .upgrade(let binary, let mode, let arguments):
            precondition(Self.problem(describing: [binary] + arguments) == nil,
                         "upgrade: \(Self.problem(describing: [binary] + arguments) ?? "")")
            w.u8(Kind.upgrade.rawValue); w.string(binary); w.u8(mode.rawValue)
            w.u16(UInt16(arguments.count))
            for a in arguments { w.string(a) }
        case .started(let pid): w.u8(Kind.started.rawValue); w.u32(UInt32(bitPattern: pid))
        case .upgradeOutcome(let upgraded, let summary):
            w.u8(Kind.upgradeOutcome.rawValue); w.u8(upgraded ? 1 : 0); w.string(Self.clipped(summary))
        case .counters(let counters):
            precondition(counters.count <= Self.maxCounters && counters.allSatisfy { $0.name.utf8.count <= Self.maxCounterName },
                         "counters: more than \(Self.maxCounters) or a name longer than \(Self.maxCounterName) bytes")
            w.u8(Kind.counters.rawValue)
            w.u16(UInt16(counters.count))
            for c in counters { w.string(c.name); w.u64(c.value) }
        }
        return w.bytes
    }

    /// Decodes one message; anything malformed, truncated or followed by extra bytes is refused.
    public init(decoding bytes: [UInt8]) throws(StateRecordError) {
        var r = ByteReader(bytes)
        let raw = try r.u8("message kind")
        guard let kind = Kind(rawValue: raw) else { throw .invalid(field: "message kind", "unknown kind \(raw)") }
        let text = { (r: inout ByteReader, field: String) throws(StateRecordError) -> String in
            try r.string(field, max: HandoverMessage.maxText)
        }
        switch kind {
        case .hello:
            let m = try r.u8("mode")
            guard let mode = Mode(rawValue: m) else { throw .invalid(field: "mode", "unknown mode \(m)") }
            self = .hello(mode: mode, driverVersion: try text(&r, "driver version"), pid: Int32(bitPattern: try r.u32("pid")))
        case .refused: self = .refused(try text(&r, "reason"))
        case .stateFollows: self = .stateFollows
        case .deviceFollows: self = .deviceFollows
        case .prepared: self = .prepared
        case .ready: self = .ready(try text(&r, "summary"))
        case .declined:
            let why = try text(&r, "reason")
            let touched = try r.u8("touched")
            guard touched <= 1 else { throw .invalid(field: "touched", "\(touched) is not 0 or 1") }
            self = .declined(why, touchedDevice: touched == 1)
        case .resumed: self = .resumed(try text(&r, "summary"))
        case .go: self = .go
        case .abort: self = .abort(try text(&r, "reason"))
        case .describe: self = .describe
        case .described:
            let pid = Int32(bitPattern: try r.u32("pid"))
            let version = try text(&r, "driver version")
            let features = try r.u64("features")
            let count = Int(try r.u16("argument count"))
            guard count <= HandoverMessage.maxArguments else { throw .invalid(field: "argument count", "\(count)") }
            var arguments: [String] = []
            for i in 0..<count { arguments.append(try text(&r, "argument \(i)")) }
            self = .described(pid: pid, driverVersion: version, features: features, arguments: arguments)
        case .statistics: self = .statistics
        case .upgrade:
            let binary = try text(&r, "binary")
            let m = try r.u8("mode")
            guard let mode = Mode(rawValue: m) else { throw .invalid(field: "mode", "unknown mode \(m)") }
            let count = Int(try r.u16("argument count"))
            guard count <= HandoverMessage.maxArguments else { throw .invalid(field: "argument count", "\(count)") }
            var arguments: [String] = []
            for i in 0..<count { arguments.append(try text(&r, "argument \(i)")) }
            self = .upgrade(binary: binary, mode: mode, arguments: arguments)
        case .started: self = .started(pid: Int32(bitPattern: try r.u32("pid")))
        case .upgradeOutcome:
            let upgraded = try r.u8("upgraded")
            guard upgraded <= 1 else { throw .invalid(field: "upgraded", "\(upgraded) is not 0 or 1") }
            self = .upgradeOutcome(upgraded: upgraded == 1, summary: try text(&r, "summary"))
        case .counters:
            let count = Int(try r.u16("counter count"))
            guard count <= HandoverMessage.maxCounters else { throw .invalid(field: "counter count", "\(count)") }
            var counters: [Counter] = []
            for i in 0..<count {
                counters.append(Counter(name: try r.string("counter \(i) name", max: HandoverMessage.maxCounterName),
                                        value: try r.u64("counter \(i) value")))
            }
            self = .counters(counters)
        }
        guard r.remaining == 0 else { throw .invalid(field: "message", "\(r.remaining) unexpected bytes at the end") }
    }
}

extension ControlConnection {
    public func send(_ message: HandoverMessage, timeoutMilliseconds: Int32 = 5000) throws(ControlSocketError) {
        try send(message.encoded(), timeoutMilliseconds: timeoutMilliseconds)
    }

    /// The next message; nil when the peer closed the connection between messages.
    public func receiveMessage(timeoutMilliseconds: Int32 = 5000) throws(ControlSocketError) -> HandoverMessage? {
        guard let bytes = try receive(timeoutMilliseconds: timeoutMilliseconds) else { return nil }
        do { return try HandoverMessage(decoding: bytes) } catch { throw .protocolError("\(error)") }
    }
}
