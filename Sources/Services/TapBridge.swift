#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import SystemPackage
import Syscalls
import Virtio
import VirtioDevices

/// How the bridge waits. After anything happened the loop spins for `busyPoll`. Then, with a
/// device in poll mode (no descriptor to wait on), it sleeps in ppoll(2) on the TAP for 20 µs,
/// 40 µs ... up to `maxSleep` (a frame from the TAP wakes it at once; one from the device waits
/// for the next look); with MSI-X it arms the device's receive interrupt (and the transmit one
/// when every slot is in flight) and sleeps on the TAP, those eventfds, the configuration
/// vector's and `wakeDescriptor`, for at most `statusInterval`.
public struct TapBridgeConfiguration: Sendable {
    public var busyPoll: Duration = .microseconds(200)
    public var maxSleep: Duration = .milliseconds(1)
    /// How often the device status (link, DEVICE_NEEDS_RESET) is read.
    public var statusInterval: Duration = .milliseconds(500)
    /// Frames moved per direction in one round, so neither direction starves the other.
    public var batch = 64
    /// An eventfd another thread writes to end a sleep at once (a hot-upgrade request), or nil.
    public var wakeDescriptor: Int32? = nil
    /// Link changes and recoveries, one line each (rare; never per frame).
    public var log: @Sendable (String) -> Void = { _ in }
    /// Called with the device's and the bridge's counters at each status look (the device's
    /// status was read and it did not need a reset), so other threads (the control socket's, a
    /// metrics endpoint's) can report them without touching the bridge.
    public var publishStatus: (@Sendable (NetCounters, TapBridgeCounters) -> Void)? = nil

    public init() {}
}

/// What the bridge counted, on top of the device's own `NetCounters`.
public struct TapBridgeCounters: Sendable, Equatable {
    // device -> TAP
    /// Frames (and their bytes, header not counted) written to the TAP.
    public var toTapFrames = 0
    public var toTapBytes = 0
    /// Received frames dropped because the TAP's queue was full (write said EAGAIN).
    public var toTapDroppedFull = 0
    /// Received frames a write to the TAP refused otherwise (EIO while the interface is down, ...).
    public var toTapErrors = 0
    public var lastWriteError: Int32 = 0
    // TAP -> device
    /// Frames read from the TAP and handed to the device.
    public var fromTapFrames = 0
    public var fromTapBytes = 0
    /// Frames from the TAP shorter than an Ethernet header or longer than MTU + 18.
    public var fromTapDroppedSize = 0
    /// Frames from the TAP whose virtio-net header asks for an offload the device did not take.
    public var fromTapDroppedHeader = 0
    /// Frames the device refused although a slot looked free (counted, dropped).
    public var fromTapDroppedRing = 0
    /// Times the TAP was left unread because every transmit slot was in flight (backpressure).
    public var transmitRingFull = 0
    public var tapReadErrors = 0
    public var lastReadError: Int32 = 0
    /// Sleeps on interrupts (MSI-X mode), and those a device vector ended (the others ended on
    /// the TAP, the wake descriptor or the status interval).
    public var interruptSleeps = 0
    public var interruptWakeups = 0

    public init() {}

    /// Every count by a stable name (reports, and the hand-over to a successor driver). The
    /// last errno values are not counts and stay with the process that saw them.
    public static let fields: [(name: String, path: WritableKeyPath<TapBridgeCounters, Int> & Sendable)] = [
        ("to_tap_frames", \.toTapFrames), ("to_tap_bytes", \.toTapBytes), ("to_tap_dropped_full", \.toTapDroppedFull),
        ("to_tap_errors", \.toTapErrors), ("from_tap_frames", \.fromTapFrames), ("from_tap_bytes", \.fromTapBytes),
        ("from_tap_dropped_size", \.fromTapDroppedSize), ("from_tap_dropped_header", \.fromTapDroppedHeader),
        ("from_tap_dropped_ring", \.fromTapDroppedRing), ("transmit_ring_full", \.transmitRingFull),
        ("tap_read_errors", \.tapReadErrors), ("interrupt_sleeps", \.interruptSleeps),
        ("interrupt_wakeups", \.interruptWakeups),
    ]

