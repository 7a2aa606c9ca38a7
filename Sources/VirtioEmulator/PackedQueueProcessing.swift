import Virtio

extension DeviceCore {
    /// Takes what the driver made available on packed queue `q`, in ring order, serves each
    /// buffer, writes its used descriptor and decides whether to notify (spec 2.8.10, 2.8.21,
    /// 2.8.22). Buffers are used in the order they were made available.
    func processPacked(_ q: PackedQueueDevice, _ s: inout State) -> Bool {
        let eventIdx = s.driverFeatures.contains(.ringEventIdx)
        let indirect = s.driverFeatures.contains(.ringIndirectDesc)
        var written = 0  // ring descriptors the used ones written in this pass cover
        var used = 0
        var rounds = 0
        rounds: while true {
            var flags = q.availFlags(at: q.nextAvail)
            if !PackedQueueDevice.isAvailable(flags, wrap: q.availWrap) {
                guard eventIdx else { break }
                // §2.8.10: ask for a notification when the next descriptor is made available, then
                // look again, so one made available meanwhile is not left waiting.
                q.writeDeviceEvent(offWrap: PackedQueueLayout.eventOffsetWrap(q.nextAvail, wrap: q.availWrap),
                                   flags: PackedQueueLayout.eventDescriptorSpecific)
                Ring.full()
                flags = q.availFlags(at: q.nextAvail)
                if !PackedQueueDevice.isAvailable(flags, wrap: q.availWrap) { break }
            }
            var served = 0
            while served < Int(q.size) {
                let f = served == 0 ? flags : q.availFlags(at: q.nextAvail)
                guard PackedQueueDevice.isAvailable(f, wrap: q.availWrap) else { break }
                do {
                    try walkPacked(q, firstFlags: f, indirect: indirect, into: &q.chain)
                } catch {
                    fail(q, error.rule, &s)
                    break rounds
                }
                let length = serve(q, &s)
                completePacked(q, written: length, &s)
                written += q.chainDescriptors
                PackedQueueDevice.advance(&q.nextAvail, &q.availWrap, by: q.chainDescriptors, size: q.size)
                served += 1
                used += 1
                if q.failure != nil { break rounds }
            }
            rounds += 1
            if !eventIdx { break }
            if rounds >= 4 { q.rescan = true; break }
        }
        guard used > 0, q.failure == nil else { return used > 0 }
        interruptIfAskedPacked(q, written: written, eventIdx: eventIdx, &s)
        return true
    }

    /// After used descriptors were written: a used buffer notification if the driver's event
    /// suppression structure asks for one (spec 2.8.10), else counts the suppressed one.
    private func interruptIfAskedPacked(_ q: PackedQueueDevice, written: Int, eventIdx: Bool, _ s: inout State) {
        // §2.8.22: the used flags are visible before the driver's structure is read.
        Ring.full()
        let flags = q.driverEventFlags()
        let notify: Bool
        switch flags & 3 {
        case PackedQueueLayout.eventEnable: notify = true
        case PackedQueueLayout.eventDisable: notify = false
        case PackedQueueLayout.eventDescriptorSpecific:
            guard eventIdx else {
                s.record("queue \(q.index): driver event flags RING_EVENT_FLAGS_DESC without VIRTIO_F_EVENT_IDX (§2.8.10)")
                notify = true
                break
            }
            // Whether the used descriptors written, [old, new) in ring positions, include the
            // one the driver named (its offset and wrap counter, §2.8.10).
            let offWrap = q.driverEventOffWrap()
            var event = offWrap & ~PackedQueueLayout.eventWrapBit
            if (offWrap & PackedQueueLayout.eventWrapBit != 0) != q.usedWrap { event &-= q.size }
            notify = SplitQueueLayout.needsEvent(event: event, new: q.nextUsed, old: q.nextUsed &- UInt16(truncatingIfNeeded: written))
        default:
            s.record("queue \(q.index): driver event flags value 3 is reserved (§2.8.10)")
            notify = true
        }
        if notify {
            queueInterrupt(q, &s)
        } else {
            s.statistics[q.index].suppressedInterrupts += 1
        }
    }

