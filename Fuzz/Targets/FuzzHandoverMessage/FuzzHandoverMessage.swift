import FuzzSupport
import Upgrade

/// Fuzz target: the control-socket message decoder of a hot upgrade (`HandoverMessage(decoding:)`),
/// what the serving driver reads from a successor (and `virtio-vfio upgrade`) and the other way
/// round.
///
/// Input: 1 byte mode, then
///   mode 0 (raw):       one message as it came over the socket;
///   mode 1 (generated): a description of a message within the decoder's limits (every kind;
///                       strings up to 4096 bytes of UTF-8, ASCII and multi-byte; up to 256
///                       arguments), built as a `HandoverMessage` and encoded with `encoded()`.
///
/// Asserts: no crash, no ASan report; a message that decodes re-encodes to exactly the bytes it
/// came from (every field has one encoding: kinds, modes and the touched flag are checked, strings
/// are validated UTF-8 kept byte for byte, nothing may follow) and decodes again to itself; a
/// generated message decodes to itself.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    if input.u8() % 2 == 0 {
        decode(Array(input.rest()))
    } else {
        let message = generate(&input)
        let bytes = message.encoded()
        do {
            let decoded = try HandoverMessage(decoding: bytes)
            require(decoded == message, "a generated message decoded to a different message: \(decoded)")
            require(decoded.encoded() == bytes, "a generated message does not re-encode to its bytes")
        } catch {
            require(false, "a message within the decoder's limits was refused: \(error)")
        }
    }
    return 0
}

func decode(_ bytes: [UInt8]) {
    let message: HandoverMessage
    do {
        message = try HandoverMessage(decoding: bytes)
    } catch {
        let why = "\(error)"
        trace("refused: \(why)")
        return
    }
    trace("decoded: \(String("\(message)".prefix(200)))")
    let again = message.encoded()
    require(again == bytes, "decoded \(message) from \(bytes.count) bytes; it re-encodes to \(again.count) other bytes")
    do {
        let redecoded = try HandoverMessage(decoding: again)
        require(redecoded == message, "re-encoded and decoded again to \(redecoded), not \(message)")
    } catch {
        require(false, "the re-encoding of \(message) was refused: \(error)")
    }
}

/// The decoder's limit for every string (HandoverMessage.swift: `max: 4096`) and for arguments.
let maxText = 4096
let maxArguments = 256

/// A string of at most `maxText` bytes of UTF-8, shaped by the input: its length, then one
/// character per input byte (ASCII including NUL and controls, two-, three- and four-byte
/// characters); past the end of the input, a repeating pattern.
func text(_ input: inout FuzzInput) -> String {
    let want = Int(input.u16()) % (maxText + 1)
    var s = ""
    var bytes = 0
    var i = 0
    while bytes < want {
        let b = input.isEmpty ? UInt8(truncatingIfNeeded: 0x20 + i % 0x5F) : input.u8()
        i += 1
        let scalar: Unicode.Scalar
        switch b {
        case 0..<0x80: scalar = Unicode.Scalar(b)
        case 0x80..<0xC0: scalar = Unicode.Scalar(UInt32(b) << 3)!                 // 0x400 ... 0x5F8: two bytes
        case 0xC0..<0xF0: scalar = Unicode.Scalar(0x4E00 + UInt32(b))!             // CJK: three bytes
        default: scalar = Unicode.Scalar(0x1F300 + UInt32(b))!                     // four bytes
        }
        guard bytes + scalar.utf8.count <= want else { break }
        s.unicodeScalars.append(scalar)
        bytes += scalar.utf8.count
    }
    return s
}

