import Virtio

/// virtio-net (virtio 1.2 §5.1) over any transport: negotiation, validated configuration, one
/// queue pair (receiveq1, transmitq1) and the control queue when CTRL_VQ is negotiated.
///
/// Shaped for a poll loop (a TAP bridge): `receive` hands out the frames the device returned and
/// posts their buffers again, `transmit` copies a frame into a free slot (false when all are in
/// flight), `reclaimTransmitted` takes completed slots back, `refreshStatus` looks at the link and
/// at DEVICE_NEEDS_RESET. Completions are polled; interrupts stay suppressed. In an interrupt
/// mode (`mode` not `.poll`) the device also signals MSI-X vectors (receiveq1 0, transmitq1 1,
/// configuration changes 2; the control queue none: its commands are waited for by polling), and
/// a loop with nothing to do arms them (`armReceiveInterrupt`, `armTransmitInterrupt`) and
/// sleeps on `interruptDescriptors`.
///
/// The device is not trusted: every used element is checked by the split queue, every frame by
/// the receive queue (lengths, num_buffers, header fields); a malformed frame is dropped and
/// counted. A device that breaks a ring is brought back by reset (at most
/// `maxConsecutiveRecoveries` times without a good frame in between), as rng and blk do.
public struct NetDevice<T: Transport & ~Copyable>: ~Copyable {
    public var transport: T
    public private(set) var negotiation: Lifecycle.Negotiation
    public private(set) var config: NetConfig
    public private(set) var linkStatus: NetLinkStatus
    public private(set) var counters = NetCounters()
    var rx: NetReceiveQueue
    var tx: NetTransmitQueue
    let control: NetControlBox?
    /// The receive modes last set through the control queue, set again after a reset.
    public private(set) var promiscuous: Bool?
    public private(set) var allMulticast: Bool?
    public let maxConsecutiveRecoveries: Int
    var consecutiveRecoveries = 0
    /// How completions are learnt: `.poll`, or MSI-X (`.msix`; `.hybrid` is the same here, the
    /// caller decides how long to poll before it sleeps).
    public let mode: CompletionMode
    /// In an interrupt mode: the eventfds of the receive, transmit and configuration vectors
    /// (owned by the transport).
    public let interruptDescriptors: NetInterruptDescriptors?

    /// The MSI-X vectors this driver programs (§4.1.5.1.2): one per data queue, one for
    /// configuration changes (link status). The control queue gets none.
    public static var receiveVector: UInt16 { 0 }
    public static var transmitVector: UInt16 { 1 }
    public static var configurationVector: UInt16 { 2 }
    static var vectorCount: Int { 3 }

    /// The features this driver uses when offered (§5.1.3). Not GSO/TSO (no segmentation here),
    /// not MQ (one queue pair; accepted when asked for, see `init`).
    public static var supported: Features {
        [.netMAC, .netStatus, .netMergeableRxBuffers, .netChecksum, .netGuestChecksum, .netControlQueue,
         .netControlRx, .netMTU, .ringEventIdx]
    }

    /// What may be asked for at all: `supported`, MQ and GUEST_ANNOUNCE (which change only
    /// configuration and queue numbering here), indirect descriptors and RING_RESET. Never
    /// PACKED or IN_ORDER (split rings, used elements one by one) nor any segmentation offload.
    public static var usable: Features {
        supported.union([.netMultiQueue, .netGuestAnnounce, .ringIndirectDesc, .ringReset])
    }

    /// §5.1.3.1: features that require another. A device must not offer one without the other
    /// (§2.2.1); if it does, the dependent one is not accepted.
    static func unmetDependencies(_ accepted: Features) -> Features {
        var drop: Features = []
        if !accepted.contains(.netControlQueue) {
            drop.formUnion(accepted.intersection([.netControlRx, .netMultiQueue, .netGuestAnnounce]))
        }
        return drop
    }

