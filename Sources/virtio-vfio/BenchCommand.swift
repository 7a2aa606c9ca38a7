// The ring benchmark: requests through a `SplitQueue` against the in-process emulator.
//
// The first part (`RingBench`) is the driver-side loop that is measured. It is compiled twice:
// here, for `virtio-vfio bench ring` (the callgrind-able command), and, through a symbolic link
// with RING_BENCH_CORE_ONLY defined, in Benchmarks/ (the ordo-one/benchmark suite with its
// malloc and retain thresholds), so both measure the same code. The second part is the command.
import Virtio
import VirtioEmulator
#if canImport(Glibc)
import Glibc
#endif
#if !RING_BENCH_CORE_ONLY
import ArgumentParser
#endif

/// The emulated device the ring benchmark drives.
enum RingBenchDevice: String, CaseIterable, Sendable {
    /// virtio-rng (spec 5.4): one device-writable buffer per request, filled by the device.
    case rng
    /// virtio-blk (spec 5.2): IN requests (header, data, status byte), read from a pre-filled disk.
    case blk
}

struct RingBenchOptions: Sendable {
    var device: RingBenchDevice = .rng
    var queueSize: UInt16 = 256
    /// Requests submitted (and published with one `publish()`) per round; the round waits for all.
    var batch = 32
    /// rng: bytes per buffer. blk: data bytes per request (a multiple of 512).
    var bufferSize = 64
    var eventIndex = true
    var indirect = true
    /// Compare every completed buffer with what the device must have written.
    var verifyData = true
    /// Keep one bit per request and check each completed exactly once (`run` sets it up).
    var trackEach = true
    /// Run the device thread and the driver on two different CPUs (the first two this process
    /// may use), as a device and its driver are. Left to the scheduler, the two threads may
    /// share a CPU, and a round trip then includes a context switch.
    var pinThreads = true
}

enum RingBenchFailure: Error, CustomStringConvertible {
    case setup(String)
    case queue(VirtioError)
    case lost(String)
    case wrong(String)

    var description: String {
        switch self {
        case .setup(let why): return "setup: \(why)"
        case .queue(let e): return "queue: \(e)"
        case .lost(let why): return "request lost: \(why)"
        case .wrong(let why): return "wrong completion: \(why)"
        }
    }
}

/// The driver side of the benchmark: one split queue on an `EmulatedDevice` whose worker thread
/// serves it. Each round pops buffer slots, adds one request per slot and publishes
/// (`ringBenchSubmit`), spins until the used ring moves, drains it (`ringBenchComplete`), then checks
/// every completion and returns its slot (`check`). Only the two `ringBench*` functions are the
/// driver hot path that callgrind measures; waiting and checking are outside it.
///
/// Tokens are `sequence << 16 | slot`: the sequence number of the request (its order of
/// submission) and the buffer slot it used.
struct RingBench: ~Copyable {
    let options: RingBenchOptions
    let device: EmulatedDevice
    let transport: EmulatedTransport
    let negotiated: Features
    var queue: SplitQueue
    /// Buffer slots: rng `[buffer]`; blk `[data | header 16 | status 1]`, `stride` bytes apart.
    let slots: DMASlice
    let stride: Int
    var idle: SlotStack
    /// The segments of the request being added (3 at most), allocated once.
    let segments: UnsafeMutablePointer<BufferSegment>
    /// Completions drained and not yet checked: token and used length.
    let tokens: UnsafeMutablePointer<UInt64>
    let lengths: UnsafeMutablePointer<UInt32>
    var pending = 0
    /// One bit per request when `trackEach` (set by `run`), else nil.
    var seen: UnsafeMutablePointer<UInt64>?
    var seenCapacity = 0
    /// The CPUs of the driver (`run` pins its caller there) and of the device thread, when
    /// `pinThreads` found two.
    let driverCPU: Int?
    let deviceCPU: Int?

    var submitted: UInt64 = 0
    var completed: UInt64 = 0
    var rounds = 0
    var doorbells = 0
    var drains = 0
    var spins = 0

    /// The emulated rng's seed. Its generator is SplitMix64, whose state advances by a constant
    /// per output; a request of `bufferSize` bytes takes (bufferSize + 7) / 8 outputs, so the
    /// bytes of request `n` are a function of the seed and `n` alone (see `rngMatches`).
    static let seed: UInt64 = 0x5EED_0000_0000_1234
    static let blkCapacitySectors: UInt64 = 2048
    static let blkHeader = 16

