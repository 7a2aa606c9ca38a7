// `virtio-vfio-ring-bench`: the ring benchmark (RingBenchmark) as a command, the one
// tools/bench-ci runs under callgrind. It is not part of the shipped `virtio-vfio`, which links
// no emulator; build it with `swift build -c release --product virtio-vfio-ring-bench`.
import ArgumentParser
import Glibc
import RingBenchmark
import Virtio

extension RingBenchDevice: ExpressibleByArgument {}
extension RingFormat: ExpressibleByArgument {}
extension RingBenchImplementation: ExpressibleByArgument {}

@main
struct RingBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtio-vfio-ring-bench",
        abstract: "Run requests through a split virtqueue against the in-process emulated device.",
        discussion: """
            Builds a queue of --queue-size entries on an in-process emulated rng or blk device \
            (its device side runs on its own thread) and runs --requests requests in rounds of \
            --batch: add each, publish once, spin until the used ring moves, drain it. Every \
            completion is checked (each request exactly once, the length, the status and, unless \
            --no-verify, every data byte); a lost request or wrong data exits 1, a bad setting 64. \
            Prints requests/s and the driver's work per request. For instruction counts of the \
            driver hot path run it under valgrind --tool=callgrind \
            --toggle-collect=virtio_bench_submit --toggle-collect=virtio_bench_complete \
            (see docs/PERFORMANCE.md). With --impl c the same loop drives the C reference rings \
            (CRingReference); collect virtio_bench_c_submit and virtio_bench_c_complete instead.
            """)

    @Option(help: "Requests to run.") var requests = 1_000_000
    @Option(help: "Requests added and published together; the round waits for all of them.") var batch = 32
    @Option(help: "Queue size (a power of 2).") var queueSize: UInt16 = 256
    @Option(help: "Emulated device: rng or blk.") var device: RingBenchDevice = .rng
    @Option(help: "Virtqueue format: split or packed (the emulated device then offers RING_PACKED).") var ring: RingFormat = .split
    @Option(name: .customLong("impl"), help: "Ring code: swift (the driver's) or c (the C reference, same algorithms and checks).")
    var implementation: RingBenchImplementation = .swift
    @Option(help: "rng: bytes per buffer; blk: data bytes per IN request (a multiple of 512). Default 64 (rng), 512 (blk).")
    var bufferSize: Int?
    @Flag(inversion: .prefixedNo, help: "Negotiate VIRTIO_F_EVENT_IDX.") var eventIdx = true
    @Flag(inversion: .prefixedNo, help: "Negotiate VIRTIO_F_INDIRECT_DESC (blk requests then take one descriptor).")
    var indirect = true
    @Flag(inversion: .prefixedNo, help: "Compare every data byte with what the device must have written.")
    var verify = true
    @Flag(inversion: .prefixedNo, help: "Run the driver and the device thread on two different CPUs (the first two allowed).")
    var pin = true

    func validate() throws {
        guard requests >= 1 else { throw ValidationError("--requests must be at least 1") }
        guard batch >= 1 else { throw ValidationError("--batch must be at least 1") }
        guard queueSize > 0, queueSize & (queueSize &- 1) == 0 else {
            throw ValidationError("--queue-size must be a power of 2")
        }
    }

    func run() throws {
        var options = RingBenchOptions()
        options.device = device
        options.ring = ring
        options.queueSize = queueSize
        options.batch = batch
        options.bufferSize = bufferSize ?? (device == .blk ? 512 : 64)
        options.eventIndex = eventIdx
        options.indirect = indirect
        options.verifyData = verify
        options.pinThreads = pin
        options.implementation = implementation
        let clock = ContinuousClock()
        var bench: RingBench
        do { bench = try RingBench(options: options) } catch {
            fail(error)
            if case .setup = error { throw ExitCode(64) }
            throw ExitCode.failure
        }
        let features = bench.negotiated.names(for: device == .blk ? .block : .entropy).joined(separator: " ")
        let placement = bench.driverCPU.map { "driver on CPU \($0), device on CPU \(bench.deviceCPU ?? -1)" } ?? "threads not pinned"
        let start = clock.now
        do { try bench.run(requests) } catch {
            fail(error)
            throw ExitCode.failure
        }
        let elapsed = clock.now - start
        let stats = bench.deviceCounters
        let (rounds, doorbells, drains, spins) = (bench.rounds, bench.doorbells, bench.drains, bench.spins)
        let completed = bench.completed
        do { try bench.finish() } catch {
            fail(error)
            throw ExitCode.failure
        }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let n = Double(requests)
        func per(_ x: Int) -> String { fixed(Double(x) / n, 3) }
        print("ring bench: \(device), \(ring) ring (\(implementation)), queue \(queueSize), batch \(batch), \(options.bufferSize)-byte buffers, features [\(features)], \(placement)")
        print("\(completed) requests in \(fixed(seconds, 3)) s: \(Int((n / seconds).rounded())) requests/s, "
              + "\(fixed(seconds / n * 1e9, 0)) ns/request; all completed once, "
              + (verify ? "data verified" : "data not verified"))
        print("per request: \(per(rounds)) rounds, \(per(doorbells)) doorbells, \(per(drains)) drains, "
              + "\(per(spins)) used-index polls; device: \(per(stats.notifications)) notifications taken, "
              + "\(per(stats.completed)) completed, \(per(stats.interrupts)) interrupts")
    }

    /// One line on stderr, written at once (so it never lands behind buffered stdout).
    private func fail(_ error: RingBenchFailure) {
        var line = "virtio-vfio-ring-bench: error: \(error)\n"
        line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }
}

/// `x` with `digits` decimals, without Foundation.
private func fixed(_ x: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let v = (x * scale).rounded()
    guard v.isFinite, abs(v) < 9e18 else { return "\(x)" }
    let whole = Int(v) / Int(scale), frac = abs(Int(v) % Int(scale))
    guard digits > 0 else { return "\(whole)" }
    let f = String(frac)
    return "\(whole).\(String(repeating: "0", count: digits - f.count))\(f)"
}
