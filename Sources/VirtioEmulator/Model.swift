import Virtio

extension EmulatedDevice {
    /// What the device is and offers: its type, features, queues, memory, interrupts and the
    /// device-specific configuration. Presets: `.rng`, `.rng(seed:)`, `.blk(capacitySectors:)`.
    public struct Model: Sendable {
        public var type: DeviceType
        public var offeredFeatures: Features
        /// One entry per queue: its maximum size (`queue_size`). 0 or a value that is not a power
        /// of 2 makes a faulty device (a split ring needs a power of 2, spec 2.7).
        public var queueMaxSizes: [UInt16]
        /// Size of the device-visible memory block (rounded up to a page): 4 MiB, 64 MiB for `.blk`.
        public var memorySize: Int = 4 << 20
        /// The bus address the device sees the block at; deliberately not the CPU address.
        public var memoryBase: UInt64 = 0x4000_0000
        /// Memory the device sees in pieces, as physical memory without an IOMMU: with a
        /// segment size (a power of two from 4 KiB), each segment of the block is at its own bus
        /// address, in reverse order and with a gap after each, so one range for the CPU is
        /// never one for the device and any access across a segment is refused. nil: one range.
        public var memorySegmentSize: Int?
        /// MSI-X vectors the device has; nil: one per queue plus one for configuration changes.
        public var interruptVectors: Int?
        /// Seed of the entropy device's generator (SplitMix64): same seed, same bytes.
        public var entropySeed: UInt64 = 0x5EED_0000_0000_0001
        /// At most this many random bytes per entropy request (spec 5.4.6.2: the device MAY use
        /// less than the whole buffer); nil fills every buffer completely.
        public var entropyBytesPerRequest: Int?
        /// The block device's configuration space and identity (used when `type` is `.block`).
        public var block = BlockConfig(capacitySectors: 0)
        /// The network device's configuration space (used when `type` is `.net`; see NetModel.swift).
        public var net = NetConfig()
        /// Scan every enabled queue on every pass, notified or not. Off by default: a strict
        /// device only looks at a queue after an available buffer notification (spec 2.7.13.4),
        /// so a driver that forgets to notify hangs here as it would on hardware.
        public var pollsRings = false
        /// Packed used descriptors as QEMU writes them (hw/virtio/virtio.c,
        /// virtqueue_packed_fill_desc): the length without the WRITE flag §2.8.4 asks for. Off
        /// by default (the spec's way).
        public var packedUsedWithoutWrite = false
        /// The function has a reset below virtio (a PCIe FLR, as QEMU's virtio-pci devices behind a
        /// PCIe port): `resetFunction()` resets it whatever its status logic does. Off by
        /// default, as on a device on the root bus.
        public var functionLevelReset = false

        public init(type: DeviceType, offeredFeatures: Features, queueMaxSizes: [UInt16]) {
            self.type = type
            self.offeredFeatures = offeredFeatures
            self.queueMaxSizes = queueMaxSizes
        }

        /// This model, offering VIRTIO_F_RING_PACKED too when `format` is packed (QEMU's
        /// `packed=on`), so a driver that asks for it gets the packed ring (§2.8).
        public func offering(_ format: RingFormat) -> Model {
            var m = self
            if format == .packed { m.offeredFeatures.insert(.ringPacked) }
            return m
        }

        /// Like QEMU's virtio-rng-pci with iommu_platform=on: one queue of 8 entries.
        public static let rng = Model(
            type: .entropy,
            offeredFeatures: [.ringIndirectDesc, .ringEventIdx, .version1, .accessPlatform, .ringReset],
            queueMaxSizes: [8])

        /// `.rng` with a chosen generator seed and queue size.
        public static func rng(seed: UInt64, queueSize: UInt16 = 8) -> Model {
            var m = rng
            m.entropySeed = seed
            m.queueMaxSizes = [queueSize]
            return m
        }

        /// Like QEMU's virtio-blk-pci (spec 5.2): `capacitySectors` 512-byte sectors of sparse,
        /// zero-filled storage, `queues` request queues (MQ offered when more than one), FLUSH,
        /// DISCARD, WRITE_ZEROES, SEG_MAX, BLK_SIZE, TOPOLOGY, and RO when `readOnly`.
        public static func blk(capacitySectors: UInt64, queues: Int = 1, queueSize: UInt16 = 256,
                               readOnly: Bool = false) -> Model {
            precondition(queues >= 1, "a block device has at least one request queue")
            var features: Features = [
                BlockFeature.segMax, BlockFeature.blkSize, BlockFeature.flush, BlockFeature.topology,
                BlockFeature.discard, BlockFeature.writeZeroes,
                .ringIndirectDesc, .ringEventIdx, .version1, .accessPlatform, .ringReset,
            ]
            if queues > 1 { features.insert(BlockFeature.mq) }
            if readOnly { features.insert(BlockFeature.readOnly) }
            var m = Model(type: .block, offeredFeatures: features,
                          queueMaxSizes: Array(repeating: queueSize, count: queues))
            m.block = BlockConfig(capacitySectors: capacitySectors)
            // Room for a full queue of large requests (memory is mapped lazily, so it costs little).
            m.memorySize = 64 << 20
            m.block.segMax = UInt32(max(Int(queueSize) - 2, 1))
            return m
        }

        var vectorCount: Int { interruptVectors ?? queueMaxSizes.count + 1 }
    }

    /// `struct virtio_blk_config` (spec 5.2.4) and the GET_ID string. Every value is reported as
    /// set, including nonsense ones (capacity 0 or huge, seg_max 0) for hardening tests.
    public struct BlockConfig: Sendable, Equatable {
        /// In 512-byte sectors. Storage is sparse, so any value works.
        public var capacitySectors: UInt64
        public var sizeMax: UInt32 = 0
        public var segMax: UInt32 = 126
        public var cylinders: UInt16 = 0
        public var heads: UInt8 = 0
        public var sectorsPerTrack: UInt8 = 0
        public var blockSize: UInt32 = 512
        public var physicalBlockExponent: UInt8 = 0
        public var alignmentOffset: UInt8 = 0
        public var minIOSize: UInt16 = 0
        public var optIOSize: UInt32 = 0
        public var maxDiscardSectors: UInt32 = 0x3FFF_FFFF
        public var maxDiscardSegments: UInt32 = 1
        public var discardSectorAlignment: UInt32 = 1
        public var maxWriteZeroesSectors: UInt32 = 0x3FFF_FFFF
        public var maxWriteZeroesSegments: UInt32 = 1
        public var writeZeroesMayUnmap: UInt8 = 1
        /// The device ID string returned by GET_ID (NUL-padded to 20 bytes, cut at 20).
        public var serial = "emulated-blk"

        public init(capacitySectors: UInt64) { self.capacitySectors = capacitySectors }
    }
}

/// Block device feature bits (spec 5.2.3), named here for the emulator's own use.
enum BlockFeature {
    static let sizeMax = Features(bit: 1)
    static let segMax = Features(bit: 2)
    static let geometry = Features(bit: 4)
    static let readOnly = Features(bit: 5)
    static let blkSize = Features(bit: 6)
    static let flush = Features(bit: 9)
    static let topology = Features(bit: 10)
    static let mq = Features(bit: 12)
    static let discard = Features(bit: 13)
    static let writeZeroes = Features(bit: 14)
}
