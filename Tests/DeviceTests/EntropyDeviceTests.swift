import Testing
import Foundation
import Glibc
import Virtio
import VirtioDevices
import VirtioEmulator
import Synchronization

@Suite("virtio-rng driver against the emulator", .serialized)
struct EntropyDeviceTests {
    @Test(arguments: CompletionMode.allCases)
    func readsEntropyInEachMode(_ mode: CompletionMode) throws {
        let device = EmulatedDevice(model: .rng(seed: 7))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), mode: mode)
        var bytes: [UInt8] = []
        try rng.read(100_000) { bytes.append(contentsOf: $0) }
        #expect(bytes.count == 100_000)
        #expect(Set(bytes).count > 200)  // not a constant fill
        // What the device did (interrupts sent, and passes that completed buffers with
        // interrupts suppressed) against how the driver's waits ended.
        let sent = device.statistics(queue: 0)
        switch mode {
        case .poll:
            #expect(rng.wakes.interrupts == 0 && rng.wakes.rechecks == 0)
            #expect(sent.interrupts == 0, "poll mode keeps interrupts suppressed: \(sent)")
        case .msix:
            #expect(rng.wakes.polled == 0 && rng.wakes.interrupts + rng.wakes.rechecks > 0)
            #expect(rng.wakes.interrupts <= sent.interrupts, "\(rng.wakes), \(sent)")
        case .hybrid:
            // How many waits the poll ends depends on the device's speed (a forced sleep is
            // `hybridSleepsOnTheInterruptOnceThePollBudgetIsSpent`); what holds in any mix: a wait
            // ended by an interrupt had one sent, and buffers found by polling were completed
            // while interrupts were suppressed (the driver polls with them off).
            #expect(rng.wakes.polled + rng.wakes.interrupts + rng.wakes.rechecks > 0, "\(rng.wakes)")
            #expect(rng.wakes.interrupts <= sent.interrupts, "\(rng.wakes), \(sent)")
            #expect(rng.wakes.polled == 0 || sent.suppressedInterrupts > 0, "\(rng.wakes), \(sent)")
        }
        _ = try rng.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    /// Counts this process's descriptors, mappings and threads: meaningful only when no other test
    /// runs at the same time. tools/test runs `swift test --no-parallel` with VIRTIO_VFIO_ISOLATED=1;
    /// without it (tests in parallel) the cycles still run and are checked, the counts are not.
    @Test func resetRenegotiateRebuildAThousandTimesLeaksNothing() throws {
        let device = EmulatedDevice(model: .rng(seed: 1))
        var transport = EmulatedTransport(device: device)
        // Warm up lazily created state (the worker thread machinery, interrupt fds).
        do { var r = try EntropyDevice(transport: transport, mode: .msix); try r.read(64) { _ in }; transport = try r.shutdown() }
        // malloc grows its arenas over the first few hundred cycles; measure after that.
        var before = ProcessResources.now()
        for cycle in 0..<1200 {
            if cycle == 200 { before = ProcessResources.now() }
            let wanted: Features = cycle % 2 == 0 ? [.ringEventIdx, .ringIndirectDesc] : []
            var rng = try EntropyDevice(transport: transport, wanted: wanted, mode: cycle % 3 == 0 ? .poll : .msix)
            #expect(rng.negotiation.accepted.contains(.ringEventIdx) == (cycle % 2 == 0))
            var n = 0
            try rng.read(64) { n += $0.count }
            #expect(n == 64)
            transport = try rng.shutdown()
        }
        if getenv("VIRTIO_VFIO_ISOLATED") != nil {
            let after = ProcessResources.now()
            // A leak only ever adds: anything that went away belonged to something else.
            #expect(after.descriptors <= before.descriptors && after.mappings <= before.mappings
                    && after.threads <= before.threads, "before \(before), after \(after)")
        }
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func perQueueResetReclaimsEveryBufferAndKeepsWorking() throws {
        let device = EmulatedDevice(model: .rng(seed: 3))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), wanted: .ringReset, mode: .hybrid)
        try rng.read(1000) { _ in }
        let reclaimed = try rng.resetQueue()
        #expect(reclaimed == 8)
        var n = 0
        try rng.read(5000) { n += $0.count }
        #expect(n == 5000)
        _ = try rng.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    /// Hybrid polls for a bounded time, then arms the interrupt and sleeps. The device is held
    /// back (`stopCompleting`) until this thread is seen blocked in poll(2) on the queue's eventfd,
    /// then let go: the wait must end by the interrupt the device sends. No timing decides it.
    @Test func hybridSleepsOnTheInterruptOnceThePollBudgetIsSpent() throws {
        let device = EmulatedDevice(model: .rng(seed: 13))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), mode: .hybrid)
        try rng.read(4096) { _ in }
        var faults = device.faults
        faults.stopCompleting = true
        device.faults = faults
        let before = rng.wakes, sentBefore = device.statistics(queue: 0).interrupts
        let reader = try #require(currentThreadID())
        let sawSleep = Flag()
        let release = JoinedThread {
            // Bounded (5 s, half the driver's completion timeout): if the reader never sleeps
            // the expectation below says so.
            for _ in 0..<5000 {
                if isBlockedInPoll(thread: reader) { sawSleep.set(); break }
                usleep(1000)
            }
            device.faults = .init()
        }
        defer { release.join() }
        // More than every buffer of the queue holds: after what the device filled before it was
        // held back, a wait finds nothing and has to sleep.
        let count = Int(device.queueMaxSize(0)) * rng.bufferSize + 1
        var n = 0
        try rng.read(count) { n += $0.count }
        #expect(n == count)
        #expect(sawSleep.isSet, "the reader was never seen asleep in poll(2)")
        #expect(rng.wakes.interrupts > before.interrupts, "before \(before), after \(rng.wakes)")
        #expect(device.statistics(queue: 0).interrupts > sentBefore)
        _ = try rng.shutdown()
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test func perQueueResetNeedsTheFeature() throws {
        var rng = try EntropyDevice(transport: EmulatedTransport(device: EmulatedDevice(model: .rng(seed: 3))))
        #expect(throws: VirtioError.self) { _ = try rng.resetQueue() }
        _ = try rng.shutdown()
    }
}

