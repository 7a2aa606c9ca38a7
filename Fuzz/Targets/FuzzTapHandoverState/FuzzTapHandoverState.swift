import FuzzSupport
import Services
import VirtioDevices

/// Fuzz target: the TAP bridge's hand-over state decoder (`TapBridgeHandoverState(decoding:)`),
/// what a new `virtio-vfio serve net` reads about the TAP it takes over, the receive modes it sets
/// again and the counters it continues.
///
/// Input: 1 byte mode, then
///   mode 0 (raw):       the state bytes as they came;
///   mode 1 (header):    magic "TAPH" and version 1 written here, the rest from the input, so
///                       mutations reach the field checks;
///   mode 2 (generated): a description of a state within every documented limit (TAP name of
///                       1-15 bytes of UTF-8, ASCII, multi-byte and combining marks, never "/";
///                       vnet header 0 or 12; receive buffer 26 bytes to 1 MiB; each receive mode
///                       unset, off or on; every counter 0 to Int.max), built with the public
///                       initialiser and encoded with `encoded()`; then, when the next byte is odd,
///                       also with its counter list rewritten as another version would send it
///                       (any order, some left out, unknown names added, up to `maxCounters`).
///
/// Asserts: no crash (no trap on any input), no ASan report; a state that decodes has
/// vnetHeaderSize 0 or 12, a TAP name Linux would take (1-15 bytes, not . or .., no "/", ":",
/// NUL or whitespace byte), a receive buffer of
/// 26 bytes (a header and an Ethernet header) to 1 MiB, no counter below 0 and no errno (those are
/// not handed over); the decoder accepts exactly what a reference reading of the documented
/// encoding accepts, with the same result; an accepted state re-encodes to bytes that decode to an
/// equal state and re-encode to themselves, and equal the input exactly when the input listed every
/// known counter once in the encoder's order (the one freedom the format has: counters travel by
/// name); a generated state decodes to itself, and with a rewritten counter list to itself with the
/// counters left out at 0.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    switch input.u8() % 3 {
    case 0:
        decode(Array(input.rest()))
    case 1:
        decode(withHeader(Array(input.rest())))
    default:
        let state = generate(&input)
        let bytes = state.encoded()
        do {
            let decoded = try TapBridgeHandoverState(decoding: bytes)
            require(decoded == state, "a generated state decoded to a different state: \(describe(decoded)), not \(describe(state))")
            require(decoded.encoded() == bytes, "a generated state does not re-encode to its bytes")
        } catch {
            require(false, "a state within every documented limit was refused: \(error) (\(describe(state)))")
        }
        if input.u8() % 2 == 1 {
            let (other, expected) = rewriteCounters(bytes, state, &input)
            do {
                let decoded = try TapBridgeHandoverState(decoding: other)
                require(decoded == expected, "a rewritten counter list decoded to \(describe(decoded)), not \(describe(expected))")
            } catch {
                require(false, "a counter list as another version sends it was refused: \(error) (\(describe(expected)))")
            }
        }
    }
    return 0
}

/// The documented limits (TapBridgeHandover.swift): the VERSION_1 virtio-net header is 12 bytes,
/// a receive buffer holds at least that and an Ethernet header.
let vnetHeader = 12
let receiveBufferRange = (12 + 14)...(1 << 20)
let knownCounters = NetCounters.fields.map(\.name) + TapBridgeCounters.fields.map(\.name)

func decode(_ bytes: [UInt8]) {
    let expected = reference(bytes)
    let state: TapBridgeHandoverState
    do {
        state = try TapBridgeHandoverState(decoding: bytes)
    } catch {
        let why = "\(error)"
        trace("refused: \(why)")
        if let expected {
            require(false, "refused \(bytes.count) bytes that the reference accepts as \(describe(expected.state)): \(why)")
        }
        return
    }
    trace("decoded: \(describe(state))")
    checkLimits(state)
    guard let expected else {
        require(false, "accepted \(describe(state)) from \(bytes.count) bytes that the reference refuses")
        return
    }
    require(state == expected.state, "decoded \(describe(state)), the reference \(describe(expected.state))")
    let again = state.encoded()
    require((again == bytes) == expected.canonical,
            expected.canonical ? "re-encoded to other bytes, although the input listed the counters as the encoder does"
                               : "re-encoded to the same bytes, although the input's counter list is not the encoder's")
    do {
        let redecoded = try TapBridgeHandoverState(decoding: again)
        require(redecoded == state, "re-encoded and decoded again to \(describe(redecoded)), not \(describe(state))")
        require(redecoded.encoded() == again, "the re-encoding is not canonical (encodes again to other bytes)")
    } catch {
        require(false, "the re-encoding of \(describe(state)) was refused: \(error)")
    }
}