    init(options: RingBenchOptions) throws(RingBenchFailure) {
        let n = Int(options.queueSize)
        guard n > 0, n & (n - 1) == 0, n <= 32768 else {
            throw .setup("queue size \(n) is not a power of two up to 32768")
        }
        guard options.batch >= 1 else { throw .setup("batch must be at least 1") }
        let stride: Int
        var model: EmulatedDevice.Model
        switch options.device {
        case .rng:
            guard options.bufferSize >= 1 else { throw .setup("buffer size must be at least 1") }
            stride = (options.bufferSize + 63) / 64 * 64
            model = .rng(seed: RingBench.seed, queueSize: options.queueSize)
        case .blk:
            guard options.bufferSize >= 512, options.bufferSize % 512 == 0,
                  UInt64(options.bufferSize / 512) <= RingBench.blkCapacitySectors else {
                throw .setup("blk data size must be a multiple of 512 up to \(RingBench.blkCapacitySectors * 512)")
            }
            stride = (options.bufferSize + RingBench.blkHeader + 1 + 63) / 64 * 64
            model = .blk(capacitySectors: RingBench.blkCapacitySectors, queueSize: options.queueSize)
        }
        let indirectEntries = options.indirect && options.device == .blk ? 4 : 0
        model.memorySize = n * stride + n * (16 + 8 + 2 + 4 * 16) + (1 << 20)
        let device = EmulatedDevice(model: model)
        let transport = EmulatedTransport(device: device)
        var wanted: Features = []
        if options.eventIndex { wanted.insert(.ringEventIdx) }
        if options.indirect { wanted.insert(.ringIndirectDesc) }

        let queue: SplitQueue
        let slots: DMASlice
        let negotiation: Lifecycle.Negotiation
        // The device thread starts in enableQueue and inherits this thread's CPU mask: give it
        // the device's CPU for that moment, then restore ours (run() pins the driver).
        let cpus = options.pinThreads ? ThreadAffinity.allowed() : []
        let original = cpus.count >= 2 ? ThreadAffinity.current() : nil
        if original != nil { _ = ThreadAffinity.pinCallingThread(to: cpus[1]) }
        defer { if let original { _ = ThreadAffinity.setCallingThread(original) } }
        do throws(VirtioError) {
            // Spec 3.1.1: reset, negotiate, queue setup, DRIVER_OK; the emulator checks every step.
            try Lifecycle.reset(transport)
            negotiation = try Lifecycle.negotiate(transport, wanted: wanted)
            transport.dma.reset()
            let memory = try SplitQueueMemory(arena: transport.dma, size: options.queueSize, indirectEntries: indirectEntries)
            slots = try transport.dma.allocate(n * stride, alignment: 4096)
            try transport.setConfigVector(nil)
            let doorbell = try transport.enableQueue(0, size: options.queueSize, rings: memory.rings, vector: nil)
            var q = SplitQueue(index: 0, memory: memory, features: negotiation.accepted, doorbell: doorbell)
            q.suppressInterrupts()
            try Lifecycle.driverOK(transport)
            queue = q
        } catch {
            throw .queue(error)
        }
        if options.device == .blk {
            // The disk the IN requests read: every byte a function of its offset (see `diskByte`).
            let bytes = (0..<Int(RingBench.blkCapacitySectors) * 512).map { RingBench.diskByte(UInt64($0)) }
            device.writeDisk(offset: 0, bytes)
        }
        self.options = options
        self.device = device
        self.transport = transport
        self.negotiated = negotiation.accepted
        self.queue = queue
        self.slots = slots
        self.stride = stride
        self.idle = SlotStack(filledTo: n)
        self.segments = .allocate(capacity: 3)
        self.tokens = .allocate(capacity: n)
        self.lengths = .allocate(capacity: n)
        self.driverCPU = original != nil ? cpus[0] : nil
        self.deviceCPU = original != nil ? cpus[1] : nil
    }

    deinit {
        segments.deallocate()
        tokens.deallocate()
        lengths.deallocate()
        seen?.deallocate()
    }

    @inline(__always) static func diskByte(_ offset: UInt64) -> UInt8 {
        UInt8(truncatingIfNeeded: (offset >> 9) &* 151 &+ (offset & 511) &* 7 &+ (offset >> 17))
    }

    /// The disk sector request `sequence` reads.
    @inline(__always) func blkSector(_ sequence: UInt64) -> UInt64 {
        let sectors = UInt64(options.bufferSize / 512)
        return (sequence &* sectors) % (RingBench.blkCapacitySectors - sectors + 1)
    }