@Suite("the driver against a hostile emulated device", .serialized)
struct HostileDeviceTests {
    /// Switches on a fault after setup, reads, and expects the named protocol error; then shows that
    /// a reset brings the device back with good data (the seed's third use of reset).
    func expectBrokenThenRecovered(_ set: (inout EmulatedDevice.Faults) -> Void, _ fragment: String) throws {
        let device = EmulatedDevice(model: .rng(seed: 11))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), mode: .poll,
                                    completionTimeout: .milliseconds(300))
        try rng.read(100) { _ in }
        var faults = device.faults
        set(&faults)
        device.faults = faults
        var delivered = 0
        do {
            try rng.read(50_000) { delivered += $0.count }
            Issue.record("the fault (\(fragment)) went unnoticed")
        } catch {
            #expect("\(error)".contains(fragment), "\(error)")
        }
        #expect(delivered < 50_000)
        let transport = try rng.shutdown()
        device.faults = .init()
        var again = try EntropyDevice(transport: transport, mode: .poll)
        var n = 0
        try again.read(10_000) { n += $0.count }
        #expect(n == 10_000)
        _ = try again.shutdown()
    }

    @Test func usedIDNotInFlight() throws {
        try expectBrokenThenRecovered({ $0.usedIDNotInFlight = true }, "not")
    }
    @Test func duplicateCompletion() throws {
        // The emulator repeats every completion: caught as ids not in flight or an impossible index jump.
        try expectBrokenThenRecovered({ $0.duplicateCompletion = true }, "queue 0 broken: used")
    }
    @Test func usedLengthPastTheBuffer() throws {
        try expectBrokenThenRecovered({ $0.usedLengthPastBuffer = true }, "device-writable bytes")
    }
    @Test func usedIndexJump() throws {
        try expectBrokenThenRecovered({ $0.usedIndexJump = true }, "used idx jumped")
    }
    @Test func aDeviceThatStopsCompleting() throws {
        try expectBrokenThenRecovered({ $0.stopCompleting = true }, "stopped answering")
    }

    @Test func aResetThatNeverCompletesIsReportedNotHung() throws {
        let device = EmulatedDevice(model: .rng(seed: 2))
        var faults = EmulatedDevice.Faults()
        faults.resetNeverCompletes = true
        device.faults = faults
        #expect(throws: VirtioError.self) {
            _ = try EntropyDevice(transport: EmulatedTransport(device: device), mode: .poll)
        }
    }
}

