import Virtio

/// virtio-net's device side (spec 5.1.6): transmitq1 frames are captured with their headers,
/// injected frames are written into the buffers posted on receiveq1 (spread over several with
/// MRG_RXBUF), the control queue answers the RX class (promiscuous, all-multicast).
enum NetQueueRole {
    case receive, transmit, control, unused
}

extension DeviceCore {
    static let netHeaderSize = 12

    /// Which queue `index` is under the negotiated features (spec 5.1.2): receiveqN at 2(N-1),
    /// transmitqN at 2(N-1)+1, controlq at 2N, N = max_virtqueue_pairs with MQ, else 1.
    func netRole(_ index: Int, _ s: State) -> NetQueueRole {
        let pairs = s.driverFeatures.contains(NetFeature.mq) ? Int(model.net.maxQueuePairs) : 1
        if index == 2 * pairs { return s.driverFeatures.contains(NetFeature.ctrlVQ) ? .control : .unused }
        if index < 2 * pairs { return index % 2 == 0 ? .receive : .transmit }
        return .unused
    }

    /// The largest frame the driver may send (spec 5.1.4.2: mtu plus the link header; 1500 when
    /// VIRTIO_NET_F_MTU was not negotiated), with one VLAN tag.
    func netMaxFrame(_ s: State) -> Int {
        (s.driverFeatures.contains(NetFeature.mtu) ? Int(model.net.mtu) : 1500) + 18
    }

    /// Serves one chain of transmitq or controlq (receiveq is `receiveNetFrames`).
    func serveNet(_ q: QueueDevice, _ s: inout State) -> UInt32 {
        switch netRole(q.index, s) {
        case .transmit: return serveNetTransmit(q, &s)
        case .control: return serveNetControl(q, &s)
        case .receive, .unused:
            s.record("queue \(q.index): buffers on a queue that is not a transmit or control queue under the negotiated features (§5.1.2)")
            return 0
        }
    }

    /// Spec 5.1.6.2: header and frame device-readable; the device writes nothing (len 0).
    private func serveNetTransmit(_ q: QueueDevice, _ s: inout State) -> UInt32 {
        let chain = q.chain
        var tag: String { "queue \(q.index): transmit chain at head \(chain.head)" }
        if chain.writableLength > 0 {
            s.record("\(tag) has \(chain.writableLength) device-writable bytes; transmit buffers are device-readable (§5.1.6.2)")
        }
        guard chain.readableLength >= DeviceCore.netHeaderSize else {
            s.record("\(tag) is \(chain.readableLength) bytes, shorter than the 12-byte virtio_net_hdr (§5.1.6)")
            return 0
        }
        var bytes = [UInt8](repeating: 0, count: chain.readableLength)
        bytes.withUnsafeMutableBytes { chain.gather(0, $0.count, into: $0.baseAddress!) }
        let header = EmulatedDevice.NetHeaderFields(bytes: Array(bytes[0..<DeviceCore.netHeaderSize]))
        let frame = Array(bytes[DeviceCore.netHeaderSize...])
        let csum = s.driverFeatures.contains(NetFeature.csum)
        if header.flags & ~(csum ? 1 : 0) != 0 {
            s.record("\(tag): flags 0x\(String(header.flags, radix: 16)) with VIRTIO_NET_F_CSUM \(csum ? "" : "not ")negotiated (§5.1.6.2.1)")
        }
        if header.gsoType != 0 && s.driverFeatures.isDisjoint(with: [NetFeature.hostTSO4, NetFeature.hostTSO6]) {
            s.record("\(tag): gso_type \(header.gsoType) without a HOST_TSO feature negotiated (§5.1.6.2.1)")
        }
        if header.flags & 1 != 0 && Int(header.checksumStart) + Int(header.checksumOffset) + 2 > frame.count {
            s.record("\(tag): checksum at \(header.checksumStart)+\(header.checksumOffset) outside the \(frame.count)-byte frame (§5.1.6.2)")
        }
        if frame.count > netMaxFrame(s) {
            s.record("\(tag): frame of \(frame.count) bytes exceeds mtu + 18 = \(netMaxFrame(s)) (§5.1.4.2)")
        }
        s.net.statistics.framesTransmitted += 1
        if s.net.transmitted.count >= EmulatedDevice.netCaptureLimit {
            s.net.transmitted.removeFirst()
            s.net.statistics.captureOverflow += 1
        }
        s.net.transmitted.append(.init(header: header, frame: frame))
        return 0
    }

