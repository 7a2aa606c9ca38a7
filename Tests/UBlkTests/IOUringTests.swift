import CVirtioShim
import IOUring
import Syscalls
import Testing

/// The ring on this machine's kernel: entries reach it, completions come back in order with their
/// user data and results, a full ring says so instead of overwriting an entry. (The ring is
/// ~Copyable: values are taken out of it before #expect looks at them.)
@Suite("io_uring")
struct IOUringTests {
    struct Missing: Error {}

    @Test func noOperationsComeBackWithTheirUserData() throws {
        var ring = try IOUring(entries: 8)
        let entries = ring.submissionEntries
        #expect(entries == 8)
        for i in 0..<5 {
            guard let e = ring.next() else { throw Missing() }
            e.set(opcode: IOUringOpcode.noOperation, fd: -1, userData: 100 + UInt64(i))
        }
        let unsubmitted = ring.unsubmitted
        #expect(unsubmitted == 5)
        let submitted = try ring.submit(waitFor: 5)
        #expect(submitted == 5)
        let waiting = ring.hasCompletions
        #expect(waiting)
        var seen: [UInt64] = [], results: [Int32] = []
        let n = ring.drainCompletions { (userData, result, _) in
            seen.append(userData)
            results.append(result)
        }
        #expect(n == 5)
        #expect(seen == [100, 101, 102, 103, 104])
        #expect(results == [0, 0, 0, 0, 0])
        let more = ring.hasCompletions
        #expect(!more)
    }

    @Test func aFullRingRefusesAnotherEntry() throws {
        var ring = try IOUring(entries: 4, bigEntries: true)
        let size = ring.entrySize
        #expect(size == 128)
        for _ in 0..<4 {
            guard let e = ring.next() else { throw Missing() }
            e.set(opcode: IOUringOpcode.noOperation, fd: -1, userData: 1)
        }
        let fifth = ring.next()
        #expect(fifth == nil)
        try ring.submit(waitFor: 4)
        // Consumed by the kernel: the slots are free again.
        let again = ring.next()
        #expect(again != nil)
    }

    /// A read of an eventfd completes when the eventfd is signalled: how a ring waits for an
    /// interrupt, and the ring's descriptor polls readable once the completion is there.
    @Test func readOfAnEventfdCompletesWhenSignalled() throws {
        var ring = try IOUring(entries: 4)
        let event = try EventFD()
        let value = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
        defer { value.deallocate() }
        guard let e = ring.next() else { throw Missing() }
        e.set(opcode: IOUringOpcode.read, fd: event.raw, userData: 7)
        e.set(address: UInt64(UInt(bitPattern: value)), length: 8, offset: 0)
        try ring.submit()
        let early = ring.hasCompletions
        #expect(!early)
        let fd = ring.fd.raw
        #expect(Syscall.pollIn(fd, timeoutMilliseconds: 0) == .success(false))
        event.signal()
        #expect(Syscall.pollIn(fd, timeoutMilliseconds: 5000) == .success(true))
        var result: Int32 = 0, userData: UInt64 = 0
        ring.drainCompletions { (u, r, _) in userData = u; result = r }
        #expect(userData == 7 && result == 8 && value.pointee == 1)
    }

    @Test func anUnknownOpcodeComesBackAsAnError() throws {
        var ring = try IOUring(entries: 2)
        guard let e = ring.next() else { throw Missing() }
        e.set(opcode: 0xFE, fd: -1, userData: 9)
        try ring.submit(waitFor: 1)
        var result: Int32 = 0
        ring.drainCompletions { (_, r, _) in result = r }
        #expect(result == -22)  // EINVAL
    }
}