@Suite("the rng driver recovers a misbehaving device by reset", .serialized)
struct RecoveryTests {
    /// Turns `fault` on mid-read; a watcher clears it as soon as the driver resets the device (a
    /// transient fault); the read must finish with all bytes and one recovery. The completion
    /// timeout is 1 s and 5 recoveries are allowed: on a loaded machine (load 5-6 on 2 cores) the
    /// emulator's thread was once not scheduled within 200 ms and the read gave up.
    func recoversFrom(_ fault: (inout EmulatedDevice.Faults) -> Void, needsReset: Bool = false) throws {
        let device = EmulatedDevice(model: .rng(seed: 5))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), mode: .poll,
                                    completionTimeout: .seconds(1))
        try rng.read(1000) { _ in }
        let baseline = device.resetCount
        var faults = device.faults
        fault(&faults)
        device.faults = faults
        if needsReset { device.setNeedsReset() }
        let watcher = JoinedThread {
            for _ in 0..<5000 where device.resetCount == baseline { usleep(200) }
            device.faults = .init()
        }
        defer { watcher.join() }
        var n = 0
        try rng.read(60_000, recoveries: 5) { n += $0.count }
        #expect(n == 60_000)
        #expect(rng.recoveries >= 1)
        _ = try rng.shutdown()
    }

    @Test func fromABadUsedID() throws { try recoversFrom { $0.usedIDNotInFlight = true } }
    @Test func fromALengthPastTheBuffer() throws { try recoversFrom { $0.usedLengthPastBuffer = true } }
    @Test func fromADeviceThatStoppedCompleting() throws { try recoversFrom { $0.stopCompleting = true } }
    @Test func fromDeviceNeedsReset() throws { try recoversFrom({ $0.stopCompleting = true }, needsReset: true) }

    @Test func givesUpAfterTheAllowedRecoveries() throws {
        let device = EmulatedDevice(model: .rng(seed: 5))
        var rng = try EntropyDevice(transport: EmulatedTransport(device: device), mode: .poll,
                                    completionTimeout: .milliseconds(50))
        var faults = EmulatedDevice.Faults()
        faults.usedIDNotInFlight = true  // never clears: a permanently broken device
        device.faults = faults
        #expect(throws: VirtioError.self) { try rng.read(60_000, recoveries: 2) { _ in } }
        #expect(rng.recoveries == 2)
    }
}

/// This thread's kernel id, from /proc/thread-self (a link to "PID/task/TID").
func currentThreadID() -> Int? {
    guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self") else { return nil }
    return target.split(separator: "/").last.flatMap { Int($0) }
}

/// Whether thread `tid` of this process is blocked in poll(2) or ppoll(2): the first field of
/// /proc/self/task/TID/syscall is the number of the system call it is blocked in, or "running".
func isBlockedInPoll(thread tid: Int) -> Bool {
    // The numbers of asm/unistd_64.h (Swift does not import the SYS_ macros).
    #if arch(x86_64)
    let polls: Set<Int> = [7, 271]  // poll, ppoll
    #elseif arch(arm64)
    let polls: Set<Int> = [73]  // ppoll (glibc's poll uses it)
    #else
    let polls: Set<Int> = []
    #endif
    guard let text = try? String(contentsOfFile: "/proc/self/task/\(tid)/syscall", encoding: .utf8),
          let first = text.split(separator: " ").first, let number = Int(first) else { return false }
    return polls.contains(number)
}

/// A flag one thread sets and another reads.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}
