import RingBenchmark
import Testing

/// The ring benchmark's loop, briefly: every request completes once with the data the emulated
/// device must have written, and the counters add up. tools/bench-ci runs it for real.
@Suite("ring benchmark")
struct RingBenchTests {
    static func options(_ device: RingBenchDevice, batch: Int) -> RingBenchOptions {
        var options = RingBenchOptions()
        options.device = device
        options.queueSize = 64
        options.batch = batch
        options.bufferSize = device == .blk ? 1024 : 100
        // Left to the scheduler: the test runner's other threads share the CPUs.
        options.pinThreads = false
        return options
    }

    @Test(arguments: [RingBenchDevice.rng, .blk], [1, 32])
    func everyRequestCompletesOnceWithItsData(device: RingBenchDevice, batch: Int) throws {
        var bench = try RingBench(options: Self.options(device, batch: batch))
        try bench.run(1000)
        try bench.run(500)
        #expect(bench.submitted == 1500 && bench.completed == 1500)
        #expect(bench.rounds == (1000 + batch - 1) / batch + (500 + batch - 1) / batch)
        #expect(bench.doorbells >= 1 && bench.doorbells <= bench.rounds)
        #expect(bench.drains >= bench.rounds)
        let device = bench.deviceCounters
        #expect(device.completed == 1500)
        #expect(device.notifications >= 1 && device.notifications <= bench.doorbells)
        #expect(device.interrupts == 0)
        try bench.finish()
    }

    @Test func refusesWhatItCannotRun() {
        var options = Self.options(.rng, batch: 1)
        options.queueSize = 48
        #expect(throws: RingBenchFailure.self) { _ = try RingBench(options: options) }
        options = Self.options(.blk, batch: 1)
        options.bufferSize = 1000
        #expect(throws: RingBenchFailure.self) { _ = try RingBench(options: options) }
        options = Self.options(.rng, batch: 0)
        #expect(throws: RingBenchFailure.self) { _ = try RingBench(options: options) }
    }
}
