import PCI
import Syscalls
import VFIO
import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The modern virtio-pci transport (virtio 1.2 §4.1) over a VFIO device: owns the VFIO session
/// and the BAR mappings that hold the common, notify, ISR and device configuration structures.
///
/// Stored properties are destroyed in declaration order: the BAR mappings go before the VFIO
/// fds they were mapped from.
public struct VirtioPCITransport: ~Copyable, Transport {
    public let function: PCIFunction
    public let deviceType: DeviceType
    public let capabilities: VirtioPCICapabilities
    /// Info for every region VFIO reports (BARs, ROM, config...).
    public let regions: [VFIORegionInfo]
    public let irqs: [VFIOIRQInfo]
    public let deviceInfo: VFIODeviceInfo
    let bars: MappedBARs
    let common: CommonConfigRegisters
    let notify: MMIOWindow
    let isr: MMIOWindow
    let deviceConfig: MMIOWindow?
    /// The device's DMA memory (one memfd-backed block), carved up by `dma`.
    let dmaBuffer: DMABuffer?
    /// The memfd behind `dmaBuffer` (-1: none), handed to a successor.
    let dmaMemoryDescriptor: Int32
    public let dma: DMAArena
    let interrupts = EventFDSet()
    public private(set) var session: VFIOSession

    /// Opens `address` through VFIO and maps its virtio structures. Nothing is written to the
    /// device except enabling memory decoding in its PCI command register if it was off.
    /// `dmaBytes` of device-visible memory are allocated and mapped through the IOMMU for rings and
    /// buffers (0 for inspection only, as `info` and `reset` do).
    public init(address: PCIAddress, sysfs: SysfsPCI = SysfsPCI(), dmaBytes: Int = 0) throws(VirtioPCIError) {
        // Without VFIO nothing else matters: say so first, before any device is looked at.
        do { try VFIOAvailability.check(sysfs: sysfs) } catch { throw .vfio(error) }
        let (function, type) = try Self.identify(address, sysfs: sysfs)
        var session: VFIOSession
        do { session = try VFIOSession(function: function, sysfs: sysfs) } catch { throw .vfio(error) }
        var buffer: DMABuffer? = nil
        if dmaBytes > 0 {
            do { buffer = try session.allocateDMA(size: dmaBytes, name: "virtio-vfio-\(address)") } catch { throw .vfio(error) }
        }
        try self.init(function: function, type: type, session: session, dmaBuffer: buffer)
    }

    /// Takes over a device another driver process had open (a hot upgrade): its container, group
    /// and device descriptors, its DMA memfd (still mapped in the container at `dmaIOVA`) and its
    /// MSI-X eventfds (still routed). Nothing is written to the device: whether it is reset
    /// (reset mode) or its rings adopted (live mode) is the caller's choice.
    public init(adopting handover: consuming VFIOHandover, sysfs: SysfsPCI = SysfsPCI()) throws(VirtioPCIError) {
        let address = handover.address
        let (function, type) = try Self.identify(address, sysfs: sysfs)
        let interrupts = handover.interrupts
        let iova = handover.dmaIOVA, size = handover.dmaSize, groupNumber = handover.groupNumber
        let memory = handover.dmaMemory
        let session: VFIOSession
        do {
            session = try VFIOSession(adoptingContainer: handover.container, group: handover.group,
                                      groupNumber: groupNumber, device: handover.device, address: address,
                                      reservedIOVA: [(iova, UInt64(size))])
        } catch { throw .vfio(error) }
        let buffer: DMABuffer
        do { buffer = try VFIOSession.adoptDMA(memfd: memory, iova: iova, size: size, noIOMMU: session.iommu == nil) } catch { throw .vfio(error) }
        try self.init(function: function, type: type, session: session, dmaBuffer: buffer)
        self.interrupts.adopt(interrupts.release())
    }

    static func identify(_ address: PCIAddress, sysfs: SysfsPCI) throws(VirtioPCIError) -> (PCIFunction, DeviceType) {
        let function: PCIFunction
        do { function = try sysfs.function(at: address) } catch { throw .pci(error) }
        guard let type = DeviceType(pciVendor: function.vendorID, pciDevice: function.deviceID,
                                    subsystemDevice: function.subsystemDeviceID) else {
            throw .notVirtio(function)
        }
        return (function, type)
    }

