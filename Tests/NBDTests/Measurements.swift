import Glibc
import Synchronization
import Syscalls
import Testing
@testable import NBD

/// Throughput with nbdcopy, and heap allocations per request counted with glibc's mtrace (the
/// client is another process, so what allocates in this one is the server). Run on purpose, not
/// in `swift test`:
///
///     NBD_MEASURE=1 swift test --filter NBDTests.Measurements                  # throughput
///     LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0 NBD_MEASURE=1 \
///       swift test --filter NBDTests.Measurements                              # allocations
///
/// The backend (`FastBackend`) allocates nothing and copies nothing, so this is the server alone:
/// socket I/O, parsing, the poll loop.
@Suite("NBD measurements", .enabled(if: getenv("NBD_MEASURE") != nil, "set NBD_MEASURE=1 to measure"))
struct Measurements {
    struct Case { var name: String; var write: Bool; var eventFD: Bool; var requestSize: Int; var size: Int }

    @Test(.enabled(if: RealClientTests.nbdcopy != nil, "nbdcopy is not installed"))
    func throughputAndAllocationsPerRequest() throws {
        // The client must not inherit the preload.
        let preloaded = getenv("LD_PRELOAD") != nil
        unsetenv("LD_PRELOAD")
        var cases: [Case] = []
        if preloaded {
            cases.append(Case(name: "warm-up", write: false, eventFD: true, requestSize: 4096, size: 1 << 20))
            for write in [false, true] {
                for eventFD in [true, false] {
                    for size in [8 << 20, 16 << 20] {
                        cases.append(Case(name: (write ? "write, " : "read, ") + (eventFD ? "eventfd" : "polled"), write: write,
                                          eventFD: eventFD, requestSize: 4096, size: size))
                    }
                }
            }
        } else {
            for write in [false, true] {
                for eventFD in [true, false] {
                    for (requestSize, size) in [(4096, 256 << 20), (65536, 1 << 30)] {
                        cases.append(Case(name: (write ? "write, " : "read, ") + (eventFD ? "eventfd" : "polled"), write: write,
                                          eventFD: eventFD, requestSize: requestSize, size: size))
                    }
                }
            }
        }
        if let only = getenv("NBD_MEASURE_CASE").map({ String(cString: $0) }) { cases = cases.filter { $0.name == only } }
        var allocationsOf: [String: [Int: Int]] = [:]  // case -> requests -> allocations
        let dir = TemporaryDirectory()
        // Written data in memory (tmpfs), so nbdcopy reading it costs little (a sparse file costs
        // the client a page clear per read).
        let shm = access("/dev/shm", W_OK) == 0 ? "/dev/shm/nbd-measure-\(getpid())" : dir.path + "/source"
        defer { unlink(shm) }
        let source = shm
        var sourceSize = 0
        for c in cases {
            var configuration = NBDServerConfiguration()
            configuration.unixSocketPath = dir.path + "/nbd.sock"
            let uri = "nbd+unix:///?socket=\(configuration.unixSocketPath!)"
            if c.write && sourceSize != c.size {  // -S 0 below: nbdcopy sends zero blocks as data too
                let fd = open(source, O_CREAT | O_WRONLY | O_TRUNC, 0o600)
                let chunk = pattern(1 << 20, seed: 1)
                for _ in 0..<(c.size >> 20) { _ = chunk.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, $0.count) } }
                Glibc.close(fd)
                sourceSize = c.size
            }
            let runner = FastRunner(try NBDServer(backend: FastBackend(size: c.size, eventFD: c.eventFD), configuration: configuration))
            let trace = dir.path + "/mtrace"
            if preloaded { setenv("MALLOC_TRACE", trace, 1); mtraceControl("mtrace") }
            let start = monotonicNanoseconds()
            let r = try RealClientTests.nbdcopy!.run(["--connections=1", "--requests=64", "--request-size=\(c.requestSize)",
                                                      "--no-extents", "-S", "0"] + (c.write ? [source, uri] : [uri, "null:"]))
            let seconds = Double(monotonicNanoseconds() - start) / 1e9
            if preloaded { mtraceControl("muntrace") }
            #expect(r.status == 0, "\(r.stderr)")
            let stats = runner.stop()
            let requests = c.write ? stats.writes : stats.reads
            #expect(requests == c.size / c.requestSize)
            var line = "nbd measure [\(c.name), \(c.requestSize)-byte requests, \(c.size >> 20) MiB]: \(requests) requests in \(fixed(seconds, 3)) s"
            if preloaded {
                let lines = String(decoding: try readFile(trace), as: UTF8.self).split(separator: "\n")
                let allocations = lines.filter { $0.contains(" + 0x") }.count
                line += "; \(allocations) allocations in the process"
                allocationsOf[c.name, default: [:]][requests] = allocations
            } else {
                line += ", \(Int(Double(c.size) / seconds / 1e6)) MB/s, \(Int(Double(requests) / seconds)) requests/s"
            }
            print(line)
        }
        // What a request costs: the difference between runs of 2048 and 4096 requests (the rest is
        // the connection, its log lines, and spawning the client).
        for (name, runs) in allocationsOf.sorted(by: { $0.key < $1.key }) where runs.count == 2 {
            let (small, large) = (runs.keys.min()!, runs.keys.max()!)
            let perRequest = Double(runs[large]! - runs[small]!) / Double(large - small)
            print("nbd measure [\(name)]: \(fixed(perRequest, 4)) allocations per request")
            #expect(perRequest < 0.01)
        }
    }
}

