import FuzzSupport
import NBD

/// Fuzz target: the NBD server's hand-over state decoder (`NBDHandoverState(decoding:descriptors:)`),
/// what a new driver version reads about the listeners and client connections it adopts.
///
/// Input: 1 byte descriptors, 1 byte mode, then
///   byte 0 % 9:        how many descriptors "arrived" (0...8), numbered 1000, 1001, ... The
///                      decoder only takes them by position and checks them for negatives and
///                      duplicates; it never calls anything on them, so fake numbers are safe.
///   (byte 0 / 9) % 4:  0, 1 honest descriptors; 2 the last one repeats the first (when there are
///                      two or more); 3 one of them is -1. Those two must always be refused.
///   mode 0 (raw):      the state bytes as they came;
///   mode 1 (header):   magic, version and the length written here, the rest from the input, so
///                      mutations that change the length still reach the field checks;
///   mode 2 (generated): a description of a state within every documented limit (export, one or
///                      two listeners, up to 16 clients in any phase in distinct server slots,
///                      pending input up to `maximumPendingInput`, paths up to 107 bytes, up to 8
///                      requests in flight per client in transmission), built with the public
///                      initialisers, encoded with `encoded()` and decoded with its `descriptors`.
///
/// Asserts: no crash, no ASan report; a state that decodes has `problem() == nil`, at least one
/// listener, every pending input within `maximumPendingInput`, no more clients than descriptors
/// (and than `maximumClients`), uses each passed descriptor exactly once, and re-encodes to bytes
/// of the same length that decode, with its own `descriptors`, to an equal state; the re-encoding
/// equals the input exactly when the input numbered the descriptors in `descriptors` order (the
/// one freedom the format has: which index each socket takes); duplicate or negative descriptors
/// are refused; a generated state decodes to itself.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let first = input.u8()
    let count = Int(first % 9)
    var fds = (0..<count).map { Int32(1000 + $0) }
    let variant = (first / 9) % 4
    var dishonest = false
    if variant == 2 && count >= 2 { fds[count - 1] = fds[0]; dishonest = true }
    if variant == 3 && count >= 1 { fds[Int(first) % count] = -1; dishonest = true }
    switch input.u8() % 3 {
    case 0:
        decode(Array(input.rest()), fds: fds, dishonest: dishonest)
    case 1:
        decode(withHeader(Array(input.rest())), fds: fds, dishonest: dishonest)
    default:
        let state = generate(&input)
        require(state.problem() == nil, "a generated state has a problem: \(state.problem() ?? "")")
        let bytes = state.encoded()
        do {
            let decoded = try NBDHandoverState(decoding: bytes, descriptors: state.descriptors)
            require(decoded == state, "a generated state decoded to a different state")
        } catch {
            require(false, "a state within every documented limit was refused: \(error) (\(state.clients.count) clients)")
        }
    }
    return 0
}