    /// Resets the device, negotiates `wanted` ∩ `usable` (plus VERSION_1 and ACCESS_PLATFORM, via
    /// `Lifecycle`), reads and checks the configuration, builds receiveq1 and transmitq1 (queues 0
    /// and 1) and the control queue (2, or 2 × max_virtqueue_pairs with MQ, §5.1.2), sets
    /// DRIVER_OK and posts every receive buffer (§5.1.5 steps 1-3).
    /// `rxBufferSize` is the buffer size with MRG_RXBUF; without it buffers hold a whole frame.
    public init(transport: consuming T, wanted: Features = NetDevice.supported, queueSize: UInt16? = nil,
                rxBufferSize: Int = 2048, maxConsecutiveRecoveries: Int = 3,
                controlTimeout: Duration = .seconds(1), counters: NetCounters = NetCounters(),
                mode: CompletionMode = .poll) throws(VirtioError) {
        guard transport.deviceType == .net else {
            throw .queueSetup(queue: 0, "device is virtio-\(transport.deviceType), not virtio-net")
        }
        var wanted = wanted.intersection(NetDevice.usable)
        try Lifecycle.reset(transport)
        var negotiation = try Lifecycle.negotiate(transport, wanted: wanted)
        let unmet = NetDevice.unmetDependencies(negotiation.accepted)
        if !unmet.isEmpty {
            // Only a reset takes features back (§3.1.1 step 5): start again without them.
            wanted.subtract(unmet)
            try Lifecycle.reset(transport)
            negotiation = try Lifecycle.negotiate(transport, wanted: wanted)
        }
        let features = negotiation.accepted
        let config = try NetConfig(reading: transport, features: features)
        let controlIndex = features.contains(.netMultiQueue) ? 2 * Int(config.maxQueuePairs) : 2
        let needed = features.contains(.netControlQueue) ? controlIndex + 1 : 2
        guard transport.queueCount() >= needed else {
            throw .queueSetup(queue: needed - 1, "the device has \(transport.queueCount()) queues, \(needed) needed for the negotiated features (§5.1.2)")
        }
        transport.dma.reset()
        // §4.1.5.1.2: MSI-X vectors are mapped (config_msix_vector, queue_msix_vector) before
        // DRIVER_OK; with none the device is polled.
        var interrupts: NetInterruptDescriptors?
        if mode != .poll { interrupts = NetInterruptDescriptors(try transport.enableInterrupts(count: NetDevice.vectorCount)) }
        let vectors = NetDevice.vectors(mode: mode)
        try transport.setConfigVector(vectors.configuration)
        // §3.1.1 step 7: every queue set up before DRIVER_OK.
        var sizes: [UInt16] = []
        for index in 0..<2 {
            let maximum = transport.queueMaxSize(index)
            guard maximum > 0 else { throw .queueSetup(queue: index, "the device reports queue size 0") }
            sizes.append(SplitQueueLayout.queueSize(maximum: maximum, limit: queueSize))
        }
        var rx = try NetReceiveQueue(index: 0, transport: transport, size: sizes[0], features: features, config: config,
                                     bufferSize: NetReceiveQueue.bufferSize(features: features, config: config, requested: rxBufferSize),
                                     vector: vectors.receive)
        let tx = try NetTransmitQueue(index: 1, transport: transport, size: sizes[1], features: features, config: config,
                                      vector: vectors.transmit)
        let control = features.contains(.netControlQueue)
            ? NetControlBox(try NetControlQueue(index: controlIndex, transport: transport, features: features, timeout: controlTimeout)) : nil
        try Lifecycle.driverOK(transport)
        // §5.1.5 step 3 / §5.1.6.3: fill the receive queue. Buffers go out only after DRIVER_OK
        // (§3.1.1: no notification before it).
        try rx.post()
        self.init(transport: transport, negotiation: negotiation, config: config, rx: rx, tx: tx, control: control,
                  counters: counters, promiscuous: nil, allMulticast: nil, maxConsecutiveRecoveries: maxConsecutiveRecoveries,
                  mode: mode, interrupts: interrupts)
    }

