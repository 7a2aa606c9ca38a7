import FuzzSupport
import Upgrade

/// Fuzz target: the hot-upgrade state record decoder (`StateRecord(decoding:descriptorCount:)`),
/// the one thing a new driver version reads from an old one before it touches the device.
///
/// Input: 1 byte mode, 1 byte descriptor count (the fds that "arrived"), then
///   mode 0 (raw):       the record bytes as they came over the socket;
///   mode 1 (body):      a record body, wrapped here in a valid magic, version, length and
///                       FNV-1a checksum, so the fuzzer reaches the field validation instead of
///                       spending itself on the checksum;
///   mode 2 (generated): a description of a record that satisfies every documented limit
///                       (queues, in-flight requests, descriptors, strings), built as a
///                       `StateRecord` and encoded with `encoded()`.
///
/// Asserts: no crash, no ASan report; a record that decodes satisfies every rule the decoder
/// documents (VERSION_1, DMA region, queue sizes and areas, indices, request queues and heads,
/// descriptor roles and clients) and re-encodes to exactly the bytes it came from; a record built
/// within the limits by the encoder decodes, and decodes to itself.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let mode = input.u8() % 3
    let descriptorCount = Int(input.u8())
    switch mode {
    case 0:
        decode(Array(input.rest()), descriptorCount: descriptorCount)
    case 1:
        decode(wrap(body: Array(input.rest())), descriptorCount: descriptorCount)
    default:
        let record = generate(&input)
        let bytes = record.encoded()
        do {
            let decoded = try StateRecord(decoding: bytes, descriptorCount: record.descriptors.count)
            require(decoded == record, "a generated record decoded to a different record")
        } catch {
            require(false, "a record within every documented limit was refused: \(error) (\(record.queues.count) queues, \(record.inFlight.count) in flight, \(record.descriptors.count) descriptors)")
        }
    }
    return 0
}

func decode(_ bytes: [UInt8], descriptorCount: Int) {
    let record: StateRecord
    do {
        record = try StateRecord(decoding: bytes, descriptorCount: descriptorCount)
    } catch {
        _ = error.description
        return
    }
    validate(record, descriptorCount: descriptorCount)
    require(record.encoded() == bytes, "a decoded record does not re-encode to the bytes it came from")
}

/// Every rule the decoder documents, checked on what it accepted.
func validate(_ r: StateRecord, descriptorCount: Int) {
    require(r.driverVersion.utf8.count <= StateRecord.maxString && r.deviceAddress.utf8.count <= StateRecord.maxString, "string past maxString")
    require(r.features & (1 << 32) != 0, "accepted a record without VERSION_1")
    require(r.dmaSize > 0 && !r.dmaIOVA.addingReportingOverflow(r.dmaSize).overflow, "accepted DMA region 0x\(String(r.dmaIOVA, radix: 16))+\(r.dmaSize)")
    func inside(_ address: UInt64, _ length: UInt64) -> Bool {
        // [address, address + length) within [iova, iova + size), computed without overflow.
        address >= r.dmaIOVA && address - r.dmaIOVA <= r.dmaSize && length <= r.dmaSize - (address - r.dmaIOVA)
    }
    require(r.queues.count <= StateRecord.maxQueues, "\(r.queues.count) queues")
    require(Set(r.queues.map(\.index)).count == r.queues.count, "duplicate queue index")
    for q in r.queues {
        require(q.size > 0 && q.size.nonzeroBitCount == 1, "queue size \(q.size)")
        let n = UInt64(q.size)
        require(inside(q.descriptors, 16 * n) && inside(q.driver, 6 + 2 * n) && inside(q.device, 6 + 8 * n),
                "queue \(q.index) areas outside the DMA region")
        require(q.availIndex &- q.lastUsedIndex <= q.size, "queue \(q.index) indices")
    }
    require(r.inFlight.count <= StateRecord.maxInFlight, "\(r.inFlight.count) requests in flight")
    let clients = r.descriptors.filter { $0 == .client }.count
    for (i, request) in r.inFlight.enumerated() {
        guard let q = r.queues.first(where: { $0.index == request.queue }) else {
            require(false, "request \(i) on queue \(request.queue), not in the record"); return
        }
        require(request.head < q.size, "request \(i) head \(request.head) ≥ \(q.size)")
        require(request.client == UInt32.max || Int(request.client) < clients, "request \(i) client \(request.client) of \(clients)")
    }
    require(r.descriptors.count == descriptorCount && r.descriptors.count <= StateRecord.maxDescriptors,
            "\(r.descriptors.count) descriptors listed, \(descriptorCount) arrived")
    for role in [StateRecord.DescriptorRole.container, .group, .device, .dmaMemory] {
        require(r.descriptors.filter { $0 == role }.count == 1, "not exactly one \(role) descriptor")
    }
}