    /// Everything past opening: regions, interrupts, the capability walk and the BAR mappings.
    init(function: PCIFunction, type: DeviceType, session: consuming VFIOSession,
         dmaBuffer: consuming DMABuffer?) throws(VirtioPCIError) {
        let address = function.address
        let deviceInfo: VFIODeviceInfo
        var regions: [VFIORegionInfo] = []
        var irqs: [VFIOIRQInfo] = []
        let config: PCIConfigSpace
        let capabilities: VirtioPCICapabilities
        var bars = MappedBARs()
        do {
            deviceInfo = try session.device.info()
            // A hostile kernel is out of scope, but keep loops bounded anyway.
            for index in 0..<min(deviceInfo.regionCount, 16) {
                // vfio-pci counts the VGA region (8) for every device but answers EINVAL for it
                // unless the device is a VGA controller: such a region is absent, not an error.
                do { regions.append(try session.device.regionInfo(index)) } catch {
                    guard case .ioctl(_, _, EINVAL) = error, index != VFIORegionIndex.config else { throw error }
                }
            }
            for index in 0..<min(deviceInfo.irqCount, 8) {
                // ERR (3) and REQ (4) exist only for PCIe functions; EINVAL means absent.
                do { irqs.append(try session.device.irqInfo(index)) } catch {
                    guard case .ioctl(_, _, EINVAL) = error, index > VFIOIRQIndex.msix else { throw error }
                }
            }
            let (configRegion, bytes) = try session.device.configSpace()
            do { config = try PCIConfigSpace(bytes: bytes) } catch { throw VirtioPCIError.pci(error) }
            let barSizes = (0...5).map { index in
                regions.first { $0.index == index }?.size ?? 0
            }
            do { capabilities = try VirtioPCICapabilities(config: config, barSizes: barSizes) } catch {
                throw VirtioPCIError.pci(error)
            }
            // PCI Local Bus Spec 6.2.2: BAR accesses need Memory Space enabled.
            let command = config.command
            if command & PCIConfigSpace.Command.memorySpace == 0 {
                let value = command | PCIConfigSpace.Command.memorySpace
                try session.device.write(region: configRegion, offset: UInt64(PCIConfigSpace.Offset.command),
                                         bytes: [UInt8(value & 0xFF), UInt8(value >> 8)])
            }
            for structure in [capabilities.common, capabilities.notify, capabilities.isr] + (capabilities.device.map { [$0] } ?? [])
            where !bars.isMapped(structure.bar) {
                guard let region = regions.first(where: { $0.index == structure.bar }) else {
                    throw VirtioPCIError.mapping(address, "BAR \(structure.bar) has no VFIO region")
                }
                bars.set(structure.bar, try session.device.map(region: region))
            }
        } catch let error as VirtioPCIError {
            throw error
        } catch let error as VFIOError {
            throw .vfio(error)
        } catch {
            throw .mapping(address, "\(error)")
        }

        let commonWindow = try Self.window(capabilities.common, maximum: 0x40, in: bars, address)
        let notifyWindow = try Self.window(capabilities.notify, maximum: capabilities.notify.length, in: bars, address)
        let isrWindow = try Self.window(capabilities.isr, maximum: 4, in: bars, address)
        var deviceWindow: MMIOWindow?
        if let device = capabilities.device { deviceWindow = try Self.window(device, maximum: 4096, in: bars, address) }

        if session.iommu == nil, dmaBuffer != nil,
           Features(rawValue: CommonConfigRegisters(mmio: commonWindow).deviceFeatures()).contains(.accessPlatform) {
            // §6.1: a device offering ACCESS_PLATFORM expects its addresses translated by the
            // platform (an IOMMU); without one it gets physical addresses it did not ask for.
            throw .needsIOMMU(address)
        }
        if let buffer = dmaBuffer {
            if let table = buffer.pageAddresses {
                // No IOMMU: the device sees the memory hugepage by hugepage, by physical address.
                let segments = DMASegments(addresses: UnsafePointer(table), count: buffer.pageCount, shift: buffer.pageShift)
                self.dma = DMAArena(memory: DMASlice(pointer: buffer.base, size: buffer.size, segments: segments))
            } else {
                self.dma = DMAArena(memory: DMASlice(pointer: buffer.base, deviceAddress: buffer.iova, size: buffer.size))
            }
            self.dmaMemoryDescriptor = buffer.memfd.raw
            self.dmaBuffer = .some(buffer)
        } else {
            // No memory: every allocation from this arena fails with outOfDMAMemory.
            self.dma = DMAArena(memory: DMASlice(pointer: UnsafeMutableRawPointer(bitPattern: 0x1000)!, deviceAddress: 0, size: 0))
            self.dmaMemoryDescriptor = -1
            self.dmaBuffer = nil
        }
        self.function = function
        self.deviceType = type
        self.capabilities = capabilities
        self.regions = regions
        self.irqs = irqs
        self.deviceInfo = deviceInfo
        self.common = CommonConfigRegisters(mmio: commonWindow)
        self.notify = notifyWindow
        self.isr = isrWindow
        self.deviceConfig = deviceWindow
        self.bars = bars
        self.session = session
    }

