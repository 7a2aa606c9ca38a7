import Synchronization
import Syscalls
import Virtio

/// A spec-strict software virtio device: the device side of the status and feature protocol
/// (virtio 1.2 §2.1, §2.2, §3.1, reset §2.4 and §4.1.4.3), of split virtqueues (§2.7) with
/// indirect descriptors and event index, of per-queue reset (§2.6.1), and an entropy (§5.4) or
/// block (§5.2) device behind them.
///
/// It is a second, real implementation of what the PCI transport talks to, so every layer above
/// `Transport` runs in unit tests. It owns a block of device-visible memory at a bus address that
/// is not its CPU address (`dma`), checks every address it is given like an IOMMU, runs its queues
/// on its own thread (started by the first `enableQueue`, stopped by a reset or `deinit`), and
/// signals eventfds as interrupts. It refuses drivers that break the spec, records why in
/// `violations`, and has fault switches (`faults`, `setNeedsReset()`) for the hardening tests.
public final class EmulatedDevice: Sendable {
    public let model: Model
    let core: DeviceCore
    /// The device-visible memory, as an arena for the driver's rings and buffers (one per device,
    /// always the same instance). Its memory, like the doorbells, lives as long as the device.
    public let dma: DMAArena

    public init(model: Model) {
        self.model = model
        core = DeviceCore(model: model)
        dma = DMAArena(memory: core.memory.slice)
    }

    deinit {
        core.shutdown()
    }

    public var faults: Faults {
        get { core.state.withLock { $0.faults } }
        set { core.state.withLock { $0.faults = newValue } }
    }

    public var violations: [Violation] { core.state.withLock { $0.violations } }
    /// Features the driver accepted (what the device runs with once FEATURES_OK is set).
    public var driverFeatures: Features { core.state.withLock { $0.driverFeatures } }
    /// Completed resets.
    public var resetCount: Int { core.state.withLock { $0.resets } }
    /// Function-level resets (`resetFunction()`).
    public var functionResetCount: Int { core.state.withLock { $0.functionResets } }
    /// How many times a driver wrote queue_enable (enabled a queue), over all queues and resets.
    public var queueEnableWrites: Int { core.state.withLock { $0.queueEnableWrites } }
    /// How many times a driver wrote config_msix_vector.
    public var configVectorWrites: Int { core.state.withLock { $0.configVectorWrites } }
    /// The whole device-visible block (CPU pointer, bus address, size).
    public var memory: DMASlice { core.memory.slice }
    /// The memfd behind `memory` (owned by the device, open as long as it lives).
    public var memoryDescriptor: Int32 { core.memory.descriptor }

    // MARK: Device side of the registers

    public func readStatus() -> DeviceStatus { core.readStatus() }
    public func writeStatus(_ new: DeviceStatus) { core.writeStatus(new) }
    /// A function-level reset, for a model with `functionLevelReset` (a PCIe FLR): the device
    /// starts over whatever its status logic was doing, and its faults end.
    public func resetFunction() throws(VirtioError) {
        guard model.functionLevelReset else { throw .functionReset("the device has no function-level reset") }
        core.resetFunction()
    }
    public func readDeviceFeatures() -> Features { model.offeredFeatures }
    public func writeDriverFeatures(_ features: Features) { core.writeDriverFeatures(features) }
    public func queueCount() -> Int { model.queueMaxSizes.count }

    public func queueMaxSize(_ index: Int) -> UInt16 {
        model.queueMaxSizes.indices.contains(index) ? model.queueMaxSizes[index] : 0
    }

    public func configGeneration() -> UInt8 { core.configGeneration() }

    // MARK: Queues and interrupts (spec 4.1.5.1.3, 2.6.1, 4.1.4.5)

    /// Checks and enables queue `index` (see `Transport.enableQueue`). Every refusal that is a
    /// driver fault is also recorded in `violations`. The doorbell is a 16-bit slot in emulator
    /// memory; the device takes notifications from it on its thread.
    public func enableQueue(_ index: Int, size: UInt16, rings: QueueRings, vector: UInt16?) throws(VirtioError) -> Doorbell {
        try core.enableQueue(index, size: size, rings: rings, vector: vector)
    }

    /// Per-queue reset (VIRTIO_F_RING_RESET must be negotiated, else a violation): once this
    /// returns the device uses no buffer of the queue.
    public func resetQueue(_ index: Int, timeout: Duration) throws(VirtioError) {
        try core.resetQueue(index, timeout: timeout)
    }

    /// Queue `index`'s registers as the driver reads them (see `Transport.queueState`).
    public func queueState(_ index: Int) -> QueueState? { core.queueState(index) }

    public func setConfigVector(_ vector: UInt16?) throws(VirtioError) { try core.setConfigVector(vector) }

    /// Reads and clears ISR status: bit 0 after a used buffer notification (set whether or not
    /// the queue has a vector), bit 1 after a configuration change notification.
    public func readISR() -> UInt8 { core.readISR() }