    /// `device`'s counters, then `bridge`'s, by name: what a successor gets.
    public static func named(device: NetCounters, bridge: TapBridgeCounters) -> [(String, Int)] {
        NetCounters.fields.map { ($0.name, device[keyPath: $0.path]) }
            + fields.map { ($0.name, bridge[keyPath: $0.path]) }
    }
}

/// Moves frames both ways between a TAP descriptor and a `NetDevice`, polling the device: every
/// frame the device received is written to the TAP (a full TAP queue drops it, counted); frames
/// are read from the TAP while the transmit ring has a free slot (a full ring leaves them in the
/// TAP's queue until completions are reclaimed); the link status is looked at every
/// `statusInterval`. Nothing is allocated per frame.
///
/// `fd` is any non-blocking descriptor that reads and writes one frame per call (a TAP, or a
/// SOCK_SEQPACKET socket in tests), each behind a `vnetHeaderSize`-byte virtio-net header when
/// that is not 0. The caller keeps it open while the bridge runs.
public struct TapBridge<T: Transport & ~Copyable>: ~Copyable {
    public var device: NetDevice<T>
    public let fd: Int32
    public let vnetHeaderSize: Int
    public let configuration: TapBridgeConfiguration
    public private(set) var counters = TapBridgeCounters()
    let buffers: TapBridgeBuffers
    var readBuffer: UnsafeMutableRawBufferPointer { buffers.read }
    var writeHeader: UnsafeMutableRawPointer { buffers.header }
    var vectors: UnsafeMutablePointer<iovec> { buffers.vectors }
    var pollSet: UnsafeMutablePointer<pollfd> { buffers.poll }
    var lastRecoveries = 0

    /// The header size the bridge and the TAP use for `features`: 12 (the VERSION_1 header) when
    /// the device negotiated CSUM or GUEST_CSUM, so partial checksums pass through untouched, and
    /// 0 (plain frames) otherwise.
    public static func vnetHeaderSize(for features: Features) -> Int {
        features.contains(.netChecksum) || features.contains(.netGuestChecksum) ? NetHeader.size : 0
    }

    /// The TUN_F_* offloads the TAP may hand us: TUN_F_CSUM (partial checksums) only when the
    /// device finishes them (VIRTIO_NET_F_CSUM).
    public static func tapOffloads(for features: Features) -> UInt32 {
        features.contains(.netChecksum) ? 1 : 0  // TUN_F_CSUM
    }

    /// `counters` continue a previous bridge's (after a hot upgrade).
    public init(device: consuming NetDevice<T>, fd: Int32, vnetHeaderSize: Int,
                configuration: TapBridgeConfiguration = TapBridgeConfiguration(),
                counters: TapBridgeCounters = TapBridgeCounters()) {
        precondition(vnetHeaderSize == 0 || vnetHeaderSize == NetHeader.size)
        self.counters = counters
        self.lastRecoveries = device.counters.recoveries
        self.device = device
        self.fd = fd
        self.vnetHeaderSize = vnetHeaderSize
        self.configuration = configuration
        self.buffers = TapBridgeBuffers(headerSize: vnetHeaderSize)
    }

    // MARK: - One round