    /// The mapped part of one virtio structure. §4.1.4.1: the driver SHOULD map only the part of
    /// the structure it needs and MUST handle an unexpectedly large length.
    static func window(_ s: VirtioPCICapabilities.Structure, maximum: UInt64, in bars: borrowing MappedBARs,
                       _ address: PCIAddress) throws(VirtioPCIError) -> MMIOWindow {
        let length = min(s.length, maximum)
        guard let w = bars.window(bar: s.bar, offset: s.offset, length: length) else {
            throw .mapping(address, "\(s.type.name) structure 0x\(String(s.offset, radix: 16))+\(length) does not fit mapped BAR \(s.bar)")
        }
        return w
    }

    public var address: PCIAddress { function.address }

    /// The descriptors a successor needs to drive this device (they stay open here).
    public var handoverDescriptors: VFIODescriptors {
        VFIODescriptors(container: session.container.rawDescriptor, group: session.group.rawDescriptor,
                        groupNumber: session.group.number, device: session.device.rawDescriptor,
                        dmaMemory: dmaMemoryDescriptor, dmaIOVA: dma.memory.deviceAddress, dmaSize: dma.memory.size,
                        interrupts: interrupts.descriptors)
    }

    /// Device-visible memory mapped through this device's IOMMU container.
    public mutating func allocateDMA(size: Int) throws(VFIOError) -> DMABuffer {
        try session.allocateDMA(size: size)
    }

    /// Unmaps and frees a DMA buffer. Only once the device can no longer touch it (after a reset).
    public mutating func free(_ buffer: consuming DMABuffer) throws(VFIOError) {
        try session.free(buffer)
    }

    // MARK: Transport

    public func readStatus() -> DeviceStatus { DeviceStatus(rawValue: common.status()) }
    public func writeStatus(_ status: DeviceStatus) { common.setStatus(status.rawValue) }
    /// VFIO reports a reset method for the function (FLR, PM or a bus reset only it sits on).
    public var canResetFunction: Bool { deviceInfo.supportsReset }
    public func resetFunction() throws(VirtioError) {
        guard canResetFunction else {
            throw .functionReset("VFIO reports no reset method for \(function.address) (no FLR, PM or bus reset)")
        }
        // vfio-pci saves and restores the config space (BARs, command, MSI-X) around the reset,
        // so the mappings and interrupt routing stay valid; the virtio state is gone (§2.4).
        do { try session.device.functionReset() } catch { throw .functionReset("\(error)") }
    }
    public func readDeviceFeatures() -> Features { Features(rawValue: common.deviceFeatures()) }
    public func writeDriverFeatures(_ features: Features) { common.setDriverFeatures(features.rawValue) }
    public func queueCount() -> Int { Int(common.numQueues()) }
    /// The features the device says the driver accepted (meaningful once FEATURES_OK is set).
    public func readDriverFeatures() -> Features { Features(rawValue: common.driverFeatures()) }
    public func configGeneration() -> UInt8 { common.configGeneration() }