    /// The bytes the emulated rng must have put in request `sequence`'s buffer, compared in place.
    func rngMatches(_ sequence: UInt64, _ buffer: UnsafeRawPointer, _ count: Int) -> Bool {
        let words = UInt64((options.bufferSize + 7) / 8)
        var state = RingBench.seed &+ sequence &* words &* 0x9E37_79B9_7F4A_7C15
        var i = 0
        while i < count {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            if count - i >= 8 {
                // The device stores each output as 8 little-endian bytes.
                if UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: i, as: UInt64.self)) != z { return false }
            } else {
                for b in 0..<(count - i) where buffer.load(fromByteOffset: i + b, as: UInt8.self) != UInt8(truncatingIfNeeded: z >> (8 * UInt64(b))) {
                    return false
                }
            }
            i += 8
        }
        return true
    }

    /// Spins until the device has used buffers; gives the core away every 256 checks (the device
    /// thread may share it, as it always does under valgrind). A device silent for 5 s lost them.
    mutating func waitForUsed() throws(RingBenchFailure) {
        var checks = 0
        var deadline: ContinuousClock.Instant?
        while !queue.hasUsed() {
            checks += 1
            if checks & 255 == 0 {
                sched_yield()
                let now = ContinuousClock.now
                if let deadline {
                    if now > deadline {
                        throw .lost("\(queue.inFlight) requests in flight and no completion for 5 s "
                                    + "(\(completed) of \(submitted) completed)")
                    }
                } else {
                    deadline = now + .seconds(5)
                }
            }
        }
        spins += checks
    }

    /// Checks every drained completion (slot, sequence, length, data) and returns its slot.
    mutating func check() throws(RingBenchFailure) {
        for i in 0..<pending {
            let token = tokens[i]
            let slot = Int(token & 0xFFFF)
            let sequence = token >> 16
            guard slot < Int(options.queueSize), sequence < submitted else {
                throw .wrong("token \(token) was never submitted")
            }
            if let seen {
                guard sequence < UInt64(seenCapacity) else { throw .wrong("sequence \(sequence) past the run") }
                let word = Int(sequence >> 6), bit = UInt64(1) << (sequence & 63)
                guard seen[word] & bit == 0 else { throw .wrong("request \(sequence) completed twice") }
                seen[word] |= bit
            }
            let buffer = UnsafeRawPointer(slots.pointer + slot * stride)
            let length = Int(lengths[i])
            switch options.device {
            case .rng:
                guard length == options.bufferSize else {
                    throw .wrong("rng request \(sequence): device wrote \(length) bytes of \(options.bufferSize)")
                }
                if options.verifyData && !rngMatches(sequence, buffer, length) {
                    throw .wrong("rng request \(sequence): bytes differ from the device's generator")
                }
            case .blk:
                let status = buffer.load(fromByteOffset: options.bufferSize + RingBench.blkHeader, as: UInt8.self)
                guard status == 0 else { throw .wrong("blk request \(sequence): status \(status), not OK") }
                guard length == options.bufferSize + 1 else {
                    throw .wrong("blk request \(sequence): used length \(length), not \(options.bufferSize + 1)")
                }
                if options.verifyData {
                    let base = blkSector(sequence) * 512
                    for j in 0..<options.bufferSize where buffer.load(fromByteOffset: j, as: UInt8.self) != RingBench.diskByte(base + UInt64(j)) {
                        throw .wrong("blk request \(sequence): byte \(j) of sector \(base / 512) differs from the disk")
                    }
                }
            }
            idle.push(slot)
        }
        completed += UInt64(pending)
        pending = 0
    }

    /// One round: submit up to `count` requests, then complete and check all of them.
    mutating func round(_ count: Int) throws(RingBenchFailure) {
        let added: Int
        do { added = try ringBenchSubmit(&self, count) } catch { throw .queue(error) }
        guard added > 0 else { throw .lost("the queue has no room although every request completed") }
        var done = 0
        while done < added {
            try waitForUsed()
            do { done += try ringBenchComplete(&self) } catch { throw .queue(error) }
        }
        guard done == added else { throw .wrong("\(done) completions for \(added) requests") }
        try check()
        rounds += 1
    }

    /// Runs `total` requests in rounds of `options.batch`, checking each exactly once.
    mutating func run(_ total: Int) throws(RingBenchFailure) {
        if let driverCPU, !ThreadAffinity.pinCallingThread(to: driverCPU) {
            throw .setup("could not pin the driver thread to CPU \(driverCPU)")
        }
        let start = submitted
        if options.trackEach {
            seen?.deallocate()
            seenCapacity = Int(start) + total
            let words = (seenCapacity + 63) / 64
            seen = .allocate(capacity: words)
            seen!.initialize(repeating: 0, count: words)
            // Requests before this run count as seen.
            for s in 0..<Int(start) { seen![s >> 6] |= UInt64(1) << UInt64(s & 63) }
        }
        while submitted - start < UInt64(total) {
            try round(min(options.batch, total - Int(submitted - start)))
        }
        if options.trackEach, let seen {
            for s in Int(start)..<seenCapacity where seen[s >> 6] & (UInt64(1) << UInt64(s & 63)) == 0 {
                throw .lost("request \(s) never completed")
            }
        }
    }

    /// Resets the device (it then uses no buffer, spec 2.4) and checks it saw no spec violation.
    consuming func finish() throws(RingBenchFailure) {
        do { try Lifecycle.reset(transport) } catch { throw .queue(error) }
        let violations = device.violations
        guard violations.isEmpty else {
            throw .wrong("the device saw \(violations.count) spec violations, first: \(violations[0])")
        }
    }
}