/// Magic, format version, body length, body, FNV-1a 64 of the body (StateRecord.swift's layout).
func wrap(body: [UInt8]) -> [UInt8] {
    var s = SeedBytes()
    s.raw(StateRecord.magic)
    s.le16(StateRecord.formatVersion)
    s.le32(UInt32(truncatingIfNeeded: body.count))
    s.raw(body)
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in body { hash = (hash ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
    s.le64(hash)
    return s.bytes
}

/// A record within every documented limit, shaped by the input: up to `maxQueues` queues with
/// power-of-two sizes and areas inside the DMA region, in-flight requests on those queues with
/// heads below their size (up to 1024 of them, to keep runs fast; `maxInFlight` is 65536), descriptors
/// with one container, group, device and DMA memory and any number of the others (up to
/// `maxDescriptors`), strings up to `maxString` bytes of UTF-8.
func generate(_ input: inout FuzzInput) -> StateRecord {
    let dmaIOVA = UInt64(input.u32()) << 12
    let dmaSize = UInt64(input.u16() | 1) << 16  // 64 KiB ... 4 GiB
    func string(_ input: inout FuzzInput) -> String {
        let n = Int(input.u16()) % (StateRecord.maxString + 1)
        let units = (0..<n).map { i in UInt8(0x20 + (Int(input.u8()) + i) % 0x5F) }  // printable ASCII
        return String(decoding: units, as: UTF8.self)
    }
    let driverVersion = string(&input)
    let deviceAddress = string(&input)
    let deviceType = input.u16()
    let features = input.u64() | 1 << 32
    var queues: [StateRecord.Queue] = []
    let queueCount = Int(input.u8()) % (StateRecord.maxQueues + 1)
    var usedIndices = Set<UInt16>()
    for _ in 0..<queueCount {
        var index = input.u16()
        while !usedIndices.insert(index).inserted { index &+= 1 }
        let size = UInt16(1) << (input.u8() % 16)
        let n = UInt64(size)
        // Areas anywhere in the region that fit (the region is at least 64 KiB; a queue of 32768
        // needs 512 KiB of descriptors, so large queues wrap their areas to fit).
        func place(_ length: UInt64, _ input: inout FuzzInput) -> UInt64 {
            guard length <= dmaSize else { return dmaIOVA }
            return dmaIOVA + UInt64(input.u32()) % (dmaSize - length + 1)
        }
        let fits = 16 * n <= dmaSize && 6 + 8 * n <= dmaSize
        let sizeThatFits = fits ? size : UInt16(1) << 8
        let m = UInt64(sizeThatFits)
        let last = input.u16()
        queues.append(StateRecord.Queue(index: index, size: sizeThatFits, descriptors: place(16 * m, &input),
                                        driver: place(6 + 2 * m, &input), device: place(6 + 8 * m, &input),
                                        availIndex: last &+ input.u16() % (sizeThatFits &+ 1), lastUsedIndex: last))
    }
    var descriptors: [StateRecord.DescriptorRole] = [.container, .group, .device, .dmaMemory]
    let extra = Int(input.u8()) % (StateRecord.maxDescriptors - 4 + 1)
    for _ in 0..<extra {
        let role: StateRecord.DescriptorRole = [.interrupt, .listener, .client][Int(input.u8()) % 3]
        descriptors.insert(role, at: Int(input.u8()) % (descriptors.count + 1))
    }
    // Permute the four required roles too (order is free; only counts are checked).
    for _ in 0..<4 { descriptors.swapAt(Int(input.u8()) % descriptors.count, Int(input.u8()) % descriptors.count) }
    let clients = descriptors.filter { $0 == .client }.count
    var inFlight: [StateRecord.InFlight] = []
    if !queues.isEmpty {
        let count = Int(input.u16()) % 1025
        for _ in 0..<count {
            let q = queues[Int(input.u8()) % queues.count]
            let client = clients == 0 || input.u8() % 8 == 0 ? UInt32.max : UInt32(Int(input.u8()) % clients)
            inFlight.append(StateRecord.InFlight(queue: q.index, head: input.u16() % q.size, slot: input.u32(),
                                                 client: client, tag: input.u64(), operation: input.u8(),
                                                 offset: input.u64(), length: input.u32()))
        }
    }
    return StateRecord(driverVersion: driverVersion, deviceAddress: deviceAddress, deviceType: deviceType,
                       features: features, dmaIOVA: dmaIOVA, dmaSize: dmaSize, queues: queues,
                       inFlight: inFlight, descriptors: descriptors)
}

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

/// The record of Tests/UpgradeTests/StateRecordTests.swift: a virtio-blk with one queue, two
/// requests in flight, eight descriptors.
let sample = StateRecord(
    driverVersion: "0.1.0", deviceAddress: "0000:00:05.0", deviceType: 2,
    features: 0x3_3000_0200, dmaIOVA: 0x10_0000, dmaSize: 40 << 20,
    queues: [.init(index: 0, size: 256, descriptors: 0x10_0000, driver: 0x10_1000, device: 0x10_2000,
                   availIndex: 1000, lastUsedIndex: 990)],
    inFlight: [.init(queue: 0, head: 3, slot: 3, client: 0, tag: 0xABCD, operation: 1, offset: 4096, length: 8192),
               .init(queue: 0, head: 7, slot: 7, client: 1, tag: 0xEF01, operation: 0, offset: 0, length: 512)],
    descriptors: [.container, .group, .device, .dmaMemory, .interrupt, .listener, .client, .client])

func seeds() -> [(name: String, bytes: [UInt8])] {
    var result: [(name: String, bytes: [UInt8])] = []
    let bytes = sample.encoded()
    result.append(("raw-sample", [0, 8] + bytes))
    // The body alone, for mode 1: everything between the 14-byte header and the checksum.
    result.append(("body-sample", [1, 8] + Array(bytes[14..<(bytes.count - 8)])))
    // Two queues (a multiqueue blk), no requests in flight, the minimum four descriptors.
    var mq = sample
    mq.queues.append(.init(index: 1, size: 256, descriptors: 0x10_4000, driver: 0x10_5000, device: 0x10_6000,
                           availIndex: 0, lastUsedIndex: 0))
    mq.inFlight = []
    mq.descriptors = [.container, .group, .device, .dmaMemory]
    result.append(("raw-two-queues", [0, 4] + mq.encoded()))
    // Another format version: refused before the body.
    var v2 = bytes
    v2[8] = 2
    result.append(("raw-version-2", [0, 8] + v2))
    // Generated: every length byte at a middling value.
    result.append(("generated", [2, 0] + [UInt8](repeating: 0x41, count: 96)))
    return result
}
