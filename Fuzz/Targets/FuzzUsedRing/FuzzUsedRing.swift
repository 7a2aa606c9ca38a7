import CFuzzShim
import FuzzSupport
import Virtio

/// Fuzz target: the driver side of a split virtqueue (`SplitQueue`, spec 2.7) with the fuzz input
/// playing the device. The queue lives on plain memory, the rings packed exactly as
/// `SplitQueueMemory` lays them out, with every byte between and after them poisoned for ASan,
/// so a read or write outside a ring is a report.
///
/// Input: 1 byte queue size (2^(b mod 9): 1...256), 1 byte features (bit 0 EVENT_IDX, bit 1
/// INDIRECT_DESC, bits 2-4 indirect table entries), then operations, one byte each plus operands:
/// the driver adds, publishes, drains, arms/suppresses interrupts, reclaims after a reset; the
/// device takes published chains, completes them honestly (any order, any length up to the
/// writable bytes), writes arbitrary used elements and used indices, scribbles on the rings,
/// sets used flags and avail_event; and a bulk op runs thousands of honest round trips so the
/// 16-bit indices wrap.
///
/// Asserts: no crash, no ASan report; every completion delivered is a token in flight, at most
/// once, with a length no larger than its writable bytes; after the queue is broken nothing is
/// delivered and add/drain throw the same error; while the device is honest the queue never
/// breaks, delivers exactly what the device completed in used-ring order, and the chains the
/// device reads are exactly the segments added (no descriptor shared by two chains in flight);
/// `add` returns false or throws exactly when the queue is full, the request too large, empty or
/// misordered; `publish` rings the doorbell exactly when spec 2.7.10 says; free and in-flight
/// counts always add up; `reclaimAll`/`cancelAll` hand back every request in flight exactly once.

let deviceBase: UInt64 = 0x4000_0000
let queueIndex: UInt16 = 3

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let n = 1 << Int(input.u8() % 9)
    let featureByte = input.u8()
    var features: Features = []
    if featureByte & 1 != 0 { features.insert(.ringEventIdx) }
    if featureByte & 2 != 0 { features.insert(.ringIndirectDesc) }
    let indirectEntries = Int(featureByte >> 2 & 7)

    let rings = Rings(size: n, indirectEntries: indirectEntries)
    defer { rings.release() }
    let queue = SplitQueue(index: Int(queueIndex), memory: rings.memory, features: features,
                           doorbell: Doorbell(address: rings.bell, value: queueIndex))
    let model = Model(size: n, eventIndex: features.contains(.ringEventIdx),
                      indirect: features.contains(.ringIndirectDesc) && indirectEntries > 0,
                      indirectEntries: indirectEntries, rings: rings)
    model.run(queue, &input)
    return 0
}

/// The ring memory: one block, the arena's slices in it, everything else poisoned.
struct Rings {
    let block: UnsafeMutableRawPointer
    let blockSize: Int
    let memory: SplitQueueMemory
    let bell: UnsafeMutablePointer<UInt16>

    init(size n: Int, indirectEntries: Int) {
        // Each part plus room for its alignment padding (SplitQueueMemory.init's order).
        blockSize = SplitQueueLayout.descriptorTableSize(n) + 64 + SplitQueueLayout.availSize(n) + 4096
            + SplitQueueLayout.usedSize(n) + 4096 + SplitQueueLayout.descriptorTableSize(n * indirectEntries) + 4096
        block = .allocate(byteCount: blockSize, alignment: 4096)
        let arena = DMAArena(memory: DMASlice(pointer: block, deviceAddress: deviceBase, size: blockSize))
        do {
            memory = try SplitQueueMemory(arena: arena, size: UInt16(n), indirectEntries: indirectEntries)
        } catch {
            fatalError("fuzz harness: ring block too small: \(error)")
        }
        bell = .allocate(capacity: 1)
        bell.pointee = 0xFFFF
        var slices = [memory.descriptors, memory.avail, memory.used]
        if let indirect = memory.indirect { slices.append(indirect) }
        var at = 0
        for s in slices.sorted(by: { $0.pointer < $1.pointer }) {
            let start = s.pointer - block
            if start > at { CFuzzShim_poison(block + at, start - at) }
            at = start + s.size
        }
        if blockSize > at { CFuzzShim_poison(block + at, blockSize - at) }
    }

