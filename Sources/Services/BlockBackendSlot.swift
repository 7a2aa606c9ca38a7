import NBD

/// What `VirtioBlockBackend` keeps for one request slot. A run of slots carries one NBD request
/// (one virtio-blk request per slot); the per-run fields are kept in the run's first slot.
struct BlockBackendSlot {
    // Per slot.
    /// Reserved for a request (by `reserve`, until `release`).
    var inUse = false
    /// The first slot of the run this slot's request belongs to; -1 when it has none.
    var run: Int32 = -1
    /// When its request was given to the device (or held), to resubmit in that order.
    var sequence: UInt64 = 0
    /// Waits to be resubmitted after a recovery.
    var held = false

    // Per run, in its first slot.
    /// Requests (chunks) still in flight.
    var remaining: Int32 = 0
    /// The first failure (an errno), 0 while none.
    var failure: Int32 = 0
    /// The caller's tag, returned with the completion.
    var tag: UInt64 = 0
    /// `VirtioBlockBackend.code(_:)` of the operation.
    var operation: UInt8 = 0
    /// A FUA write in its flush phase.
    var flushing = false
    /// Discard and write-zeroes ranges longer than the device's limit go as consecutive requests
    /// in the run's first slot: the next sector and the sectors still to do.
    var rangeNext: UInt64 = 0
    var rangeLeft = 0

    /// The `operation` code of each backend operation.
    static func code(_ operation: BackendOperation) -> UInt8 {
        switch operation {
        case .read: return 0
        case .write: return 1
        case .writeFUA: return 2
        case .flush: return 3
        case .trim: return 4
        case .writeZeroes: return 5
        }
    }
}
