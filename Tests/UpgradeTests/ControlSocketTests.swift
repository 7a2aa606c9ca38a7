import Testing
import Glibc
import Syscalls
@testable import Upgrade

@Suite("control socket and handover messages")
struct ControlSocketTests {
    func directory() -> String {
        var template = Array("/tmp/virtio-vfio-control.XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    @Test func everyMessageRoundTrips() throws {
        let messages: [HandoverMessage] = [
            .hello(mode: .live, driverVersion: "0.2.0", pid: 42), .refused("busy"), .stateFollows, .ready("ok"),
            .declined("first read failed", touchedDevice: true), .resumed("device reset and rebuilt"), .go, .abort("deadline"), .describe,
            .described(pid: 7, driverVersion: "0.2.0+no-event-idx", features: 0x3_0000_0000, arguments: ["virtio-vfio", "serve", "blk"]),
            .statistics, .counters([]),
            .upgrade(binary: "/opt/virtio-vfio-next/virtio-vfio", mode: .live, arguments: ["--handover-timeout", "500"]),
            .started(pid: 4242), .upgradeOutcome(upgraded: false, summary: "rolled back: first request failed"),
            .counters([.init(name: "rx_packets", value: 12), .init(name: "tx_bytes", value: UInt64.max)]),
        ]
        for m in messages { #expect(try HandoverMessage(decoding: m.encoded()) == m) }
    }

    @Test func countersBeyondTheLimitsAreRefused() throws {
        var bytes: [UInt8] = [13, 0x01, 0x01]  // counters, count 257
        #expect { try HandoverMessage(decoding: bytes) } throws: { "\($0)".contains("counter count") }
        bytes = [13, 1, 0, 65, 0] + Array(repeating: 0x61, count: 65) + Array(repeating: 0, count: 8)  // a 65-byte name
        #expect { try HandoverMessage(decoding: bytes) } throws: { "\($0)".contains("counter 0 name") }
        bytes = HandoverMessage.counters([.init(name: "a", value: 1)]).encoded() + [0]
        #expect { try HandoverMessage(decoding: bytes) } throws: { "\($0)".contains("unexpected bytes") }
    }

    @Test func longReasonsAreClippedAndTooManyArgumentsAreNamed() throws {
        let long = String(repeating: "é", count: 3000)   // 6000 UTF-8 bytes
        guard case .declined(let why, true) = try HandoverMessage(decoding: HandoverMessage.declined(long, touchedDevice: true).encoded()) else {
            Issue.record("not a declined message"); return
        }
        #expect(why.utf8.count <= HandoverMessage.maxText && why.hasSuffix("...") && why.hasPrefix("éé"))
        #expect(HandoverMessage.problem(describing: Array(repeating: "a", count: 257)) == "257 arguments (at most 256)")
        #expect(HandoverMessage.problem(describing: [String(repeating: "a", count: 4097)]) == "an argument of 4097 bytes (at most 4096)")
        #expect(HandoverMessage.problem(describing: Array(repeating: String(repeating: "a", count: 4096), count: 256)) == nil)
    }

    @Test func malformedMessagesAreRefusedByField() {
        #expect(throws: StateRecordError.invalid(field: "message kind", "unknown kind 99")) { try HandoverMessage(decoding: [99]) }
        #expect(throws: StateRecordError.invalid(field: "mode", "unknown mode 9")) { try HandoverMessage(decoding: [1, 9]) }
        #expect(throws: StateRecordError.invalid(field: "touched", "2 is not 0 or 1")) {
            try HandoverMessage(decoding: HandoverMessage.declined("x", touchedDevice: false).encoded().dropLast() + [2])
        }
        #expect(throws: StateRecordError.invalid(field: "message", "1 unexpected bytes at the end")) {
            try HandoverMessage(decoding: HandoverMessage.go.encoded() + [0])
        }
        let hello = HandoverMessage.hello(mode: .reset, driverVersion: "0.2.0", pid: 1).encoded()
        for n in 0..<hello.count { #expect(throws: StateRecordError.self) { try HandoverMessage(decoding: Array(hello.prefix(n))) } }
    }

    @Test func listenerIsPrivateAndAnswersItsOwnUser() throws {
        let dir = directory() + "/run"
        let path = ControlListener.path(for: "0000:00:05.0", directory: dir)
        let listener = try ControlListener(path: path)
        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o600 && st.st_mode & S_IFMT == S_IFSOCK)
        #expect(stat(dir, &st) == 0 && st.st_mode & 0o777 == 0o700)
        let client = try ControlConnection(connectingTo: path)
        var accepted: ControlConnection?
        for _ in 0..<100 where accepted == nil {
            accepted = listener.accept(log: { Issue.record("refused: \($0)") })
            if accepted == nil { usleep(10_000) }
        }
        guard let server = accepted else { Issue.record("no connection accepted"); return }
        #expect(server.peer.uid == geteuid() && server.peer.pid == getpid())
        try client.send(.describe)
        #expect(try server.receiveMessage() == .describe)
        try server.send(.refused("no"))
        #expect(try client.receiveMessage() == .refused("no"))
        _ = consume server
        #expect(try client.receiveMessage() == nil)
        // A second driver for the same device is refused while the first answers.
        #expect(throws: ControlSocketError.self) { _ = try ControlListener(path: path) }
    }

    @Test func successorReplacesTheSocketAtomicallyAndTheOldOneLeavesItAlone() throws {
        let path = ControlListener.path(for: "0000:00:04.0", directory: directory())
        var inode: UInt64 = 0
        do {
            let old = try ControlListener(path: path)
            let new = try ControlListener(path: path, replacing: true)
            var st = stat()
            #expect(stat(path, &st) == 0)
            inode = UInt64(st.st_ino)
            #expect(inode == new.inode && inode != old.inode)
            _ = consume old
            // The old listener went away: the path still holds the successor's socket.
            #expect(stat(path, &st) == 0 && UInt64(st.st_ino) == inode)
            _ = try ControlConnection(connectingTo: path)
        }
        var st = stat()
        #expect(stat(path, &st) != 0, "the last listener removes its own socket file")
    }

    @Test func nobodyListeningIsNamed() {
        #expect(throws: ControlSocketError.nobodyListening(path: "/tmp/nonexistent-virtio-vfio.sock")) {
            _ = try ControlConnection(connectingTo: "/tmp/nonexistent-virtio-vfio.sock")
        }
    }

    @Test func stateRecordCarriesServiceStateAndQuiesceTime() throws {
        var record = sample
        record.serviceState = Array(0..<200).map { UInt8($0) }
        record.quiesceStarted = 123_456_789
        let decoded = try StateRecord(decoding: record.encoded(), descriptorCount: record.descriptors.count)
        #expect(decoded == record)
        #expect(throws: StateRecordError.unsupportedVersion(found: 99, supported: StateRecord.formatVersion)) {
            _ = try StateRecord(decoding: record.encoded(format: 99), descriptorCount: record.descriptors.count)
        }
    }
}
