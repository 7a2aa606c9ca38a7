#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CVirtioShim
import Synchronization
import Virtio

/// The emulated device's view of memory: one page-aligned block that the device reaches at its
/// own bus address (`deviceBase`), like DMA memory behind an IOMMU.
///
/// Every address the device dereferences goes through `translate`, which bounds-checks it like an
/// IOMMU would: an address or length outside the block is refused, never touched.
///
/// The block is a memfd mapped shared, as the driver's DMA memory is under VFIO: a successor
/// driver in a hot-upgrade test receives the descriptor and can check it names the same memory.
final class DeviceMemory: @unchecked Sendable {
    let cpuBase: UnsafeMutableRawPointer
    let deviceBase: UInt64
    let size: Int
    let descriptor: Int32

    init(size requested: Int, deviceBase: UInt64) {
        let page = 4096
        precondition(requested > 0, "device memory size must be positive")
        precondition(deviceBase % UInt64(page) == 0, "device base address must be page-aligned")
        precondition(deviceBase <= UInt64.max - UInt64(requested), "device memory wraps the address space")
        let size = (requested + page - 1) / page * page
        // A memfd mapped shared: page-aligned, zeroed, returned to the kernel in deinit.
        let fd = CVirtioShim_memfd_create("virtio-emulator-dma", 1)  // MFD_CLOEXEC
        guard fd >= 0, ftruncate(fd, off_t(size)) == 0 else {
            fatalError("emulated device: memfd of \(size) bytes failed (errno \(errno))")
        }
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            fatalError("emulated device: mmap of \(size) bytes failed (errno \(errno))")
        }
        self.descriptor = fd
        self.cpuBase = p
        self.deviceBase = deviceBase
        self.size = size
    }

    deinit {
        munmap(cpuBase, size)
        close(descriptor)
    }

    var slice: DMASlice { DMASlice(pointer: cpuBase, deviceAddress: deviceBase, size: size) }

    /// The CPU address of `[address, address + length)`, or nil if any byte of it is outside.
    @inline(__always)
    func translate(_ address: UInt64, _ length: Int) -> UnsafeMutableRawPointer? {
        guard length >= 0, address >= deviceBase else { return nil }
        let offset = address - deviceBase
        guard offset <= UInt64(size), UInt64(length) <= UInt64(size) - offset else { return nil }
        return cpuBase + Int(offset)
    }
}

/// One 16-bit notification slot per queue, in emulator-owned memory: the driver's `Doorbell`
/// stores the queue index there (spec 4.1.5.2), the device takes it with an atomic exchange
/// against `idle`, so a notification is consumed exactly once.
final class NotifySlots: @unchecked Sendable {
    static let idle: UInt16 = 0xFFFF
    let slots: UnsafeMutablePointer<Atomic<UInt16>>
    let count: Int

    init(count: Int) {
        self.count = max(count, 1)
        slots = .allocate(capacity: self.count)
        for i in 0..<self.count { (slots + i).initialize(to: Atomic(NotifySlots.idle)) }
    }

    deinit {
        slots.deinitialize(count: count)
        slots.deallocate()
    }

    func address(_ queue: Int) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(slots + queue) }

    /// The value written since the last call, or nil if the driver did not notify.
    func take(_ queue: Int) -> UInt16? {
        let v = slots[queue].exchange(NotifySlots.idle, ordering: .acquiringAndReleasing)
        return v == NotifySlots.idle ? nil : v
    }

    func clear(_ queue: Int) { slots[queue].store(NotifySlots.idle, ordering: .releasing) }
}
