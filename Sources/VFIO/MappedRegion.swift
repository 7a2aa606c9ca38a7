#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Syscalls

/// A BAR mapped into this process with mmap; unmapped when its owner goes away.
public struct MappedRegion: ~Copyable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    public let regionIndex: Int

    init(base: UnsafeMutableRawPointer, length: Int, regionIndex: Int) {
        self.base = base
        self.length = length
        self.regionIndex = regionIndex
    }

    /// A register window `[offset, offset + length)` inside the mapping. The window does not own
    /// the mapping: it is valid while this `MappedRegion` lives, which its users guarantee by
    /// owning both (see `VirtioPCITransport`).
    public func window(offset: UInt64, length: UInt64) -> MMIOWindow? {
        guard offset <= UInt64(self.length), length <= UInt64(self.length) - offset else { return nil }
        return MMIOWindow(base: base + Int(offset), length: Int(length))
    }

    deinit {
        Syscall.munmap(base, length)
    }
}

/// The one volatile access layer for device registers: every MMIO load and store goes through
/// these methods, which bounds-check the offset against the window and check natural alignment
/// (virtio 1.2 §4.1.3.1: 16-bit and 32-bit fields are accessed with aligned accesses of their width).
/// Values are little-endian on the bus (virtio 1.2 §4.1.3: PCI device configuration is little-endian).
public struct MMIOWindow: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    public init(base: UnsafeMutableRawPointer, length: Int) {
        self.base = base
        self.length = length
    }

    @inline(__always)
    func check(_ offset: Int, _ width: Int) {
        precondition(offset >= 0 && offset + width <= length && offset % width == 0,
                     "MMIO access of \(width) bytes at offset \(offset) outside a \(length)-byte window or unaligned")
    }

    @inline(__always) public func load8(_ offset: Int) -> UInt8 {
        check(offset, 1); return CVirtioShim_mmio_read8(base + offset)
    }
    @inline(__always) public func load16(_ offset: Int) -> UInt16 {
        check(offset, 2); return UInt16(littleEndian: CVirtioShim_mmio_read16(base + offset))
    }
    @inline(__always) public func load32(_ offset: Int) -> UInt32 {
        check(offset, 4); return UInt32(littleEndian: CVirtioShim_mmio_read32(base + offset))
    }
    @inline(__always) public func store8(_ offset: Int, _ value: UInt8) {
        check(offset, 1); CVirtioShim_mmio_write8(base + offset, value)
    }
    @inline(__always) public func store16(_ offset: Int, _ value: UInt16) {
        check(offset, 2); CVirtioShim_mmio_write16(base + offset, value.littleEndian)
    }
    @inline(__always) public func store32(_ offset: Int, _ value: UInt32) {
        check(offset, 4); CVirtioShim_mmio_write32(base + offset, value.littleEndian)
    }
    /// A 64-bit field as two 32-bit accesses, low half first (virtio 1.2 §4.1.3.1 allows the driver
    /// to access the halves independently; low-then-high is the order Linux uses).
    @inline(__always) public func store64Split(_ offset: Int, _ value: UInt64) {
        store32(offset, UInt32(truncatingIfNeeded: value))
        store32(offset + 4, UInt32(truncatingIfNeeded: value >> 32))
    }
    @inline(__always) public func load64Split(_ offset: Int) -> UInt64 {
        UInt64(load32(offset)) | UInt64(load32(offset + 4)) << 32
    }
}
