import CFuzzShim
import FuzzSupport
import Virtio

/// Fuzz target: the driver side of a packed virtqueue (`PackedQueue`, spec 2.8) with the fuzz
/// input playing the device. The queue lives on plain memory laid out exactly as
/// `PackedQueueMemory` carves it, with every byte between and after its parts poisoned for ASan
/// (and the tail of every indirect table past its entries), so a read or write outside a ring,
/// an event structure or a table is a report.
///
/// Input: 1 byte queue size (1...64, or one of 128, 255, 256, 1000, 1024, 4096, 32768, 3: a packed
/// queue need not be a power of two), 1 byte features (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC,
/// bits 2-4 indirect table entries), then operations, one byte each plus operands: the driver
/// adds (any shape, indirect when it fits), publishes, drains, arms/suppresses interrupts,
/// reclaims after a reset; the device takes available buffers in ring order, completes them
/// honestly (any order, any length up to the writable bytes, with or without WRITE), writes
/// arbitrary used descriptors (any position, id, length, flags: wrong wrap bits, AVAIL without
/// USED, duplicates, IDs never made available), moves its used position (skips, rewinds),
/// scribbles on any byte of the ring, event structures or indirect tables, sets its event
/// suppression structure; and a bulk op runs hundreds of honest round trips (many laps).
///
/// Asserts: no crash, no ASan report; every completion delivered is a token in flight and
/// published, at most once, with a length no larger than its writable bytes; after the queue is
/// broken nothing is delivered, add/drain throw the same error and the reason stays; while the
/// device is honest the queue never breaks, delivers exactly what the device completed in
/// used-ring order, and the buffers the device reads are exactly the segments added; `add` is
/// refused or full exactly when it should be; `publish` rings the doorbell exactly when §2.8.10
/// says; the driver event structure is what suppress/arm must write, arm and hasUsed agree with
/// the ring; free descriptors + descriptors of requests in flight == queue size, buffer IDs in
/// flight == requests in flight; `reclaimAll`/`cancelAll` hand back every request in flight once
/// and leave the queue as new.

let deviceBase: UInt64 = 0x4000_0000
let queueIndex: UInt16 = 5
let largeSizes = [128, 255, 256, 1000, 1024, 4096, 32768, 3]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let sizeByte = input.u8()
    let n = sizeByte < 0xC0 ? 1 + Int(sizeByte & 63) : largeSizes[Int(sizeByte & 7)]
    let featureByte = input.u8()
    var features: Features = []
    if featureByte & 1 != 0 { features.insert(.ringEventIdx) }
    if featureByte & 2 != 0 { features.insert(.ringIndirectDesc) }
    let indirectEntries = Int(featureByte >> 2 & 7)

    let rings = Rings(size: n, indirectEntries: indirectEntries)
    defer { rings.release() }
    let queue = PackedQueue(index: Int(queueIndex), memory: rings.memory, features: features,
                            doorbell: Doorbell(address: rings.bell, value: queueIndex))
    let model = Model(size: n, eventIndex: features.contains(.ringEventIdx),
                      indirect: features.contains(.ringIndirectDesc) && indirectEntries > 0,
                      indirectEntries: indirectEntries, rings: rings)
    model.run(queue, &input)
    return 0
}

/// The queue memory: one block, the arena's slices in it, everything else poisoned.
struct Rings {
    let block: UnsafeMutableRawPointer
    let blockSize: Int
    let memory: PackedQueueMemory
    let bell: UnsafeMutablePointer<UInt16>

    init(size n: Int, indirectEntries: Int) {
        // Each part plus room for its alignment padding (PackedQueueMemory.init's order).
        blockSize = PackedQueueLayout.ringSize(n) + 4096 + 2 * PackedQueueLayout.eventSize + 64
            + n * indirectEntries * PackedQueueLayout.descriptorSize + 4096
        block = .allocate(byteCount: blockSize, alignment: 4096)
        let arena = DMAArena(memory: DMASlice(pointer: block, deviceAddress: deviceBase, size: blockSize))
        do {
            memory = try PackedQueueMemory(arena: arena, size: UInt16(n), indirectEntries: indirectEntries)
        } catch {
            fatalError("fuzz harness: ring block too small: \(error)")
        }
        bell = .allocate(capacity: 1)
        bell.pointee = 0xFFFF
        // Addressable: the ring, both event structures, and each indirect table's entries.
        var parts: [(start: Int, size: Int)] = [
            (memory.descriptors.pointer - block, memory.descriptors.size),
            (memory.driverEvent.pointer - block, memory.driverEvent.size),
            (memory.deviceEvent.pointer - block, memory.deviceEvent.size),
        ]
        if let indirect = memory.indirect {
            for id in 0..<n {
                parts.append((indirect.pointer - block + id * memory.indirectStride, indirectEntries * PackedQueueLayout.descriptorSize))
            }
        }
        var at = 0
        for p in parts.sorted(by: { $0.start < $1.start }) {
            if p.start > at { CFuzzShim_poison(block + at, p.start - at) }
            at = max(at, p.start + p.size)
        }
        if blockSize > at { CFuzzShim_poison(block + at, blockSize - at) }
    }