    /// Spec 5.1.6.5: `{ u8 class; u8 command; u8 data[]; }` readable, `u8 ack` writable.
    private func serveNetControl(_ q: QueueDevice, _ s: inout State) -> UInt32 {
        let chain = q.chain
        var tag: String { "queue \(q.index): control command at head \(chain.head)" }
        guard chain.writableLength >= 1 else {
            s.record("\(tag) has no device-writable ack byte (§5.1.6.5)")
            return 0
        }
        s.net.statistics.controlCommands += 1
        var ack: UInt8 = 1  // VIRTIO_NET_ERR
        if chain.readableLength >= 2 {
            var bytes = [UInt8](repeating: 0, count: chain.readableLength)
            bytes.withUnsafeMutableBytes { chain.gather(0, $0.count, into: $0.baseAddress!) }
            let (cls, command, data) = (bytes[0], bytes[1], Array(bytes[2...]))
            // Class VIRTIO_NET_CTRL_RX (0): PROMISC (0), ALLMULTI (1), one byte 0 or 1 (§5.1.6.5.1).
            if cls == 0 && s.driverFeatures.contains(NetFeature.ctrlRx) && command <= 1 && data.count == 1 && data[0] <= 1 {
                if command == 0 { s.net.statistics.promiscuous = data[0] == 1 } else { s.net.statistics.allMulticast = data[0] == 1 }
                ack = 0
            } else if cls == 0 && !s.driverFeatures.contains(NetFeature.ctrlRx) {
                s.record("\(tag): VIRTIO_NET_CTRL_RX without VIRTIO_NET_F_CTRL_RX negotiated (§5.1.6.5.1)")
            }
        } else {
            s.record("\(tag) is \(chain.readableLength) device-readable bytes, no class and command (§5.1.6.5)")
        }
        if s.net.faults.controlBadAck > 0 {
            s.net.faults.controlBadAck -= 1
            ack = 0x7F
        }
        chain.writeByte(0, ack)
        return 1
    }

    /// Writes waiting frames into the buffers posted on receiveq1 (spec 5.1.6.4), one frame at a
    /// time, each published with its buffers (used idx after the data and elements, 2.7.8.2).
    /// Without MRG_RXBUF a frame takes one buffer and is dropped if it does not fit; with it the
    /// frame fills as many buffers as it needs, num_buffers telling how many, and waits when
    /// fewer are posted. Called on every pass while frames wait: a receive queue is used when
    /// traffic arrives, not when the driver notifies.
    func receiveNetFrames(_ q: SplitQueueDevice, _ s: inout State) -> Bool {
        guard s.net.pendingCount > 0 else { return false }
        let mergeable = s.driverFeatures.contains(NetFeature.mrgRxbuf)
        let eventIdx = s.driverFeatures.contains(.ringEventIdx)
        let indirect = s.driverFeatures.contains(.ringIndirectDesc)
        let oldUsed = q.usedIdx
        var chains: [[Segment]] = []
        frames: while s.net.pendingCount > 0 {
            let (fields, frame) = s.net.pending[s.net.pendingHead]
            var availIdx = q.availIdx()
            if availIdx == q.lastAvail && eventIdx {
                // §2.7.10.2: ask to be notified of the next buffer, then look again.
                q.writeAvailEvent(q.lastAvail)
                Ring.full()
                availIdx = q.availIdx()
            }
            let posted = Int(availIdx &- q.lastAvail)
            guard posted <= Int(q.size) else {
                fail(q, "available idx moved from \(q.lastAvail) to \(availIdx), more than the queue size \(q.size) ahead (§2.7.6.1, §2.7.13.3)", &s)
                break
            }
            if posted == 0 { break }
            let packetBytes = DeviceCore.netHeaderSize + frame.count
            // Take chains until the packet fits (one only without MRG_RXBUF).
            chains.removeAll(keepingCapacity: true)
            var heads: [UInt16] = []
            var room = 0
            while room < packetBytes && heads.count < (mergeable ? posted : 1) {
                let head = q.availEntry(q.lastAvail &+ UInt16(heads.count))
                guard head < q.size else {
                    fail(q, "available ring entry names descriptor \(head), outside the table of \(q.size) (§2.7.6)", &s)
                    break frames
                }
                do { try walk(head: head, q, indirect: indirect, into: &q.chain) } catch {
                    fail(q, error.rule, &s)
                    break frames
                }
                guard q.chain.readableLength == 0 else {
                    fail(q, "receive buffer at head \(head) has \(q.chain.readableLength) device-readable bytes; receive buffers are device-writable (§5.1.6.3)", &s)
                    break frames
                }
                if mergeable && q.chain.writableLength < DeviceCore.netHeaderSize {
                    s.record("queue \(q.index): receive buffer at head \(head) is \(q.chain.writableLength) bytes; with MRG_RXBUF each buffer holds at least the 12-byte header (§5.1.6.3.1)")
                }
                heads.append(head)
                chains.append(q.chain.writable)
                room += q.chain.writableLength
            }
            if room < packetBytes {
                if !mergeable || heads.count == Int(q.size) {
                    // It can never fit: dropped, as a NIC drops a frame larger than its buffers.
                    s.net.statistics.framesTooLarge += 1
                    s.net.popPending()
                    continue
                }
                break  // wait for the driver to post more
            }
            // The packet: header (num_buffers = buffers used, spec 5.1.6.4) and frame.
            var header = fields
            header.numBuffers = mergeable ? UInt16(heads.count) : 1
            var pastBuffer = false, short = false
            if s.net.faults.rxNumBuffersPastPosted > 0 && mergeable {
                s.net.faults.rxNumBuffersPastPosted -= 1
                header.numBuffers = UInt16(clamping: posted + 1)
            }
            if s.net.faults.rxBadHeader > 0 {
                s.net.faults.rxBadHeader -= 1
                header.flags |= 0x80
                header.gsoType = 1
            }
            if s.net.faults.rxUsedLengthPastBuffer > 0 {
                s.net.faults.rxUsedLengthPastBuffer -= 1
                pastBuffer = true
            } else if s.net.faults.rxUsedLengthShort > 0 {
                s.net.faults.rxUsedLengthShort -= 1
                short = true
            }
            let packet = header.bytes + frame
            var offset = 0
            packet.withUnsafeBytes { source in
                for (j, segments) in chains.enumerated() {
                    let capacity = segments.reduce(0) { $0 + $1.length }
                    let n = min(capacity, packet.count - offset)
                    var from = source.baseAddress! + offset
                    DescriptorChain.pieces(segments, offset: 0, count: n) { p, k in
                        p.copyMemory(from: from, byteCount: k)
                        from += k
                    }
                    offset += n
                    var length = UInt32(n)
                    if j == 0 && pastBuffer { length = UInt32(capacity) + 1 }
                    if j == 0 && short { length = UInt32(DeviceCore.netHeaderSize - 1) }
                    q.writeUsed(id: UInt32(heads[j]), length: length)
                }
            }
            q.lastAvail &+= UInt16(heads.count)
            s.statistics[q.index].completed += heads.count
            s.net.statistics.framesDelivered += 1
            s.net.popPending()
            q.publishUsed()
        }
        guard q.usedIdx != oldUsed else { return false }
        interruptIfAsked(q, since: oldUsed, eventIdx: eventIdx, &s)
        return true
    }

