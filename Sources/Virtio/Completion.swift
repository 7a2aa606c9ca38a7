import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// How the driver learns that the device used buffers (spec 2.7.7, 4.1.5.4).
public enum CompletionMode: String, Sendable, CaseIterable {
    /// Spin on the used index; interrupts suppressed. Lowest latency, one core busy.
    case poll
    /// Sleep on the queue's MSI-X eventfd until the device interrupts.
    case msix
    /// Poll for a bounded time, then arm the interrupt and sleep.
    case hybrid
}

/// How a wait ended.
public enum Wake: Sendable {
    /// Used buffers were already there.
    case ready
    /// Found by polling.
    case polled
    /// An interrupt (the queue's eventfd) fired.
    case interrupt
    /// Found when re-checking after arming the interrupt, or after a poll timeout.
    case recheck
}

/// Counts of how waits ended, for reports and tests.
public struct WakeCounts: Sendable, Equatable {
    public var ready = 0, polled = 0, interrupts = 0, rechecks = 0
    public init() {}
    public mutating func count(_ wake: Wake) {
        switch wake {
        case .ready: ready += 1
        case .polled: polled += 1
        case .interrupt: interrupts += 1
        case .recheck: rechecks += 1
        }
    }
}

/// Waits for completions on one queue in the chosen mode. The eventfd is borrowed from the
/// transport (which owns it) and only read here.
public struct CompletionWaiter: Sendable {
    public let mode: CompletionMode
    public let eventfd: Int32?
    /// How long `hybrid` polls before sleeping.
    public let pollBudget: Duration
    /// A device that shows nothing for this long is considered stopped.
    public let timeout: Duration

    public init(mode: CompletionMode, eventfd: Int32?, pollBudget: Duration = .microseconds(50),
                timeout: Duration = .seconds(10)) {
        precondition(mode == .poll || eventfd != nil, "interrupt modes need an eventfd")
        self.mode = mode
        self.eventfd = eventfd
        self.pollBudget = pollBudget
        self.timeout = timeout
    }

    /// Returns once `queue` has used buffers; throws if the device stays silent past `timeout`.
    @discardableResult
    public func wait(for queue: inout Virtqueue) throws(VirtioError) -> Wake {
        if queue.hasUsed() { return .ready }
        let clock = ContinuousClock()
        let start = clock.now
        switch mode {
        case .poll:
            try spin(queue: &queue, until: start + timeout, clock: clock)
            return .polled
        case .hybrid:
            if (try? spin(queue: &queue, until: start + pollBudget, clock: clock)) != nil { return .polled }
            return try sleep(queue: &queue, start: start, clock: clock)
        case .msix:
            return try sleep(queue: &queue, start: start, clock: clock)
        }
    }

    func spin(queue: inout Virtqueue, until deadline: ContinuousClock.Instant, clock: ContinuousClock) throws(VirtioError) {
        var checks = 0
        while !queue.hasUsed() {
            checks += 1
            // Read the clock only every 256 checks: it costs more than the used-index load.
            if checks & 255 == 0 && clock.now > deadline {
                throw .brokenQueue(queue: queue.index, "no completion within \(timeout) (polling): the device stopped answering")
            }
        }
    }

    func sleep(queue: inout Virtqueue, start: ContinuousClock.Instant, clock: ContinuousClock) throws(VirtioError) -> Wake {
        guard let eventfd else { preconditionFailure("interrupt mode without an eventfd") }
        while true {
            // Arm, then re-check: a completion that raced the arming is seen here (spec 2.7.7.1).
            if !queue.armInterrupts() { queue.suppressInterrupts(); return .recheck }
            let left = timeout - (clock.now - start)
            if left <= .zero {
                queue.suppressInterrupts()
                throw .brokenQueue(queue: queue.index, "no interrupt and no completion within \(timeout): the device stopped answering")
            }
            let (seconds, attoseconds) = left.components
            let milliseconds = Int32(clamping: seconds * 1000 + attoseconds / 1_000_000_000_000_000 + 1)
            var fired = false
            switch Syscall.pollIn(eventfd, timeoutMilliseconds: milliseconds) {
            case .failure(let e): throw .interrupts("poll on the queue's eventfd: \(e)")
            case .success(true): _ = Syscall.read64(eventfd); fired = true  // the used ring is the truth
            case .success(false): break
            }
            queue.suppressInterrupts()
            if queue.hasUsed() { return fired ? .interrupt : .recheck }
        }
    }
}