    /// Takes over a running virtio-net device from a previous driver process without a reset
    /// (live upgrade): status and features checked (`Adoption.checkLive`), the configuration read
    /// and checked again, receiveq1, transmitq1 and the control queue (when CTRL_VQ was
    /// negotiated) checked against `queues` and rebuilt over the same memory in the order `init`
    /// lays them out, without writing it. The receive buffers stay posted (frames the device
    /// received meanwhile come out of the next `receive`); transmit frames still in flight are
    /// reclaimed as the device uses them. In an interrupt `mode` receiveq1 and transmitq1 must
    /// still signal their vectors (`queueVectors`) and the eventfds are registered again for this
    /// process; polling checks no vector. `counters`, `promiscuous` and `allMulticast` continue
    /// the previous driver's.
    /// Every check comes before the first write (ring flags only): a refusal leaves the device
    /// as it was.
    public init(adopting transport: consuming T, features: Features, queues snapshots: [QueueSnapshot],
                rxBufferSize: Int = 2048, counters: NetCounters = NetCounters(), promiscuous: Bool? = nil,
                allMulticast: Bool? = nil, maxConsecutiveRecoveries: Int = 3,
                controlTimeout: Duration = .seconds(1), mode: CompletionMode = .poll,
                verified: Adoption.Verified? = nil) throws(VirtioError) {
        guard transport.deviceType == .net else {
            throw .adoption(queue: nil, "device is virtio-\(transport.deviceType), not virtio-net")
        }
        let known = NetDevice.usable.union([.version1, .accessPlatform])
        guard features.isSubset(of: known) else {
            throw .adoption(queue: nil, "features 0x\(String(features.subtracting(known).rawValue, radix: 16)) are not ones this driver uses")
        }
        let negotiation = try Adoption.live(transport, features: features, verified: verified)
        let config = try NetConfig(reading: transport, features: features)
        let controlIndex = features.contains(.netMultiQueue) ? 2 * Int(config.maxQueuePairs) : 2
        let expected = features.contains(.netControlQueue) ? [0, 1, controlIndex] : [0, 1]
        guard snapshots.map(\.index) == expected else {
            throw .adoption(queue: nil, "queues \(snapshots.map(\.index)) handed over, the negotiated features need \(expected) (§5.1.2)")
        }
        var doorbells: [Doorbell] = []
        let vectors = NetDevice.queueVectors(mode: mode, count: snapshots.count)
        for (snapshot, vector) in zip(snapshots, vectors) {
            doorbells.append(try Adoption.doorbell(transport, snapshot, verified: verified, vector: vector))
        }
        transport.dma.reset()
        let bufferSize = NetReceiveQueue.bufferSize(features: features, config: config, requested: rxBufferSize)
        var rx = try NetReceiveQueue(adopting: snapshots[0], transport: transport, features: features, config: config,
                                     bufferSize: bufferSize, doorbell: doorbells[0])
        let tx = try NetTransmitQueue(adopting: snapshots[1], transport: transport, features: features, config: config,
                                      doorbell: doorbells[1])
        let control = features.contains(.netControlQueue)
            ? NetControlBox(try NetControlQueue(adopting: snapshots[2], transport: transport, features: features,
                                                doorbell: doorbells[2], timeout: controlTimeout)) : nil
        // MSI-X: eventfds of this process; queue_msix_vector and config_msix_vector are still
        // programmed and are not written again, nor is queue_enable (§4.1.4.3.2).
        let interrupts = mode == .poll ? nil : NetInterruptDescriptors(try transport.enableInterrupts(count: NetDevice.vectorCount))
        // Buffers the previous driver had taken back and not posted again go out now (the
        // device is live: DRIVER_OK was set by the previous driver, §3.1.1).
        try rx.post()
        self.init(transport: transport, negotiation: negotiation, config: config, rx: rx, tx: tx, control: control,
                  counters: counters, promiscuous: promiscuous, allMulticast: allMulticast,
                  maxConsecutiveRecoveries: maxConsecutiveRecoveries, mode: mode, interrupts: interrupts)
    }

    /// What both public initialisers end with: the device as they set it up or adopted it.
    init(transport: consuming T, negotiation: Lifecycle.Negotiation, config: NetConfig, rx: consuming NetReceiveQueue,
         tx: consuming NetTransmitQueue, control: NetControlBox?, counters: NetCounters, promiscuous: Bool?,
         allMulticast: Bool?, maxConsecutiveRecoveries: Int, mode: CompletionMode, interrupts: NetInterruptDescriptors?) {
        self.rx = rx
        self.tx = tx
        self.control = control
        self.linkStatus = config.status
        self.config = config
        self.negotiation = negotiation
        self.counters = counters
        self.promiscuous = promiscuous
        self.allMulticast = allMulticast
        self.maxConsecutiveRecoveries = maxConsecutiveRecoveries
        self.mode = mode
        self.interruptDescriptors = interrupts
        self.transport = transport
    }

