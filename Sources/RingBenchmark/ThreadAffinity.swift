import Glibc

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
