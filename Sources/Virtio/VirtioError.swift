/// Errors of the device lifecycle. Each says what the device did and leaves it recoverable by reset.
public enum VirtioError: Error, Equatable, CustomStringConvertible {
    /// Status did not read back 0 after a reset within the timeout (§4.1.4.3.2), and then not
    /// after a function-level reset either (`afterFunctionReset`) or the function has none.
    case resetTimeout(lastStatus: UInt8, waitedMicroseconds: Int64, afterFunctionReset: Bool)
    /// A function-level reset (`Transport.resetFunction`) was not possible or failed.
    case functionReset(String)
    /// The device does not offer VERSION_1: it is a legacy device this driver does not drive.
    case legacyOnly(offered: UInt64)
    /// The device cleared FEATURES_OK: it refused the accepted subset (§3.1.1 step 6).
    case featuresRejected(offered: UInt64, accepted: UInt64, status: UInt8)
    /// The device set DEVICE_NEEDS_RESET or FAILED while being set up.
    case deviceFailed(status: UInt8, during: String)
    /// A feature required by this driver is not offered.
    case missingFeature(String)
    /// The device's arena of DMA memory is too small for what was asked.
    case outOfDMAMemory(requested: Int, available: Int)
    /// A buffer the device must see as one range is larger than (or does not divide) the
    /// segments of memory that is contiguous for it only in pieces (no IOMMU: its hugepages).
    case notContiguous(requested: Int, segment: Int)
    /// Setting up a queue failed (bad size from the device, vector refused, queue missing...).
    case queueSetup(queue: Int, String)
    /// The device broke the virtqueue protocol; the queue is unusable until a reset (spec 2.7).
    case brokenQueue(queue: Int, String)
    /// Interrupts could not be set up or waited for.
    case interrupts(String)
    /// A running device (or one of its queues; nil: the device as a whole) cannot be adopted
    /// without a reset: it differs from the state it was handed over in, or is not idle.
    case adoption(queue: Int?, String)

    public var description: String {
        switch self {
        case .resetTimeout(let status, let waited, let afterFunctionReset):
            let what = afterFunctionReset
                ? "after writing 0 and after a function-level reset (VFIO_DEVICE_RESET)"
                : "after writing 0, and the function has no reset below virtio (VFIO reports no FLR, PM or bus reset)"
            return "device status still reads \(DeviceStatus(rawValue: status)) \(waited) µs \(what): the device is unresponsive; it needs a power cycle or a hot-unplug and rescan of the function"
        case .functionReset(let why):
            return "function-level reset: \(why)"
        case .legacyOnly(let offered):
            return "device does not offer VERSION_1 (offered 0x\(String(offered, radix: 16))): a legacy-only device; use a modern device (QEMU: disable-legacy=on)"
        case .featuresRejected(let offered, let accepted, let status):
            return "device refused features 0x\(String(accepted, radix: 16)) (offered 0x\(String(offered, radix: 16))): FEATURES_OK not set after writing it, status \(DeviceStatus(rawValue: status))"
        case .deviceFailed(let status, let during):
            return "device reported \(DeviceStatus(rawValue: status)) during \(during); it needs a reset ('virtio-vfio reset BDF')"
        case .missingFeature(let name):
            return "device does not offer \(name), which this driver requires"
        case .notContiguous(let requested, let segment):
            return "a \(requested)-byte DMA buffer cannot be contiguous for the device: without an IOMMU its memory is contiguous only in \(segment)-byte pages (use smaller transfers)"
        case .outOfDMAMemory(let requested, let available):
            return "out of DMA memory: \(requested) bytes requested, \(available) left in the device's arena"
        case .queueSetup(let queue, let why):
            return "queue \(queue): \(why)"
        case .brokenQueue(let queue, let why):
            return "queue \(queue) broken: \(why); reset the device to recover"
        case .interrupts(let why):
            return "interrupts: \(why)"
        case .adoption(let queue, let why):
            let what = queue.map { "queue \($0)" } ?? "device"
            return "cannot adopt the running device without a reset: \(what): \(why); start it with a reset instead"
        }
    }
}
