import Glibc

/// A helper thread of one test, started at once and joined by that test (`defer { t.join() }`).
///
/// Whatever the body captured (an emulated device, a descriptor number, a closure holding either)
/// is released when the body returns, and `join()` returns only after that. A detached thread
/// (Foundation's `Thread`) can outlive its test: the last reference to an `EmulatedDevice` then
/// goes away on it, in the middle of a later test, and that device's worker is joined there. Tests
/// that count process-wide threads (`EmulatedDevice.liveWorkerThreads`, `ProcessResources`) saw
/// such a late teardown as a thread that vanished.
final class JoinedThread {
    private final class Body {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    private var thread = pthread_t()
    private var joined = false

    init(_ body: @escaping @Sendable () -> Void) {
        let raw = Unmanaged.passRetained(Body(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            // The body, and everything it captured, is released before the thread ends.
            Unmanaged<Body>.fromOpaque(raw!).takeRetainedValue().run()
            return nil
        }, raw)
        guard rc == 0 else {
            Unmanaged<Body>.fromOpaque(raw).release()
            fatalError("test helper thread: pthread_create failed (\(rc))")
        }
    }

    /// Waits for the body to return and its captures to be released. Idempotent.
    func join() {
        if !joined {
            pthread_join(thread, nil)
            joined = true
        }
    }

    deinit { join() }
}