/// CPU affinity of the calling thread. sched_{get,set}affinity are GNU extensions the Glibc
/// module does not import; they are looked up once with dlsym. Neither allocates.
enum ThreadAffinity {
    typealias Mask = cpu_set_t
    private typealias Call = @convention(c) (pid_t, Int, UnsafeMutableRawPointer?) -> Int32
    private static let calls: (get: Call, set: Call)? = {
        guard let libc = dlopen(nil, RTLD_NOW), let get = dlsym(libc, "sched_getaffinity"),
              let set = dlsym(libc, "sched_setaffinity") else { return nil }
        return (unsafeBitCast(get, to: Call.self), unsafeBitCast(set, to: Call.self))
    }()

    /// The calling thread's mask, or nil if it cannot be read.
    static func current() -> Mask? {
        guard let calls else { return nil }
        var mask = Mask()
        return calls.get(0, MemoryLayout<Mask>.size, &mask) == 0 ? mask : nil
    }

    /// The CPUs the calling thread may run on, in order.
    static func allowed() -> [Int] {
        guard var mask = current() else { return [] }
        return withUnsafeBytes(of: &mask) { raw in
            (0..<raw.count * 8).filter { raw[$0 / 8] & UInt8(1 << ($0 % 8)) != 0 }
        }
    }

    static func setCallingThread(_ mask: Mask) -> Bool {
        guard let calls else { return false }
        var mask = mask
        return calls.set(0, MemoryLayout<Mask>.size, &mask) == 0
    }

    static func pinCallingThread(to cpu: Int) -> Bool {
        var mask = Mask()
        guard cpu >= 0, cpu < MemoryLayout<Mask>.size * 8 else { return false }
        withUnsafeMutableBytes(of: &mask) { $0[cpu / 8] |= UInt8(1 << (cpu % 8)) }
        return setCallingThread(mask)
    }
}

/// The driver hot path, part 1 (callgrind: `--toggle-collect=virtio_bench_submit`): for up to
/// `count` idle slots, describe one request and `add` it, then `publish` once.
/// Returns how many were added.
@inline(never) @_silgen_name("virtio_bench_submit")
func ringBenchSubmit(_ bench: inout RingBench, _ count: Int) throws(VirtioError) -> Int {
    var added = 0
    let segments = bench.segments
    let segmentCount: Int
    let bufferSize = bench.options.bufferSize
    let isBlk = bench.options.device == .blk
    segmentCount = isBlk ? 3 : 1
    while added < count, let slot = bench.idle.pop() {
        let buffer = bench.slots.pointer + slot * bench.stride
        let address = bench.slots.deviceAddress + UInt64(slot * bench.stride)
        if isBlk {
            // struct virtio_blk_req (spec 5.2.6): le32 type (IN = 0), le32 reserved, le64 sector;
            // data; u8 status, set to an invalid value so a request the device skipped shows.
            let header = buffer + bufferSize
            header.storeBytes(of: UInt32(0), as: UInt32.self)
            header.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
            header.storeBytes(of: bench.blkSector(bench.submitted).littleEndian, toByteOffset: 8, as: UInt64.self)
            header.storeBytes(of: UInt8(0xFF), toByteOffset: RingBench.blkHeader, as: UInt8.self)
            segments[0] = BufferSegment(address: address + UInt64(bufferSize), length: UInt32(RingBench.blkHeader), deviceWritable: false)
            segments[1] = BufferSegment(address: address, length: UInt32(bufferSize), deviceWritable: true)
            segments[2] = BufferSegment(address: address + UInt64(bufferSize + RingBench.blkHeader), length: 1, deviceWritable: true)
        } else {
            segments[0] = BufferSegment(address: address, length: UInt32(bufferSize), deviceWritable: true)
        }
        let token = bench.submitted << 16 | UInt64(slot)
        guard try bench.queue.add(UnsafeBufferPointer(start: segments, count: segmentCount), token: token) else {
            bench.idle.push(slot)
            break
        }
        bench.submitted += 1
        added += 1
    }
    if bench.queue.publish() { bench.doorbells += 1 }
    return added
}