/// Every documented limit of an accepted state.
func checkLimits(_ s: TapBridgeHandoverState) {
    let name = Array(s.tapName.utf8)
    require(kernelAcceptsName(name),
            "accepted the TAP name \(name) (\(name.count) bytes): not a name Linux's dev_valid_name takes")
    require(s.vnetHeaderSize == 0 || s.vnetHeaderSize == vnetHeader, "accepted a vnet header of \(s.vnetHeaderSize) bytes")
    require(receiveBufferRange.contains(s.receiveBufferSize), "accepted a receive buffer of \(s.receiveBufferSize) bytes")
    for f in NetCounters.fields {
        require(s.deviceCounters[keyPath: f.path] >= 0, "device counter \(f.name) is \(s.deviceCounters[keyPath: f.path])")
    }
    for f in TapBridgeCounters.fields {
        require(s.bridgeCounters[keyPath: f.path] >= 0, "bridge counter \(f.name) is \(s.bridgeCounters[keyPath: f.path])")
    }
    require(s.bridgeCounters.lastWriteError == 0 && s.bridgeCounters.lastReadError == 0, "an errno came with the counters")
}

/// Magic and version (little-endian, TapBridgeHandover.swift's layout), then `rest`.
func withHeader(_ rest: [UInt8]) -> [UInt8] {
    var s = SeedBytes()
    s.raw(TapBridgeHandoverState.magic)
    s.le16(TapBridgeHandoverState.version)
    s.raw(rest)
    return s.bytes
}

// MARK: - Reference

/// The documented encoding read again with plain indexing (not the library's ByteReader):
///   magic "TAPH", version u16 = 1, TAP name (u16 length, UTF-8, a name Linux takes),
///   vnet header u8 (0 or 12), receive buffer u32 (26...1 MiB), promiscuous u8, all-multicast u8
///   (0 unset, 1 off, 2 on), counter count u16 (at most 256), per counter: name (u16 length, UTF-8,
///   at most 64 bytes), value u64 (at most Int.max); no name twice; nothing after the last counter.
/// Known names set their counter, the others are skipped, the counters not listed are 0.
/// `canonical`: the list is every known name once, in the encoder's order.
func reference(_ b: [UInt8]) -> (state: TapBridgeHandoverState, canonical: Bool)? {
    var at = 0
    func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard n <= b.count - at else { return nil }
        defer { at += n }
        return b[at..<(at + n)]
    }
    func le(_ n: Int) -> UInt64? {
        guard let s = take(n) else { return nil }
        return s.reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }
    func string(max: Int) -> String? {
        guard let n = le(2), n <= max, let s = take(Int(n)) else { return nil }
        return String(validating: s, as: UTF8.self)
    }
    let modes: [UInt64: Bool?] = [0: nil, 1: false, 2: true]  // a receive mode: unset, off, on

    guard let magic = take(4), Array(magic) == Array("TAPH".utf8), le(2) == 1 else { return nil }
    guard let name = string(max: 15), kernelAcceptsName(Array(name.utf8)) else { return nil }
    guard let header = le(1), header == 0 || header == 12 else { return nil }
    guard let buffer = le(4), receiveBufferRange.contains(Int(buffer)) else { return nil }
    guard let p = le(1), let m = le(1), let promiscuous = modes[p], let allMulticast = modes[m] else { return nil }
    guard let count = le(2), count <= 256 else { return nil }
    var values: [String: Int] = [:]
    var listed: [String] = []
    var seen = Set<String>()
    for _ in 0..<count {
        guard let counter = string(max: 64), let value = le(8), value <= UInt64(Int.max),
              seen.insert(counter).inserted else { return nil }
        listed.append(counter)
        if knownCounters.contains(counter) { values[counter] = Int(value) }
    }
    guard at == b.count else { return nil }
    var device = NetCounters(), bridge = TapBridgeCounters()
    for f in NetCounters.fields { device[keyPath: f.path] = values[f.name] ?? 0 }
    for f in TapBridgeCounters.fields { bridge[keyPath: f.path] = values[f.name] ?? 0 }
    let state = TapBridgeHandoverState(tapName: name, vnetHeaderSize: Int(header), receiveBufferSize: Int(buffer),
                                       promiscuous: promiscuous, allMulticast: allMulticast,
                                       deviceCounters: device, bridgeCounters: bridge)
    return (state, listed.map { Array($0.utf8) } == knownCounters.map { Array($0.utf8) })
}

