import Testing
import Foundation
import Glibc
import Services
import Syscalls
import Upgrade
import VirtioDevices

/// What `serve net` hands to its successor: the TAP state blob, and the TAP descriptor itself.
@Suite("serve net hand-over state and TAP adoption", .serialized)
struct TapHandoverTests {
    func sample() -> TapBridgeHandoverState {
        var device = NetCounters()
        device.rxPackets = 1234
        device.txBytes = 1 << 40
        device.rxBadHeader = 3
        var bridge = TapBridgeCounters()
        bridge.toTapDroppedFull = 7
        bridge.fromTapFrames = 99
        return TapBridgeHandoverState(tapName: "vtap0", vnetHeaderSize: 12, receiveBufferSize: 1530, promiscuous: true,
                                      allMulticast: nil, deviceCounters: device, bridgeCounters: bridge)
    }

    @Test func roundTripsEveryCounter() throws {
        let state = sample()
        #expect(try TapBridgeHandoverState(decoding: state.encoded()) == state)
        var all = NetCounters()
        for (i, f) in NetCounters.fields.enumerated() { all[keyPath: f.path] = i + 1 }
        var bridge = TapBridgeCounters()
        for (i, f) in TapBridgeCounters.fields.enumerated() { bridge[keyPath: f.path] = 100 + i }
        var full = state
        full.deviceCounters = all
        full.bridgeCounters = bridge
        #expect(try TapBridgeHandoverState(decoding: full.encoded()) == full)
        #expect(Set(NetCounters.fields.map(\.name) + TapBridgeCounters.fields.map(\.name)).count
                == NetCounters.fields.count + TapBridgeCounters.fields.count, "two counters share a name")
    }

    /// The blob with `counters` in place of the real list.
    func blob(name: String = "vtap0", header: UInt8 = 12, buffer: UInt32 = 1530, promiscuous: UInt8 = 2,
              version: UInt16 = 1, counters: [(String, UInt64)] = [("rx_packets", 5)]) -> [UInt8] {
        var w = ByteWriter()
        w.raw(Array("TAPH".utf8)); w.u16(version); w.string(name); w.u8(header); w.u32(buffer); w.u8(promiscuous); w.u8(0)
        w.u16(UInt16(counters.count))
        for (n, v) in counters { w.string(n); w.u64(v) }
        return w.bytes
    }

    @Test func everyFieldIsChecked() throws {
        #expect(try TapBridgeHandoverState(decoding: blob()).deviceCounters.rxPackets == 5)
        let cases: [([UInt8], String)] = [
            (blob(version: 2), "format 2 is not supported"),
            (blob(name: ""), "TAP name"),
            (blob(name: "a/b"), "TAP name"),
            (blob(name: String(repeating: "x", count: 16)), "TAP name"),
            (blob(name: "/\u{301}"), "TAP name"),  // one character that is not "/", but a "/" byte
            (blob(name: ".."), "TAP name"),
            (blob(name: "a b"), "TAP name"),
            (blob(name: "a:1"), "TAP name"),
            (blob(header: 10), "vnet header size"),
            (blob(buffer: 20), "receive buffer size"),
            (blob(promiscuous: 3), "promiscuous"),
            (blob(counters: [("rx_packets", 1), ("rx_packets", 2)]), "appears twice"),
            (blob(counters: [("rx_packets", UInt64.max)]), "out of range"),
            (Array(blob().dropLast()), "truncated"),
            (blob() + [0], "unexpected bytes"),
            (Array("NOPE".utf8) + blob().dropFirst(4), "not a serve net state"),
        ]
        for (bytes, fragment) in cases {
            #expect { try TapBridgeHandoverState(decoding: bytes) } throws: { "\($0)".contains(fragment) }
        }
    }

    @Test func aCounterThisVersionDoesNotKnowIsSkipped() throws {
        let state = try TapBridgeHandoverState(decoding: blob(counters: [("rx_packets", 5), ("something_new", 9), ("to_tap_frames", 4)]))
        #expect(state.deviceCounters.rxPackets == 5 && state.bridgeCounters.toTapFrames == 4)
    }

    /// A real TAP (needs CAP_NET_ADMIN, as `serve net` does): the descriptor is adopted when it
    /// carries the header size asked for, refused by name otherwise; a socket is no TAP.
    @Test func aHandedOverTapIsCheckedBeforeItIsUsed() throws {
        let name = "vvtest\(getpid() % 100000)"
        let tap = try TapInterface(name: name, vnetHeaderSize: 12)
        let copy = dup(tap.raw)
        let adopted = try TapInterface(adopting: OwnedFD(adopting: dup(tap.raw)), vnetHeaderSize: 12)
        #expect(adopted.name == name && adopted.vnetHeaderSize == 12)
        #expect { _ = try TapInterface(adopting: OwnedFD(adopting: copy), vnetHeaderSize: 0) } throws: {
            "\($0)".contains("carries a virtio-net header, this driver needs 0 bytes")
        }
        var pair: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &pair) == 0)
        Syscall.close(pair[1])
        #expect { _ = try TapInterface(adopting: OwnedFD(adopting: pair[0]), vnetHeaderSize: 12) } throws: {
            "\($0)".contains("TUNGETIFF")
        }
        let plain = try TapInterface(name: name + "p", vnetHeaderSize: 0)
        #expect { _ = try TapInterface(adopting: OwnedFD(adopting: dup(plain.raw)), vnetHeaderSize: 12) } throws: {
            "\($0)".contains("does not carry a virtio-net header")
        }
    }
}
