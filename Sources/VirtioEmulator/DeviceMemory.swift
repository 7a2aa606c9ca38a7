#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CVirtioShim
import Synchronization
import Virtio

/// The emulated device's view of memory: one page-aligned block that the device reaches at its
/// own bus address (`deviceBase`), like DMA memory behind an IOMMU; or, with a segment size, in
/// segments each at its own bus address (reversed, with gaps), like physical memory without one.
///
/// Every address the device dereferences goes through `translate`, which bounds-checks it like an
/// IOMMU would: an address or length outside the block (or across a segment) is refused, never
/// touched.
///
/// The block is a memfd mapped shared, as the driver's DMA memory is under VFIO: a successor
/// driver in a hot-upgrade test receives the descriptor and can check it names the same memory.
final class DeviceMemory: @unchecked Sendable {
    let cpuBase: UnsafeMutableRawPointer
    let deviceBase: UInt64
    let size: Int
    let descriptor: Int32
    /// The bus address of each segment, when the memory is segmented.
    let segments: DMASegments?
    private let segmentTable: UnsafeMutablePointer<UInt64>?

    init(size requested: Int, deviceBase: UInt64, segmentSize: Int? = nil) {
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
        if let segmentSize {
            precondition(segmentSize >= page && segmentSize & (segmentSize - 1) == 0, "segment size must be a power of two from 4 KiB")
            let count = (size + segmentSize - 1) / segmentSize
            let table = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
            // Segment i at base + (count - 1 - i) * 2 * segmentSize: reversed, a hole after each.
            for i in 0..<count { table[i] = deviceBase + UInt64((count - 1 - i) * 2 * segmentSize) }
            segmentTable = table
            segments = DMASegments(addresses: table, count: count, shift: segmentSize.trailingZeroBitCount)
        } else {
            segmentTable = nil
            segments = nil
        }
    }

    deinit {
        munmap(cpuBase, size)
        close(descriptor)
        segmentTable?.deallocate()
    }

    var slice: DMASlice {
        guard let segments else { return DMASlice(pointer: cpuBase, deviceAddress: deviceBase, size: size) }
        return DMASlice(pointer: cpuBase, size: size, segments: segments)
    }

    /// The bus address of byte `offset` of the block.
    func busAddress(ofOffset offset: Int) -> UInt64 {
        segments?.address(ofOffset: offset) ?? deviceBase + UInt64(offset)
    }

    /// The CPU address of `[address, address + length)`, or nil if any byte of it is outside.
    @inline(__always)
    func translate(_ address: UInt64, _ length: Int) -> UnsafeMutableRawPointer? {
        if let segments {
            guard let offset = segments.offset(ofAddress: address, length: length), offset + length <= size else { return nil }
            return cpuBase + offset
        }
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
    /// A 32-bit slot per queue: a driver writes 16 bits (the queue index) or, with
    /// VIRTIO_F_NOTIFICATION_DATA, 32 (§4.1.5.2). A 16-bit write leaves the upper half idle.
    static let idle: UInt32 = 0xFFFF_FFFF
    let slots: UnsafeMutablePointer<Atomic<UInt32>>
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
    func take(_ queue: Int) -> UInt32? {
        let v = slots[queue].exchange(NotifySlots.idle, ordering: .acquiringAndReleasing)
        return v == NotifySlots.idle ? nil : v
    }

    func clear(_ queue: Int) { slots[queue].store(NotifySlots.idle, ordering: .releasing) }
}