func describe(_ s: TapBridgeHandoverState) -> String {
    let counters = NetCounters.fields.map { s.deviceCounters[keyPath: $0.path] }
        + TapBridgeCounters.fields.map { s.bridgeCounters[keyPath: $0.path] }
    return "TAP \(Array(s.tapName.utf8)) header \(s.vnetHeaderSize) buffer \(s.receiveBufferSize) "
        + "promiscuous \(s.promiscuous.map { "\($0)" } ?? "-") all-multicast \(s.allMulticast.map { "\($0)" } ?? "-") "
        + "counters \(counters)"
}

/// Linux's `dev_valid_name` (net/core/dev.c), written from it: 1-15 bytes (IFNAMSIZ 16 with the
/// NUL), not "." or "..", and no byte that is "/", ":", NUL or whitespace (isspace: space, \t \n
/// \v \f \r).
func kernelAcceptsName(_ bytes: [UInt8]) -> Bool {
    guard !bytes.isEmpty, bytes.count < 16, bytes != [0x2E], bytes != [0x2E, 0x2E] else { return false }
    for b in bytes where b == 0x2F || b == 0x3A || b == 0 || b == 0x20 || (0x09...0x0D).contains(b) { return false }
    return true
}

// MARK: - Generated states

/// A TAP name of 1...15 bytes that Linux would take: printable ASCII but "/", ":" and space (a
/// lone "." or ".." becomes "_"), two-byte letters and combining marks, three-byte CJK and
/// four-byte emoji.
func generateName(_ input: inout FuzzInput) -> String {
    let want = 1 + Int(input.u8()) % 15
    var name = ""
    var bytes = 0
    while bytes < want {
        let b = input.u8()
        let left = want - bytes
        // Printable ASCII; "/", ":" and space become "_".
        var ascii = 0x21 + (b & 0x7F) % 0x5E
        if ascii == 0x2F || ascii == 0x3A { ascii = 0x5F }
        var scalar = Unicode.Scalar(ascii)
        switch b >> 6 {
        case 2 where left >= 2:
            scalar = Unicode.Scalar((b & 0x20 != 0 ? 0x300 : 0xC0) + UInt32(b & 0x1F))!  // combining mark or Latin-1
        case 3 where left >= 4 && b & 0x20 != 0:
            scalar = Unicode.Scalar(0x1F300 + UInt32(b & 0x1F))!
        case 3 where left >= 3:
            scalar = Unicode.Scalar(0x4E00 + UInt32(b & 0x3F))!
        default:
            break
        }
        name.unicodeScalars.append(scalar)
        bytes += String(scalar).utf8.count
    }
    return name == "." || name == ".." ? "_" : name
}

/// A counter value: 0, small, 32-bit or anything up to Int.max.
func counterValue(_ input: inout FuzzInput) -> Int {
    switch input.u8() % 4 {
    case 0: return 0
    case 1: return Int(input.u8())
    case 2: return Int(input.u32())
    default: return Int(input.u64() & UInt64(Int.max))
    }
}