    /// `count` MSI-X vectors (at most `Model.interruptVectors`), each an eventfd the device
    /// signals; replaces any earlier set. The descriptors stay the device's.
    public func enableInterrupts(count: Int) throws(VirtioError) -> [Int32] {
        try core.enableInterrupts(count: count)
    }

    public func disableInterrupts() { core.disableInterrupts() }

    /// Reads `width` (1, 2 or 4) bytes of device configuration at `offset`, little-endian; nil
    /// outside it. A read not aligned to its width is a violation (§4.1.3.1) and returns nil.
    public func readDeviceConfig(_ offset: Int, width: Int) -> UInt32? {
        core.state.withLock { s -> UInt32? in
            let bytes = model.type == .block ? core.blockConfig(s) : model.type == .net ? core.netConfig(s) : []
            guard [1, 2, 4].contains(width), offset >= 0, offset + width <= bytes.count else { return nil }
            guard offset % width == 0 else {
                s.record("device configuration read of \(width) bytes at unaligned offset \(offset) (§4.1.3.1)")
                return nil
            }
            var v: UInt32 = 0
            for i in 0..<width { v |= UInt32(bytes[offset + i]) << (8 * UInt32(i)) }
            return v
        }
    }

    // MARK: For tests

    /// Waits up to `timeout` for vector `vector` to be signalled; returns the count consumed
    /// (0 on timeout or if the vector does not exist). Only for tests that do not hand the
    /// eventfd to a driver: whoever waits consumes the interrupt.
    public func waitForInterrupt(vector: Int, timeout: Duration) -> UInt64 {
        let v = core.state.withLock { s -> InterruptVector? in
            s.vectors.indices.contains(vector) ? s.vectors[vector] : nil
        }
        guard let v else { return 0 }
        let (seconds, attoseconds) = timeout.components
        let ms = Int32(clamping: seconds * 1000 + attoseconds / 1_000_000_000_000_000)
        return (try? v.event.wait(timeoutMilliseconds: ms)) ?? 0
    }

    /// The device enters an error state at once (spec 2.1.2): DEVICE_NEEDS_RESET, a configuration
    /// change notification if DRIVER_OK is set, and no more buffers used until a reset.
    public func setNeedsReset() {
        core.state.withLock { s in core.needsReset(&s) }
    }

    /// What the device did on queue `index` since it was enabled.
    public func statistics(queue index: Int) -> QueueStatistics {
        core.state.withLock { s in s.statistics.indices.contains(index) ? s.statistics[index] : .init() }
    }

    /// Why the device stopped using queue `index` (a driver fault it found), or nil.
    public func queueFailure(_ index: Int) -> String? {
        core.state.withLock { s in s.queues.indices.contains(index) ? s.queues[index]?.failure : nil }
    }

    /// Whether queue `index` is enabled (set up and not reset).
    public func isQueueEnabled(_ index: Int) -> Bool {
        core.state.withLock { s in s.queues.indices.contains(index) && s.queues[index] != nil }
    }

    /// Whether this device's thread is running.
    public var isWorkerRunning: Bool { core.state.withLock { $0.worker != nil } }

    /// Device threads alive in this process, over all emulated devices: other devices' threads
    /// count too (tests running in parallel, or a device another test still holds), so it is
    /// exact only when nothing else runs (`VIRTIO_VFIO_ISOLATED`).
    public static var liveWorkerThreads: Int { VirtioEmulator.liveWorkerThreads.load(ordering: .relaxed) }

    /// This device's threads started and not yet joined: 0 or 1 unless the worker leaks.
    /// Counted when the join returns, so it is exact whatever else runs in the process.
    public var liveWorkerThreads: Int { core.liveWorkerThreads.load(ordering: .relaxed) }

    /// Block device: `count` bytes of the disk at byte `offset` (zero where never written).
    public func readDisk(offset: UInt64, count: Int) -> [UInt8] {
        core.state.withLock { s in
            [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
                if count > 0 { s.store.read(offset, count, into: UnsafeMutableRawPointer(buffer.baseAddress!)) }
                initialized = count
            }
        }
    }

    /// Block device: writes `bytes` to the disk at byte `offset`, behind the driver's back.
    public func writeDisk(offset: UInt64, _ bytes: [UInt8]) {
        core.state.withLock { s in
            bytes.withUnsafeBytes { if !$0.isEmpty { s.store.write(offset, $0.count, from: $0.baseAddress!) } }
        }
    }

    /// Block device: changes `capacity` at run time, as spec 5.2.6.2 allows: a new
    /// `config_generation` and a configuration change notification.
    public func setCapacity(sectors: UInt64) {
        core.state.withLock { s in
            s.capacitySectors = sectors
            s.configGeneration &+= 1
            if s.status.contains(.driverOK) { core.configInterrupt(&s) }
        }
    }
}