/// A backend that allocates nothing: zero-filled reads, discarded writes, each request completed
/// on the next poll (signalling its eventfd on submit, if it has one).
struct FastBackend: BlockBackend, ~Copyable {
    let size: UInt64
    var readOnly: Bool { false }
    var canFlush: Bool { true }
    var canTrim: Bool { true }
    var canWriteZeroes: Bool { true }
    var minimumBlockSize: Int { 512 }
    var preferredBlockSize: Int { 4096 }
    var maxPayload: Int { 1 << 20 }
    let completionDescriptor: Int32?
    let slotSize = 64 << 10, slots = 256
    let memory: UnsafeMutableRawPointer
    let free: UnsafeMutablePointer<Bool>
    let pending: UnsafeMutablePointer<UInt64>
    var pendingCount = 0

    init(size: Int, eventFD: Bool) {
        self.size = UInt64(size)
        if eventFD, case .success(let fd) = Syscall.eventfd(0, O_NONBLOCK) { completionDescriptor = fd } else { completionDescriptor = nil }
        memory = .allocate(byteCount: slotSize * slots, alignment: 4096)
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: slotSize * slots)
        free = .allocate(capacity: slots)
        free.initialize(repeating: true, count: slots)
        pending = .allocate(capacity: slots)
    }

    deinit {
        if let completionDescriptor { Syscall.close(completionDescriptor) }
        memory.deallocate(); free.deallocate(); pending.deallocate()
    }

    mutating func reserve(length: Int) -> BackendBuffer? {
        let need = max(1, (length + slotSize - 1) / slotSize)
        var run = 0
        for i in 0..<slots {
            run = free[i] ? run + 1 : 0
            if run == need {
                for k in (i - need + 1)...i { free[k] = false }
                return BackendBuffer(first: i - need + 1, count: need, length: length)
            }
        }
        return nil
    }

    func memory(of buffer: BackendBuffer) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: memory + buffer.first * slotSize, count: buffer.length)
    }

    mutating func submit(_ operation: BackendOperation, offset: UInt64, length: Int, buffer: BackendBuffer, tag: UInt64) throws(BackendError) {
        pending[pendingCount] = tag
        pendingCount += 1
        if let completionDescriptor { _ = Syscall.write64(completionDescriptor, 1) }
    }

    mutating func poll(_ body: (UInt64, Int32) -> Void) throws(BackendError) -> Int {
        let n = pendingCount
        for k in 0..<n { body(pending[k], 0) }
        pendingCount = 0
        return n
    }

    mutating func release(_ buffer: BackendBuffer) {
        for k in buffer.first..<(buffer.first + buffer.count) { free[k] = true }
    }
}

/// An `NBDServer<FastBackend>` on its own thread.
final class FastRunner {
    private final class Context: @unchecked Sendable {
        var server: NBDServer<FastBackend>?
        let flag = Atomic<Bool>(false)
        var statistics = NBDServerStatistics()
        init(_ s: consuming NBDServer<FastBackend>) { server = consume s }
    }
    private let context: Context
    private var thread = pthread_t()

    init(_ server: consuming NBDServer<FastBackend>) {
        context = Context(server)
        let raw = Unmanaged.passRetained(context).toOpaque()
        pthread_create(&thread, nil, { raw in
            let context = Unmanaged<Context>.fromOpaque(raw!).takeRetainedValue()
            var s = context.server.take()!
            try? s.run(until: context.flag)
            context.statistics = s.statistics
            return nil
        }, raw)
    }

    func stop() -> NBDServerStatistics {
        context.flag.store(true, ordering: .relaxed)
        pthread_join(thread, nil)
        return context.statistics
    }
}

func fixed(_ value: Double, _ digits: Int) -> String {
    if value < 0 { return "-" + fixed(-value, digits) }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let n = Int((value * scale).rounded())
    let whole = n / Int(scale), frac = n % Int(scale)
    let f = String(frac)
    return "\(whole)." + String(repeating: "0", count: digits - f.count) + f
}

/// Calls glibc's mtrace() or muntrace() (in libc_malloc_debug when preloaded).
func mtraceControl(_ name: String) {
    // libc keeps a do-nothing compat symbol; the working one is the preloaded library's versioned
    // symbol, which only dlvsym (a GNU extension, looked up itself) finds.
    typealias DLVSym = @convention(c) (UnsafeMutableRawPointer?, UnsafePointer<CChar>, UnsafePointer<CChar>) -> UnsafeMutableRawPointer?
    guard let library = dlopen("libc_malloc_debug.so.0", RTLD_NOW | RTLD_NOLOAD),
          let dlvsymAddress = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "dlvsym"),
          let symbol = unsafeBitCast(dlvsymAddress, to: DLVSym.self)(library, name, "GLIBC_2.2.5") else { return }
    unsafeBitCast(symbol, to: (@convention(c) () -> Void).self)()
}
