/// A slice of device-visible memory: where the CPU sees it and where the device does.
public struct DMASlice: @unchecked Sendable, Equatable {
    public let pointer: UnsafeMutableRawPointer
    public let deviceAddress: UInt64
    public let size: Int

    public init(pointer: UnsafeMutableRawPointer, deviceAddress: UInt64, size: Int) {
        self.pointer = pointer
        self.deviceAddress = deviceAddress
        self.size = size
    }

    /// The sub-slice `[offset, offset + size)`.
    public func slice(_ offset: Int, _ size: Int) -> DMASlice {
        precondition(offset >= 0 && size >= 0 && offset + size <= self.size, "DMA slice outside its parent")
        return DMASlice(pointer: pointer + offset, deviceAddress: deviceAddress + UInt64(offset), size: size)
    }
}

/// One contiguous block of device-visible memory per device, handed out by a bump allocator.
///
/// Rings and request buffers are carved from it when queues are built; after a reset the whole
/// arena is taken back with `reset()` (the device uses no buffer after a reset, spec 2.4), so the
/// data path never allocates. The memory itself belongs to the transport (a memfd mapped through
/// the IOMMU for VFIO, plain memory for the emulator); this class only hands out pieces.
public final class DMAArena: @unchecked Sendable {
    public let memory: DMASlice
    public private(set) var used = 0

    public init(memory: DMASlice) {
        self.memory = memory
    }

    /// `size` bytes aligned to `alignment` (a power of two) in both address spaces, zeroed unless
    /// `zeroed` is false: then the same layout is recomputed over memory a running device still
    /// uses (adopting it on a live upgrade), and not a byte of it is written.
    public func allocate(_ size: Int, alignment: Int = 64, zeroed: Bool = true) throws(VirtioError) -> DMASlice {
        precondition(alignment > 0 && alignment & (alignment - 1) == 0, "alignment must be a power of two")
        // Align the device address; the CPU pointer shares the same offset from a page-aligned base.
        let misalignment = Int((memory.deviceAddress + UInt64(used)) & UInt64(alignment - 1))
        let start = used + (misalignment == 0 ? 0 : alignment - misalignment)
        guard size >= 0, start + size <= memory.size else {
            throw .outOfDMAMemory(requested: size, available: max(0, memory.size - start))
        }
        used = start + size
        let slice = memory.slice(start, size)
        if zeroed { slice.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: size) }
        return slice
    }

    /// Takes every piece back. Only after a device reset: until then the device may still use them.
    public func reset() {
        used = 0
    }

    /// Whether `[address, address + length)` lies inside the arena, in device addresses.
    public func contains(deviceAddress address: UInt64, length: Int) -> Bool {
        address >= memory.deviceAddress && length >= 0
            && address - memory.deviceAddress <= UInt64(memory.size)
            && UInt64(length) <= UInt64(memory.size) - (address - memory.deviceAddress)
    }
}
