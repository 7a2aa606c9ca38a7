import Virtio

/// A driver fault found while walking a descriptor chain.
struct ChainFault: Error {
    var rule: String
}

extension DeviceCore {
    /// One pass of the worker over every enabled queue. Returns whether anything was used.
    func runPass() -> Bool {
        state.withLock { s in pass(&s) }
    }

    private func pass(_ s: inout State) -> Bool {
        // §2.1.2: nothing is consumed before DRIVER_OK; nothing after the device needs a reset
        // or the driver gave up.
        guard s.status.contains(.driverOK), s.status.isDisjoint(with: [.deviceNeedsReset, .failed]),
              !s.faults.stopCompleting else { return false }
        var worked = false
        for i in s.queues.indices {
            guard let q = s.queues[i], q.failure == nil else { continue }
            var look = q.rescan || model.pollsRings
            if let value = notify.take(i) {
                look = true
                s.statistics[i].notifications += 1
                checkNotification(value, q, i, &s)
            }
            // A net receive queue is used when frames arrive, notified or not (NetFrames.swift).
            if model.type == .net && netRole(i, s) == .receive {
                if i == 0, let q = q as? SplitQueueDevice, receiveNetFrames(q, &s) { worked = true }
                if s.status.contains(.deviceNeedsReset) { break }
                continue
            }
            guard look else { continue }
            q.rescan = false
            if let split = q as? SplitQueueDevice {
                if process(split, &s) { worked = true }
            } else if let packed = q as? PackedQueueDevice {
                if processPacked(packed, &s) { worked = true }
            }
            if s.status.contains(.deviceNeedsReset) { break }
        }
        return worked
    }

    /// An available buffer notification as the driver wrote it (§4.1.5.2): the 16-bit queue
    /// index, or with VIRTIO_F_NOTIFICATION_DATA the 32-bit `{ vqn: 16; next_off: 15;
    /// next_wrap: 1 }` (§2.9), whose position must be one the ring can have: for a split ring an
    /// available index not past the ring's own (read now, so it may have moved on) nor more than
    /// the queue size behind it, for a packed ring an offset inside the ring.
    private func checkNotification(_ value: UInt32, _ q: QueueDevice, _ i: Int, _ s: inout State) {
        let vqn = UInt16(truncatingIfNeeded: value), next = UInt16(truncatingIfNeeded: value >> 16)
        guard s.driverFeatures.contains(.notificationData) else {
            if vqn != UInt16(i) || next != 0xFFFF {
                let wrote = next == 0xFFFF ? "\(vqn)" : "32 bits, 0x\(String(value, radix: 16))"
                s.record("queue \(i): notification wrote \(wrote); without VIRTIO_F_NOTIFICATION_DATA the driver writes the 16-bit queue index (§4.1.5.2)")
            }
            return
        }
        guard vqn == UInt16(i) else {
            s.record("queue \(i): notification data names queue \(vqn) (§2.9: vqn is the notified queue's index)")
            return
        }
        s.statistics[i].notificationsWithData += 1
        s.statistics[i].lastNotificationData = next
        if let split = q as? SplitQueueDevice {
            let now = split.availIdx()
            if now &- next > q.size {
                s.record("queue \(i): notification data says available index \(next), the ring says \(now) (§2.9)")
            }
        } else if next & 0x7FFF >= q.size {
            s.record("queue \(i): notification data next_off \(next & 0x7FFF) is outside the \(q.size)-entry ring (§2.9)")
        }
    }