    /// Device -> TAP: up to `batch` received frames written to the TAP. Returns how many frames
    /// the device handed out (written or dropped).
    public mutating func deviceToTap() throws(NetError) -> Int {
        let fd = self.fd, headerSize = vnetHeaderSize, header = writeHeader, iov = vectors
        var c = counters
        let n = try device.receive(limit: configuration.batch) { frame, received in
            let result: Result<Int, Errno>
            if headerSize > 0 {
                // Flags (NEEDS_CSUM, DATA_VALID) and checksum offsets go to the kernel as the
                // device gave them; num_buffers means nothing to a TAP.
                var h = received
                h.numBuffers = 0
                h.store(to: header)
                iov[0] = iovec(iov_base: header, iov_len: headerSize)
                iov[1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: frame.baseAddress), iov_len: frame.count)
                result = Syscall.writev(fd, iov, 2)
            } else {
                result = Syscall.write(fd, frame)
            }
            switch result {
            case .success:
                c.toTapFrames += 1
                c.toTapBytes += frame.count
            case .failure(let e) where e.rawValue == EAGAIN:
                c.toTapDroppedFull += 1
            case .failure(let e):
                c.toTapErrors += 1
                c.lastWriteError = e.rawValue
            }
        }
        counters = c
        return n
    }

    /// TAP -> device: frames read while a transmit slot is free (up to `batch`), published to the
    /// device with one notification. Returns whether the ring is full (the TAP is then not read).
    public mutating func tapToDevice() throws(NetError) -> (moved: Int, ringFull: Bool) {
        var moved = 0
        var ringFull = false
        let maximum = device.config.maxFrameBytes
        let headerSize = vnetHeaderSize
        while moved < configuration.batch {
            if device.transmitInFlight >= device.transmitQueueSize {
                try device.reclaimTransmitted()
                if device.transmitInFlight >= device.transmitQueueSize {
                    counters.transmitRingFull += 1
                    ringFull = true
                    break
                }
            }
            let length: Int
            switch Syscall.read(fd, readBuffer) {
            case .success(let n): length = n
            case .failure(let e):
                if e.rawValue != EAGAIN {
                    counters.tapReadErrors += 1
                    counters.lastReadError = e.rawValue
                }
                if moved > 0 { device.publishTransmitted() }
                return (moved, false)
            }
            moved += 1
            let frameBytes = length - headerSize
            guard frameBytes >= 14, frameBytes <= maximum else { counters.fromTapDroppedSize += 1; continue }
            let base = readBuffer.baseAddress!
            var header = NetHeader.none
            if headerSize > 0 {
                header = NetHeader(loading: base)
                // DATA_VALID is the kernel saying it checked the checksum: meaningless on transmit
                // (§5.1.6.2.1 allows only NEEDS_CSUM). Anything else (GSO, which is never enabled
                // with TUNSETOFFLOAD here) is refused by `transmit` and dropped below.
                header.flags &= ~NetHeader.dataValid
                header.numBuffers = 0
                if header.flags == 0 { header.checksumStart = 0; header.checksumOffset = 0 }
            }
            let frame = UnsafeRawBufferPointer(start: base + headerSize, count: frameBytes)
            do {
                if try device.transmit(frame: frame, header: header, publish: false) {
                    counters.fromTapFrames += 1
                    counters.fromTapBytes += frameBytes
                } else {
                    counters.fromTapDroppedRing += 1
                }
            } catch {
                switch error {
                case .frameSize: counters.fromTapDroppedSize += 1
                case .badHeader: counters.fromTapDroppedHeader += 1
                default:
                    if moved > 1 { device.publishTransmitted() }
                    throw error
                }
            }
        }
        device.publishTransmitted()
        return (moved, ringFull)
    }

    /// Looks at DEVICE_NEEDS_RESET and the link (recovering by reset if needed); logs a change
    /// and publishes the counters.
    public mutating func refreshStatus() throws(NetError) {
        if try device.refreshStatus() {
            configuration.log("link \(device.linkStatus) (change \(device.counters.linkChanges))")
        }
        noteRecoveries()
        configuration.publishStatus?(device.counters, counters)
    }

    mutating func noteRecoveries() {
        let r = device.counters.recoveries
        if r != lastRecoveries {
            lastRecoveries = r
            configuration.log("device recovered by reset (\(r) so far, \(device.counters.brokenRings) broken rings, \(device.counters.txLostToReset) transmit frames lost to resets)")
        }
    }

    /// One round both ways plus transmit completions. Returns whether anything moved, and
    /// whether the transmit ring is full.
    public mutating func step() throws(NetError) -> (progress: Bool, ringFull: Bool) {
        let received = try deviceToTap()
        let reclaimed = try device.reclaimTransmitted()
        let sent = try tapToDevice()
        if device.counters.recoveries != lastRecoveries { noteRecoveries() }
        return (received > 0 || reclaimed > 0 || sent.moved > 0, sent.ringFull)
    }

    // MARK: - The loop

    public enum Outcome: Sendable { case stopped, paused }

    /// Runs rounds until `stop` is set (returns `.stopped`) or `pause` is set (returns `.paused`;
    /// the caller clears it, e.g. after printing counters on SIGUSR1, and calls `run` again).
    /// Throws only what the device could not recover from.
    public mutating func run(until stop: borrowing Atomic<Bool>, pauseWhen pause: borrowing Atomic<Bool>) throws(NetError) -> Outcome {
        try run(until: stop) { pause.load(ordering: .relaxed) }
    }

    /// `run` with any pause condition (looked at once per round): a SIGUSR1 flag, or a hot
    /// upgrade waiting for the bridge to stop moving frames.
    public mutating func run(until stop: borrowing Atomic<Bool>, pauseWhen pause: () -> Bool) throws(NetError) -> Outcome {
        let clock = ContinuousClock()
        var lastProgress = clock.now
        var lastStatus = clock.now
        var sleep: Duration = .microseconds(20)
        while true {
            if stop.load(ordering: .relaxed) { return .stopped }
            if pause() { return .paused }
            let round = try step()
            let now = clock.now
            if round.progress {
                lastProgress = now
                sleep = .microseconds(20)
            }
            if now - lastStatus >= configuration.statusInterval {
                lastStatus = now
                try refreshStatus()
            }
            // Busy while traffic flows.
            if now - lastProgress < configuration.busyPoll { continue }
            if let interrupts = device.interruptDescriptors {
                if try sleepOnInterrupts(interrupts, ringFull: round.ringFull) { lastStatus = clock.now }
                continue
            }
            let timeout = sleep
            sleep = min(sleep * 2, configuration.maxSleep)
            // Wait for the TAP only while a frame read from it can be sent; with a full ring
            // only time (completions) helps.
            pollSet.pointee = pollfd(fd: fd, events: round.ringFull ? 0 : Int16(POLLIN), revents: 0)
            let (s, a) = timeout.components
            if case .failure(let e) = Syscall.poll(pollSet, 1, timeoutNanoseconds: s * 1_000_000_000 + a / 1_000_000_000) {
                counters.tapReadErrors += 1
                counters.lastReadError = e.rawValue
            }
            if pollSet.pointee.revents & Int16(POLLIN) != 0 { sleep = .microseconds(20) }
        }
    }

    // MARK: - Hot upgrade

    /// Before a handover that resets the device (reset mode): frames the device has received go
    /// to the TAP and transmitted frames are waited for, so the reset loses none of them; the
    /// TAP is not read (what the stack sends meanwhile waits in the TAP's queue for the
    /// successor). Bounded by `timeout`; returns the transmit frames still in flight (lost if
    /// the successor resets).
    public mutating func drainForReset(timeout: Duration) throws(NetError) -> Int {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        device.publishTransmitted()
        while true {
            _ = try deviceToTap()
            try device.reclaimTransmitted()
            if device.transmitInFlight == 0 || clock.now >= deadline { break }
        }
        _ = try deviceToTap()
        return device.transmitInFlight
    }

    /// Gives up the device without touching it (live upgrade: the successor adopts it). The TAP
    /// descriptor stays the caller's.
    public consuming func detach() -> NetDevice<T> {
        device
    }

    /// One sleep in MSI-X mode: the receive interrupt armed (the transmit one too when the ring
    /// is full), then ppoll on the TAP (unless the ring is full), the armed vectors' eventfds,
    /// the configuration vector's and the wake descriptor, for at most `statusInterval`. Arming
    /// re-checks the used ring after a full barrier (§2.7.7.1), so a frame that raced it is
    /// handled now instead of waiting for an interrupt that was suppressed. Returns whether the
    /// status was looked at (a configuration interrupt: the link changed).
    mutating func sleepOnInterrupts(_ interrupts: NetInterruptDescriptors, ringFull: Bool) throws(NetError) -> Bool {
        defer { device.suppressInterrupts() }
        guard device.armReceiveInterrupt() else { return false }
        if ringFull { guard device.armTransmitInterrupt() else { return false } }
        counters.interruptSleeps += 1
        let p = pollSet
        p[0] = pollfd(fd: ringFull ? -1 : fd, events: Int16(POLLIN), revents: 0)
        p[1] = pollfd(fd: interrupts.receive, events: Int16(POLLIN), revents: 0)
        p[2] = pollfd(fd: ringFull ? interrupts.transmit : -1, events: Int16(POLLIN), revents: 0)
        p[3] = pollfd(fd: interrupts.configuration, events: Int16(POLLIN), revents: 0)
        p[4] = pollfd(fd: configuration.wakeDescriptor ?? -1, events: Int16(POLLIN), revents: 0)
        let (s, a) = configuration.statusInterval.components
        if case .failure(let e) = Syscall.poll(p, 5, timeoutNanoseconds: s * 1_000_000_000 + a / 1_000_000_000), e.rawValue != EINTR {
            counters.tapReadErrors += 1
            counters.lastReadError = e.rawValue
        }
        // Each eventfd that fired is read (reading clears its count). The rings are the truth.
        var fired = false
        for i in 1...4 where p[i].fd >= 0 && p[i].revents & Int16(POLLIN) != 0 {
            _ = Syscall.read64(p[i].fd)
            if i < 4 { fired = true }
        }
        if fired { counters.interruptWakeups += 1 }
        if p[3].revents & Int16(POLLIN) != 0 {
            try refreshStatus()
            return true
        }
        return false
    }

    /// Resets the device (it uses no buffer afterwards) and returns the transport.
    public consuming func shutdown() throws(VirtioError) -> T {
        try device.shutdown()
    }

    // MARK: - Report

    /// The counters in a few lines: traffic both ways, drops by reason, device faults.
    public var summary: String {
        let c = counters, d = device.counters
        var lines: [String] = []
        lines.append("device->tap: \(c.toTapFrames) frames \(c.toTapBytes) bytes; dropped: tap full \(c.toTapDroppedFull), write errors \(c.toTapErrors)\(c.lastWriteError != 0 ? " (last \(Errno(rawValue: c.lastWriteError)))" : "")")
        lines.append("  malformed from device: \(d.rxDropped) (short used length \(d.rxShortUsedLength), bad num_buffers \(d.rxBadNumBuffers), bad header \(d.rxBadHeader), bad length \(d.rxBadLength))")
        lines.append("tap->device: \(c.fromTapFrames) frames \(c.fromTapBytes) bytes, \(d.txCompleted) completed; dropped: size \(c.fromTapDroppedSize), header \(c.fromTapDroppedHeader), ring \(c.fromTapDroppedRing), lost to resets \(d.txLostToReset); ring full \(c.transmitRingFull) times; read errors \(c.tapReadErrors)\(c.lastReadError != 0 ? " (last \(Errno(rawValue: c.lastReadError)))" : "")")
        lines.append("device: link \(device.linkStatus), \(d.linkChanges) link changes, \(d.brokenRings) broken rings, \(d.recoveries) recoveries")
        if device.interruptDescriptors != nil {
            lines.append("interrupts: \(c.interruptSleeps) sleeps, \(c.interruptWakeups) woken by the device")
        }
        return lines.joined(separator: "\n")
    }
}

/// The bridge's private memory, allocated once: one frame read from the TAP (header and frame,
/// with room for the largest the kernel sends), the header written in front of a frame going to
/// the TAP with the two iovecs of that write, and the poll set (TAP, three vectors, wake).
struct TapBridgeBuffers: ~Copyable {
    let read: UnsafeMutableRawBufferPointer
    let header: UnsafeMutableRawPointer
    let vectors: UnsafeMutablePointer<iovec>
    let poll: UnsafeMutablePointer<pollfd>

    init(headerSize: Int) {
        // The largest frame a TAP hands out without GSO is its MTU + 14; 64 KiB covers any MTU,
        // so an oversize frame is read whole and dropped, never cut.
        read = .allocate(byteCount: headerSize + 65536, alignment: 64)
        header = .allocate(byteCount: NetHeader.size, alignment: 8)
        vectors = .allocate(capacity: 2)
        poll = .allocate(capacity: 5)
    }

    deinit {
        read.deallocate()
        header.deallocate()
        vectors.deallocate()
        poll.deallocate()
    }
}