    public func queueMaxSize(_ index: Int) -> UInt16 {
        guard let queue = UInt16(exactly: index) else { return 0 }
        // §4.1.4.3: queue_size refers to the queue selected by queue_select; select first.
        common.select(queue: queue)
        return common.queueSize()
    }

    public func queueState(_ index: Int) -> QueueState? {
        guard index >= 0, index < queueCount(), let queue = UInt16(exactly: index) else { return nil }
        // §4.1.4.3: every queue_* field refers to the queue in queue_select; select first. Only
        // reads follow: a running queue is not reprogrammed (§4.1.4.3.2).
        common.select(queue: queue)
        let size = common.queueSize()
        let enabled = common.queueEnable() == 1
        let vector = common.queueVector()
        let rings = common.queueAddresses()
        // §4.1.4.4: the doorbell is at cap.offset + queue_notify_off * notify_off_multiplier.
        let notifyOffset = Int(common.queueNotifyOff()) * Int(capabilities.notify.notifyOffMultiplier ?? 0)
        let width = readDriverFeatures().contains(.notificationData) ? 4 : 2
        let doorbell = notifyOffset + width <= notify.length ? Doorbell(address: notify.base + notifyOffset, value: queue) : nil
        return QueueState(size: size, enabled: enabled, rings: rings, msixVector: vector, doorbell: doorbell)
    }

    /// `queue_notify_off` of a queue (select, then read).
    public func queueNotifyOffset(_ index: Int) -> UInt16 {
        guard let queue = UInt16(exactly: index) else { return 0 }
        common.select(queue: queue)
        return common.queueNotifyOff()
    }

    public func enableQueue(_ index: Int, size: UInt16, rings: QueueRings, vector: UInt16?) throws(VirtioError) -> Doorbell {
        guard index >= 0, index < queueCount(), let queue = UInt16(exactly: index) else {
            throw .queueSetup(queue: index, "the device has \(queueCount()) queues")
        }
        // §4.1.5.1.3 Virtqueue Configuration, in the spec's order:
        // 1. write the queue index to queue_select;
        common.select(queue: queue)
        // 2. read the queue size; 0 means the queue is unavailable.
        let maximum = common.queueSize()
        guard maximum != 0 else { throw .queueSetup(queue: index, "the device reports queue size 0 (queue unavailable)") }
        // QEMU does not enforce its own maximum (HIL.md): never write more than the device reported.
        guard size > 0, size <= maximum, size & (size &- 1) == 0 else {
            throw .queueSetup(queue: index, "size \(size) is not a power of two up to the device's maximum \(maximum)")
        }
        // 3. optionally a smaller size (§4.1.4.3.2: the driver MUST NOT write 0 or a non-power of 2).
        common.setQueueSize(size)
        // 4. MSI-X vector, read back: NO_VECTOR means the device could not allocate it (§4.1.5.1.2).
        common.setQueueVector(vector ?? noMSIXVector)
        if let vector, common.queueVector() != vector {
            throw .queueSetup(queue: index, "the device refused MSI-X vector \(vector) (read back NO_VECTOR)")
        }
        // 5. the addresses of the descriptor table, driver area and device area.
        common.setQueueAddresses(rings)
        // §4.1.4.4: the doorbell is at cap.offset + queue_notify_off * notify_off_multiplier.
        let notifyOffset = Int(common.queueNotifyOff()) * Int(capabilities.notify.notifyOffMultiplier ?? 0)
        // §4.1.4.4.1: room for the 16-bit queue index, or the 32-bit notification data.
        let width = readDriverFeatures().contains(.notificationData) ? 4 : 2
        guard notifyOffset + width <= notify.length else {
            throw .queueSetup(queue: index, "notify offset \(notifyOffset) leaves no room for a \(width)-byte notification in the \(notify.length)-byte notify structure")
        }
        // The device masters the bus for every ring access: PCI command BUS_MASTER (HIL.md: vfio-pci leaves it off).
        do { try enableBusMaster() } catch { throw .queueSetup(queue: index, "\(error)") }
        // 6. enable (§4.1.4.3.2: the driver configures everything else before enabling).
        common.enableQueue()
        return Doorbell(address: notify.base + notifyOffset, value: queue)
    }