func generate(_ input: inout FuzzInput) -> TapBridgeHandoverState {
    let name = generateName(&input)
    let header = input.bool() ? vnetHeader : 0
    let span = UInt32(receiveBufferRange.count)
    let buffer = receiveBufferRange.lowerBound + Int(input.u32() % span)
    let modes: [Bool?] = [nil, false, true]
    let promiscuous = modes[Int(input.u8() % 3)]
    let allMulticast = modes[Int(input.u8() % 3)]
    var device = NetCounters(), bridge = TapBridgeCounters()
    for f in NetCounters.fields { device[keyPath: f.path] = counterValue(&input) }
    for f in TapBridgeCounters.fields { bridge[keyPath: f.path] = counterValue(&input) }
    return TapBridgeHandoverState(tapName: name, vnetHeaderSize: header, receiveBufferSize: buffer, promiscuous: promiscuous,
                                  allMulticast: allMulticast, deviceCounters: device, bridgeCounters: bridge)
}

/// `bytes` (`state.encoded()`) with the counter list another version would send: the known
/// counters in any order, some left out, and names this version does not know (at most
/// `maxCounters` in all). Returns those bytes and the state they must decode to (the counters left
/// out at 0).
func rewriteCounters(_ bytes: [UInt8], _ state: TapBridgeHandoverState, _ input: inout FuzzInput)
    -> (bytes: [UInt8], expected: TapBridgeHandoverState) {
    // magic 4, version 2, name 2 + n, header 1, buffer 4, two modes: the counter count follows.
    let countAt = 15 + state.tapName.utf8.count
    require(bytes.count >= countAt + 2 && Int(bytes[countAt]) | Int(bytes[countAt + 1]) << 8 == knownCounters.count,
            "the target's idea of the layout is wrong: no counter count of \(knownCounters.count) at \(countAt)")
    var expected = state
    var entries: [(name: String, value: UInt64)] = []
    for f in NetCounters.fields {
        if input.u8() % 4 == 0 { expected.deviceCounters[keyPath: f.path] = 0 }  // left out: starts at 0
        else { entries.append((f.name, UInt64(state.deviceCounters[keyPath: f.path]))) }
    }
    for f in TapBridgeCounters.fields {
        if input.u8() % 4 == 0 { expected.bridgeCounters[keyPath: f.path] = 0 }
        else { entries.append((f.name, UInt64(state.bridgeCounters[keyPath: f.path]))) }
    }
    let unknown = Int(input.u8()) % (TapBridgeHandoverState.maxCounters - entries.count + 1)
    for k in 0..<unknown {
        let stem = "new_\(k)_"
        let length = Int(input.u8()) % (64 - stem.utf8.count + 1)
        entries.append((stem + String(repeating: "c", count: length), UInt64(counterValue(&input))))
    }
    if entries.count > 1 {
        for i in stride(from: entries.count - 1, to: 0, by: -1) {
            entries.swapAt(i, Int(input.u16()) % (i + 1))
        }
    }
    var s = SeedBytes()
    s.raw(bytes[..<countAt])
    s.le16(UInt16(entries.count))
    for (name, value) in entries {
        s.le16(UInt16(name.utf8.count))
        s.raw(name.utf8)
        s.le64(value)
    }
    return (s.bytes, expected)
}

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

/// What `serve net` hands over after some traffic (the unit tests' sample).
func sample(name: String = "vtap0", header: Int = 12, buffer: Int = 1530) -> TapBridgeHandoverState {
    var device = NetCounters()
    device.rxPackets = 1234
    device.rxBytes = 1_700_000
    device.txPackets = 321
    device.txBytes = 1 << 40
    device.rxBadHeader = 3
    var bridge = TapBridgeCounters()
    bridge.toTapDroppedFull = 7
    bridge.fromTapFrames = 99
    return TapBridgeHandoverState(tapName: name, vnetHeaderSize: header, receiveBufferSize: buffer, promiscuous: true,
                                  allMulticast: nil, deviceCounters: device, bridgeCounters: bridge)
}

