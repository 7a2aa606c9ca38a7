import Upgrade
import Virtio

extension StateRecord.Queue {
    init(_ s: QueueSnapshot) {
        self.init(index: UInt16(s.index), size: s.size, descriptors: s.rings.descriptors, driver: s.rings.driver,
                  device: s.rings.device, availIndex: s.availIndex, lastUsedIndex: s.usedIndex)
    }
}

extension StateRecord {
    /// Records `snapshots`: each queue, and the requests the device still holds in the in-flight
    /// table (head, token as tag, device-writable bytes as length; no client).
    mutating func setQueues(_ snapshots: [QueueSnapshot]) {
        queues = snapshots.map(Queue.init)
        inFlight = snapshots.flatMap { s in
            s.outstanding.map {
                InFlight(queue: UInt16(s.index), head: $0.head, slot: UInt32(truncatingIfNeeded: $0.token), client: UInt32.max,
                         tag: $0.token, operation: 0, offset: 0, length: $0.writableBytes)
            }
        }
    }

    /// The queues as `setQueues` recorded them, each with its outstanding requests.
    public var queueSnapshots: [QueueSnapshot] {
        queues.map { q in
            QueueSnapshot(index: Int(q.index), size: q.size,
                          rings: QueueRings(descriptors: q.descriptors, driver: q.driver, device: q.device),
                          availIndex: q.availIndex, usedIndex: q.lastUsedIndex,
                          outstanding: inFlight.filter { $0.queue == q.index }.map {
                              QueueSnapshot.Outstanding(head: $0.head, token: $0.tag, writableBytes: $0.length)
                          })
        }
    }
}
