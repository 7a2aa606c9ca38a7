import NBD
import Services
import Testing
import Upgrade
import VirtioDevices

/// The state `serve blk` hands over with requests in flight: the backend's slots, and the
/// connections' requests, which must name exactly the runs the backend carries.
@Suite("serve blk hand-over state: requests in flight")
struct BlockHandoverStateTests {
    typealias Slot = BlockBackendHandoverState.Slot

    /// A READ of 2 slots (4, 5), one of them complete, and a FUA WRITE in its flush (slot 9).
    static let backend = BlockBackendHandoverState(slots: 16, slotBytes: 4096, nextSequence: 40, reserved: [
        Slot(slot: 4, run: 4, sequence: 30, remaining: 1, failure: 0, tag: 1 << 40 | 2 << 20 | 3, operation: 0, flushing: false,
             rangeNext: 0, rangeLeft: 0, request: CarriedBlockRequest(slot: 4, type: 0, sector: 64, bytes: 4096)),
        Slot(slot: 5, run: 4, sequence: 31, remaining: 0, failure: 0, tag: 0, operation: 0, flushing: false,
             rangeNext: 0, rangeLeft: 0, request: nil),
        Slot(slot: 9, run: 9, sequence: 35, remaining: 1, failure: 0, tag: 1 << 40 | 2 << 20 | 5, operation: 2, flushing: true,
             rangeNext: 0, rangeLeft: 0, request: CarriedBlockRequest(slot: 9, type: 4, sector: 0, bytes: 0)),
    ])

    static var connections: NBDHandoverState {
        NBDHandoverState(exportSize: 1 << 20, minimumBlockSize: 512, preferredBlockSize: 4096, maximumPayload: 32768,
                         unixListener: .init(fd: 3, path: "/run/blk.sock"),
                         clients: [.init(fd: 4, isTCP: false, phase: .transmission, clientFlags: 3, promisedFlags: 0x16d, pendingInput: [],
                                         slot: 2, generation: 1, inFlight: [
                                             .init(slot: 3, flushing: false, operation: .read, flushAfter: false, command: NBDProtocol.Command.read,
                                                   cookie: 77, offset: 32768, length: 8192, buffer: BackendBuffer(first: 4, count: 2, length: 8192)),
                                             .init(slot: 5, flushing: false, operation: .writeFUA, flushAfter: false, command: NBDProtocol.Command.write,
                                                   cookie: 78, offset: 0, length: 4096, buffer: BackendBuffer(first: 9, count: 1, length: 4096)),
                                         ])])
    }

    @Test func theBackendStateRoundTripsAndNamesWhatIsWrong() throws {
        #expect(try BlockBackendHandoverState(decoding: Self.backend.encoded()) == Self.backend)
        #expect(Self.backend.carried.map(\.slot) == [4, 9])
        func problem(_ change: (inout BlockBackendHandoverState) -> Void) -> String? {
            var state = Self.backend
            change(&state)
            return state.problem()
        }
        #expect(problem { $0.reserved[0].remaining = 2 }?.contains("run 4 waits for 2 requests, 1 are in the device") == true)
        #expect(problem { $0.reserved[1].run = 7 }?.contains("slot 5 belongs to run 7") == true)
        #expect(problem { $0.reserved[2].slot = 16 }?.contains("slot 16 of 16") == true)
        #expect(problem { $0.reserved[2].request?.type = 99 }?.contains("request type 99") == true)
        #expect(problem { $0.reserved[0].request?.bytes = 8192 }?.contains("a slot holds 4096") == true)
        #expect(problem { $0.reserved[2].tag = $0.reserved[0].tag }?.contains("in flight twice") == true)
        #expect(problem { $0.reserved[2].operation = 6 }?.contains("operation 6") == true)
        // A slot without a request in the device takes 47 bytes: a long run of them is read whole.
        var long = BlockBackendHandoverState(slots: 64, slotBytes: 4096, nextSequence: 1, reserved: [])
        for slot in 0..<64 {
            long.reserved.append(Slot(slot: slot, run: 0, sequence: 0, remaining: slot == 0 ? 1 : 0, failure: 0, tag: slot == 0 ? 1 : 0,
                                      operation: 0, flushing: false, rangeNext: 0, rangeLeft: 0,
                                      request: slot == 0 ? CarriedBlockRequest(slot: 0, type: 0, sector: 0, bytes: 4096) : nil))
        }
        #expect(long.problem() == nil)
        #expect(try BlockBackendHandoverState(decoding: long.encoded()) == long)
        // Every truncation is refused by field.
        let bytes = Self.backend.encoded()
        for n in 0..<bytes.count {
            #expect(throws: StateRecordError.self) { try BlockBackendHandoverState(decoding: Array(bytes[..<n])) }
        }
    }

    @Test func theConnectionsMustHaveExactlyTheRequestsTheBackendCarries() throws {
        let state = BlockExportState(connections: Self.connections, backend: Self.backend)
        let decoded = try BlockExportState(decoding: state.encoded(), descriptors: [3, 4])
        #expect(decoded == state)
        var other = Self.connections
        other.clients[0].inFlight[1].buffer = BackendBuffer(first: 8, count: 1, length: 4096)
        #expect(BlockExportState(connections: other, backend: Self.backend).problem()?.contains("the backend run 9+1") == true)
        other = Self.connections
        other.clients[0].generation = 2
        #expect(BlockExportState(connections: other, backend: Self.backend).problem()?.contains("the backend does not carry it") == true)
        other = Self.connections
        other.clients[0].inFlight.removeLast()
        #expect(BlockExportState(connections: other, backend: Self.backend).problem()?.contains("the backend carries 2 requests, the connections 1") == true)
        // Requests in flight without a backend state (from a build that cannot carry them) are refused.
        #expect(BlockExportState(connections: Self.connections, backend: nil).problem() != nil)
        #expect(throws: BlockExportStateError.self) {
            try BlockExportState(decoding: BlockExportState(connections: other, backend: Self.backend).encoded(), descriptors: [3, 4])
        }
        // A bare NBD state (builds before this one) has nothing in flight.
        var bare = Self.connections
        bare.clients[0].inFlight = []
        let old = try BlockExportState(decoding: bare.encoded(), descriptors: [3, 4])
        #expect(old.backend == nil && old.connections == bare)
    }
}
