import Virtio

extension BlockDevice where T: ~Copyable {
    /// Brings the device back by reset, the seed's third use of it: a device that broke a queue,
    /// set DEVICE_NEEDS_RESET, or was left half-initialised by a successor that failed its upgrade.
    /// Reset (§2.4: afterwards the device uses no buffer), every request still in flight handed to
    /// `cancelled(queue, slot)` for the caller to fail or resubmit, the same features negotiated
    /// again (anything else is refused: the configuration and slots were sized for them), every
    /// queue enabled again on its own memory, DRIVER_OK.
    /// The reset waits up to `resetTimeout` for status to read 0.
    public mutating func recover(resetTimeout: Duration = .seconds(5),
                                 cancelled: (Int, Int) -> Void = { _, _ in }) throws(VirtioError) {
        try Lifecycle.reset(transport, timeout: resetTimeout)
        queue.cancelAll { cancelled(0, $0) }
        for (i, worker) in workerQueues.enumerated() { worker.queue.cancelAll { cancelled(i + 1, $0) } }
        let again = try Lifecycle.negotiate(transport, wanted: negotiation.accepted)
        guard again.accepted == negotiation.accepted else {
            throw .featuresRejected(offered: again.offered.rawValue, accepted: negotiation.accepted.rawValue,
                                    status: transport.readStatus().rawValue)
        }
        let polling = queue.waiter.mode == .poll
        // §3.1.1 step 7: queues and vectors are programmed again before DRIVER_OK; a reset
        // cleared them (§4.1.4.3), the eventfds behind the vectors are unchanged.
        if !polling { _ = try transport.enableInterrupts(count: 1 + workerQueues.count) }
        try transport.setConfigVector(nil)
        try queue.enableAgain(on: transport, vector: polling ? nil : 0)
        for (i, worker) in workerQueues.enumerated() {
            try worker.queue.enableAgain(on: transport, vector: polling ? nil : UInt16(i + 1))
        }
        try Lifecycle.driverOK(transport)
    }
}

extension BlockQueue {
    /// After a reset and `cancelAll`: programs this queue again on the same ring memory.
    mutating func enableAgain<T: Transport & ~Copyable>(on transport: borrowing T, vector: UInt16?) throws(VirtioError) {
        _ = try transport.enableQueue(index, size: queue.size, rings: queue.rings, vector: vector)
        queue.suppressInterrupts()
    }
}