    /// Every queue as a successor adopts it (`init(adopting:)`), with the receive buffers the
    /// device holds and the transmit frames it has not sent: frames queued with `publish: false`
    /// are published first. Throws if a queue is broken or the control queue is busy.
    public mutating func handoverSnapshots() throws(VirtioError) -> [QueueSnapshot] {
        tx.publish()
        var result = [try rx.handoverSnapshot(), try tx.handoverSnapshot()]
        if let control {
            guard control.queue.queue.isIdle else {
                throw .adoption(queue: control.queue.index, "a control command is outstanding")
            }
            result.append(try control.queue.queue.idleSnapshot())
        }
        return result
    }

    /// Gives the transport back with the device still running (live upgrade): no reset, nothing
    /// written; the successor adopts it. Only after `handoverSnapshots()`, with nothing touched
    /// in between.
    public consuming func detach() -> T {
        transport
    }

    public var features: Features { negotiation.accepted }
    /// Receive buffers the device holds (the whole ring between `receive` calls).
    public var receivePosted: Int { rx.posted }
    public var receiveQueueSize: Int { rx.size }
    public var receiveBufferSize: Int { rx.bufferSize }
    public var transmitInFlight: Int { tx.inFlight }
    public var transmitQueueSize: Int { tx.size }
    public var controlQueueIndex: Int? { control?.queue.index }

    // MARK: - Receive

    /// Whether the device has returned receive buffers not consumed yet (one load of used.idx).
    public func hasReceived() -> Bool { rx.hasUsed() }

    /// Hands up to `limit` received frames to `body` (frame bytes without the header, and the
    /// header), drops and counts malformed ones, and posts every buffer again. Returns the frames
    /// delivered. The bytes are valid only during the call: copy them out (to a TAP) there.
    /// A broken ring is recovered by reset (counted) and 0 returned; past the allowed recoveries
    /// the error is thrown.
    public mutating func receive(limit: Int = .max, _ body: (UnsafeRawBufferPointer, NetHeader) -> Void) throws(NetError) -> Int {
        do {
            let n = try rx.receive(limit: limit, counters: &counters, body)
            if n > 0 { consecutiveRecoveries = 0 }
            return n
        } catch {
            try recoverFrom(error)
            return 0
        }
    }

    // MARK: - Interrupts

    /// The vectors programmed in `mode`: none when polling.
    static func vectors(mode: CompletionMode) -> (receive: UInt16?, transmit: UInt16?, configuration: UInt16?) {
        mode == .poll ? (nil, nil, nil) : (receiveVector, transmitVector, configurationVector)
    }

    /// The MSI-X vector each handed-over queue (receiveq1, transmitq1, control) must still
    /// signal in `mode`; nil is not checked (the control queue, and every queue when polling).
    public static func queueVectors(mode: CompletionMode, count: Int) -> [UInt16?] {
        let v = vectors(mode: mode)
        return (0..<count).map { $0 == 0 ? v.receive : $0 == 1 ? v.transmit : nil }
    }

    /// Asks for an interrupt at the next received frame. False if frames are already waiting:
    /// receive them instead of sleeping (§2.7.7.1: the arming could have raced them).
    public mutating func armReceiveInterrupt() -> Bool { rx.queue.armInterrupts() }

    /// Asks for an interrupt at the next transmit completion (when waiting for a free slot).
    /// False if completions are already waiting.
    public mutating func armTransmitInterrupt() -> Bool { tx.queue.armInterrupts() }

    /// Back to polling after a sleep: no interrupts while the loop is busy (advisory, §2.7.7).
    public mutating func suppressInterrupts() {
        rx.queue.suppressInterrupts()
        tx.queue.suppressInterrupts()
    }

    // MARK: - Transmit

