// Submit + complete through a split virtqueue against the emulated device (docs/PERFORMANCE.md).
//
// One sample is `requestsPerSample` requests run by `RingBench` (the main package's RingBenchmark
// library, the same code as `virtio-vfio-ring-bench`): rounds of `batch` requests added and published together, a
// spin until the device thread uses them, one drain, and a check of every completion (slot,
// sequence, used length; blk: status byte). Data bytes are not compared here (the command
// does that), so the figures are the ring's, not memcmp's.
//
// Metrics, all per sample of `requestsPerSample` requests:
// - Malloc (total): every malloc in the process while the sample runs (ordo-one/benchmark's
//   malloc-interposer): the driver's thread and the emulated device's thread together.
// - mallocs / retains / releases (driver thread): those of the benchmark's thread, which runs
//   the whole driver side (ThreadCounters; its header says how, and why not the package's
//   own ARC metrics). retains (all threads) adds the device thread, for information.
// - requests/s: requestsPerSample / the sample's wall-clock time.
// Thresholds/ holds the p90 values `thresholds check` compares with (tools/bench-ci runs it):
// 0 for the driver thread's mallocs, retains and releases everywhere, and for Malloc (total)
// where the emulator allocates nothing per request (see docs/PERFORMANCE.md for blk).
import Benchmark
import RingBenchmark
import ThreadCounters

let requestsPerSample = 4096

let driverMallocs = BenchmarkMetric.custom("mallocs (driver thread)")
let driverRetains = BenchmarkMetric.custom("retains (driver thread)")
let driverReleases = BenchmarkMetric.custom("releases (driver thread)")
let allRetains = BenchmarkMetric.custom("retains (all threads)")
let requestRate = BenchmarkMetric.custom("requests/s", polarity: .prefersLarger, useScalingFactor: false)

/// Owns the (noncopyable) driver state for the closures; built in `setup`, outside the samples.
final class RingHarness {
    var bench: RingBench

    init(_ options: RingBenchOptions) {
        do { bench = try RingBench(options: options) } catch {
            fatalError("ring benchmark setup failed: \(error)")
        }
    }

    /// One sample. A lost request or a wrong completion stops the benchmark (and the CI check).
    func sample(_ benchmark: Benchmark) {
        let clock = ContinuousClock()
        // Only the requests are between the counter reads (the framework's own calls retain).
        let start = clock.now
        let retains = thread_counters_retains()
        let releases = thread_counters_releases()
        let processRetains = thread_counters_process_retains()
        let mallocs = thread_counters_mallocs()
        do { try bench.run(requestsPerSample) } catch {
            fatalError("ring benchmark: \(error)")
        }
        let retained = thread_counters_retains() - retains
        let released = thread_counters_releases() - releases
        let retainedByAll = thread_counters_process_retains() - processRetains
        let allocated = thread_counters_mallocs() - mallocs
        let elapsed = clock.now - start
        let nanoseconds = Double(elapsed.components.seconds) * 1e9 + Double(elapsed.components.attoseconds) / 1e9
        benchmark.measurement(driverMallocs, Int(allocated))
        benchmark.measurement(driverRetains, Int(retained))
        benchmark.measurement(driverReleases, Int(released))
        benchmark.measurement(allRetains, Int(retainedByAll))
        benchmark.measurement(requestRate, Int((Double(requestsPerSample) / nanoseconds * 1e9).rounded()))
    }
}

let benchmarks: @Sendable () -> Void = {
    guard thread_counters_retains_active() == 1 else {
        fatalError("ThreadCounters could not find the Swift runtime's retain/release entry points")
    }
    guard thread_counters_install_malloc_hook() == 1 else {
        fatalError("malloc-interposer is not loaded (run through `swift package benchmark`)")
    }
    // Thresholds: no growth at all (absolute 0) for the allocation and retain counts; the time
    // metrics are reported, not checked (they depend on the machine and its load).
    let zero = BenchmarkThresholds(absolute: BenchmarkThresholds.Absolute.strict)
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .mallocCountTotal, driverMallocs, driverRetains, driverReleases, allRetains, requestRate],
        timeUnits: .microseconds,
        warmupIterations: 3,
        scalingFactor: .one,
        maxDuration: .seconds(2),
        maxIterations: 400,
        thresholds: [.mallocCountTotal: zero, driverMallocs: zero, driverRetains: zero, driverReleases: zero]
    )

    for device in RingBenchDevice.allCases {
        for batch in [1, 32] {
            var options = RingBenchOptions()
            options.device = device
            options.queueSize = 256
            options.batch = batch
            options.bufferSize = device == .blk ? 512 : 64
            options.verifyData = false
            options.trackEach = false
            Benchmark("\(device)-q256-b\(batch)") { benchmark, harness in
                harness.sample(benchmark)
            } setup: {
                RingHarness(options)
            }
        }
    }
}
