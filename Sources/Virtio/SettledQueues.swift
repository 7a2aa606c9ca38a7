import CVirtioShim
import Syscalls

extension Adoption {
    /// After the driver that ran a device died without handing it over (a crash, its descriptors
    /// and DMA memory kept by the service manager): queues `indices` as the device has them, once
    /// every request the dead driver published has completed. With nothing outstanding, no
    /// driver-side bookkeeping is needed beyond the indices, so the rings can be adopted without
    /// a record of the dead driver's state; the device's answers to those requests are dropped
    /// (the clients they belonged to are gone with the dead driver).
    ///
    /// Read, never written: queue_size, queue_enable and the ring addresses (§4.1.4.3), which
    /// must lie in this transport's DMA memory; `avail.idx`, which the dead driver wrote; and
    /// `used.idx`, the device's, polled until it reaches `avail.idx` (at most `settle`). A queue
    /// not enabled, rings outside the memory, a used index more than the queue size behind or any
    /// ahead of the available one, or requests still outstanding after `settle`, throw: the caller
    /// resets the device instead. The snapshots still go through `verify` and the adopting
    /// initialisers' layout check.
    public static func settledSnapshots<T: Transport & ~Copyable>(
        _ transport: borrowing T, queues indices: Range<Int>, settle: Duration
    ) throws(VirtioError) -> [QueueSnapshot] {
        let deadline = monotonicNanoseconds() &+ UInt64(max(0, settle.nanoseconds))
        // The rings below are read as split rings (§2.7); a packed one is taken over by reset.
        guard !transport.readDriverFeatures().contains(.ringPacked) else { throw Virtqueue.packedAdoption(queue: nil) }
        var snapshots: [QueueSnapshot] = []
        for i in indices {
            guard let state = transport.queueState(i) else {
                throw .adoption(queue: i, "the device has no such queue (it has \(transport.queueCount()))")
            }
            guard state.enabled else { throw .adoption(queue: i, "queue_enable reads 0: the dead driver had not set it up") }
            let n = Int(state.size)
            guard n > 0, n & (n - 1) == 0, n <= SplitQueueLayout.maximumSize else {
                throw .adoption(queue: i, "queue_size \(n) is not a power of two up to \(SplitQueueLayout.maximumSize) (§2.7)")
            }
            let arena = transport.dma
            let r = state.rings
            guard arena.contains(deviceAddress: r.descriptors, length: SplitQueueLayout.descriptorTableSize(n)),
                  let avail = arena.pointer(deviceAddress: r.driver, length: SplitQueueLayout.availSize(n)),
                  let used = arena.pointer(deviceAddress: r.device, length: SplitQueueLayout.usedSize(n)) else {
                throw .adoption(queue: i, "rings at \(describe(r)) are not all inside this driver's DMA memory")
            }
            // avail.idx is the dead driver's last publication; nothing writes it any more.
            let availIndex = UInt16(littleEndian: CVirtioShim_mmio_read16(avail + SplitQueueLayout.availIndex))
            var usedIndex: UInt16
            while true {
                // §2.7.8: used.idx is the device's; one volatile load per look, validated below.
                usedIndex = UInt16(littleEndian: CVirtioShim_mmio_read16(used + SplitQueueLayout.usedIndex))
                let outstanding = Int(availIndex &- usedIndex)
                guard outstanding <= n else {
                    throw .adoption(queue: i, "used idx \(usedIndex) is \(outstanding) behind avail idx \(availIndex), more than the queue size \(n)")
                }
                if outstanding == 0 { break }
                guard monotonicNanoseconds() < deadline else {
                    throw .adoption(queue: i, "\(outstanding) requests of the dead driver still outstanding after \(settle)")
                }
                Lifecycle.sleep(.microseconds(200))
            }
            // §2.7.14: order the used.idx load before anything the adopting driver reads next.
            CVirtioShim_barrier_read()
            snapshots.append(QueueSnapshot(index: i, size: state.size, rings: r, availIndex: availIndex, usedIndex: usedIndex))
        }
        return snapshots
    }
}