    /// Sends one frame (14...MTU + 18 bytes) with `header` (`.none`, or a partial checksum with
    /// VIRTIO_NET_F_CSUM). Returns false when every transmit slot is in flight (backpressure:
    /// try again after `reclaimTransmitted`). With `publish: false` the device is told at the next
    /// `publishTransmitted()`, so a batch costs one notification.
    public mutating func transmit(frame: UnsafeRawBufferPointer, header: NetHeader = .none,
                                  publish: Bool = true) throws(NetError) -> Bool {
        let maximum = config.maxFrameBytes
        guard frame.count >= 14, frame.count <= maximum else { throw .frameSize(frame.count, maximum: maximum) }
        // §5.1.6.2.1: flags 0 unless CSUM was negotiated (then only NEEDS_CSUM, with the checksum
        // inside the frame); gso_type NONE, as no HOST_TSO/UFO/USO is negotiated here.
        let allowed: UInt8 = features.contains(.netChecksum) ? NetHeader.needsChecksum : 0
        guard header.flags & ~allowed == 0 else {
            throw .badHeader("flags 0x\(String(header.flags, radix: 16)) (VIRTIO_NET_F_CSUM \(allowed == 0 ? "not " : "")negotiated)")
        }
        guard header.gsoType == NetHeader.gsoNone else { throw .badHeader("gso_type \(header.gsoType): no segmentation offload negotiated") }
        if header.flags & NetHeader.needsChecksum != 0 && !header.checksumFits(frameBytes: frame.count) {
            throw .badHeader("checksum at \(header.checksumStart)+\(header.checksumOffset) is outside the \(frame.count)-byte frame")
        }
        for attempt in 0..<2 {
            do {
                guard try tx.transmit(frame, header: header, publish: publish) else {
                    counters.txRingFull += 1
                    return false
                }
                counters.txPackets += 1
                counters.txBytes += frame.count
                return true
            } catch {
                // A broken ring: reset and rebuild, then try once more on the empty ring.
                if attempt == 1 { throw .virtio(error) }
                try recoverFrom(error)
            }
        }
        return false
    }

    /// Tells the device about frames queued with `publish: false`.
    public mutating func publishTransmitted() { tx.publish() }

    /// Takes back the transmit slots the device is done with. Returns how many.
    @discardableResult
    public mutating func reclaimTransmitted() throws(NetError) -> Int {
        do {
            let n = try tx.reclaim()
            counters.txCompleted += n
            if n > 0 { consecutiveRecoveries = 0 }
            return n
        } catch {
            try recoverFrom(error)
            return 0
        }
    }

    // MARK: - Status and control

    /// Reads the device status (one register read) and the link status (§5.1.4, one config read
    /// in the generation loop). DEVICE_NEEDS_RESET (§2.1.2) is recovered like a broken ring.
    /// Returns whether the link status changed since the last look. Call it now and then (or on
    /// a configuration change interrupt), not per frame: each read is an MMIO exit on hardware.
    @discardableResult
    public mutating func refreshStatus() throws(NetError) -> Bool {
        let status = transport.readStatus()
        if status.contains(.deviceNeedsReset) {
            try recoverFrom(.deviceFailed(status: status.rawValue, during: "net traffic (DEVICE_NEEDS_RESET)"))
        }
        let link: NetLinkStatus
        do { link = try NetConfig.readStatus(transport, features: features) } catch { throw .virtio(error) }
        guard link != linkStatus else { return false }
        linkStatus = link
        config.status = link
        counters.linkChanges += 1
        return true
    }

    /// VIRTIO_NET_CTRL_RX_PROMISC (§5.1.6.5.1): receive every frame, not just the device's address.
    public mutating func setPromiscuous(_ on: Bool) throws(NetError) {
        try rxMode(NetControlQueue.rxPromisc, on, "VIRTIO_NET_CTRL_RX_PROMISC")
        promiscuous = on
    }

    /// VIRTIO_NET_CTRL_RX_ALLMULTI (§5.1.6.5.1): receive every multicast frame.
    public mutating func setAllMulticast(_ on: Bool) throws(NetError) {
        try rxMode(NetControlQueue.rxAllMulti, on, "VIRTIO_NET_CTRL_RX_ALLMULTI")
        allMulticast = on
    }