func decode(_ bytes: [UInt8], fds: [Int32], dishonest: Bool) {
    let state: NBDHandoverState
    do {
        state = try NBDHandoverState(decoding: bytes, descriptors: fds)
    } catch {
        let why = error.description
        trace("refused with descriptors \(fds): \(why)")
        return
    }
    trace("decoded with descriptors \(fds): \(state.clients.count) clients, UNIX \(state.unixListener.map { "\($0)" } ?? "-"), TCP \(state.tcpListener.map { "\($0)" } ?? "-")")
    require(!dishonest, "accepted duplicate or negative descriptors \(fds)")
    require(state.problem() == nil, "a decoded state has a problem: \(state.problem() ?? "")")
    require(state.unixListener != nil || state.tcpListener != nil, "a decoded state without a listener")
    for (k, c) in state.clients.enumerated() {
        require(c.pendingInput.count <= NBDHandoverState.maximumPendingInput,
                "client \(k): \(c.pendingInput.count) bytes pending, more than \(NBDHandoverState.maximumPendingInput)")
    }
    require(state.clients.count <= NBDHandoverState.maximumClients && state.clients.count <= fds.count,
            "\(state.clients.count) clients with \(fds.count) descriptors")
    let listed = state.descriptors
    require(listed.count == fds.count && listed.sorted() == fds.sorted(),
            "the state uses descriptors \(listed), \(fds) were passed (each exactly once)")
    let again = state.encoded()
    // A version 2 state (read as connections in slots 0, 1, ... with nothing in flight) is
    // re-encoded as version 3: 12 more bytes per client.
    let version2 = bytes.starts(with: NBDHandoverState.magic + [2, 0])
    if version2 {
        require(state.clients.enumerated().allSatisfy { $0.element.slot == $0.offset && $0.element.inFlight.isEmpty },
                "a version 2 state decoded with slots out of order or requests in flight")
        require(again.count == bytes.count + 12 * state.clients.count, "a version 2 state re-encoded to \(again.count) bytes from \(bytes.count)")
    } else {
        require(again.count == bytes.count, "re-encoded to \(again.count) bytes, decoded from \(bytes.count)")
        require((again == bytes) == (listed == fds),
                listed == fds ? "re-encoded to different bytes, with the descriptors in the same order"
                              : "re-encoded to the same bytes with the descriptors in another order")
    }
    do {
        let redecoded = try NBDHandoverState(decoding: again, descriptors: listed)
        require(redecoded == state, "re-encoded and decoded again to a different state")
    } catch {
        require(false, "the re-encoding of a decoded state was refused: \(error)")
    }
}

/// Magic, version and the length of `rest` (little-endian, HandoverState.swift's layout), then `rest`.
func withHeader(_ rest: [UInt8]) -> [UInt8] {
    var s = SeedBytes()
    s.raw(NBDHandoverState.magic)
    s.le16(NBDHandoverState.version)
    s.le32(UInt32(truncatingIfNeeded: rest.count))
    s.raw(rest)
    return s.bytes
}

