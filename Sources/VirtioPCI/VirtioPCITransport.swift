import PCI
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
    public private(set) var session: VFIOSession

    /// Opens `address` through VFIO and maps its virtio structures. Nothing is written to the
    /// device except enabling memory decoding in its PCI command register if it was off.
    public init(address: PCIAddress, sysfs: SysfsPCI = SysfsPCI()) throws(VirtioPCIError) {
        // Without VFIO nothing else matters: say so first, before any device is looked at.
        do { try VFIOAvailability.check(sysfs: sysfs) } catch { throw .vfio(error) }
        let function: PCIFunction
        do { function = try sysfs.function(at: address) } catch { throw .pci(error) }
        guard let type = DeviceType(pciVendor: function.vendorID, pciDevice: function.deviceID,
                                    subsystemDevice: function.subsystemDeviceID) else {
            throw .notVirtio(function)
        }
        let session: VFIOSession
        do { session = try VFIOSession(function: function, sysfs: sysfs) } catch { throw .vfio(error) }

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
    public func readDeviceFeatures() -> Features { Features(rawValue: common.deviceFeatures()) }
    public func writeDriverFeatures(_ features: Features) { common.setDriverFeatures(features.rawValue) }
    public func queueCount() -> Int { Int(common.numQueues()) }
    public func configGeneration() -> UInt8 { common.configGeneration() }

    public func queueMaxSize(_ index: Int) -> UInt16 {
        guard let queue = UInt16(exactly: index) else { return 0 }
        // §4.1.4.3: queue_size refers to the queue selected by queue_select; select first.
        common.select(queue: queue)
        return common.queueSize()
    }

    /// `queue_notify_off` of a queue (select, then read).
    public func queueNotifyOffset(_ index: Int) -> UInt16 {
        guard let queue = UInt16(exactly: index) else { return 0 }
        common.select(queue: queue)
        return common.queueNotifyOff()
    }

    /// Length of the device-specific configuration window this driver mapped (0 if none).
    public var deviceConfigLength: Int { deviceConfig?.length ?? 0 }
}