    /// Writes the used descriptor for the chain just served, bent by the completion faults.
    private func completePacked(_ q: PackedQueueDevice, written: UInt32, _ s: inout State) {
        var id = q.chainID
        var length = written
        if s.faults.usedIDNotInFlight { id = packedIDNotInFlight(q) }
        if s.faults.usedLengthPastBuffer { length = UInt32(truncatingIfNeeded: q.chain.writableLength) &+ 1 }
        if s.faults.usedLengthZero { length = 0 }
        // Used with the wrong wrap counter: AVAIL the inverse of USED, as no used descriptor can be.
        let bent: UInt16? = s.faults.usedIndexJump
            ? (q.usedWrap ? PackedQueueLayout.flagUsed : PackedQueueLayout.flagAvail) : nil
        if s.faults.duplicateCompletion {
            // The repeat goes where the next used descriptor would, and is written first: a
            // driver that sees the completion then sees its repeat in the same pass. Written
            // after it, the driver could reuse the ID in between, and a used descriptor naming an
            // ID in flight again is, in a packed ring, a valid completion.
            let (position, wrap) = (q.nextUsed, q.usedWrap)
            PackedQueueDevice.advance(&q.nextUsed, &q.usedWrap, by: q.chainDescriptors, size: q.size)
            q.writeUsed(id: id, length: length, descriptors: 1, markWrite: !model.packedUsedWithoutWrite)
            let after = (q.nextUsed, q.usedWrap)
            (q.nextUsed, q.usedWrap) = (position, wrap)
            q.writeUsed(id: id, length: length, descriptors: q.chainDescriptors, flags: bent,
                        markWrite: !model.packedUsedWithoutWrite)
            (q.nextUsed, q.usedWrap) = after
        } else {
            q.writeUsed(id: id, length: length, descriptors: q.chainDescriptors, flags: bent,
                        markWrite: !model.packedUsedWithoutWrite)
        }
        s.statistics[q.index].completed += 1
    }

    /// A buffer ID that is in flight on no driver's side: one past the last (the queue size). A
    /// device cannot tell which IDs a driver holds (it may have taken a used buffer back and made
    /// its ID available again, or not yet): an ID only "not available now" was sometimes one the
    /// driver held again, and naming it is then a completion of the wrong buffer, which no
    /// driver can tell from a right one.
    private func packedIDNotInFlight(_ q: PackedQueueDevice) -> UInt16 { q.size }