    func release() {
        CFuzzShim_unpoison(block, blockSize)
        block.deallocate()
        bell.deallocate()
    }

    func pointer(_ deviceAddress: UInt64) -> UnsafeMutableRawPointer { block + Int(deviceAddress - deviceBase) }
    var ring: UnsafeMutableRawPointer { memory.descriptors.pointer }
    var n: Int { Int(memory.size) }

    func load16(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt16 { UInt16(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
    func load32(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt32 { UInt32(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    func load64(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    func store16(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt16) { p.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt16.self) }
    func store32(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt32) { p.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt32.self) }

    struct Descriptor { var address: UInt64; var length: UInt32; var id: UInt16; var flags: UInt16 }
    func descriptor(_ table: UnsafeMutableRawPointer, _ i: Int) -> Descriptor {
        let d = PackedQueueLayout.descriptor(i)
        return Descriptor(address: load64(table, d + PackedQueueLayout.descriptorAddress),
                          length: load32(table, d + PackedQueueLayout.descriptorLength),
                          id: load16(table, d + PackedQueueLayout.descriptorID),
                          flags: load16(table, d + PackedQueueLayout.descriptorFlags))
    }
    /// The device writes a used descriptor at ring position `slot` (§2.8.6: id, len, flags).
    func writeUsed(slot: Int, id: UInt16, length: UInt32, flags: UInt16) {
        let d = PackedQueueLayout.descriptor(slot)
        store16(ring, d + PackedQueueLayout.descriptorID, id)
        store32(ring, d + PackedQueueLayout.descriptorLength, length)
        store16(ring, d + PackedQueueLayout.descriptorFlags, flags)
    }
    func flags(at slot: Int) -> UInt16 { load16(ring, PackedQueueLayout.descriptor(slot) + PackedQueueLayout.descriptorFlags) }

    // The event suppression structures (§2.8.14).
    var driverEventDesc: UInt16 { load16(memory.driverEvent.pointer, PackedQueueLayout.eventDescriptor) }
    var driverEventFlags: UInt16 { load16(memory.driverEvent.pointer, PackedQueueLayout.eventFlags) }
    var deviceEventDesc: UInt16 { load16(memory.deviceEvent.pointer, PackedQueueLayout.eventDescriptor) }
    var deviceEventFlags: UInt16 { load16(memory.deviceEvent.pointer, PackedQueueLayout.eventFlags) }
    func setDeviceEvent(desc: UInt16) { store16(memory.deviceEvent.pointer, PackedQueueLayout.eventDescriptor, desc) }
    func setDeviceEvent(flags: UInt16) { store16(memory.deviceEvent.pointer, PackedQueueLayout.eventFlags, flags) }
}

/// One request as the driver added it.
struct Request {
    var segments: [BufferSegment]
    /// Ring descriptors it takes (1 when indirect).
    var needed: Int
    var indirect: Bool
    /// Sum of the writable segments, without wrapping.
    var writable: UInt64
    var published = false
}

/// A buffer the device took: the ID it read, the ring descriptors it spans, the model's token.
struct Taken {
    var id: UInt16
    var count: Int
    var token: UInt64
}

/// A position in the ring with its wrap counter (§2.8.1), advanced as both sides advance theirs.
struct RingPosition: Equatable {
    var index = 0
    var wrap = true
    mutating func advance(_ k: Int, size n: Int) {
        index += k
        while index >= n { index -= n; wrap.toggle() }
    }
    mutating func retreat(_ k: Int, size n: Int) {
        index -= k
        while index < 0 { index += n; wrap.toggle() }
    }
}

final class Model {
    let n: Int
    let eventIndex: Bool
    let indirect: Bool
    let indirectEntries: Int
    let rings: Rings

    // Driver side, as the model expects it.
    var inFlight: [UInt64: Request] = [:]
    var addOrder: [UInt64] = []         // tokens in ring order since the last reset
    var added = 0, published = 0        // adds accepted / made visible since the last reset
    var pendingDescriptors = 0          // ring descriptors added since the last publish
    var driverAvail = RingPosition()    // where the driver makes the next descriptor available
    var driverUsed = RingPosition()     // where the driver expects the next used descriptor
    var nextToken: UInt64 = 1
    var everBroken = false
    var brokenError: VirtioError?

    // Device side.
    var honest = true                   // false once the input wrote anything a device must not
    var deviceSeen = 0                  // buffers the device took
    var deviceAvail = RingPosition()    // the device's next descriptor to read
    var deviceUsed = RingPosition()     // the device's next used position
    var taken: [Taken] = []
    var honestCompletions: [(token: UInt64, length: UInt32)] = []

    init(size: Int, eventIndex: Bool, indirect: Bool, indirectEntries: Int, rings: Rings) {
        n = size; self.eventIndex = eventIndex; self.indirect = indirect
        self.indirectEntries = indirectEntries; self.rings = rings
    }

    func run(_ q: consuming PackedQueue, _ input: inout FuzzInput) {
        var operations = 0
        while !input.isEmpty && operations < 4096 {
            operations += 1
            let op = input.u8() % 14
            trace("op \(op) [in flight \(inFlight.count), free \(q.freeCount), added \(added), published \(published), taken \(taken.count), device used \(deviceUsed.index)/\(deviceUsed.wrap ? 1 : 0), driver used \(driverUsed.index)/\(driverUsed.wrap ? 1 : 0), honest \(honest), broken \(q.brokenReason.map { "\($0)" } ?? "no")]")
            switch op {
            case 0, 1: add(&q, &input)
            case 2: publish(&q)
            case 3: deviceTake()
            case 4: deviceComplete(&input)
            case 5:
                let limit = Int(input.u8() % 17)
                drain(&q, limit: limit == 0 ? .max : limit)
            case 6: hostileUsed(&input)
            case 7: hostileUsedPosition(&input)
            case 8: scribble(&input)
            case 9: deviceEvent(&input)
            case 10: interrupts(&q, &input)
            case 11: if input.u8() % 4 == 0 { reclaimAll(&q) }
            case 12: bulk(&q, rounds: Int(input.u8()))
            default:
                // A short honest burst: take everything published, complete it all, drain.
                var takes = 0
                while takes <= n, deviceTakeOne() { takes += 1 }
                let seed = input.u32()
                var k = 0
                while !taken.isEmpty { completeTaken(Int(seed >> (k & 31)) % taken.count, lengthSeed: seed &* 2654435761 &+ UInt32(k), write: true); k += 1 }
                drain(&q, limit: .max)
            }
            checkCounts(q)
        }
        // The end of a device's life: reset, and every request in flight comes back once.
        let expected = Set(inFlight.keys)
        var cancelled: [UInt64] = []
        q.cancelAll { cancelled.append($0) }
        require(cancelled.count == expected.count && Set(cancelled) == expected,
                "cancelAll handed back \(cancelled.count) tokens, \(expected.count) were in flight")
    }

    func checkCounts(_ q: borrowing PackedQueue) {
        require(q.inFlight == inFlight.count, "queue has \(q.inFlight) in flight, the model \(inFlight.count)")
        let held = inFlight.values.reduce(0) { $0 + $1.needed }
        require(q.freeCount + held == n, "free \(q.freeCount) + held \(held) != queue size \(n)")
        require((q.brokenReason != nil) == everBroken, "queue broken: \(q.brokenReason != nil), the model expects \(everBroken)")
        if let brokenError { require(q.brokenReason == brokenError, "the broken reason changed from \(brokenError) to \(String(describing: q.brokenReason))") }
        require(q.isIdle == (inFlight.isEmpty && !everBroken), "isIdle is \(q.isIdle)")
    }

    // MARK: driver operations

    func add(_ q: inout PackedQueue, _ input: inout FuzzInput) {
        let shape = input.u8()
        let count = Int(shape & 15)
        let anyOrder = shape & 0x80 != 0
        let readableCount = count == 0 ? 0 : Int(input.u8()) % (count + 1)
        var segments: [BufferSegment] = []
        for i in 0..<count {
            let writable = anyOrder ? input.bool() : i >= readableCount
            let length: UInt32
            switch input.u8() & 3 {
            case 0: length = UInt32(input.u8())
            case 1: length = UInt32(input.u16())
            case 2: length = input.u32()
            default: length = 0xFFFF_FFFF - UInt32(input.u8())
            }
            segments.append(BufferSegment(address: nextToken << 20 | UInt64(i) << 12, length: length, deviceWritable: writable))
        }
        addSegments(&q, segments)
    }

    func addSegments(_ q: inout PackedQueue, _ segments: [BufferSegment]) {
        let token = nextToken
        nextToken += 1
        let count = segments.count
        let misordered = segments.indices.contains { i in segments[i].deviceWritable && segments[(i + 1)...].contains { !$0.deviceWritable } }
        let goesIndirect = indirect && count > 1 && count <= indirectEntries
        let needed = goesIndirect ? 1 : count
        let freeBefore = q.freeCount, inFlightBefore = q.inFlight
        let brokenBefore = q.brokenReason
        let outcome = segments.withUnsafeBufferPointer { buffer -> Result<Bool, VirtioError> in
            do throws(VirtioError) { return .success(try q.add(buffer, token: token)) } catch { return .failure(error) }
        }
        let result: Bool
        switch outcome {
        case .success(let r): result = r
        case .failure(let error):
            if let brokenBefore {
                require(error == brokenBefore, "add on a broken queue threw \(error), not \(brokenBefore)")
            } else {
                require(count == 0 || misordered || needed > n, "add refused a valid request: \(error)")
                guard case .queueSetup = error else { require(false, "add threw \(error) for a bad request"); return }
            }
            require(q.freeCount == freeBefore && q.inFlight == inFlightBefore, "a refused add changed the queue")
            return
        }
        require(brokenBefore == nil, "add succeeded on a broken queue")
        require(count > 0 && !misordered && needed <= n, "add accepted a request of \(count) buffers (misordered: \(misordered))")
        guard result else {
            require(needed > freeBefore || inFlightBefore == n, "add said full with \(freeBefore) free for \(needed) descriptors")
            require(q.freeCount == freeBefore && q.inFlight == inFlightBefore, "a full add changed the queue")
            return
        }
        require(needed <= freeBefore, "add accepted \(needed) descriptors with \(freeBefore) free")
        let writable = segments.reduce(UInt64(0)) { $0 + ($1.deviceWritable ? UInt64($1.length) : 0) }
        inFlight[token] = Request(segments: segments, needed: needed, indirect: goesIndirect, writable: writable)
        addOrder.append(token)
        added += 1
        pendingDescriptors += needed
        driverAvail.advance(needed, size: n)
    }

    func publish(_ q: inout PackedQueue) {
        var expectNotify: Bool? = false
        if pendingDescriptors > 0 {
            // §2.8.10: DISABLE suppresses; DESC (with EVENT_IDX) asks for a notification when the
            // descriptor at `desc`'s offset is made available in `desc`'s lap; anything else notifies.
            let flags = rings.deviceEventFlags & 3
            if flags == PackedQueueLayout.eventDescriptorSpecific && eventIndex {
                let desc = rings.deviceEventDesc
                let offset = Int(desc & 0x7FFF), wrap = desc & PackedQueueLayout.eventWrapBit != 0
                if offset >= n {
                    expectNotify = nil  // no such descriptor: either answer will do
                } else {
                    var p = driverAvail
                    p.retreat(pendingDescriptors, size: n)  // back to the batch's first
                    var hit = false
                    for _ in 0..<pendingDescriptors {
                        if p.index == offset && p.wrap == wrap { hit = true }
                        p.advance(1, size: n)
                    }
                    expectNotify = hit
                }
            } else {
                expectNotify = flags != PackedQueueLayout.eventDisable
            }
        }
        rings.bell.pointee = 0xFFFF
        let rang = q.publish()
        if let expectNotify {
            require(rang == expectNotify, "publish rang: \(rang), §2.8.10 says \(expectNotify) (pending \(pendingDescriptors), device event \(rings.deviceEventDesc)/\(rings.deviceEventFlags))")
        }
        require(rang ? rings.bell.pointee == queueIndex : rings.bell.pointee == 0xFFFF, "doorbell does not match publish's answer")
        if pendingDescriptors > 0 {
            for t in addOrder[published...] { inFlight[t]?.published = true }
            published = added
            pendingDescriptors = 0
        }
    }

    func drain(_ q: inout PackedQueue, limit: Int) {
        let brokenBefore = q.brokenReason
        let pendingHonest = honestCompletions.count
        var got: [(token: UInt64, length: UInt32)] = []
        var delivered = Set<UInt64>()
        do {
            let count = try q.drainUsed(limit: limit) { token, length in
                // Checked here as well as below, so that a queue delivering one token over and
                // over is a finding at once, not a timeout.
                require(inFlight[token] != nil && delivered.insert(token).inserted,
                        "completion for token \(token), which is not in flight (never added, or delivered before)")
                require(got.count < limit, "drain delivered past its limit \(limit)")
                got.append((token, length))
            }
            require(brokenBefore == nil, "drain succeeded on a broken queue")
            require(count == got.count, "drain returned \(count) but delivered \(got.count)")
            if honest {
                require(count == min(limit, pendingHonest), "drain delivered \(count) of \(pendingHonest) completions (limit \(limit))")
            }
        } catch {
            require(q.brokenReason == error, "drain threw \(error) but the queue says \(String(describing: q.brokenReason))")
            guard case .brokenQueue(_, let why) = error else { require(false, "drain threw \(error)"); return }
            require(!why.isEmpty, "broken without a reason")
            if let brokenBefore {
                require(got.isEmpty && error == brokenBefore, "a broken queue delivered \(got.count) completions")
            } else {
                require(!honest, "the queue broke although the device was honest: \(error)")
                everBroken = true
                brokenError = error
            }
            trace("broken: \(error)")
        }
        require(got.count <= limit, "drain delivered \(got.count) past its limit \(limit)")
        trace("drain(limit \(limit)) delivered \(got.map { "(\($0.token), \($0.length))" })")
        for (token, length) in got {
            guard let request = inFlight.removeValue(forKey: token) else {
                require(false, "completion for token \(token), which is not in flight (never added, or delivered before)")
                return
            }
            require(request.published, "completion for token \(token), which was added but not yet published")
            require(UInt64(length) <= request.writable, "completion of \(length) bytes for a request with \(request.writable) writable")
            driverUsed.advance(request.needed, size: n)
            if honest {
                let expected = honestCompletions.removeFirst()
                require(expected.token == token && expected.length == length,
                        "delivered (\(token), \(length)), the device completed (\(expected.token), \(expected.length)) next")
            }
        }
    }

    func interrupts(_ q: inout PackedQueue, _ input: inout FuzzInput) {
        // Something for drainUsed to look at: the next position used in this lap, or, while
        // buffers are published, flags there that are neither available nor used in this lap.
        let state = rings.flags(at: driverUsed.index) & (PackedQueueLayout.flagAvail | PackedQueueLayout.flagUsed)
        let publishedHeld = inFlight.values.reduce(0) { $0 + ($1.published ? $1.needed : 0) }
        let expectUsed = state == PackedQueueLayout.usedFlags(wrap: driverUsed.wrap)
            || (state != PackedQueueLayout.availableFlags(wrap: driverUsed.wrap) && publishedHeld > 0)
        switch input.u8() % 3 {
        case 0:
            q.suppressInterrupts()
            require(rings.driverEventFlags == PackedQueueLayout.eventDisable, "driver event flags after suppress are \(rings.driverEventFlags)")
        case 1:
            let armed = q.armInterrupts()
            if eventIndex {
                require(rings.driverEventFlags == PackedQueueLayout.eventDescriptorSpecific, "driver event flags after arm are \(rings.driverEventFlags)")
                let desc = PackedQueueLayout.eventOffsetWrap(UInt16(driverUsed.index), wrap: driverUsed.wrap)
                require(rings.driverEventDesc == desc, "driver event desc after arm is \(rings.driverEventDesc), next used \(desc)")
            } else {
                require(rings.driverEventFlags == PackedQueueLayout.eventEnable, "driver event flags after arm are \(rings.driverEventFlags)")
            }
            require(armed == !expectUsed, "armInterrupts said \(armed) with flags \(rings.flags(at: driverUsed.index)) at the next used \(driverUsed)")
        default:
            require(q.hasUsed() == expectUsed, "hasUsed disagrees with flags \(rings.flags(at: driverUsed.index)) at the next used \(driverUsed)")
        }
    }

    func reclaimAll(_ q: inout PackedQueue) {
        let expected = Set(inFlight.keys)
        var cancelled: [UInt64] = []
        q.reclaimAll { cancelled.append($0) }
        require(cancelled.count == expected.count && Set(cancelled) == expected,
                "reclaimAll handed back \(cancelled.count) tokens, \(expected.count) were in flight")
        require(q.freeCount == n && q.inFlight == 0 && q.brokenReason == nil && q.isIdle, "reclaimAll left the queue not as new")
        for i in 0..<n { require(rings.flags(at: i) == 0, "descriptor \(i) has flags \(rings.flags(at: i)) after reclaimAll") }
        inFlight = [:]; addOrder = []; added = 0; published = 0; pendingDescriptors = 0
        driverAvail = RingPosition(); driverUsed = RingPosition(); everBroken = false; brokenError = nil
        honest = true; deviceSeen = 0; deviceAvail = RingPosition(); deviceUsed = RingPosition(); taken = []; honestCompletions = []
    }

    /// Hundreds of honest round trips, many laps of a small ring: one writable buffer added,
    /// published, taken, completed and drained per round, checked on a short path (only from a
    /// quiet queue with an honest device: nothing added, taken or pending).
    func bulk(_ q: inout PackedQueue, rounds: Int) {
        guard honest, q.brokenReason == nil, inFlight.isEmpty, added == published, deviceSeen == published else { return }
        for round in 0..<rounds {
            let token = nextToken
            nextToken += 1
            let segment = BufferSegment(address: token << 20, length: UInt32(truncatingIfNeeded: round & 0xFFF) + 1, deviceWritable: true)
            let outcome = withUnsafePointer(to: segment) { p -> Result<Bool, VirtioError> in
                do throws(VirtioError) { return .success(try q.add(UnsafeBufferPointer(start: p, count: 1), token: token)) }
                catch { return .failure(error) }
            }
            guard case .success(let accepted) = outcome else {
                require(false, "add failed in an honest round trip: \(outcome)"); return
            }
            require(accepted, "a one-buffer add into an empty queue of \(n) returned false")
            inFlight[token] = Request(segments: [segment], needed: 1, indirect: false, writable: UInt64(segment.length))
            addOrder.append(token)
            added += 1
            pendingDescriptors = 1
            driverAvail.advance(1, size: n)
            publish(&q)
            require(deviceTakeOne(), "round \(round): the device found nothing available")
            completeTaken(0, lengthSeed: UInt32(truncatingIfNeeded: round), write: true)
            drain(&q, limit: .max)
            require(inFlight.isEmpty, "round \(round): still in flight")
        }
    }

    // MARK: device operations

    /// The flags at `p` say the driver made it available in `p`'s lap (§2.8.1).
    func isAvailable(_ p: RingPosition) -> Bool {
        rings.flags(at: p.index) & (PackedQueueLayout.flagAvail | PackedQueueLayout.flagUsed) == PackedQueueLayout.availableFlags(wrap: p.wrap)
    }

    func deviceTake() { _ = deviceTakeOne() }

    /// The device reads the next available buffer (§2.8.5, §2.8.6, §2.8.8) and, while honest,
    /// checks it against what was added; returns false if nothing is available.
    func deviceTakeOne() -> Bool {
        guard isAvailable(deviceAvail) else {
            if honest { require(deviceSeen == published, "nothing available at \(deviceAvail) with \(published - deviceSeen) published not taken") }
            return false
        }
        let token = deviceSeen < addOrder.count ? addOrder[deviceSeen] : 0
        if honest { require(deviceSeen < published, "a descriptor available at \(deviceAvail) past the \(published) published buffers") }
        var chain: [Rings.Descriptor] = []
        var p = deviceAvail
        while true {
            let d = rings.descriptor(rings.ring, p.index)
            chain.append(d)
            p.advance(1, size: n)
            if d.flags & PackedQueueLayout.flagNext == 0 || chain.count >= n { break }
            if !isAvailable(p) { require(!honest, "chain at \(deviceAvail) continues into \(p), which is not available"); break }
        }
        let id = chain.last!.id
        deviceAvail = p
        deviceSeen += 1
        taken.append(Taken(id: id, count: chain.count, token: token))
        guard honest else { return true }
        guard let request = inFlight[token] else {
            require(false, "the device took token \(token), which is no longer in flight, from an honest ring")
            return true
        }
        require(chain.count == request.needed, "buffer at \(deviceAvail) spans \(chain.count) descriptors, the driver added \(request.needed)")
        require(Int(id) < n, "buffer ID \(id) is not below the queue size \(n)")
        require(!taken.dropLast().contains { $0.id == id }, "buffer ID \(id) is already taken by the device")
        if request.indirect {
            let d = chain[0]
            require(d.flags & ~(PackedQueueLayout.flagAvail | PackedQueueLayout.flagUsed) == PackedQueueLayout.flagIndirect
                    && Int(d.length) == PackedQueueLayout.descriptorSize * request.segments.count,
                    "indirect descriptor: flags \(d.flags), length \(d.length) for \(request.segments.count) segments")
            guard let tables = rings.memory.indirect else { require(false, "indirect request without tables"); return true }
            require(d.address >= tables.deviceAddress && d.address - tables.deviceAddress + UInt64(d.length) <= UInt64(tables.size),
                    "indirect table at 0x\(String(d.address, radix: 16)) is outside the indirect tables")
            let entries = rings.pointer(d.address)
            for (i, s) in request.segments.enumerated() {
                let e = rings.descriptor(entries, i)
                require(e.address == s.address && e.length == s.length && e.flags == (s.deviceWritable ? PackedQueueLayout.flagWrite : 0),
                        "indirect entry \(i): (0x\(String(e.address, radix: 16)), \(e.length), flags \(e.flags)) for \(s)")
            }
        } else {
            for (i, (d, s)) in zip(chain, request.segments).enumerated() {
                let flags = (s.deviceWritable ? PackedQueueLayout.flagWrite : 0) | (i + 1 < chain.count ? PackedQueueLayout.flagNext : 0)
                require(d.address == s.address && d.length == s.length && d.flags & 0x7F == flags,
                        "descriptor \(i): (0x\(String(d.address, radix: 16)), \(d.length), flags \(d.flags)) but the driver added \(s)")
            }
        }
        return true
    }

    func deviceComplete(_ input: inout FuzzInput) {
        let pick = Int(input.u8()), lengthSeed = input.u32()  // operands read even when unused
        guard !taken.isEmpty else { return }
        completeTaken(pick % taken.count, lengthSeed: lengthSeed, write: pick & 0x80 == 0)
    }

    /// Completes a taken buffer at the device's used position with a length no larger than its
    /// writable bytes (§2.8.6, §2.8.3), and skips its descriptors (§2.8.4).
    func completeTaken(_ k: Int, lengthSeed: UInt32, write: Bool) {
        let t = taken.remove(at: k)
        var length = lengthSeed
        var writeFlag = write
        if let request = inFlight[t.token] {
            let limit = min(request.writable, UInt64(UInt32.max))
            length = UInt32(UInt64(lengthSeed) % (limit + 1))
            if request.writable > 0 { writeFlag = true }
        }
        if !writeFlag { length = 0 }
        rings.writeUsed(slot: deviceUsed.index, id: t.id, length: lengthSeed,
                        flags: PackedQueueLayout.usedFlags(wrap: deviceUsed.wrap) | (writeFlag ? PackedQueueLayout.flagWrite : 0))
        if writeFlag { rings.store32(rings.ring, PackedQueueLayout.descriptor(deviceUsed.index) + PackedQueueLayout.descriptorLength, length) }
        deviceUsed.advance(t.count, size: n)
        if honest { honestCompletions.append((t.token, length)) }
    }

    /// A used descriptor no honest device writes, at or near the device's used position.
    func hostileUsed(_ input: inout FuzzInput) {
        let how = input.u8()
        var slot = deviceUsed.index
        if how & 1 != 0 { slot = (slot + Int(input.u8())) % n }
        let id: UInt16
        switch how >> 1 & 3 {
        case 0: id = taken.isEmpty ? UInt16(input.u8()) : taken[Int(input.u8()) % taken.count].id
        case 1: id = UInt16(input.u8()) % UInt16(n + 2)
        case 2: id = input.u16()
        default: id = UInt16(truncatingIfNeeded: n - 1 + Int(input.u8() & 3))
        }
        let length = input.bool() ? input.u32() : UInt32(input.u8())
        var flags: UInt16
        switch how >> 3 & 3 {
        case 0: flags = PackedQueueLayout.usedFlags(wrap: deviceUsed.wrap)
        case 1: flags = PackedQueueLayout.usedFlags(wrap: !deviceUsed.wrap)
        case 2: flags = PackedQueueLayout.availableFlags(wrap: input.bool())
        default: flags = input.u16()
        }
        if how & 0x20 != 0 { flags |= PackedQueueLayout.flagWrite }
        trace("hostile used descriptor: slot \(slot), id \(id), length \(length), flags 0x\(String(flags, radix: 16))")
        rings.writeUsed(slot: slot, id: id, length: length, flags: flags)
        if how & 0x40 != 0 { deviceUsed.advance(1 + Int(input.u8() % 4), size: n) }
        honest = false
    }

    /// The device's used position moves without a completion (skips, or rewinds a lap).
    func hostileUsedPosition(_ input: inout FuzzInput) {
        let k = Int(input.u8()) % (2 * n)
        deviceUsed.advance(k, size: n)
        if input.bool() { deviceUsed.wrap.toggle() }
        trace("hostile used position \(deviceUsed)")
        honest = false
    }

    /// Any byte of the ring, the event structures or an indirect table: the driver must never
    /// read back what it wrote.
    func scribble(_ input: inout FuzzInput) {
        var slices = [rings.memory.descriptors, rings.memory.driverEvent, rings.memory.deviceEvent]
        if let indirect = rings.memory.indirect {
            for id in 0..<min(n, 4) { slices.append(indirect.slice(id * rings.memory.indirectStride, indirectEntries * PackedQueueLayout.descriptorSize)) }
        }
        let s = slices[Int(input.u8()) % slices.count]
        let value = input.u8(), offset = Int(input.u16()) % s.size
        trace("scribble 0x\(String(value, radix: 16)) at offset \(offset) of a \(s.size)-byte area")
        s.pointer.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
        honest = false
    }

    /// What a device may legitimately write: its event suppression structure (§2.8.10, §2.8.14).
    func deviceEvent(_ input: inout FuzzInput) {
        let b = input.u8()
        switch b & 3 {
        case 0: rings.setDeviceEvent(flags: UInt16(b >> 2))
        case 1: rings.setDeviceEvent(desc: input.u16())
        case 2:
            // A descriptor-specific event at the driver's next available position, or near it.
            var p = driverAvail
            p.advance(Int(b >> 2) % n, size: n)
            rings.setDeviceEvent(desc: PackedQueueLayout.eventOffsetWrap(UInt16(p.index), wrap: p.wrap))
            rings.setDeviceEvent(flags: PackedQueueLayout.eventDescriptorSpecific)
        default:
            rings.setDeviceEvent(desc: input.u16())
            rings.setDeviceEvent(flags: input.u16())
        }
    }
}

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

/// Operation bytes, as `Model.run` decodes them.
enum Op {
    static let add: UInt8 = 0, publish: UInt8 = 2, take: UInt8 = 3, complete: UInt8 = 4, drain: UInt8 = 5
    static let hostileUsed: UInt8 = 6, hostilePosition: UInt8 = 7, scribble: UInt8 = 8, deviceEvent: UInt8 = 9
    static let interrupts: UInt8 = 10, reclaim: UInt8 = 11, bulk: UInt8 = 12, burst: UInt8 = 13
}

struct Script {
    var bytes: [UInt8]
    /// `size`: 1...64 directly; `features` as the input's second byte.
    init(size: Int, features: UInt8) { bytes = [UInt8(size - 1), features] }
    init(sizeByte: UInt8, features: UInt8) { bytes = [sizeByte, features] }
    /// A request of `readable` then `writable` segments of small lengths (length mode 0: one byte).
    mutating func add(readable: Int, writable: Int, length: UInt8 = 64) {
        let count = readable + writable
        bytes += [Op.add, UInt8(count), UInt8(readable)]
        for _ in 0..<count { bytes += [0, length] }
    }
    mutating func op(_ o: UInt8, _ operands: UInt8...) { bytes += [o] + operands }
    /// Completes the `pick`th taken buffer (bit 7 clear: with WRITE when it has writable bytes).
    mutating func complete(pick: UInt8 = 0, length: UInt32 = 0xFFFF_FFFF) {
        bytes += [Op.complete, pick] + (0..<4).map { UInt8(truncatingIfNeeded: length >> (8 * UInt32($0))) }
    }
    /// drain with no limit (first operand byte % 17 == 0).
    mutating func drainAll() { bytes += [Op.drain, 0] }
}

func seeds() -> [(name: String, bytes: [UInt8])] {
    var result: [(name: String, bytes: [UInt8])] = []
    // A virtio-blk-like round trip: header (readable), data (writable), status (writable),
    // completed out of order.
    var blk = Script(size: 16, features: 0)
    for _ in 0..<3 { blk.add(readable: 1, writable: 2) }
    blk.op(Op.publish)
    for _ in 0..<3 { blk.op(Op.take) }
    blk.complete(pick: 1); blk.complete(pick: 0); blk.complete(pick: 0)
    blk.drainAll()
    blk.op(Op.interrupts, 1)
    result.append(("blk-round-trip", blk.bytes))
    // EVENT_IDX and INDIRECT_DESC (4 entries per table), a descriptor-specific device event.
    var ev = Script(size: 16, features: 1 | 2 | 4 << 2)
    ev.op(Op.deviceEvent, 2 | 5 << 2)         // event at the driver's position + 5
    for _ in 0..<6 { ev.add(readable: 1, writable: 1) }
    ev.op(Op.publish)
    for _ in 0..<6 { ev.op(Op.take) }
    for _ in 0..<6 { ev.complete() }
    ev.op(Op.interrupts, 0); ev.drainAll(); ev.op(Op.interrupts, 1)
    result.append(("event-idx-indirect", ev.bytes))
    // A ring of 5 (not a power of two) wrapped several times by chains of 2 and 3.
    var odd = Script(size: 5, features: 0)
    for i in 0..<6 {
        odd.add(readable: 1, writable: 1 + i % 2); odd.op(Op.publish); odd.op(Op.take); odd.complete(); odd.drainAll()
    }
    odd.op(Op.interrupts, 2)
    result.append(("odd-size-laps", odd.bytes))
    // virtio-rng-like: writable buffers only, a full queue, refill after a partial drain.
    var rng = Script(size: 4, features: 0)
    for _ in 0..<5 { rng.add(readable: 0, writable: 1, length: 255) }
    rng.op(Op.publish)
    for _ in 0..<4 { rng.op(Op.take) }
    rng.complete(pick: 2, length: 100); rng.complete()
    rng.op(Op.drain, 1)                      // limit 1
    rng.add(readable: 0, writable: 1); rng.op(Op.publish); rng.drainAll()
    result.append(("rng-full-queue", rng.bytes))
    // Hostile devices: a duplicate completion (same ID at the next used position, right wrap).
    var dup = Script(size: 8, features: 0)
    dup.add(readable: 1, writable: 1); dup.add(readable: 0, writable: 1); dup.add(readable: 0, writable: 1); dup.op(Op.publish)
    dup.op(Op.take); dup.op(Op.take); dup.complete(); dup.drainAll()
    dup.op(Op.hostileUsed, 0x60 | 0 << 1, 0, 0, 0, 0)  // the second buffer's ID, right wrap; device moves on by 1
    dup.op(Op.hostileUsed, 0x20 | 1 << 1, 0, 0, 0)     // ID 0 again: completed before
    dup.drainAll()
    dup.add(readable: 0, writable: 1)
    result.append(("hostile-duplicate", dup.bytes))
    // A length past the writable bytes.
    var long = Script(size: 8, features: 0)
    long.add(readable: 1, writable: 1, length: 16); long.op(Op.publish); long.op(Op.take)
    long.op(Op.hostileUsed, 0x20 | 1 << 1, 0, 0, 17); long.drainAll()
    result.append(("hostile-length", long.bytes))
    // An ID out of range, then reset and an honest round trip.
    var range = Script(size: 8, features: 0)
    range.add(readable: 0, writable: 1); range.op(Op.publish)
    range.op(Op.hostileUsed, 0x20 | 3 << 1, 1, 0, 0); range.drainAll()
    range.op(Op.reclaim, 0); range.add(readable: 0, writable: 1); range.op(Op.publish); range.op(Op.take); range.complete(); range.drainAll()
    result.append(("hostile-id-then-reset", range.bytes))
    // Used before published: the ID of an added, unpublished buffer at the next used position.
    var early = Script(size: 8, features: 0)
    early.add(readable: 0, writable: 1); early.op(Op.publish); early.add(readable: 0, writable: 1)
    early.op(Op.hostileUsed, 0x20 | 1 << 1, 1, 0, 0); early.drainAll()
    result.append(("hostile-unpublished", early.bytes))
    // Wrong wrap bits at the next used position, and AVAIL without USED.
    var wrap = Script(size: 4, features: 1)
    wrap.add(readable: 0, writable: 1); wrap.op(Op.publish); wrap.op(Op.take)
    wrap.op(Op.hostileUsed, 0x20 | 1 << 1 | 1 << 3, 0, 0, 0); wrap.drainAll(); wrap.op(Op.interrupts, 1)
    result.append(("hostile-wrong-wrap", wrap.bytes))
    // The device scribbling on the ring and the indirect tables.
    var scribble = Script(size: 8, features: 2 | 2 << 2)
    scribble.add(readable: 1, writable: 1); scribble.op(Op.publish)
    scribble.op(Op.scribble, 0, 0xFF, 15, 0); scribble.op(Op.scribble, 3, 0x07, 8, 0)
    scribble.op(Op.take); scribble.complete(); scribble.drainAll()
    result.append(("scribble", scribble.bytes))
    // Many laps: 255 honest round trips on a ring of 1, then bursts on a ring of 3 and 32768.
    result.append(("laps-size-1", [0, 0, Op.bulk, 0xFF, Op.interrupts, 1, Op.interrupts, 2]))
    var burst = Script(sizeByte: 0xC7, features: 1)
    for _ in 0..<2 { burst.add(readable: 1, writable: 1) }
    burst.op(Op.publish); burst.op(Op.burst, 1, 2, 3, 4); burst.op(Op.bulk, 7)
    result.append(("burst-size-3", burst.bytes))
    var large = Script(sizeByte: 0xC6, features: 1 | 2 | 7 << 2)
    for _ in 0..<8 { large.add(readable: 2, writable: 3) }
    large.op(Op.publish); large.op(Op.burst, 9, 9, 9, 9); large.op(Op.interrupts, 1)
    result.append(("size-32768-indirect", large.bytes))
    return result
}
