import RingBenchmark
import Testing
import Virtio
import VirtioEmulator

/// The C reference rings (CRingReference) through the same RingBench loop as the Swift driver:
/// every request completes once with its data, and a hostile device is reported, by the same
/// words as the Swift queue, not survived silently or crashed on.
@Suite("C reference rings")
struct CReferenceTests {
    static func options(_ device: RingBenchDevice, _ ring: RingFormat, batch: Int,
                        implementation: RingBenchImplementation = .c) -> RingBenchOptions {
        var options = RingBenchTests.options(device, batch: batch)
        options.ring = ring
        options.implementation = implementation
        return options
    }

    @Test(arguments: [RingBenchDevice.rng, .blk], [RingFormat.split, .packed])
    func everyRequestCompletesOnceWithItsData(device: RingBenchDevice, ring: RingFormat) throws {
        for batch in [1, 32] {
            var bench = try RingBench(options: Self.options(device, ring, batch: batch))
            try bench.run(2000)
            try bench.run(1000)
            #expect(bench.submitted == 3000 && bench.completed == 3000)
            #expect(bench.rounds == (2000 + batch - 1) / batch + (1000 + batch - 1) / batch)
            #expect(bench.doorbells >= 1 && bench.doorbells <= bench.rounds)
            #expect(bench.drains >= bench.rounds)
            let counters = bench.deviceCounters
            #expect(counters.completed == 3000)
            #expect(counters.notifications >= 1 && counters.notifications <= bench.doorbells)
            #expect(counters.interrupts == 0)
            try bench.finish()
        }
    }

    /// The same hostile device against both implementations: each must stop with a broken queue,
    /// and the C reference must name the same violation as the Swift queue.
    static func brokenQueueMessage(_ options: RingBenchOptions, fault: (inout EmulatedDevice.Faults) -> Void) -> String? {
        guard var bench = try? RingBench(options: options) else { return "setup failed" }
        bench.updateFaults(fault)
        do {
            try bench.run(200)
            return nil
        } catch {
            guard case .queue(.brokenQueue(_, let why)) = error else { return "not a broken queue: \(error)" }
            return why
        }
    }

    static let hostile: [(String, @Sendable (inout EmulatedDevice.Faults) -> Void)] = [
        ("usedIDNotInFlight", { $0.usedIDNotInFlight = true }),
        ("usedLengthPastBuffer", { $0.usedLengthPastBuffer = true }),
        ("duplicateCompletion", { $0.duplicateCompletion = true }),
        ("usedIndexJump", { $0.usedIndexJump = true }),
    ]

    @Test(arguments: [RingBenchDevice.rng, .blk], [RingFormat.split, .packed])
    func hostileCompletionsAreReportedLikeSwift(device: RingBenchDevice, ring: RingFormat) {
        for (name, fault) in Self.hostile {
            let c = Self.brokenQueueMessage(Self.options(device, ring, batch: 1), fault: fault)
            let swift = Self.brokenQueueMessage(Self.options(device, ring, batch: 1, implementation: .swift), fault: fault)
            #expect(c != nil, "C reference: \(name) on \(device) \(ring) went unnoticed")
            #expect(c == swift, "\(name) on \(device) \(ring): C says \(c ?? "nothing"), Swift \(swift ?? "nothing")")
        }
    }
}