    /// Takes what the driver made available on `q`, serves it, publishes the used ring and
    /// decides whether to notify (spec 2.7.7, 2.7.10, 2.7.13, 2.7.14).
    private func process(_ q: SplitQueueDevice, _ s: inout State) -> Bool {
        let eventIdx = s.driverFeatures.contains(.ringEventIdx)
        let indirect = s.driverFeatures.contains(.ringIndirectDesc)
        let oldUsed = q.usedIdx
        var used = 0
        var rounds = 0
        var failed = false
        rounds: while true {
            var availIdx = q.availIdx()
            if availIdx == q.lastAvail {
                guard eventIdx else { break }
                // §2.7.10.2: tell the driver which entry to notify for, then look again, so a
                // buffer made available meanwhile is not left waiting for a notification.
                q.writeAvailEvent(q.lastAvail)
                Ring.full()
                availIdx = q.availIdx()
                if availIdx == q.lastAvail { break }
            }
            let pending = availIdx &- q.lastAvail
            // §2.7.13: the ring holds at most queue size entries; idx never goes back (§2.7.6.1).
            guard pending <= q.size else {
                fail(q, "available idx moved from \(q.lastAvail) to \(availIdx), more than the queue size \(q.size) ahead (§2.7.6.1, §2.7.13.3)", &s)
                failed = true
                break
            }
            for _ in 0..<pending {
                let head = q.availEntry(q.lastAvail)
                guard head < q.size else {
                    fail(q, "available ring entry \(q.lastAvail) names descriptor \(head), outside the table of \(q.size) (§2.7.6)", &s)
                    failed = true
                    break rounds
                }
                do {
                    try walk(head: head, q, indirect: indirect, into: &q.chain)
                } catch {
                    fail(q, error.rule, &s)
                    failed = true
                    break rounds
                }
                let written = serve(q, &s)
                complete(q, head: head, written: written, availIdx: availIdx, &s)
                q.lastAvail &+= 1
                used += 1
            }
            q.publishUsed()
            rounds += 1
            // Without EVENT_IDX the driver notifies for every batch: one read of idx per pass.
            // With it, go on until avail_event is current. Bounded either way; leftovers next pass.
            if !eventIdx { break }
            if rounds >= 4 { q.rescan = true; break }
        }
        if used > 0 && failed { q.publishUsed() }
        guard q.usedIdx != oldUsed, !failed else { return used > 0 }
        interruptIfAsked(q, since: oldUsed, eventIdx: eventIdx, &s)
        return true
    }

    /// After new used elements were published: interrupts the driver if it asked to be
    /// (EVENT_IDX's used_event, or the avail ring's NO_INTERRUPT flag), else counts the
    /// suppressed interrupt.
    func interruptIfAsked(_ q: SplitQueueDevice, since oldUsed: UInt16, eventIdx: Bool, _ s: inout State) {
        // §2.7.7.2: after the used idx is visible, read what the driver asked for.
        Ring.full()
        let notify = eventIdx
            ? SplitQueueLayout.needsEvent(event: q.usedEvent(), new: q.usedIdx, old: oldUsed)
            : q.availFlags() & SplitQueueLayout.availNoInterrupt == 0
        if notify {
            queueInterrupt(q, &s)
        } else {
            s.statistics[q.index].suppressedInterrupts += 1
        }
    }

    /// Writes the used element for one chain, bent by the completion faults when they are on.
    private func complete(_ q: SplitQueueDevice, head: UInt16, written: UInt32, availIdx: UInt16, _ s: inout State) {
        var id = UInt32(head)
        var length = written
        if s.faults.usedIDNotInFlight { id = idNotInFlight(q, availIdx: availIdx) }
        if s.faults.usedLengthPastBuffer { length = UInt32(truncatingIfNeeded: q.chain.writableLength) &+ 1 }
        if s.faults.usedLengthZero { length = 0 }
        q.writeUsed(id: id, length: length)
        if s.faults.duplicateCompletion { q.writeUsed(id: id, length: length) }
        if s.faults.usedIndexJump { q.usedIdx &+= q.size }
        s.statistics[q.index].completed += 1
    }

    /// The lowest descriptor index that heads no chain still in the available ring (including
    /// the one being completed); the queue size if every index does.
    private func idNotInFlight(_ q: SplitQueueDevice, availIdx: UInt16) -> UInt32 {
        var heads = Set<UInt16>()
        var i = q.lastAvail
        while i != availIdx {
            heads.insert(q.availEntry(i))
            i &+= 1
        }
        for candidate in 0..<q.size where !heads.contains(candidate) { return UInt32(candidate) }
        return UInt32(q.size)
    }

    /// The driver broke the ring: record it, stop using the queue, ask for a reset (spec 2.1.2).
    func fail(_ q: QueueDevice, _ rule: String, _ s: inout State) {
        s.record("queue \(q.index): \(rule)")
        q.failure = rule
        needsReset(&s)
    }

