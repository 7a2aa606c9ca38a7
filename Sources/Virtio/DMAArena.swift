/// Where the device reaches memory that is one range for the CPU but not for the device: without
/// an IOMMU (VFIO no-IOMMU mode) the device uses physical addresses, and a mapping is physically
/// contiguous only within each of its pages (2 MiB hugepages). `addresses[i]` is the device
/// address of segment `i`, the `1 << shift` bytes from offset `i << shift` of the memory.
///
/// The table belongs to the memory's owner and lives as long as the memory; this is a plain view
/// of it (no reference counting on the paths that compute addresses).
public struct DMASegments: @unchecked Sendable, Equatable {
    public let addresses: UnsafePointer<UInt64>
    public let count: Int
    public let shift: Int

    public init(addresses: UnsafePointer<UInt64>, count: Int, shift: Int) {
        precondition(count > 0 && (12...30).contains(shift), "DMA segments: \(count) of 2^\(shift) bytes")
        self.addresses = addresses
        self.count = count
        self.shift = shift
    }

    public var size: Int { 1 << shift }

    /// The device address of byte `offset` of the memory.
    @inline(__always)
    public func address(ofOffset offset: Int) -> UInt64 {
        addresses[offset >> shift] &+ UInt64(offset & (size - 1))
    }

    /// The offset in the memory of `[address, address + length)`, if the range lies inside one
    /// segment; nil otherwise.
    public func offset(ofAddress address: UInt64, length: Int) -> Int? {
        guard length >= 0, length <= size else { return nil }
        for i in 0..<count where address >= addresses[i] && address - addresses[i] <= UInt64(size - length) {
            return (i << shift) + Int(address - addresses[i])
        }
        return nil
    }
}

/// A slice of device-visible memory: where the CPU sees it and where the device does.
///
/// `deviceAddress` is the device address of the first byte; `deviceAddress(at:)` that of any byte.
/// Both agree with `deviceAddress + offset` unless the memory is segmented (`DMASegments`), where
/// a slice that crosses a segment is not one range for the device: the arena never hands out such
/// a slice except as an array whose elements each stay inside one segment.
public struct DMASlice: @unchecked Sendable, Equatable {
    public let pointer: UnsafeMutableRawPointer
    public let deviceAddress: UInt64
    public let size: Int
    /// The memory's segments and this slice's offset in that memory; nil: one linear range.
    public let segments: DMASegments?
    let memoryOffset: Int

    public init(pointer: UnsafeMutableRawPointer, deviceAddress: UInt64, size: Int) {
        self.pointer = pointer
        self.deviceAddress = deviceAddress
        self.size = size
        self.segments = nil
        self.memoryOffset = 0
    }

    /// The whole of a segmented memory at `pointer`.
    public init(pointer: UnsafeMutableRawPointer, size: Int, segments: DMASegments) {
        precondition(size <= segments.count << segments.shift, "DMA memory larger than its segments")
        self.init(pointer: pointer, size: size, segments: segments, memoryOffset: 0)
    }

    init(pointer: UnsafeMutableRawPointer, size: Int, segments: DMASegments, memoryOffset: Int) {
        self.pointer = pointer
        self.size = size
        self.segments = segments
        self.memoryOffset = memoryOffset
        self.deviceAddress = segments.address(ofOffset: memoryOffset)
    }

    /// The device address of byte `offset` of the slice.
    @inline(__always)
    public func deviceAddress(at offset: Int) -> UInt64 {
        guard let segments else { return deviceAddress &+ UInt64(offset) }
        return segments.address(ofOffset: memoryOffset + offset)
    }

    /// The sub-slice `[offset, offset + size)`.
    public func slice(_ offset: Int, _ size: Int) -> DMASlice {
        precondition(offset >= 0 && size >= 0 && offset + size <= self.size, "DMA slice outside its parent")
        guard let segments else {
            return DMASlice(pointer: pointer + offset, deviceAddress: deviceAddress + UInt64(offset), size: size)
        }
        return DMASlice(pointer: pointer + offset, size: size, segments: segments, memoryOffset: memoryOffset + offset)
    }
}

