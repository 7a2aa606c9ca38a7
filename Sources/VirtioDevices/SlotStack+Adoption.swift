import Virtio

extension SlotStack {
    /// The idle slots of a net queue adopted from a previous driver (live upgrade) whose
    /// requests are `snapshot.outstanding`, each token a buffer slot: every slot the device does
    /// not hold. Each token must be a distinct slot below the queue size, and each request must
    /// offer exactly `writableBytes` device-writable bytes (what this version posts: the buffer
    /// size on receive, 0 on transmit); otherwise the adoption is refused by name.
    init(idleBesides snapshot: QueueSnapshot, writableBytes: UInt32, kind: String) throws(VirtioError) {
        let size = Int(snapshot.size)
        var held = [Bool](repeating: false, count: size)
        for request in snapshot.outstanding {
            guard request.token < UInt64(size), !held[Int(request.token)] else {
                throw .adoption(queue: snapshot.index, "\(kind) slot \(request.token) handed over is not a slot of \(size), or appears twice")
            }
            guard request.writableBytes == writableBytes else {
                throw .adoption(queue: snapshot.index, "\(kind) slot \(request.token) offers \(request.writableBytes) device-writable bytes, this version posts \(writableBytes)")
            }
            held[Int(request.token)] = true
        }
        self.init(capacity: size)
        for slot in (0..<size).reversed() where !held[slot] { push(slot) }
    }
}