    /// Walks the chain at `head` (spec 2.7.5): every descriptor read once, every buffer
    /// translated and bounds-checked, readable before writable, at most one indirect table
    /// (only if negotiated, never nested, length a multiple of 16), loops and over-long chains
    /// refused.
    func walk(head: UInt16, _ q: SplitQueueDevice, indirect: Bool, into chain: inout DescriptorChain) throws(ChainFault) {
        chain.reset(head: head)
        var table = UnsafeRawPointer(q.descriptors)
        var tableSize = Int(q.size)
        var index = Int(head)
        var inIndirect = false
        var walked = 0  // descriptors walked in the current table
        var total: UInt64 = 0
        func where_() -> String { inIndirect ? "indirect descriptor \(index) (chain head \(head))" : "descriptor \(index)" }
        while true {
            guard index < tableSize else {
                throw ChainFault(rule: "chain from head \(head): next index \(index) outside the \(inIndirect ? "indirect table" : "descriptor table") of \(tableSize) (§2.7.5)")
            }
            walked += 1
            guard walked <= tableSize else {
                throw ChainFault(rule: "descriptor chain from head \(head) loops: more than \(tableSize) descriptors in a table of \(tableSize) (§2.7.5.2)")
            }
            let d = table + SplitQueueLayout.descriptor(index)
            let address = Ring.load64(d + SplitQueueLayout.descriptorAddress)
            let length = Ring.load32(d + SplitQueueLayout.descriptorLength)
            let flags = Ring.load16(d + SplitQueueLayout.descriptorFlags)
            let next = Ring.load16(d + SplitQueueLayout.descriptorNext)
            if flags & SplitQueueLayout.flagIndirect != 0 {
                guard indirect else {
                    throw ChainFault(rule: "\(where_()) is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated (§2.7.5.3.1)")
                }
                guard !inIndirect else {
                    throw ChainFault(rule: "\(where_()): INDIRECT inside an indirect table (§2.7.5.3.1)")
                }
                guard flags & SplitQueueLayout.flagNext == 0 else {
                    throw ChainFault(rule: "\(where_()) has both INDIRECT and NEXT (§2.7.5.3.1)")
                }
                guard length > 0, Int(length) % SplitQueueLayout.descriptorSize == 0 else {
                    throw ChainFault(rule: "\(where_()): indirect table length \(length) is not a non-zero multiple of 16 (§2.7.5.3)")
                }
                guard let t = memory.translate(address, Int(length)) else {
                    throw ChainFault(rule: "\(where_()): DMA to unmapped address 0x\(hex(address)) (indirect table, \(length) bytes) outside device memory \(memoryRange)")
                }
                // §2.7.5.3.2: the WRITE flag of the descriptor pointing to the table is ignored.
                table = UnsafeRawPointer(t)
                tableSize = Int(length) / SplitQueueLayout.descriptorSize
                index = 0
                walked = 0
                inIndirect = true
                continue
            }
            guard let p = memory.translate(address, Int(length)) else {
                throw ChainFault(rule: "\(where_()): DMA to unmapped address 0x\(hex(address)) (\(length) bytes) outside device memory \(memoryRange)")
            }
            chain.descriptors += 1
            // §2.7.5.3.1: a chain, indirect descriptors included, is at most the queue size long.
            guard chain.descriptors <= Int(q.size) else {
                throw ChainFault(rule: "chain from head \(head) has more than \(q.size) descriptors, the queue size (§2.7.5.3.1)")
            }
            total += UInt64(length)
            guard total <= 1 << 32 else {
                throw ChainFault(rule: "chain from head \(head) is longer than 2^32 bytes (§2.7.5.2)")
            }
            if flags & SplitQueueLayout.flagWrite != 0 {
                chain.writable.append(Segment(pointer: p, length: Int(length)))
                chain.writableLength += Int(length)
            } else {
                guard chain.writable.isEmpty else {
                    throw ChainFault(rule: "\(where_()): device-readable descriptor after a device-writable one (§2.7.4.2)")
                }
                chain.readable.append(Segment(pointer: p, length: Int(length)))
                chain.readableLength += Int(length)
            }
            if flags & SplitQueueLayout.flagNext == 0 { return }
            index = Int(next)
        }
    }

    /// Serves one request by device type; returns the bytes written to its writable part.
    func serve(_ q: QueueDevice, _ s: inout State) -> UInt32 {
        switch model.type {
        case .entropy: return serveEntropy(q, &s)
        case .block: return serveBlock(q, &s)
        case .net: return serveNet(q, &s)
        default: return 0
        }
    }

    /// Spec 5.4.6: fill the device-writable buffer with random bytes (all of it, or at most
    /// `entropyBytesPerRequest`); len is the number written.
    private func serveEntropy(_ q: QueueDevice, _ s: inout State) -> UInt32 {
        let chain = q.chain
        if chain.readableLength > 0 {
            s.record("queue \(q.index): entropy request with \(chain.readableLength) device-readable bytes; the driver MUST NOT place device-readable buffers (§5.4.6.1)")
        }
        guard chain.writableLength > 0 else {
            s.record("queue \(q.index): entropy request without device-writable bytes (§5.4.6)")
            return 0
        }
        let count = max(1, min(chain.writableLength, model.entropyBytesPerRequest ?? Int.max))
        DescriptorChain.pieces(chain.writable, offset: 0, count: count) { p, n in s.entropy.fill(p, n) }
        return UInt32(count)
    }
}
