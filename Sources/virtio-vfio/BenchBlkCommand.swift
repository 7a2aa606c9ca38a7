import ArgumentParser
import Foundation
import Histogram
import PCI
import Virtio
import VirtioDevices
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `virtio-vfio bench blk BDF`: IOPS, bandwidth and latency percentiles of the driver's data path.
struct BenchBlk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Benchmark a virtio-blk device: random/sequential reads/writes over queue depths, block sizes and completion modes.",
        discussion: """
            Runs every combination of --pattern, --qd, --bs and --irq for --seconds each against the \
            first --span bytes of the device, keeping qd requests in flight, and reports IOPS, MB/s \
            and latency percentiles (HdrHistogram). Write patterns overwrite data: they need \
            --destroy-data. A progress line goes to stderr; --json prints the results as JSON.
            """)

    enum Pattern: String, ExpressibleByArgument, CaseIterable, Encodable {
        case randread, randwrite, read, write
        var isWrite: Bool { self == .randwrite || self == .write }
        var isRandom: Bool { self == .randread || self == .randwrite }
    }

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @OptionGroup var ring: RingOption
    @Option(parsing: .upToNextOption, help: "Patterns: randread, randwrite, read, write.") var pattern: [Pattern] = [.randread]
    @Option(parsing: .upToNextOption, help: "Queue depths (1-32768; the queues get entries for the deepest, as far as the device and 256 MiB of DMA memory allow; deeper values run at the queue's depth).")
    var qd: [Int] = [1, 32]
    @Option(parsing: .upToNextOption, help: "Block sizes in bytes, multiples of 512 (e.g. 4096 131072).") var bs: [Int] = [4096]
    @Option(parsing: .upToNextOption, help: "Completion modes.") var irq: [CompletionMode] = [.poll]
    @Option(help: "Request queues, one worker thread each (VIRTIO_BLK_F_MQ); qd is per queue.") var queues = 1
    @Option(help: "Seconds per combination.") var seconds: Double = 3
    @Option(help: "Bytes of the device to use, from its start.") var span: Int = 256 << 20
    @Flag(help: "Allow write patterns, which overwrite the span.") var destroyData = false
    @Flag(help: "Print results as JSON.") var json = false

    /// The most DMA memory the benchmark's queues take together.
    static let arenaLimit = 256 << 20

    struct Result: Encodable {
        var pattern: Pattern, qd: Int, bs: Int, irq: String, queues: Int, ring: String
        var iops: Double, mbPerSecond: Double, requests: Int, errors: Int
        var p50us: Double, p99us: Double, p999us: Double, maxus: Double
        var interrupts: Int, polled: Int
    }

    func validate() throws {
        // §2.7, §2.8: a queue of either format has at most 32768 entries.
        guard qd.allSatisfy({ (1...32768).contains($0) }) else { throw ValidationError("--qd values must be 1 to 32768 (the most entries a virtqueue has, virtio 1.2 §2.7)") }
        guard bs.allSatisfy({ $0 >= 512 && $0 % 512 == 0 && $0 <= 1 << 20 }) else {
            throw ValidationError("--bs values must be multiples of 512 up to 1 MiB")
        }
        guard (1...16).contains(queues) else { throw ValidationError("--queues must be 1 to 16") }
        guard seconds > 0, seconds <= 600 else { throw ValidationError("--seconds must be in (0, 600]") }
        guard span >= 1 << 20, span % 512 == 0 else { throw ValidationError("--span must be at least 1 MiB and whole sectors") }
        if pattern.contains(where: \.isWrite) && !destroyData {
            throw ValidationError("write patterns overwrite the first \(span) bytes of the device: add --destroy-data")
        }
    }

    func run() throws {
        let address = try device.address()
        var results: [Result] = []
        for mode in irq {
            // Each queue gets entries for the deepest --qd (at least the default size; the device's
            // maximum caps it when the queue is built), and the arena what the queues can take,
            // held to 256 MiB: a deep queue of large blocks gives up depth, not memory.
            let maxTransfer = max(bs.max() ?? 4096, 4096)
            let deepest = qd.max() ?? 1
            var queueSize = max(Int(BlockDevice<VirtioPCITransport>.defaultQueueSize),
                                1 << (Int.bitWidth - (deepest - 1).leadingZeroBitCount))
            queueSize = min(queueSize, SplitQueueLayout.maximumSize)
            while queueSize > Int(BlockDevice<VirtioPCITransport>.defaultQueueSize),
                  queues * BlockQueue.memoryBound(size: UInt16(queueSize), maxTransfer: maxTransfer) > Self.arenaLimit {
                queueSize /= 2
            }
            let perQueue = BlockQueue.memoryBound(size: UInt16(queueSize), maxTransfer: maxTransfer)
            let transport = try global.openTransport(address, dmaBytes: queues * perQueue, expecting: .block)
            var blk: BlockDevice<VirtioPCITransport>
            do { blk = try BlockDevice(transport: transport, ring: ring.ring, mode: mode, maxTransfer: maxTransfer, queueSize: UInt16(queueSize), queues: queues) } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
            if deepest > blk.queue.slots {
                FileHandle.standardError.write(Data(("\(address): the device's queues take \(blk.queue.slots) requests at once; "
                    + "deeper --qd values run at \(blk.queue.slots) (the QD column shows it)\n").utf8))
            }
            let usable = min(UInt64(span), blk.config.capacityBytes)
            do throws(VirtioError) {
                for p in pattern {
                    for size in bs {
                        for depth in qd {
                            results.append(try runAll(&blk, pattern: p, qd: min(depth, blk.queue.slots), bs: size,
                                                      mode: mode, span: usable))
                        }
                    }
                }
                _ = try blk.shutdown()
            } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
        }
        if json { try JSONOutput.print(results); return }
        printTable(header: ["PATTERN", "RING", "QUEUES", "QD", "BS", "IRQ", "IOPS", "MB/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "ERRORS"],
                   rows: results.map { r in
                       [r.pattern.rawValue, r.ring, "\(r.queues)", "\(r.qd)", "\(r.bs)", r.irq, format2(r.iops), format2(r.mbPerSecond),
                        format2(r.p50us), format2(r.p99us), format2(r.p999us), format2(r.maxus), "\(r.errors)"]
                   })
    }

    /// One combination on every queue at once: queue 0 on this thread, each worker queue on its own.
    func runAll(_ blk: inout BlockDevice<VirtioPCITransport>, pattern: Pattern, qd: Int, bs: Int, mode: CompletionMode,
                span: UInt64) throws(VirtioError) -> Result {
        final class Outcome: @unchecked Sendable { var run: Run?; var error: VirtioError? }
        var threads: [Thread] = []
        var outcomes: [Outcome] = []
        for (i, worker) in blk.workerQueues.enumerated() {
            let outcome = Outcome()
            outcomes.append(outcome)
            let thread = Thread {
                do throws(VirtioError) {
                    outcome.run = try self.runOne(&worker.queue, pattern: pattern, qd: qd, bs: bs, mode: mode, span: span,
                                                  seed: UInt64(i + 2), progress: false)
                } catch { outcome.error = error }
            }
            thread.start()
            threads.append(thread)
        }
        var total = try runOne(&blk.queue, pattern: pattern, qd: qd, bs: bs, mode: mode, span: span, seed: 1, progress: true)
        while outcomes.contains(where: { $0.run == nil && $0.error == nil }) { usleep(1000) }
        for outcome in outcomes {
            if let error = outcome.error { throw error }
            total.merge(outcome.run!)
        }
        _ = threads
        printProgress("")
        func us(_ p: Double) -> Double { Double(total.histogram.valueAtPercentile(p)) / 1000 }
        return Result(pattern: pattern, qd: qd, bs: bs, irq: mode.rawValue, queues: 1 + blk.workerQueues.count,
                      ring: RingFormat(blk.negotiation.accepted).rawValue,
                      iops: Double(total.requests) / total.seconds, mbPerSecond: Double(total.requests * bs) / total.seconds / 1e6,
                      requests: total.requests, errors: total.errors, p50us: us(50), p99us: us(99), p999us: us(99.9),
                      maxus: Double(total.histogram.max) / 1000, interrupts: total.interrupts, polled: total.polled)
    }

    /// What one queue did in one combination.
    struct Run {
        var histogram: Histogram<UInt64>
        var requests: Int, errors: Int, seconds: Double, interrupts: Int, polled: Int
        mutating func merge(_ other: Run) {
            histogram.add(other.histogram)
            requests += other.requests; errors += other.errors; seconds = max(seconds, other.seconds)
            interrupts += other.interrupts; polled += other.polled
        }
    }

    func runOne(_ queue: inout BlockQueue, pattern: Pattern, qd: Int, bs: Int, mode: CompletionMode, span: UInt64,
                seed: UInt64, progress: Bool) throws(VirtioError) -> Run {
        let clock = ContinuousClock()
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        let started = UnsafeMutablePointer<ContinuousClock.Instant>.allocate(capacity: queue.slots)
        let doneSlots = UnsafeMutablePointer<Int>.allocate(capacity: queue.slots)
        defer { started.deallocate(); doneSlots.deallocate() }
        let blocks = span / UInt64(bs)
        var random: UInt64 = 0x9E37_79B9_7F4A_7C15 &* seed
        var next: UInt64 = 0
        var requests = 0, errors = 0
        let wakesBefore = queue.wakes
        let start = clock.now
        let end = start + .milliseconds(Int(seconds * 1000))
        var lastProgress = start
        let type: BlockRequestType = pattern.isWrite ? .write : .read
        while true {
            let now = clock.now
            let stopping = now >= end
            if !stopping {
                while queue.inFlight < qd, let slot = queue.acquire() {
                    let block: UInt64
                    if pattern.isRandom {
                        random ^= random << 13; random ^= random >> 7; random ^= random << 17
                        block = random % blocks
                    } else {
                        block = next; next = (next + 1) % blocks
                    }
                    started[slot] = clock.now
                    guard try queue.submit(type, sector: block * UInt64(bs / 512), bytes: bs, slot: slot) else {
                        queue.release(slot); break
                    }
                }
                queue.publish()
            }
            if queue.inFlight == 0 { break }
            try queue.wait()
            var count = 0
            _ = try queue.complete { slot, status, _ in
                doneSlots[count] = slot; count += 1
                if status != BlockStatus.ok { errors += 1 }
            }
            let finished = clock.now
            for i in 0..<count {
                let elapsed = finished - started[doneSlots[i]]
                _ = histogram.record(UInt64(elapsed.nanoseconds))
                queue.release(doneSlots[i])
            }
            requests += count
            if progress && finished - lastProgress > .seconds(1) {
                lastProgress = finished
                let secs = seconds(finished - start)
                printProgress("\(pattern.rawValue) qd \(qd) bs \(bs) \(mode): \(format2(Double(requests) / secs)) IOPS")
            }
        }
        let elapsed = seconds(clock.now - start)
        let wakes = queue.wakes
        return Run(histogram: histogram, requests: requests, errors: errors, seconds: elapsed,
                   interrupts: wakes.interrupts - wakesBefore.interrupts, polled: wakes.polled - wakesBefore.polled)
    }

    func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    /// One line on stderr, rewritten in place (a terminal shows it as a live status).
    func printProgress(_ text: String) {
        var line = "\r\u{1B}[K" + text
        if text.isEmpty { line = "\r\u{1B}[K" }
        line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    }
}