/// One block of device-visible memory per device, handed out by a bump allocator.
///
/// Rings and request buffers are carved from it when queues are built; after a reset the whole
/// arena is taken back with `reset()` (the device uses no buffer after a reset, spec 2.4), so the
/// data path never allocates. The memory itself belongs to the transport (a memfd mapped through
/// the IOMMU for VFIO, plain memory for the emulator); this class only hands out pieces.
///
/// Segmented memory (`DMASegments`, no IOMMU): no piece crosses a segment, and an array of
/// elements larger than a segment in total keeps each element inside one (`allocate(element:)`).
public final class DMAArena: @unchecked Sendable {
    public let memory: DMASlice
    public private(set) var used = 0

    public init(memory: DMASlice) {
        self.memory = memory
    }

    /// The stride an array of `bytes`-byte elements needs so that each element is one range for
    /// the device: `bytes` on linear memory; on segmented memory the next power of two (it then
    /// divides the segment, and elements aligned to it never cross one).
    public func elementStride(_ bytes: Int) -> Int {
        guard memory.segments != nil, bytes > 1 else { return bytes }
        return 1 << (Int.bitWidth - (bytes - 1).leadingZeroBitCount)
    }

    /// `size` bytes aligned to `alignment` (a power of two) in both address spaces, zeroed unless
    /// `zeroed` is false: then the same layout is recomputed over memory a running device still
    /// uses (adopting it on a live upgrade), and not a byte of it is written.
    ///
    /// `element`: the piece is an array of `element`-byte elements (a stride from
    /// `elementStride`), each of which the device must see as one range; only segmented memory
    /// cares. Without it, the whole piece must be one range.
    public func allocate(_ size: Int, alignment: Int = 64, element: Int? = nil, zeroed: Bool = true) throws(VirtioError) -> DMASlice {
        precondition(alignment > 0 && alignment & (alignment - 1) == 0, "alignment must be a power of two")
        var start: Int
        if let segments = memory.segments {
            // Offsets aligned in the memory are aligned for the device: segments start aligned.
            let unit = element ?? size
            guard unit <= segments.size, element == nil || segments.size % unit == 0 else {
                throw .notContiguous(requested: unit, segment: segments.size)
            }
            start = align(used, element == nil ? alignment : max(alignment, unit))
            // A single piece that would cross a segment starts at the next one instead.
            if element == nil, size > 0, start >> segments.shift != (start + size - 1) >> segments.shift {
                start = align(start, segments.size)
            }
        } else {
            // Align the device address; the CPU pointer shares the same offset from a page-aligned base.
            let misalignment = Int((memory.deviceAddress + UInt64(used)) & UInt64(alignment - 1))
            start = used + (misalignment == 0 ? 0 : alignment - misalignment)
        }
        guard size >= 0, start + size <= memory.size else {
            throw .outOfDMAMemory(requested: size, available: max(0, memory.size - start))
        }
        used = start + size
        let slice = memory.slice(start, size)
        if zeroed { slice.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: size) }
        return slice
    }

    private func align(_ offset: Int, _ alignment: Int) -> Int {
        (offset + alignment - 1) & ~(alignment - 1)
    }

    /// Takes every piece back. Only after a device reset: until then the device may still use them.
    public func reset() {
        used = 0
    }

    /// The CPU pointer of `[address, address + length)` in device addresses, if it lies inside the
    /// arena (and, on segmented memory, inside one segment).
    public func pointer(deviceAddress address: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        if let segments = memory.segments {
            guard let offset = segments.offset(ofAddress: address, length: length), offset + length <= memory.size else { return nil }
            return memory.pointer + offset
        }
        guard address >= memory.deviceAddress, length >= 0,
              address - memory.deviceAddress <= UInt64(memory.size),
              UInt64(length) <= UInt64(memory.size) - (address - memory.deviceAddress) else { return nil }
        return memory.pointer + Int(address - memory.deviceAddress)
    }

    /// Whether `[address, address + length)` lies inside the arena, in device addresses.
    public func contains(deviceAddress address: UInt64, length: Int) -> Bool {
        pointer(deviceAddress: address, length: length) != nil
    }
}