/// The driver hot path, part 2 (callgrind: `--toggle-collect=virtio_bench_complete`): one
/// `drainUsed`, recording each completion's token and length for `check`.
@inline(never) @_silgen_name("virtio_bench_complete")
func ringBenchComplete(_ bench: inout RingBench) throws(VirtioError) -> Int {
    let tokens = bench.tokens, lengths = bench.lengths
    var pending = bench.pending
    let n = try bench.queue.drainUsed { token, length in
        tokens[pending] = token
        lengths[pending] = length
        pending += 1
    }
    bench.pending = pending
    bench.drains += 1
    return n
}

#if !RING_BENCH_CORE_ONLY
/// `virtio-vfio bench ...`: measurements that need no device (see docs/PERFORMANCE.md).
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure the driver against the in-process emulated device.",
        subcommands: [BenchRingCommand.self, BenchBlk.self])
}

extension RingBenchDevice: ExpressibleByArgument {}

/// `virtio-vfio bench ring`: N requests through a split queue against the emulator.
struct BenchRingCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ring",
        abstract: "Run requests through a split virtqueue against the emulated device.",
        discussion: """
            Builds a queue of --queue-size entries on an in-process emulated rng or blk device \
            (its device side runs on its own thread) and runs --requests requests in rounds of \
            --batch: add each, publish once, spin until the used ring moves, drain it. Every \
            completion is checked (each request exactly once, the length, the status and, unless \
            --no-verify, every data byte); a lost request or wrong data exits 1. Prints requests/s \
            and the driver's work per request. For instruction counts of the driver hot path run \
            it under valgrind --tool=callgrind --toggle-collect=virtio_bench_submit \
            --toggle-collect=virtio_bench_complete (see docs/PERFORMANCE.md).
            """)

    @Option(help: "Requests to run.") var requests = 1_000_000
    @Option(help: "Requests added and published together; the round waits for all of them.") var batch = 32
    @Option(help: "Queue size (a power of 2).") var queueSize: UInt16 = 256
    @Option(help: "Emulated device: rng or blk.") var device: RingBenchDevice = .rng
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
        options.queueSize = queueSize
        options.batch = batch
        options.bufferSize = bufferSize ?? (device == .blk ? 512 : 64)
        options.eventIndex = eventIdx
        options.indirect = indirect
        options.verifyData = verify
        options.pinThreads = pin
        let clock = ContinuousClock()
        var bench: RingBench
        do { bench = try RingBench(options: options) } catch {
            printError("virtio-vfio: error: bench ring: \(error)")
            if case .setup = error { throw ExitCode(Failure.usage) }
            throw ExitCode.failure
        }
        let features = bench.negotiated.names(for: device == .blk ? .block : .entropy).joined(separator: " ")
        let placement = bench.driverCPU.map { "driver on CPU \($0), device on CPU \(bench.deviceCPU ?? -1)" } ?? "threads not pinned"
        let start = clock.now
        do { try bench.run(requests) } catch {
            printError("virtio-vfio: error: bench ring: \(error)")
            throw ExitCode.failure
        }
        let elapsed = clock.now - start
        let stats = bench.device.statistics(queue: 0)
        let (rounds, doorbells, drains, spins) = (bench.rounds, bench.doorbells, bench.drains, bench.spins)
        let completed = bench.completed
        do { try bench.finish() } catch {
            printError("virtio-vfio: error: bench ring: \(error)")
            throw ExitCode.failure
        }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let n = Double(requests)
        func per(_ x: Int) -> String { fixed(Double(x) / n, 3) }
        print("bench ring: \(device), queue \(queueSize), batch \(batch), \(options.bufferSize)-byte buffers, features [\(features)], \(placement)")
        print("\(completed) requests in \(fixed(seconds, 3)) s: \(Int((n / seconds).rounded())) requests/s, "
              + "\(fixed(seconds / n * 1e9, 0)) ns/request; all completed once, "
              + (verify ? "data verified" : "data not verified"))
        print("per request: \(per(rounds)) rounds, \(per(doorbells)) doorbells, \(per(drains)) drains, "
              + "\(per(spins)) used-index polls; device: \(per(stats.notifications)) notifications taken, "
              + "\(per(stats.completed)) completed, \(per(stats.interrupts)) interrupts")
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
#endif