/// A state within every documented limit, shaped by the input: block sizes that
/// `NBDExport.problem` accepts, a UNIX listener (path of 1...107 bytes of UTF-8 without NUL), a TCP
/// listener or both, up to 16 clients, each in a phase with flags it may have by then and up to
/// `maximumPendingInput` bytes of pending input; descriptors 1000, 1001, ... in encoding order.
func generate(_ input: inout FuzzInput) -> NBDHandoverState {
    let exportSize = input.u64()
    let minimum = UInt32(1) << (input.u8() % 17)                                  // 1 ... 65536
    let preferredShift = Int(input.u8()) % (32 - max(9, minimum.trailingZeroBitCount))
    let preferred = UInt32(max(minimum, 512)) << preferredShift                   // ... 2^31
    let maximum = preferred + input.u32() % (UInt32.max - preferred + 1)
    var nextFD: Int32 = 1000
    func fd() -> Int32 { defer { nextFD += 1 }; return nextFD }
    let listeners = input.u8() % 3  // 0 UNIX, 1 TCP, 2 both
    var unix: NBDHandoverState.UnixListener?
    var tcp: NBDHandoverState.TCPListener?
    if listeners != 1 {
        // 1...107 bytes: ASCII and two-byte characters, never NUL.
        let want = 1 + Int(input.u8()) % 107
        var path = ""
        var bytes = 0
        while bytes < want {
            let b = input.u8()
            let c: Character = b < 0x80 || want - bytes < 2 ? Character(Unicode.Scalar(0x21 + b % 0x5E)) : Character(Unicode.Scalar(UInt32(b) + 0x80)!)
            path.append(c)
            bytes += c.utf8.count
        }
        unix = .init(fd: fd(), path: path)
    }
    if listeners != 0 { tcp = .init(fd: fd(), port: input.u16()) }
    let known = NBDProtocol.ClientFlags([.fixedNewstyle, .noZeroes]).rawValue
    let promisable = NBDProtocol.TransmissionFlags([.hasFlags, .readOnly, .sendFlush, .sendFUA, .sendTrim,
                                                    .sendWriteZeroes, .canMultiConn]).rawValue
    var clients: [NBDHandoverState.Client] = []
    // Distinct server slots, in any order: slot k + (a rotation the input picks) mod 64.
    let rotation = Int(input.u8())
    for k in 0..<(Int(input.u8()) % 17) {
        let phase = NBDHandoverState.Phase(rawValue: input.u8() % 3)!
        let clientFlags = phase == .awaitingClientFlags ? 0 : input.u32() & known
        let promised = phase == .transmission ? input.u16() & promisable | NBDProtocol.TransmissionFlags.hasFlags.rawValue : 0
        // Mostly short; one in eight up to the maximum (a pattern, the input is rarely that long).
        let length = input.u8() % 8 == 0 ? Int(input.u16()) % (NBDHandoverState.maximumPendingInput + 1) : Int(input.u8())
        let seed = input.u8()
        let pending = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
        var client = NBDHandoverState.Client(fd: fd(), isTCP: input.bool(), phase: phase, clientFlags: clientFlags,
                                             promisedFlags: promised, pendingInput: pending, slot: (k + rotation) % 64,
                                             generation: input.u32())
        if phase == .transmission {
            // Up to 8 requests in flight, each a command with the operation and buffer it is
            // submitted with, in distinct request slots.
            for q in 0..<(Int(input.u8()) % 9) {
                let length = 512 * (1 + Int(input.u16()) % 64)
                let first = Int(input.u8())
                let request: NBDHandoverState.Request
                switch input.u8() % 6 {
                case 0: request = .init(slot: q * 3, flushing: false, operation: .read, flushAfter: false, command: NBDProtocol.Command.read,
                                        cookie: input.u64(), offset: input.u64(), length: length, buffer: BackendBuffer(first: first, count: 1, length: length))
                case 1: request = .init(slot: q * 3, flushing: false, operation: input.bool() ? .write : .writeFUA, flushAfter: false,
                                        command: NBDProtocol.Command.write, cookie: input.u64(), offset: input.u64(), length: length,
                                        buffer: BackendBuffer(first: first, count: 2, length: length))
                case 2: request = .init(slot: q * 3, flushing: false, operation: .flush, flushAfter: false, command: NBDProtocol.Command.flush,
                                        cookie: input.u64(), offset: 0, length: 0, buffer: BackendBuffer(first: first, count: 1, length: 0))
                case 3: request = .init(slot: q * 3, flushing: input.bool(), operation: .trim, flushAfter: true, command: NBDProtocol.Command.trim,
                                        cookie: input.u64(), offset: input.u64(), length: length, buffer: BackendBuffer(first: first, count: 1, length: 0))
                case 4: request = .init(slot: q * 3, flushing: false, operation: .writeZeroes, flushAfter: false,
                                        command: NBDProtocol.Command.writeZeroes, cookie: input.u64(), offset: input.u64(), length: length,
                                        buffer: BackendBuffer(first: first, count: 1, length: 0))
                default: request = .init(slot: q * 3, flushing: false, operation: .trim, flushAfter: false, command: NBDProtocol.Command.trim,
                                         cookie: input.u64(), offset: input.u64(), length: length, buffer: BackendBuffer(first: first, count: 1, length: 0))
                }
                client.inFlight.append(request)
            }
        }
        clients.append(client)
    }
    return NBDHandoverState(exportSize: exportSize, minimumBlockSize: minimum, preferredBlockSize: preferred,
                            maximumPayload: maximum, unixListener: unix, tcpListener: tcp, clients: clients)
}

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

/// Seed prefix for a state with `n` descriptors, honest, in mode `mode`.
func prefix(_ n: Int, _ mode: UInt8) -> [UInt8] { [UInt8(n), mode] }