    func release() {
        CFuzzShim_unpoison(block, blockSize)
        block.deallocate()
        bell.deallocate()
    }

    func pointer(_ deviceAddress: UInt64) -> UnsafeMutableRawPointer { block + Int(deviceAddress - deviceBase) }
    var avail: UnsafeMutableRawPointer { memory.avail.pointer }
    var used: UnsafeMutableRawPointer { memory.used.pointer }
    var n: Int { Int(memory.size) }

    func load16(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt16 { UInt16(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt16.self)) }
    func load32(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt32 { UInt32(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    func load64(_ p: UnsafeMutableRawPointer, _ offset: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    func store16(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt16) { p.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt16.self) }
    func store32(_ p: UnsafeMutableRawPointer, _ offset: Int, _ v: UInt32) { p.storeBytes(of: v.littleEndian, toByteOffset: offset, as: UInt32.self) }

    // Device-side views of the rings (§2.7.5, §2.7.6, §2.7.8).
    var availIdx: UInt16 { load16(avail, SplitQueueLayout.availIndex) }
    func availEntry(_ position: Int) -> UInt16 { load16(avail, SplitQueueLayout.availRing(position & (n - 1))) }
    var availFlags: UInt16 { load16(avail, SplitQueueLayout.availFlags) }
    var usedEvent: UInt16 { load16(avail, SplitQueueLayout.usedEvent(n)) }
    var usedIdx: UInt16 { load16(used, SplitQueueLayout.usedIndex) }
    func setUsedIdx(_ v: UInt16) { store16(used, SplitQueueLayout.usedIndex, v) }
    var usedFlags: UInt16 { load16(used, SplitQueueLayout.usedFlags) }
    func setUsedFlags(_ v: UInt16) { store16(used, SplitQueueLayout.usedFlags, v) }
    var availEvent: UInt16 { load16(used, SplitQueueLayout.availEvent(n)) }
    func setAvailEvent(_ v: UInt16) { store16(used, SplitQueueLayout.availEvent(n), v) }
    func writeUsed(slot: Int, id: UInt32, length: UInt32) {
        let element = SplitQueueLayout.usedElement(slot & (n - 1))
        store32(used, element + SplitQueueLayout.usedElementID, id)
        store32(used, element + SplitQueueLayout.usedElementLength, length)
    }

    struct Descriptor { var address: UInt64; var length: UInt32; var flags: UInt16; var next: UInt16 }
    func descriptor(_ table: UnsafeMutableRawPointer, _ i: Int) -> Descriptor {
        let d = SplitQueueLayout.descriptor(i)
        return Descriptor(address: load64(table, d + SplitQueueLayout.descriptorAddress),
                          length: load32(table, d + SplitQueueLayout.descriptorLength),
                          flags: load16(table, d + SplitQueueLayout.descriptorFlags),
                          next: load16(table, d + SplitQueueLayout.descriptorNext))
    }
}

/// One request as the driver added it.
struct Request {
    var segments: [BufferSegment]
    /// Descriptors it takes in the ring (1 when indirect).
    var needed: Int
    var indirect: Bool
    /// Sum of the writable segments, without wrapping.
    var writable: UInt64
    /// Ring descriptors the device found in its chain (after the device took it).
    var descriptors: [Int] = []
}

final class Model {
    let n: Int
    let eventIndex: Bool
    let indirect: Bool
    let indirectEntries: Int
    let rings: Rings

    // Driver side, as the model expects it.
    var inFlight: [UInt64: Request] = [:]
    var addOrder: [UInt64] = []         // tokens in avail-ring order since the last reset
    var added = 0, published = 0        // adds accepted / made visible since the last reset
    var consumed = 0                    // used elements delivered since the last reset
    var nextToken: UInt64 = 1
    var everBroken = false

    // Device side.
    var honest = true                   // false once the input wrote anything a device must not
    var deviceSeen = 0                  // avail entries the device took
    var taken: [(head: UInt16, token: UInt64)] = []
    var usedIdx: UInt16 = 0             // the device's used idx
    var honestCompletions: [(token: UInt64, length: UInt32)] = []
    var owned = Set<Int>()              // descriptors of chains the device took and not yet delivered

    init(size: Int, eventIndex: Bool, indirect: Bool, indirectEntries: Int, rings: Rings) {
        n = size; self.eventIndex = eventIndex; self.indirect = indirect
        self.indirectEntries = indirectEntries; self.rings = rings
    }

    func run(_ q: consuming SplitQueue, _ input: inout FuzzInput) {
        var operations = 0
        while !input.isEmpty && operations < 4096 {
            operations += 1
            let op = input.u8() % 13
            trace("op \(op) [in flight \(inFlight.count), free \(q.freeCount), added \(added), published \(published), taken \(taken.count), used idx \(usedIdx), honest \(honest), broken \(q.brokenReason.map { "\($0)" } ?? "no")]")
            switch op {
            case 0, 1: add(&q, &input)
            case 2: publish(&q)
            case 3: deviceTake()
            case 4: deviceComplete(&input)
            case 5:
                let limit = Int(input.u8() % 17)
                drain(&q, limit: limit == 0 ? .max : limit)
            case 6: hostileUsedElement(&input)
            case 7: hostileUsedIndex(&input)
            case 8: scribble(&input)
            case 9: notificationFields(&input)
            case 10: interrupts(&q, &input)
            case 11: if input.u8() % 4 == 0 { reclaimAll(&q) }
            default:
                // Up to 15 honest rounds; with the operand 0xFF then 0xF0...0xFF, enough that the
                // 16-bit indices get within 16 of wrapping (or just past it), so the ops after it
                // cross the wrap. Two bytes, so that few mutants pay the ~30 ms this takes.
                let b = input.u8()
                if b == 0xFF, input.u8() & 0xF0 == 0xF0 {
                    bulk(&q, rounds: 65520 + Int(input.u8() & 15) * 2)
                } else {
                    bulk(&q, rounds: Int(b & 0x0F))
                }
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

    func checkCounts(_ q: borrowing SplitQueue) {
        require(q.inFlight == inFlight.count, "queue has \(q.inFlight) in flight, the model \(inFlight.count)")
        let held = inFlight.values.reduce(0) { $0 + $1.needed }
        require(q.freeCount + held == n, "free \(q.freeCount) + held \(held) != queue size \(n)")
        require((q.brokenReason != nil) == everBroken, "queue broken: \(q.brokenReason != nil), the model expects \(everBroken)")
    }

    // MARK: driver operations

    func add(_ q: inout SplitQueue, _ input: inout FuzzInput) {
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

    func addSegments(_ q: inout SplitQueue, _ segments: [BufferSegment]) {
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
            require(needed > freeBefore, "add said full with \(freeBefore) free for \(needed) descriptors")
            require(q.freeCount == freeBefore && q.inFlight == inFlightBefore, "a full add changed the queue")
            return
        }
        require(needed <= freeBefore, "add accepted \(needed) descriptors with \(freeBefore) free")
        let writable = segments.reduce(UInt64(0)) { $0 + ($1.deviceWritable ? UInt64($1.length) : 0) }
        inFlight[token] = Request(segments: segments, needed: needed, indirect: goesIndirect, writable: writable)
        addOrder.append(token)
        added += 1
    }

    func publish(_ q: inout SplitQueue) {
        let pending = added != published
        var expectNotify = false
        if pending {
            let old = UInt16(truncatingIfNeeded: published), new = UInt16(truncatingIfNeeded: added)
            if eventIndex {
                // §2.7.10.1 vring_need_event: notify if new passed avail_event since old.
                expectNotify = new &- rings.availEvent &- 1 < new &- old
            } else {
                expectNotify = rings.usedFlags & SplitQueueLayout.usedNoNotify == 0
            }
        }
        rings.bell.pointee = 0xFFFF
        let rang = q.publish()
        require(rang == expectNotify, "publish rang: \(rang), spec 2.7.10 says \(expectNotify) (pending: \(pending))")
        require(rang ? rings.bell.pointee == queueIndex : rings.bell.pointee == 0xFFFF, "doorbell does not match publish's answer")
        if pending {
            require(rings.availIdx == UInt16(truncatingIfNeeded: added), "avail idx \(rings.availIdx) after publishing \(added)")
            published = added
        }
    }

    func drain(_ q: inout SplitQueue, limit: Int) {
        let brokenBefore = q.brokenReason
        let pendingHonest = honestCompletions.count
        var got: [(token: UInt64, length: UInt32)] = []
        do {
            let count = try q.drainUsed(limit: limit) { got.append(($0, $1)) }
            require(brokenBefore == nil, "drain succeeded on a broken queue")
            require(count == got.count, "drain returned \(count) but delivered \(got.count)")
            if honest {
                require(count == min(limit, pendingHonest), "drain delivered \(count) of \(pendingHonest) completions (limit \(limit))")
            }
        } catch {
            require(q.brokenReason == error, "drain threw \(error) but the queue says \(String(describing: q.brokenReason))")
            guard case .brokenQueue = error else { require(false, "drain threw \(error)"); return }
            if let brokenBefore {
                require(got.isEmpty && error == brokenBefore, "a broken queue delivered \(got.count) completions")
            } else {
                require(!honest, "the queue broke although the device was honest: \(error)")
                everBroken = true
            }
            _ = "\(error)"
        }
        require(got.count <= limit, "drain delivered \(got.count) past its limit \(limit)")
        trace("drain(limit \(limit)) delivered \(got.map { "(\($0.token), \($0.length))" })")
        for (token, length) in got {
            guard let request = inFlight.removeValue(forKey: token) else {
                require(false, "completion for token \(token), which is not in flight (never added, or delivered before)")
                return
            }
            require(UInt64(length) <= request.writable, "completion of \(length) bytes for a request with \(request.writable) writable")
            for d in request.descriptors { owned.remove(d) }
            consumed += 1
            if honest {
                let expected = honestCompletions.removeFirst()
                require(expected.token == token && expected.length == length,
                        "delivered (\(token), \(length)), the device completed (\(expected.token), \(expected.length)) next")
            }
        }
    }

    func interrupts(_ q: inout SplitQueue, _ input: inout FuzzInput) {
        let lastUsed = UInt16(truncatingIfNeeded: consumed)
        switch input.u8() % 3 {
        case 0:
            q.suppressInterrupts()
            if eventIndex {
                require(rings.usedEvent == lastUsed &+ 0x8000, "used_event after suppress is \(rings.usedEvent)")
            } else {
                require(rings.availFlags == 1, "avail flags after suppress are \(rings.availFlags)")
            }
        case 1:
            let armed = q.armInterrupts()
            if eventIndex {
                require(rings.usedEvent == lastUsed, "used_event after arm is \(rings.usedEvent), last used \(lastUsed)")
            } else {
                require(rings.availFlags == 0, "avail flags after arm are \(rings.availFlags)")
            }
            require(armed == (rings.usedIdx == lastUsed), "armInterrupts said \(armed) with used idx \(rings.usedIdx), last used \(lastUsed)")
        default:
            require(q.hasUsed() == (rings.usedIdx != lastUsed), "hasUsed disagrees with used idx \(rings.usedIdx), last used \(lastUsed)")
        }
    }

    func reclaimAll(_ q: inout SplitQueue) {
        let expected = Set(inFlight.keys)
        var cancelled: [UInt64] = []
        q.reclaimAll { cancelled.append($0) }
        require(cancelled.count == expected.count && Set(cancelled) == expected,
                "reclaimAll handed back \(cancelled.count) tokens, \(expected.count) were in flight")
        require(q.freeCount == n && q.inFlight == 0 && q.brokenReason == nil, "reclaimAll left the queue not as new")
        inFlight = [:]; addOrder = []; added = 0; published = 0; consumed = 0; everBroken = false
        honest = true; deviceSeen = 0; taken = []; usedIdx = 0; honestCompletions = []; owned = []
    }

    /// Thousands of honest round trips, so the 16-bit indices wrap: one writable buffer added,
    /// published, taken, completed and drained per round, checked on a short path (only from a
    /// quiet queue with an honest device: nothing added, taken or pending).
    func bulk(_ q: inout SplitQueue, rounds: Int) {
        guard honest, q.brokenReason == nil, inFlight.isEmpty, added == published, deviceSeen == published else { return }
        let table = rings.memory.descriptors.pointer
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
            added += 1
            addOrder.append(token)
            let new = UInt16(truncatingIfNeeded: added)
            let expectNotify = eventIndex ? new &- rings.availEvent &- 1 < new &- (new &- 1) : rings.usedFlags & SplitQueueLayout.usedNoNotify == 0
            rings.bell.pointee = 0xFFFF
            require(q.publish() == expectNotify && (rings.bell.pointee == queueIndex) == expectNotify, "publish in round \(round)")
            published = added
            require(rings.availIdx == new, "avail idx \(rings.availIdx) after \(added) adds")
            let head = rings.availEntry(deviceSeen)
            deviceSeen += 1
            require(Int(head) < n, "avail entry \(head) in round \(round)")
            let d = rings.descriptor(table, Int(head))
            require(d.address == segment.address && d.length == segment.length && d.flags == 2, "descriptor \(head) in round \(round)")
            let length = UInt32(truncatingIfNeeded: round) % (segment.length + 1)
            rings.writeUsed(slot: Int(usedIdx), id: UInt32(head), length: length)
            usedIdx &+= 1
            rings.setUsedIdx(usedIdx)
            var delivered = 0
            do throws(VirtioError) {
                let count = try q.drainUsed { t, l in
                    require(t == token && l == length, "round \(round): delivered (\(t), \(l)), completed (\(token), \(length))")
                    delivered += 1
                }
                require(count == 1 && delivered == 1, "round \(round): drained \(count)")
            } catch {
                require(false, "the queue broke in an honest round trip: \(error)"); return
            }
            consumed += 1
        }
    }

    // MARK: device operations

    /// The device takes the next published chain and, while honest, checks it against what was added.
    func deviceTake() {
        guard deviceSeen < published else { return }
        if honest {
            require(rings.availIdx == UInt16(truncatingIfNeeded: published), "avail idx \(rings.availIdx), published \(published)")
        }
        let head = rings.availEntry(deviceSeen)
        let token = deviceSeen < addOrder.count ? addOrder[deviceSeen] : 0
        deviceSeen += 1
        taken.append((head, token))
        guard honest else { return }
        guard var request = inFlight[token] else {
            require(false, "the device took token \(token), which is no longer in flight, from an honest ring")
            return
        }
        require(Int(head) < n, "avail ring entry \(head) is not a descriptor (queue size \(n))")
        let table = rings.memory.descriptors.pointer
        var found: [Int] = []
        if request.indirect {
            let d = rings.descriptor(table, Int(head))
            require(d.flags == SplitQueueLayout.flagIndirect && Int(d.length) == SplitQueueLayout.descriptorTableSize(request.segments.count),
                    "indirect head \(head): flags \(d.flags), length \(d.length) for \(request.segments.count) segments")
            guard let tables = rings.memory.indirect else { require(false, "indirect request without tables"); return }
            require(d.address >= tables.deviceAddress && d.address - tables.deviceAddress + UInt64(d.length) <= UInt64(tables.size),
                    "indirect table at 0x\(String(d.address, radix: 16)) is outside the indirect tables")
            let entries = rings.pointer(d.address)
            for (i, s) in request.segments.enumerated() {
                let e = rings.descriptor(entries, i)
                checkDescriptor(e, s, last: i + 1 == request.segments.count, where: "indirect entry \(i) of head \(head)")
                if i + 1 < request.segments.count { require(Int(e.next) == i + 1, "indirect entry \(i) links to \(e.next)") }
            }
            found = [Int(head)]
        } else {
            var d = Int(head)
            for (i, s) in request.segments.enumerated() {
                require(d < n, "chain of head \(head) reaches descriptor \(d)")
                let e = rings.descriptor(table, d)
                checkDescriptor(e, s, last: i + 1 == request.segments.count, where: "descriptor \(d) of head \(head)")
                found.append(d)
                d = Int(e.next)
            }
        }
        require(Set(found).count == found.count, "chain of head \(head) visits a descriptor twice: \(found)")
        require(owned.isDisjoint(with: found), "chain of head \(head) uses descriptors of a request still in flight: \(found)")
        owned.formUnion(found)
        request.descriptors = found
        inFlight[token] = request
    }

    func checkDescriptor(_ d: Rings.Descriptor, _ s: BufferSegment, last: Bool, where place: String) {
        let flags: UInt16 = (s.deviceWritable ? SplitQueueLayout.flagWrite : 0) | (last ? 0 : SplitQueueLayout.flagNext)
        require(d.address == s.address && d.length == s.length && d.flags == flags,
                "\(place): (0x\(String(d.address, radix: 16)), \(d.length), flags \(d.flags)) but the driver added (0x\(String(s.address, radix: 16)), \(s.length), flags \(flags))")
    }

    func deviceComplete(_ input: inout FuzzInput) {
        let pick = Int(input.u8()), lengthSeed = input.u32()  // operands read even when unused
        guard !taken.isEmpty else { return }
        completeTaken(pick % taken.count, lengthSeed: lengthSeed)
    }

    /// Completes a taken chain with a length no larger than its writable bytes (§2.7.8.1).
    func completeTaken(_ k: Int, lengthSeed: UInt32) {
        let (head, token) = taken.remove(at: k)
        var length = lengthSeed
        if let request = inFlight[token] {
            let limit = min(request.writable, UInt64(UInt32.max))
            length = UInt32(UInt64(lengthSeed) % (limit + 1))
        }
        rings.writeUsed(slot: Int(usedIdx), id: UInt32(head), length: length)
        usedIdx &+= 1
        rings.setUsedIdx(usedIdx)
        if honest { honestCompletions.append((token, length)) }
    }

    func hostileUsedElement(_ input: inout FuzzInput) {
        let slot = Int(input.u8())
        let id = input.bool() ? input.u32() : UInt32(input.u8()) % UInt32(n + 2)
        let length = input.bool() ? input.u32() : UInt32(input.u8())
        trace("hostile used element: slot \(slot), id \(id), length \(length)")
        rings.writeUsed(slot: slot, id: id, length: length)
        honest = false
    }

    func hostileUsedIndex(_ input: inout FuzzInput) {
        usedIdx = input.bool() ? input.u16() : usedIdx &+ UInt16(truncatingIfNeeded: Int(Int8(bitPattern: input.u8())))
        trace("hostile used idx \(usedIdx)")
        rings.setUsedIdx(usedIdx)
        honest = false
    }

    /// Any byte of any ring: the driver must never read back what it wrote.
    func scribble(_ input: inout FuzzInput) {
        var slices = [rings.memory.descriptors, rings.memory.avail, rings.memory.used]
        if let indirect = rings.memory.indirect { slices.append(indirect) }
        let s = slices[Int(input.u8()) % slices.count]
        let value = input.u8(), offset = Int(input.u16()) % s.size
        trace("scribble 0x\(String(value, radix: 16)) at offset \(offset) of a \(s.size)-byte ring area")
        s.pointer.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
        honest = false
    }

    /// Fields a device may legitimately write: used flags (NO_NOTIFY) and avail_event.
    func notificationFields(_ input: inout FuzzInput) {
        if input.bool() { rings.setUsedFlags(input.u16()) } else { rings.setAvailEvent(input.u16()) }
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
    static let hostileElement: UInt8 = 6, hostileIndex: UInt8 = 7, scribble: UInt8 = 8, notification: UInt8 = 9
    static let interrupts: UInt8 = 10, reclaim: UInt8 = 11, bulk: UInt8 = 12
}

struct Script {
    var bytes: [UInt8]
    init(sizeExponent: UInt8, features: UInt8) { bytes = [sizeExponent, features] }
    /// A request of `readable` then `writable` segments of small lengths (length mode 0: one byte).
    mutating func add(readable: Int, writable: Int, length: UInt8 = 64) {
        let count = readable + writable
        bytes += [Op.add, UInt8(count), UInt8(readable)]
        for _ in 0..<count { bytes += [0, length] }
    }
    mutating func op(_ o: UInt8, _ operands: UInt8...) { bytes += [o] + operands }
    mutating func complete(pick: UInt8 = 0, length: UInt32 = 0xFFFF_FFFF) {
        bytes += [Op.complete, pick] + (0..<4).map { UInt8(truncatingIfNeeded: length >> (8 * UInt32($0))) }
    }
    /// drain with no limit (first operand byte % 17 == 0).
    mutating func drainAll() { bytes += [Op.drain, 0] }
}

func seeds() -> [(name: String, bytes: [UInt8])] {
    var result: [(name: String, bytes: [UInt8])] = []
    // A virtio-blk-like round trip: header (readable), data (writable), status (writable).
    var blk = Script(sizeExponent: 4, features: 0)
    for _ in 0..<3 { blk.add(readable: 1, writable: 2) }
    blk.op(Op.publish)
    for _ in 0..<3 { blk.op(Op.take) }
    blk.complete(pick: 1); blk.complete(pick: 0); blk.complete(pick: 0)
    blk.drainAll()
    blk.op(Op.interrupts, 1)
    result.append(("blk-round-trip", blk.bytes))
    // EVENT_IDX and INDIRECT_DESC (4 entries per table), notification suppression by the device.
    var ev = Script(sizeExponent: 4, features: 1 | 2 | 4 << 2)
    ev.op(Op.notification, 0, 5, 0)          // avail_event = 5
    for _ in 0..<6 { ev.add(readable: 1, writable: 1) }
    ev.op(Op.publish)
    for _ in 0..<6 { ev.op(Op.take) }
    for _ in 0..<6 { ev.complete() }
    ev.op(Op.interrupts, 0); ev.drainAll(); ev.op(Op.interrupts, 1)
    result.append(("event-idx-indirect", ev.bytes))
    // virtio-rng-like: writable buffers only, a full queue, refill after a partial drain.
    var rng = Script(sizeExponent: 2, features: 0)
    for _ in 0..<5 { rng.add(readable: 0, writable: 1, length: 255) }
    rng.op(Op.publish)
    for _ in 0..<4 { rng.op(Op.take) }
    rng.complete(pick: 2, length: 100); rng.complete()
    rng.op(Op.drain, 1)                      // limit 1
    rng.add(readable: 0, writable: 1); rng.op(Op.publish); rng.drainAll()
    result.append(("rng-full-queue", rng.bytes))
    // Hostile devices: a duplicate completion, a length past the writable bytes, an index jump.
    var dup = Script(sizeExponent: 3, features: 0)
    dup.add(readable: 1, writable: 1); dup.add(readable: 0, writable: 1); dup.op(Op.publish)
    dup.op(Op.take); dup.op(Op.take); dup.complete(); dup.drainAll()     // head 0 completed
    dup.op(Op.hostileElement, 1, 0, 0, 0, 0); dup.op(Op.hostileIndex, 0, 1); dup.drainAll()  // head 0 again
    dup.add(readable: 0, writable: 1)
    result.append(("hostile-duplicate", dup.bytes))
    var long = Script(sizeExponent: 3, features: 0)
    long.add(readable: 1, writable: 1, length: 16); long.op(Op.publish); long.op(Op.take)
    long.op(Op.hostileElement, 0, 0, 0, 1, 0x11, 0, 0, 0); long.op(Op.hostileIndex, 0, 1); long.drainAll()
    result.append(("hostile-length", long.bytes))
    var jump = Script(sizeExponent: 3, features: 0)
    jump.add(readable: 0, writable: 1); jump.op(Op.publish)
    jump.op(Op.hostileIndex, 1, 0, 0x80); jump.drainAll()
    jump.op(Op.reclaim, 0); jump.add(readable: 0, writable: 1); jump.op(Op.publish); jump.op(Op.take); jump.complete(); jump.drainAll()
    result.append(("hostile-jump-then-reset", jump.bytes))
    // The device scribbling on the descriptor table and avail ring after the driver wrote them.
    var scribble = Script(sizeExponent: 3, features: 2 | 2 << 2)
    scribble.add(readable: 1, writable: 1); scribble.op(Op.publish)
    scribble.op(Op.scribble, 0, 0xFF, 3, 0); scribble.op(Op.scribble, 1, 0x07, 4, 0)
    scribble.op(Op.take); scribble.complete(); scribble.drainAll()
    result.append(("scribble", scribble.bytes))
    // 16-bit index wrap: 65,544 honest round trips on a queue of 1; 65,524 on a queue of 256 with
    // EVENT_IDX, then requests across the wrap.
    result.append(("wrap-size-1", [0, 0, Op.bulk, 0xFF, 0xF0, 12, Op.interrupts, 1]))
    var wrap = Script(sizeExponent: 8, features: 1)
    wrap.op(Op.bulk, 0xFF, 0xF0, 2)
    for _ in 0..<12 { wrap.add(readable: 1, writable: 1) }
    wrap.op(Op.publish)
    for _ in 0..<12 { wrap.op(Op.take) }
    for i in 0..<12 { wrap.complete(pick: UInt8(i * 7 % (12 - i))) }
    wrap.op(Op.drain, 5); wrap.op(Op.interrupts, 1); wrap.drainAll(); wrap.op(Op.interrupts, 0)
    result.append(("wrap-size-256-event-idx", wrap.bytes))
    return result
}