    mutating func rxMode(_ command: UInt8, _ on: Bool, _ name: String) throws(NetError) {
        // §5.1.6.5.1: the RX class needs VIRTIO_NET_F_CTRL_RX (which needs CTRL_VQ).
        guard features.contains(.netControlRx) else { throw .notNegotiated("VIRTIO_NET_F_CTRL_RX (for \(name))") }
        guard let control else { throw .notNegotiated("VIRTIO_NET_F_CTRL_VQ") }
        let accepted: Bool
        do { accepted = try control.queue.send(class: NetControlQueue.classRx, command: command, data: on ? 1 : 0) } catch {
            throw .virtio(error)
        }
        guard accepted else { throw .commandRejected("\(name) \(on ? "on" : "off")") }
    }

    // MARK: - Reset

    /// Brings the device back by reset, the seed's third use of it: reset (§2.4: afterwards the
    /// device uses no buffer), every buffer taken back (frames in flight on the transmit queue are
    /// lost and counted), the same features negotiated again, the configuration read again (MTU
    /// and queue pairs must not change: the buffers were sized for them), every queue enabled
    /// again on its own memory, DRIVER_OK, the receive buffers posted, the receive modes set again.
    public mutating func recover() throws(VirtioError) {
        try Lifecycle.reset(transport)
        rx.reclaimAll()
        counters.txLostToReset += tx.reclaimAll()
        control?.queue.reclaimAll()
        let again = try Lifecycle.negotiate(transport, wanted: negotiation.accepted)
        guard again.accepted == negotiation.accepted else {
            throw .featuresRejected(offered: again.offered.rawValue, accepted: negotiation.accepted.rawValue,
                                    status: transport.readStatus().rawValue)
        }
        let fresh = try NetConfig(reading: transport, features: features)
        guard fresh.mtu == config.mtu, fresh.maxQueuePairs == config.maxQueuePairs else {
            throw .deviceFailed(status: transport.readStatus().rawValue,
                                during: "recovery: the configuration changed across the reset (mtu \(config.mtu) -> \(fresh.mtu), max_virtqueue_pairs \(config.maxQueuePairs) -> \(fresh.maxQueuePairs))")
        }
        if fresh.status != linkStatus { counters.linkChanges += 1 }
        config = fresh
        linkStatus = fresh.status
        let vectors = NetDevice.vectors(mode: mode)
        try transport.setConfigVector(vectors.configuration)
        try rx.enableAgain(on: transport, vector: vectors.receive)
        try tx.enableAgain(on: transport, vector: vectors.transmit)
        if let control { try control.queue.enableAgain(on: transport) }
        try Lifecycle.driverOK(transport)
        try rx.post()
        counters.recoveries += 1
        // A reset returned the device's receive modes to their defaults: set them again.
        do {
            if let on = promiscuous { try setPromiscuous(on) }
            if let on = allMulticast { try setAllMulticast(on) }
        } catch {
            if case .virtio(let e) = error { throw e }
            throw .deviceFailed(status: transport.readStatus().rawValue, during: "recovery: \(error)")
        }
    }

    /// The recovery policy of the data path: a broken ring or DEVICE_NEEDS_RESET is recovered by
    /// reset, at most `maxConsecutiveRecoveries` times without a frame received or a transmit
    /// completed in between, with a backoff of 0, 1, 10, 100 ms; anything else is thrown.
    mutating func recoverFrom(_ error: VirtioError) throws(NetError) {
        switch error {
        case .brokenQueue: counters.brokenRings += 1
        case .deviceFailed: break
        default: throw .virtio(error)
        }
        guard consecutiveRecoveries < maxConsecutiveRecoveries else { throw .virtio(error) }
        if consecutiveRecoveries > 0 {
            Lifecycle.sleep(.milliseconds([1, 10, 100][min(consecutiveRecoveries - 1, 2)]))
        }
        consecutiveRecoveries += 1
        do { try recover() } catch { throw .virtio(error) }
    }

    /// Shuts down as the seed says: reset first (the device then uses no buffer), then reclaim
    /// every buffer and free the queues. Returns the transport for the next user.
    public consuming func shutdown() throws(VirtioError) -> T {
        try Lifecycle.reset(transport)
        rx.reclaimAll()
        _ = tx.reclaimAll()
        control?.queue.reclaimAll()
        transport.disableInterrupts()
        transport.dma.reset()
        return transport
    }
}
