import Glibc
@testable import NBD
import Synchronization
import Syscalls

/// A pthread running `body`; `join()` waits for it.
final class TestThread {
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    private var thread = pthread_t()
    private var joined = false

    init(_ body: @escaping () -> Void) {
        let raw = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, raw)
        precondition(rc == 0)
    }

    func join() {
        if !joined { pthread_join(thread, nil); joined = true }
    }

    deinit { join() }
}

/// Polls `condition` every millisecond for up to `seconds`.
func waitUntil(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
    while monotonicNanoseconds() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

/// A counting semaphore (for a sender keeping a window of requests in flight).
final class Semaphore: @unchecked Sendable {
    private let s = UnsafeMutablePointer<sem_t>.allocate(capacity: 1)
    init(_ value: Int) { sem_init(s, 0, UInt32(value)) }
    deinit { sem_destroy(s); s.deallocate() }
    func wait() { while sem_wait(s) != 0 {} }
    func signal() { sem_post(s) }
}

/// One request of a pipelined run, and what its reply must be.
struct Planned: Sendable {
    var request: NBDRequest
    var payload: [UInt8] = []
    /// For a READ: the data expected (nil: do not check).
    var expected: [UInt8]?
    var error: UInt32 = 0
}

/// Sends `plan` on `client` keeping up to `window` requests unanswered (a sender thread), reads
/// the replies on this thread, checks each against its cookie (the index in `plan`). Returns the
/// order in which cookies were answered.
func pipeline(_ client: TestClient, _ plan: [Planned], window: Int) throws -> [Int] {
    let room = Semaphore(window)
    let sendError = Mutex<String?>(nil)
    let sender = TestThread {
        for p in plan {
            room.wait()
            do { try client.sendRequest(p.request, payload: p.payload) } catch {
                sendError.withLock { $0 = "\(error)" }
                return
            }
        }
    }
    var finished = false
    defer {
        if !finished {
            // Unblock the sender: wake it and make its sends fail.
            Glibc.shutdown(client.fd, Int32(SHUT_RDWR))
            for _ in 0..<plan.count { room.signal() }
        }
        sender.join()
    }
    var order: [Int] = []
    var seen = [Bool](repeating: false, count: plan.count)
    for _ in 0..<plan.count {
        let reply = try client.readReply()
        let index = Int(reply.cookie)
        guard index < plan.count, !seen[index] else { throw TestFailure("unexpected or repeated cookie \(reply.cookie)") }
        seen[index] = true
        let p = plan[index]
        guard reply.error == p.error else { throw TestFailure("request \(index) (\(p.request)): error \(reply.error), expected \(p.error)") }
        if p.request.type == NBDProtocol.Command.read && reply.error == 0 {
            let data = try client.receive(Int(p.request.length))
            if let expected = p.expected, data != expected { throw TestFailure("request \(index): wrong data at \(p.request.offset)") }
        }
        order.append(index)
        room.signal()
    }
    finished = true
    if let e = sendError.withLock({ $0 }) { throw TestFailure("send: \(e)") }
    return order
}