/// A 256 MiB export as `serve blk` offers it: 512-byte blocks, 4 KiB preferred, 32 MiB payload.
func state(unix: String? = "/run/nbd.sock", tcp: UInt16? = nil, clients: [(Bool, NBDHandoverState.Phase, [UInt8])] = []) -> NBDHandoverState {
    var next: Int32 = 1000
    func fd() -> Int32 { defer { next += 1 }; return next }
    let u = unix.map { NBDHandoverState.UnixListener(fd: fd(), path: $0) }
    let t = tcp.map { NBDHandoverState.TCPListener(fd: fd(), port: $0) }
    let cs = clients.map { (isTCP, phase, pending) in
        NBDHandoverState.Client(fd: fd(), isTCP: isTCP, phase: phase,
                                clientFlags: phase == .awaitingClientFlags ? 0 : 3,  // FIXED_NEWSTYLE | NO_ZEROES
                                promisedFlags: phase == .transmission ? 0x1 | 0x4 | 0x8 | 0x20 | 0x40 : 0,
                                pendingInput: pending, slot: Int(next - 1000))
    }
    return NBDHandoverState(exportSize: 256 << 20, minimumBlockSize: 512, preferredBlockSize: 4096,
                            maximumPayload: 32 << 20, unixListener: u, tcpListener: t, clients: cs)
}

func seeds() -> [(name: String, bytes: [UInt8])] {
    var result: [(name: String, bytes: [UInt8])] = []
    func add(_ name: String, _ s: NBDHandoverState) {
        precondition(s.problem() == nil, "seed \(name): \(s.problem()!)")
        result.append((name, prefix(s.descriptors.count, 0) + s.encoded()))
    }
    add("unix-listener-only", state())
    add("tcp-listener-only", state(unix: nil, tcp: 10809))
    add("both-listeners", state(tcp: 10809))
    // A request header (READ 4 KiB at 0) half received, an option header, the client flags.
    var request: [UInt8] = [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0]
    request += [0, 0, 0, 0, 0, 0, 0, 7] + [0, 0, 0, 0, 0, 0, 0, 0] + [0, 0, 0x10, 0]
    let option: [UInt8] = [0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 0, 0]
    // Two listeners and two clients in each phase: the eight descriptors the target passes at most.
    let busy = state(tcp: 10809, clients: [
        (false, .awaitingClientFlags, []), (true, .awaitingClientFlags, [0, 0, 0]),
        (false, .negotiating, []), (true, .negotiating, option),
        (true, .transmission, Array(request.prefix(20))), (false, .transmission, request + request.prefix(6)),
    ])
    add("clients-in-every-phase", busy)
    add("maximum-pending-input", state(clients: [(false, .transmission,
        (0..<NBDHandoverState.maximumPendingInput).map { UInt8(truncatingIfNeeded: $0) })]))
    // Well-formed but refused by problem(): a client in transmission promised flags without HAS_FLAGS.
    var noHasFlags = busy
    noHasFlags.clients[4].promisedFlags &= ~1
    result.append(("transmission-without-has-flags", prefix(noHasFlags.descriptors.count, 0) + noHasFlags.encoded()))
    add("longest-path", state(unix: "/" + String(repeating: "p", count: 106), clients: [(false, .negotiating, option)]))
    add("multibyte-path", state(unix: "/tmp/nbd-\u{e9}t\u{e9}-\u{1F4BE}.sock"))
    // The TCP listener numbered 0 and the UNIX listener 1: legal, the decoder takes descriptors by index.
    var swapped = state(tcp: 10809).encoded()
    // Header 10 bytes, export and descriptor count 24, "present" 1; indices are little-endian.
    let unixIndex = 35, tcpIndex = 35 + 4 + 2 + "/run/nbd.sock".utf8.count + 1
    precondition(swapped[unixIndex] == 0 && swapped[tcpIndex] == 1)
    swapped[unixIndex] = 1
    swapped[tcpIndex] = 0
    result.append(("listener-indices-swapped", prefix(2, 0) + swapped))
    // Truncations of the busy state, with the header fixed (mode 1) so that they reach the field
    // that is cut: in the export, the listeners, a client header and a client's pending input.
    let full = busy.encoded()
    for cut in [20, 40, 60, 75, 90, full.count - 5] {
        result.append(("truncated-at-\(cut)", prefix(busy.descriptors.count, 1) + Array(full[10..<cut])))
    }
    result.append(("truncated-raw", prefix(busy.descriptors.count, 0) + Array(full.prefix(full.count - 1))))
    // Generated: every length byte at a middling value.
    result.append(("generated", prefix(3, 2) + [UInt8](repeating: 0x41, count: 96)))
    return result
}