    /// Walks the buffer at `nextAvail` (spec 2.8.6-2.8.8, 2.8.17-2.8.19): descriptors in ring
    /// order while NEXT is set, each one available in this lap, or one INDIRECT descriptor (only
    /// if negotiated, never with NEXT, its table a non-zero multiple of 16 whose entries carry no
    /// flag but WRITE); every buffer translated and bounds-checked, readable before writable, at
    /// most the queue size of descriptors.
    func walkPacked(_ q: PackedQueueDevice, firstFlags: UInt16, indirect: Bool, into chain: inout DescriptorChain) throws(ChainFault) {
        let start = q.nextAvail
        chain.reset(head: start)
        var position = start, wrap = q.availWrap
        var flags = firstFlags
        var ringDescriptors = 0
        var total: UInt64 = 0
        func add(_ address: UInt64, _ length: UInt32, writable: Bool, _ what: @autoclosure () -> String) throws(ChainFault) {
            guard let p = memory.translate(address, Int(length)) else {
                throw ChainFault(rule: "\(what()): DMA to unmapped address 0x\(hex(address)) (\(length) bytes) outside device memory \(memoryRange)")
            }
            chain.descriptors += 1
            guard chain.descriptors <= Int(q.size) else {
                throw ChainFault(rule: "buffer at descriptor \(start) has more than \(q.size) descriptors, the queue size (§2.8.17)")
            }
            total += UInt64(length)
            guard total <= 1 << 32 else { throw ChainFault(rule: "buffer at descriptor \(start) is longer than 2^32 bytes") }
            if writable {
                chain.writable.append(Segment(pointer: p, length: Int(length)))
                chain.writableLength += Int(length)
            } else {
                guard chain.writable.isEmpty else {
                    throw ChainFault(rule: "\(what()): device-readable descriptor after a device-writable one (§2.8.17)")
                }
                chain.readable.append(Segment(pointer: p, length: Int(length)))
                chain.readableLength += Int(length)
            }
        }
        while true {
            let d = q.descriptor(position)
            let address = Ring.load64(d + PackedQueueLayout.descriptorAddress)
            let length = Ring.load32(d + PackedQueueLayout.descriptorLength)
            let id = Ring.load16(d + PackedQueueLayout.descriptorID)
            ringDescriptors += 1
            if flags & PackedQueueLayout.flagIndirect != 0 {
                guard indirect else {
                    throw ChainFault(rule: "descriptor \(position) is INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated (§2.8.19)")
                }
                guard flags & PackedQueueLayout.flagNext == 0, ringDescriptors == 1 else {
                    throw ChainFault(rule: "descriptor \(position): INDIRECT in a list linked by NEXT (§2.8.19)")
                }
                guard length > 0, Int(length) % PackedQueueLayout.descriptorSize == 0 else {
                    throw ChainFault(rule: "descriptor \(position): indirect table length \(length) is not a non-zero multiple of 16 (§2.8.8)")
                }
                guard let table = memory.translate(address, Int(length)) else {
                    throw ChainFault(rule: "descriptor \(position): DMA to unmapped address 0x\(hex(address)) (indirect table, \(length) bytes) outside device memory \(memoryRange)")
                }
                for i in 0..<(Int(length) / PackedQueueLayout.descriptorSize) {
                    let e = UnsafeRawPointer(table) + PackedQueueLayout.descriptor(i)
                    let entryFlags = Ring.load16(e + PackedQueueLayout.descriptorFlags)
                    guard entryFlags & ~PackedQueueLayout.flagWrite == 0 else {
                        throw ChainFault(rule: "indirect descriptor \(i) (buffer at descriptor \(position)) has flags 0x\(String(entryFlags, radix: 16)): only WRITE is valid there (§2.8.19)")
                    }
                    try add(Ring.load64(e + PackedQueueLayout.descriptorAddress), Ring.load32(e + PackedQueueLayout.descriptorLength),
                            writable: entryFlags & PackedQueueLayout.flagWrite != 0, "indirect descriptor \(i) (buffer at descriptor \(position))")
                }
                q.chainID = id
                break
            }
            try add(address, length, writable: flags & PackedQueueLayout.flagWrite != 0, "descriptor \(position)")
            if flags & PackedQueueLayout.flagNext == 0 {
                q.chainID = id  // §2.8.6: the buffer ID is in the last descriptor
                break
            }
            PackedQueueDevice.advance(&position, &wrap, by: 1, size: q.size)
            guard ringDescriptors < Int(q.size) else {
                throw ChainFault(rule: "buffer at descriptor \(start) has more than \(q.size) descriptors, the queue size (§2.8.17)")
            }
            // §2.8.6: every descriptor of a list carries the AVAIL/USED bits of its lap.
            flags = Ring.load16(q.descriptor(position) + PackedQueueLayout.descriptorFlags)
            guard PackedQueueDevice.isAvailable(flags, wrap: wrap) else {
                throw ChainFault(rule: "descriptor \(position) continues the list at \(start) (NEXT) but is not available in this lap: flags 0x\(String(flags, radix: 16)) (§2.8.6, §2.8.17)")
            }
        }
        q.chainDescriptors = ringDescriptors
    }
}