func generate(_ input: inout FuzzInput) -> HandoverMessage {
    switch input.u8() % 15 {
    case 0:
        let mode = HandoverMessage.Mode.allCases[Int(input.u8()) % HandoverMessage.Mode.allCases.count]
        return .hello(mode: mode, driverVersion: text(&input), pid: Int32(bitPattern: input.u32()))
    case 1: return .refused(text(&input))
    case 2: return .stateFollows
    case 3: return .ready(text(&input))
    case 4: return .declined(text(&input), touchedDevice: input.bool())
    case 5: return .go
    case 6: return .abort(text(&input))
    case 7: return .describe
    case 8: return .deviceFollows
    case 9: return .prepared
    case 10: return .resumed(text(&input))
    case 11: return .started(pid: Int32(bitPattern: input.u32()))
    case 12: return .upgradeOutcome(upgraded: input.bool(), summary: text(&input))
    case 13:
        let mode = HandoverMessage.Mode.allCases[Int(input.u8()) % HandoverMessage.Mode.allCases.count]
        let binary = text(&input)
        var arguments: [String] = []
        for _ in 0..<(Int(input.u8()) % 8) { arguments.append(String(decoding: (0..<Int(input.u8() % 32)).map { _ in 0x20 + input.u8() % 0x5F }, as: UTF8.self)) }
        return .upgrade(binary: binary, mode: mode, arguments: arguments)
    default:
        let pid = Int32(bitPattern: input.u32())
        let version = text(&input)
        let features = input.u64()
        let count = Int(input.u16()) % (maxArguments + 1)
        // Arguments are mostly short: a length byte each rather than text()'s u16 (up to 255 bytes).
        var arguments: [String] = []
        for _ in 0..<count {
            let n = Int(input.u8())
            arguments.append(String(decoding: (0..<n).map { _ in 0x20 + input.u8() % 0x5F }, as: UTF8.self))
        }
        if input.u8() % 16 == 0, !arguments.isEmpty { arguments[arguments.count - 1] = text(&input) }
        return .described(pid: pid, driverVersion: version, features: features, arguments: arguments)
    }
}

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

func seeds() -> [(name: String, bytes: [UInt8])] {
    let arguments = ["/usr/local/bin/virtio-vfio", "serve", "blk", "0000:00:05.0", "--nbd", "unix:/tmp/nbd.sock",
                     "--tcp", "127.0.0.1:10809", "--irq", "msix"]
    let messages: [(String, HandoverMessage)] = [
        ("hello-reset", .hello(mode: .reset, driverVersion: "0.1.0", pid: 4242)),
        ("hello-live", .hello(mode: .live, driverVersion: "0.1.0-no-event-idx", pid: 1)),
        ("hello-auto", .hello(mode: .auto, driverVersion: "", pid: -1)),
        ("refused", .refused("another handover is in progress")),
        ("device-follows", .deviceFollows),
        ("prepared", .prepared),
        ("state-follows", .stateFollows),
        ("ready", .ready("live: adopted 1 queue, first read 4096 bytes in 180 µs")),
        ("declined-untouched", .declined("state record: queue 0 size 0", touchedDevice: false)),
        ("declined-touched", .declined("device did not reset within 1000 ms", touchedDevice: true)),
        ("go", .go),
        ("abort", .abort("not healthy within 5000 ms")),
        ("describe", .describe),
        ("described", .described(pid: 4242, driverVersion: "0.1.0", features: 0x3_3000_0200, arguments: arguments)),
        ("described-no-arguments", .described(pid: 7, driverVersion: "0.1.0", features: 1 << 32, arguments: [])),
        ("refused-longest", .refused(String(repeating: "\u{e9}", count: maxText / 2))),
        ("described-most-arguments", .described(pid: 7, driverVersion: "0.1.0", features: 1 << 32,
                                                arguments: (0..<maxArguments).map { "--feature=\($0)" })),
    ]
    var result = messages.map { (name: $0.0, bytes: [0] + $0.1.encoded()) }
    // Refusals: an unknown kind, an unknown mode, touched = 2, a string that is not UTF-8.
    result.append(("unknown-kind", [0, 12]))
    result.append(("kind-0", [0, 0]))
    result.append(("hello-mode-4", [0, 1, 4, 0, 0, 0, 0, 0, 0]))
    result.append(("declined-touched-2", [0, 5, 1, 0, 0x41, 2]))
    result.append(("ready-not-utf8", [0, 4, 2, 0, 0xC3, 0x28]))
    // Generated: every byte at a middling value.
    result.append(("generated", [1] + [UInt8](repeating: 0x41, count: 64)))
    return result
}