/// A blob with `counters` in place of the encoder's list (and any field as given, valid or not).
func blob(name: [UInt8] = Array("vtap0".utf8), header: UInt8 = 12, buffer: UInt32 = 1530, promiscuous: UInt8 = 2,
          allMulticast: UInt8 = 0, version: UInt16 = 1, counters: [(String, UInt64)]) -> [UInt8] {
    var s = SeedBytes()
    s.raw(Array("TAPH".utf8))
    s.le16(version)
    s.le16(UInt16(name.count)); s.raw(name)
    s.u8(header)
    s.le32(buffer)
    s.u8(promiscuous)
    s.u8(allMulticast)
    s.le16(UInt16(counters.count))
    for (n, v) in counters {
        s.le16(UInt16(n.utf8.count)); s.raw(n.utf8)
        s.le64(v)
    }
    return s.bytes
}

func seeds() -> [(name: String, bytes: [UInt8])] {
    var result: [(name: String, bytes: [UInt8])] = []
    func add(_ name: String, _ s: TapBridgeHandoverState) { result.append((name, [0] + s.encoded())) }
    func raw(_ name: String, _ bytes: [UInt8]) { result.append((name, [0] + bytes)) }

    add("vnet-header", sample())
    add("plain-frames-modes-off", TapBridgeHandoverState(tapName: "tap0", vnetHeaderSize: 0, receiveBufferSize: 2048,
                                                         promiscuous: false, allMulticast: false,
                                                         deviceCounters: NetCounters(), bridgeCounters: TapBridgeCounters()))
    var every = sample(buffer: receiveBufferRange.upperBound)
    for (i, f) in NetCounters.fields.enumerated() { every.deviceCounters[keyPath: f.path] = i + 1 }
    for (i, f) in TapBridgeCounters.fields.enumerated() { every.bridgeCounters[keyPath: f.path] = 100 + i }
    every.deviceCounters.txBytes = Int.max
    every.allMulticast = true
    add("every-counter-largest-buffer", every)
    add("smallest-buffer", sample(header: 0, buffer: receiveBufferRange.lowerBound))
    add("longest-name", sample(name: "vtap-0123456789"))
    add("multibyte-name", sample(name: "t\u{e9}p-e\u{301}\u{1F310}"))
    // Counters by name: an older version that counts less, a newer one that counts more (in
    // another order), and the most a state may list.
    raw("older-version-counters", blob(counters: [("rx_packets", 5), ("tx_packets", 4)]))
    raw("newer-version-counters", blob(counters: [("to_tap_frames", 4), ("rx_drop_checksum", 2), ("rx_packets", 5),
                                                  ("tx_packets", 9), ("", 1), ("rx_bytes", 300)]))
    let all = knownCounters.enumerated().map { ($0.element, UInt64($0.offset)) }
    let filler = (0..<(TapBridgeHandoverState.maxCounters - all.count)).map { ("future_counter_\($0)", UInt64($0)) }
    raw("maximum-counters", blob(counters: all + filler))
    // Refused: each breaks one rule.
    raw("version-2", blob(version: 2, counters: []))
    raw("name-with-slash", blob(name: Array("a/b".utf8), counters: []))
    raw("name-16-bytes", blob(name: Array(repeating: 0x78, count: 16), counters: []))
    raw("vnet-header-10", blob(header: 10, counters: []))
    raw("buffer-25", blob(buffer: 25, counters: []))
    raw("promiscuous-3", blob(promiscuous: 3, counters: []))
    raw("duplicate-counter", blob(counters: [("rx_packets", 1), ("rx_packets", 2)]))
    raw("counter-above-int-max", blob(counters: [("rx_packets", UInt64(Int.max) + 1)]))
    raw("too-many-counters", blob(counters: all + filler + [("one_too_many", 1)]))
    raw("trailing-byte", every.encoded() + [0])
    // Truncations of the full state, with the header written by the target (mode 1) so that they
    // reach the field that is cut: the name, the fixed fields, the counter count, a counter's
    // name and a counter's value.
    let full = every.encoded()
    for cut in [9, 20, 22, 27, 60, full.count - 3] {
        result.append(("truncated-at-\(cut)", [1] + Array(full[6..<cut])))
    }
    // Generated: every length byte at a middling value (the odd last byte rewrites the counters).
    result.append(("generated", [2] + [UInt8](repeating: 0x41, count: 160)))
    return result
}
