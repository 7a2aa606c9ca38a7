import Virtio

/// virtio-blk request types and status values (virtio 1.2 §5.2.6).
public enum BlockRequestType: UInt32, Sendable {
    case read = 0, write = 1, flush = 4, getID = 8, discard = 11, writeZeroes = 13
}

public enum BlockStatus {
    public static let ok: UInt8 = 0, ioError: UInt8 = 1, unsupported: UInt8 = 2
    /// Not a status the device writes (§5.2.6): the request was completed without an answer
    /// (`BlockQueue.complete` reports any other byte as this). A failure of the device, not of the I/O.
    public static let invalid: UInt8 = 0xFF
}

/// Feature bits of virtio-blk (§5.2.3).
public extension Features {
    static let blkSizeMax = Features(bit: 1), blkSegMax = Features(bit: 2), blkGeometry = Features(bit: 4)
    static let blkReadOnly = Features(bit: 5), blkBlockSize = Features(bit: 6), blkFlush = Features(bit: 9)
    static let blkTopology = Features(bit: 10), blkConfigWCE = Features(bit: 11), blkMultiQueue = Features(bit: 12)
    static let blkDiscard = Features(bit: 13), blkWriteZeroes = Features(bit: 14)
}

/// The device configuration of a virtio-blk device (§5.2.4), read consistently (config_generation
/// loop, §2.5.1) and validated: a device reporting nonsense is refused here, not trusted later.
public struct BlockConfig: Sendable, Equatable {
    /// Always in 512-byte sectors, whatever the block size (§5.2.4).
    public var capacitySectors: UInt64
    public var sizeMax: UInt32?
    /// The segment size used when the device offers SIZE_MAX with `size_max` 0 (Linux: a page).
    public static let sizeMaxWhenZero: UInt32 = 4096
    public var segMax: UInt32?
    public var blockSize: UInt32
    public var numQueues: UInt16
    public var readOnly: Bool
    public var flush: Bool
    public var maxDiscardSectors: UInt32?
    public var maxWriteZeroesSectors: UInt32?
    public var writeback: UInt8?

    public static let sectorSize = 512
    /// Largest capacity accepted: byte offsets must fit an Int64 (8 EiB).
    public static let maxCapacitySectors = UInt64(Int64.max) / 512

    public var capacityBytes: UInt64 { capacitySectors * 512 }

    /// A configuration as a device would report it (for tests and tools; drivers read it with
    /// `init(reading:features:)`).
    public init(capacitySectors: UInt64, blockSize: UInt32 = 512, readOnly: Bool = false, flush: Bool = true,
                maxDiscardSectors: UInt32? = nil, maxWriteZeroesSectors: UInt32? = nil) {
        self.capacitySectors = capacitySectors
        self.blockSize = blockSize
        numQueues = 1
        self.readOnly = readOnly
        self.flush = flush
        self.maxDiscardSectors = maxDiscardSectors
        self.maxWriteZeroesSectors = maxWriteZeroesSectors
    }

    // Offsets in struct virtio_blk_config (§5.2.4).
    enum Offset {
        static let capacity = 0, sizeMax = 8, segMax = 12, blkSize = 20, writeback = 32, numQueues = 34
        static let maxDiscardSectors = 36, maxWriteZeroesSectors = 48
    }

    public init<T: Transport & ~Copyable>(reading transport: borrowing T, features: Features) throws(VirtioError) {
        func u32(_ offset: Int) throws(VirtioError) -> UInt32 {
            guard let v = transport.readDeviceConfig(offset, width: 4) else {
                throw .deviceFailed(status: transport.readStatus().rawValue, during: "reading blk config at offset \(offset): outside the device configuration")
            }
            return v
        }
        func u16(_ offset: Int) throws(VirtioError) -> UInt16 {
            guard let v = transport.readDeviceConfig(offset, width: 2) else {
                throw .deviceFailed(status: transport.readStatus().rawValue, during: "reading blk config at offset \(offset)")
            }
            return UInt16(truncatingIfNeeded: v)
        }
        var raw = try Lifecycle.readConfig(transport) { () throws(VirtioError) in
            (capacity: UInt64(try u32(Offset.capacity)) | UInt64(try u32(Offset.capacity + 4)) << 32,
             sizeMax: features.contains(.blkSizeMax) ? try u32(Offset.sizeMax) : nil,
             segMax: features.contains(.blkSegMax) ? try u32(Offset.segMax) : nil,
             blockSize: features.contains(.blkBlockSize) ? try u32(Offset.blkSize) : 512,
             numQueues: features.contains(.blkMultiQueue) ? try u16(Offset.numQueues) : 1,
             discard: features.contains(.blkDiscard) ? try u32(Offset.maxDiscardSectors) : nil,
             zeroes: features.contains(.blkWriteZeroes) ? try u32(Offset.maxWriteZeroesSectors) : nil,
             writeback: features.contains(.blkConfigWCE)
                ? UInt8(truncatingIfNeeded: transport.readDeviceConfig(Offset.writeback, width: 1) ?? 0) : nil)
        }
        func bad(_ why: String) -> VirtioError { .deviceFailed(status: transport.readStatus().rawValue, during: "blk configuration: \(why)") }
        guard raw.capacity > 0 else { throw bad("capacity 0: the device has no storage") }
        guard raw.capacity <= BlockConfig.maxCapacitySectors else { throw bad("capacity \(raw.capacity) sectors is larger than 8 EiB") }
        if let segMax = raw.segMax, segMax == 0 { throw bad("seg_max 0: no request could carry data") }
        // size_max 0 with VIRTIO_BLK_F_SIZE_MAX offered states no usable limit: qemu-storage-daemon's
        // vhost-user-blk export reports exactly that. Linux's block layer raises any segment limit
        // below a page to the page (blk_queue_max_segment_size), so such a device works with
        // 4 KiB segments; so does it here. A limit of 1-511 bytes, below one sector, is refused.
        if raw.sizeMax == 0 { raw.sizeMax = BlockConfig.sizeMaxWhenZero }
        if let sizeMax = raw.sizeMax, sizeMax < 512 { throw bad("size_max \(sizeMax) is below one sector") }
        guard raw.blockSize >= 512, raw.blockSize <= 1 << 16, raw.blockSize & (raw.blockSize - 1) == 0 else {
            throw bad("blk_size \(raw.blockSize) is not a power of two between 512 and 64 KiB")
        }
        guard raw.numQueues >= 1 else { throw bad("num_queues 0") }
        capacitySectors = raw.capacity
        sizeMax = raw.sizeMax
        segMax = raw.segMax
        blockSize = raw.blockSize
        numQueues = raw.numQueues
        readOnly = features.contains(.blkReadOnly)
        flush = features.contains(.blkFlush)
        maxDiscardSectors = raw.discard
        maxWriteZeroesSectors = raw.zeroes
        writeback = raw.writeback
    }
}
