#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization
import Syscalls

/// Worker threads of all emulated devices alive in this process (started and not yet joined).
let liveWorkerThreads = Atomic<Int>(0)

/// The device's own thread: started when the first queue is enabled, stopped and joined when a
/// reset completes or the device goes away. It runs `DeviceCore.runPass` (which takes the device
/// lock, so a pass never overlaps a reset) and polls between passes: the driver's doorbell is a
/// plain store, so there is nothing to wait on. For 2 ms after work it only yields; then it backs
/// off to 1 ms sleeps, from which `kick()` (queue enabled, DRIVER_OK) and `stop` wake it at once.
struct Worker: Sendable {
    let thread: pthread_t
    let signal: WorkerSignal
    /// The device whose thread this is (alive until the join: the thread holds it).
    unowned let core: DeviceCore

    private final class Context {
        let core: DeviceCore
        let signal: WorkerSignal
        init(core: DeviceCore, signal: WorkerSignal) { self.core = core; self.signal = signal }
    }

    static func start(_ core: DeviceCore) -> Worker {
        let signal = WorkerSignal()
        let context = Unmanaged.passRetained(Context(core: core, signal: signal)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            // Balances passRetained: the context (and with it the core) is released when the
            // thread ends, before pthread_join returns to whoever stops it.
            let context = Unmanaged<Context>.fromOpaque(raw!).takeRetainedValue()
            Worker.run(context.core, context.signal)
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<Context>.fromOpaque(context).release()
            fatalError("emulated device: pthread_create failed (\(rc))")
        }
        liveWorkerThreads.add(1, ordering: .relaxed)
        core.liveWorkerThreads.add(1, ordering: .relaxed)
        return Worker(thread: thread, signal: signal, core: core)
    }

    /// Stops the thread and waits for it to end. Must not be called with the device lock held.
    func stopAndJoin() {
        signal.stop()
        pthread_join(thread, nil)
        liveWorkerThreads.subtract(1, ordering: .relaxed)
        core.liveWorkerThreads.subtract(1, ordering: .relaxed)
    }

    func kick() { signal.kick() }

    /// Spins (yielding) for `spin` after the last work, then sleeps 20 µs, 40 µs ... 1 ms.
    private static func run(_ core: DeviceCore, _ signal: WorkerSignal) {
        let spin: UInt64 = 2_000_000
        var lastWork = monotonicNanoseconds()
        var pause = 0
        while true {
            if core.runPass() {
                lastWork = monotonicNanoseconds()
                pause = 0
            }
            if monotonicNanoseconds() - lastWork < spin {
                if signal.stopRequested { return }
                sched_yield()
            } else {
                pause = pause == 0 ? 20_000 : min(pause * 2, 1_000_000)
                if !signal.pause(nanoseconds: pause) { return }
            }
        }
    }
}

/// Stop flag and wake-up for one worker: a pthread mutex and a CLOCK_MONOTONIC condition.
final class WorkerSignal: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var stopping = false
    private var kicked = false

    init() {
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    var stopRequested: Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return stopping
    }

    func stop() {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    func kick() {
        pthread_mutex_lock(mutex)
        kicked = true
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Sleeps up to `nanoseconds`, less if kicked or stopped. False once a stop was requested.
    func pause(nanoseconds: Int) -> Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let total = deadline.tv_nsec + nanoseconds
        deadline.tv_sec += total / 1_000_000_000
        deadline.tv_nsec = total % 1_000_000_000
        while !stopping && !kicked {
            if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT { break }
        }
        kicked = false
        return !stopping
    }
}