    /// `struct virtio_net_config` (spec 5.1.4): mac, status, max_virtqueue_pairs, mtu, speed,
    /// duplex, rss_max_key_size, rss_max_indirection_table_length, supported_hash_types.
    func netConfig(_ s: State) -> [UInt8] {
        let n = model.net
        var bytes = Array(n.mac.prefix(6))
        bytes += Array(repeating: 0, count: 6 - bytes.count)
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        put(s.net.status ?? n.status)   // 6 status
        put(n.maxQueuePairs)            // 8 max_virtqueue_pairs
        put(n.mtu)                      // 10 mtu
        put(UInt32.max)                 // 12 speed: unknown
        put(UInt8(0xFF))                // 16 duplex: unknown
        put(UInt8(0))                   // 17 rss_max_key_size
        put(UInt16(0))                  // 18 rss_max_indirection_table_length
        put(UInt32(0))                  // 20 supported_hash_types
        return bytes
    }
}

extension EmulatedDevice {
    /// Net device: a frame arrives from the wire for the driver (header fields as given,
    /// num_buffers the device's). Kept until receive buffers are posted; false (dropped) when
    /// `netPendingLimit` frames already wait.
    @discardableResult
    public func injectFrame(_ frame: [UInt8], header: NetHeaderFields = .init()) -> Bool {
        let worker = core.state.withLock { s -> Worker?? in
            guard s.net.pendingCount < EmulatedDevice.netPendingLimit else { return .none }
            s.net.pending.append((header, frame))
            return .some(s.worker)
        }
        guard let worker else { return false }
        worker?.kick()
        return true
    }

    /// Net device: the frames the driver transmitted since the last call, oldest first.
    public func takeTransmitted() -> [TransmittedFrame] {
        core.state.withLock { s in
            defer { s.net.transmitted.removeAll() }
            return s.net.transmitted
        }
    }

    /// Net device: injected frames not yet delivered (no receive buffer for them yet).
    public var pendingReceiveFrames: Int { core.state.withLock { $0.net.pendingCount } }

    /// Net device: link up or down (VIRTIO_NET_S_LINK_UP in `status`), a configuration change as
    /// spec 5.1.4.2 describes: new config_generation and a configuration change notification.
    public func setLink(up: Bool) {
        core.state.withLock { s in
            let old = s.net.status ?? model.net.status
            s.net.status = up ? old | 1 : old & ~1
            s.configGeneration &+= 1
            if s.status.contains(.driverOK) { core.configInterrupt(&s) }
        }
    }

    /// Net device: receive-side and control faults (see `NetFaults`).
    public var netFaults: NetFaults {
        get { core.state.withLock { $0.net.faults } }
        set { core.state.withLock { $0.net.faults = newValue } }
    }

    /// Net device: frames delivered, transmitted and dropped, control commands, receive filters.
    public var netStatistics: NetStatistics { core.state.withLock { $0.net.statistics } }
}