    public func resetQueue(_ index: Int, timeout: Duration) throws(VirtioError) {
        guard let queue = UInt16(exactly: index), index < queueCount() else {
            throw .queueSetup(queue: index, "the device has \(queueCount()) queues")
        }
        // §4.1.4.3.2 (VIRTIO_F_RING_RESET): write 1 to queue_reset, then wait until it reads 0,
        // after which the device uses no buffer of the queue and queue_enable reads 0.
        common.select(queue: queue)
        common.startQueueReset()
        let clock = ContinuousClock()
        let start = clock.now
        while common.queueReset() != 0 {
            if clock.now - start > timeout {
                throw .queueSetup(queue: index, "queue_reset still reads 1 after \(timeout); the device did not reset the queue")
            }
        }
        if common.queueEnable() != 0 {
            throw .brokenQueue(queue: index, "queue_enable reads 1 after a completed queue reset (§4.1.4.3.1)")
        }
    }

    public func setConfigVector(_ vector: UInt16?) throws(VirtioError) {
        common.setConfigVector(vector ?? noMSIXVector)
        if let vector, common.configVector() != vector {
            throw .interrupts("the device refused MSI-X vector \(vector) for configuration changes")
        }
    }

    public func readISR() -> UInt8 { isr.load8(0) }

    public func readDeviceConfig(_ offset: Int, width: Int) -> UInt32? {
        guard let window = deviceConfig, [1, 2, 4].contains(width), offset >= 0, offset % width == 0,
              offset + width <= window.length else { return nil }
        switch width {
        case 1: return UInt32(window.load8(offset))
        case 2: return UInt32(window.load16(offset))
        default: return window.load32(offset)
        }
    }

    public func enableInterrupts(count: Int) throws(VirtioError) -> [Int32] {
        guard let msix = irqs.first(where: { $0.index == VFIOIRQIndex.msix }), msix.count >= count, count > 0 else {
            throw .interrupts("\(address) has \(irqs.first { $0.index == VFIOIRQIndex.msix }?.count ?? 0) MSI-X vectors, \(count) needed")
        }
        // Eventfds already routed to `count` vectors (ours, or a predecessor's handed over) stay:
        // a device reset does not touch VFIO's MSI-X routing, only the device's vector numbers.
        if interrupts.descriptors.count == count { return interrupts.descriptors }
        do { try interrupts.create(count: count) } catch { throw .interrupts("eventfd: \(error)") }
        do { try session.device.setIRQs(index: VFIOIRQIndex.msix, eventfds: interrupts.descriptors) } catch {
            interrupts.closeAll()
            throw .interrupts("\(error)")
        }
        return interrupts.descriptors
    }

    public func disableInterrupts() {
        guard !interrupts.descriptors.isEmpty else { return }
        try? session.device.disableIRQs(index: VFIOIRQIndex.msix)
        interrupts.closeAll()
    }

    /// Sets Memory Space and Bus Master in the PCI command register (PCI Local Bus Spec 6.2.2).
    func enableBusMaster() throws(VFIOError) {
        let region = try session.device.regionInfo(VFIORegionIndex.config)
        let bytes = try session.device.read(region: region, offset: UInt64(PCIConfigSpace.Offset.command), count: 2)
        let command = UInt16(bytes[0]) | UInt16(bytes[1]) << 8
        let wanted = command | PCIConfigSpace.Command.memorySpace | PCIConfigSpace.Command.busMaster
        if wanted != command {
            try session.device.write(region: region, offset: UInt64(PCIConfigSpace.Offset.command),
                                     bytes: [UInt8(wanted & 0xFF), UInt8(wanted >> 8)])
        }
    }

    /// Length of the device-specific configuration window this driver mapped (0 if none).
    public var deviceConfigLength: Int { deviceConfig?.length ?? 0 }
}
