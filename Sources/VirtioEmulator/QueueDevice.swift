/// What the device keeps for one enabled virtqueue, whatever its format: the split ring
/// (`SplitQueueDevice`, spec 2.7) or the packed ring (`PackedQueueDevice`, spec 2.8). Request
/// handling (`serveBlock`, `serveNet`, entropy) sees only this: the chain being served.
class QueueDevice {
    let index: Int
    let size: UInt16
    /// MSI-X vector for used buffer notifications, nil for none.
    let vector: Int?
    /// Why the device stopped using this queue (it then has DEVICE_NEEDS_RESET set).
    var failure: String?
    /// Work left over from a bounded pass: look again without waiting for a notification.
    var rescan = false
    /// Scratch for the chain being served.
    var chain = DescriptorChain()

    init(index: Int, size: UInt16, vector: Int?) {
        self.index = index
        self.size = size
        self.vector = vector
    }
}
