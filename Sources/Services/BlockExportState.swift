import NBD
import Upgrade

/// What `serve blk` hands over as its service state: the NBD connections and, when requests are
/// carried in flight, the backend's bookkeeping of them. Each part is its own versioned blob.
///
/// Encoding (little-endian, Upgrade's codec), version 1:
///
///     magic "BLKS", version u16, length u32,
///     NBD state length u32, NBD state (`NBDHandoverState`),
///     backend present u8 [backend state length u32, backend state (`BlockBackendHandoverState`)]
///
/// A bare NBD state (magic "NBDH", from builds before this one) is read as connections without
/// requests in flight.
public struct BlockExportState: Sendable, Equatable {
    public static let format = BlobFormat(name: "serve blk hand-over state", magic: Array("BLKS".utf8), version: 1)

    public var connections: NBDHandoverState
    public var backend: BlockBackendHandoverState?

    public init(connections: NBDHandoverState, backend: BlockBackendHandoverState?) {
        self.connections = connections
        self.backend = backend
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.header(Self.format)
        w.lengthPrefixed { w in
            let nbd = connections.encoded()
            w.u32(UInt32(nbd.count))
            w.raw(nbd)
            if let backend {
                let b = backend.encoded()
                w.u8(1); w.u32(UInt32(b.count)); w.raw(b)
            } else {
                w.u8(0)
            }
        }
        return w.bytes
    }

    /// Decodes `encoded()`'s output with the received `descriptors` (in the order the NBD state
    /// numbers them), and checks that the backend carries exactly the requests the connections
    /// have in flight, each in a run of the slots its buffer names.
    public init(decoding bytes: [UInt8], descriptors: [Int32]) throws(BlockExportStateError) {
        if bytes.starts(with: NBDHandoverState.magic) {
            do { self.init(connections: try NBDHandoverState(decoding: bytes, descriptors: descriptors), backend: nil) } catch {
                throw BlockExportStateError("\(error)")
            }
        } else {
            var nbd: [UInt8] = [], backendBytes: [UInt8]?
            do throws(StateRecordError) {
                var r = ByteReader(bytes)
                try r.header(Self.format)
                _ = try r.length("body length")
                nbd = Array(try r.take(Int(try r.u32("NBD state length")), "NBD state"))
                switch try r.u8("backend present") {
                case 0: break
                case 1: backendBytes = Array(try r.take(Int(try r.u32("backend state length")), "backend state"))
                case let v: throw StateRecordError.invalid(field: "backend present", "\(v) (0 or 1)")
                }
                guard r.remaining == 0 else { throw StateRecordError.invalid(field: Self.format.name, "\(r.remaining) bytes after the end") }
            } catch { throw BlockExportStateError("\(error)") }
            let connections: NBDHandoverState
            do { connections = try NBDHandoverState(decoding: nbd, descriptors: descriptors) } catch { throw BlockExportStateError("\(error)") }
            var backend: BlockBackendHandoverState?
            if let backendBytes {
                do { backend = try BlockBackendHandoverState(decoding: backendBytes) } catch { throw BlockExportStateError("\(error)") }
            }
            self.init(connections: connections, backend: backend)
        }
        if let problem = problem() { throw BlockExportStateError(problem) }
    }

    /// Why the two parts disagree, or nil.
    public func problem() -> String? {
        var runs: [UInt64: (first: Int, count: Int)] = [:]
        if let backend {
            var counts = [Int](repeating: 0, count: backend.slots)
            for s in backend.reserved { counts[s.run] += 1 }
            for s in backend.reserved where s.run == s.slot { runs[s.tag] = (s.slot, counts[s.slot]) }
        }
        var requests = 0
        for c in connections.clients {
            for r in c.inFlight {
                requests += 1
                guard let run = runs[c.tag(of: r)] else {
                    return "client in server slot \(c.slot): request slot \(r.slot) is in flight, the backend does not carry it"
                }
                guard run.first == r.buffer.first, run.count == r.buffer.count else {
                    return "client in server slot \(c.slot): request slot \(r.slot) has buffer \(r.buffer.first)+\(r.buffer.count), the backend run \(run.first)+\(run.count)"
                }
                if let backend, r.buffer.length > run.count * backend.slotBytes {
                    return "client in server slot \(c.slot): request slot \(r.slot) has \(r.buffer.length) bytes in \(run.count) slots of \(backend.slotBytes)"
                }
            }
        }
        guard requests == runs.count else { return "the backend carries \(runs.count) requests, the connections \(requests)" }
        return nil
    }
}

public struct BlockExportStateError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
