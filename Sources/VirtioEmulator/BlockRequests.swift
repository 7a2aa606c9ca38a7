import Virtio

/// virtio-blk request handling (spec 5.2.6): header {le32 type, le32 reserved, le64 sector}
/// device-readable, then data, then one device-writable status byte.
enum BlockRequest {
    static let typeIn: UInt32 = 0
    static let typeOut: UInt32 = 1
    static let typeFlush: UInt32 = 4
    static let typeGetID: UInt32 = 8
    static let typeDiscard: UInt32 = 11
    static let typeWriteZeroes: UInt32 = 13

    static let ok: UInt8 = 0
    static let ioError: UInt8 = 1
    static let unsupported: UInt8 = 2

    static let sectorSize = 512
    static let headerSize = 16
    static let segmentSize = 16  // struct virtio_blk_discard_write_zeroes
    static let idLength = 20
}

extension DeviceCore {
    func serveBlock(_ q: QueueDevice, _ s: inout State) -> UInt32 {
        let chain = q.chain
        // Built only when a violation is recorded: a string per request would allocate on every request.
        var tag: String { "queue \(q.index): blk request at head \(chain.head)" }
        guard chain.writableLength >= 1 else {
            s.record("\(tag) has no device-writable status byte (§5.2.6)")
            return 0
        }
        let statusAt = chain.writableLength - 1
        func finish(_ status: UInt8, _ dataWritten: Int = 0) -> UInt32 {
            chain.writeByte(statusAt, status)
            return UInt32(dataWritten + 1)
        }
        guard chain.readableLength >= BlockRequest.headerSize else {
            s.record("\(tag): device-readable header is \(chain.readableLength) bytes, not 16 (§5.2.6)")
            return finish(BlockRequest.ioError)
        }
        var header = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &header) { chain.gather(0, BlockRequest.headerSize, into: $0.baseAddress!) }
        let type = UInt32(truncatingIfNeeded: UInt64(littleEndian: header.0))
        let sector = UInt64(littleEndian: header.1)
        let readOnly = model.offeredFeatures.contains(BlockFeature.readOnly)
        let capacity = s.capacitySectors

        // Data lengths in the two directions, and the descriptor count limits (SEG_MAX, SIZE_MAX).
        let inData = chain.writableLength - 1
        let outData = chain.readableLength - BlockRequest.headerSize
        if let problem = segmentProblem(chain, s.driverFeatures) {
            s.record("\(tag): \(problem)")
            return finish(BlockRequest.ioError)
        }
        // Within capacity, and byte offsets that fit in 64 bits whatever capacity the model claims.
        let limit = min(capacity, UInt64.max / UInt64(BlockRequest.sectorSize))
        func inRange(_ first: UInt64, _ count: UInt64) -> Bool {
            first <= limit && count <= limit - first
        }
        // A device with larger logical blocks (blk_size, as QEMU's logical_block_size) fails I/O
        // that does not start and end on one of them, as QEMU does (virtio_blk_sect_range_ok).
        let blockSectors = UInt64(max(512, model.block.blockSize) / 512)
        func aligned(_ first: UInt64, _ bytes: Int) -> Bool {
            first % blockSectors == 0 && UInt64(bytes / BlockRequest.sectorSize) % blockSectors == 0
        }

        switch type {
        case BlockRequest.typeIn:
            guard inData % BlockRequest.sectorSize == 0 else {
                s.record("\(tag): IN data length \(inData) is not a multiple of 512 (§5.2.6.1)")
                return finish(BlockRequest.ioError)
            }
            guard inRange(sector, UInt64(inData / BlockRequest.sectorSize)) else {
                s.record("\(tag): IN of \(inData / 512) sectors at \(sector) beyond capacity \(capacity) (§5.2.6.1)")
                return finish(BlockRequest.ioError)
            }
            guard aligned(sector, inData) else { return finish(BlockRequest.ioError) }
            // The short-read faults: part of the data written, or all of it with a short used length.
            let written = min(inData, max(0, s.faults.shortReadDataBytes ?? inData))
            var at = sector * UInt64(BlockRequest.sectorSize)
            DescriptorChain.pieces(chain.writable, offset: 0, count: written) { p, n in
                s.store.read(at, n, into: p)
                at += UInt64(n)
            }
            return finish(BlockRequest.ok, s.faults.shortReadLength ? written / 2 : written)

        case BlockRequest.typeOut:
            // §5.2.6.2: with RO offered, every write fails and no data is written.
            if readOnly { return finish(BlockRequest.ioError) }
            guard outData % BlockRequest.sectorSize == 0 else {
                s.record("\(tag): OUT data length \(outData) is not a multiple of 512 (§5.2.6.1)")
                return finish(BlockRequest.ioError)
            }
            guard inRange(sector, UInt64(outData / BlockRequest.sectorSize)) else {
                s.record("\(tag): OUT of \(outData / 512) sectors at \(sector) beyond capacity \(capacity) (§5.2.6.1)")
                return finish(BlockRequest.ioError)
            }
            guard aligned(sector, outData) else { return finish(BlockRequest.ioError) }
            var at = sector * UInt64(BlockRequest.sectorSize)
            DescriptorChain.pieces(chain.readable, offset: BlockRequest.headerSize, count: outData) { p, n in
                s.store.write(at, n, from: p)
                at += UInt64(n)
            }
            return finish(BlockRequest.ok)

        case BlockRequest.typeFlush:
            guard model.offeredFeatures.contains(BlockFeature.flush) else { return finish(BlockRequest.unsupported) }
            if sector != 0 { s.record("\(tag): FLUSH with sector \(sector), not 0 (§5.2.6.1)") }
            // Storage is memory: every completed write is already stable.
            return finish(BlockRequest.ok)

        case BlockRequest.typeGetID:
            if inData != BlockRequest.idLength {
                s.record("\(tag): GET_ID data length \(inData), not 20 (§5.2.6.1)")
            }
            var id = Array(model.block.serial.utf8.prefix(BlockRequest.idLength))
            id += Array(repeating: 0, count: BlockRequest.idLength - id.count)
            let n = min(inData, BlockRequest.idLength)
            id.withUnsafeBytes { chain.scatter(0, n, from: $0.baseAddress!) }
            return finish(BlockRequest.ok, n)

        case BlockRequest.typeDiscard, BlockRequest.typeWriteZeroes:
            let discard = type == BlockRequest.typeDiscard
            let feature = discard ? BlockFeature.discard : BlockFeature.writeZeroes
            let name = discard ? "DISCARD" : "WRITE_ZEROES"
            guard s.driverFeatures.contains(feature) else { return finish(BlockRequest.unsupported) }
            if readOnly { return finish(BlockRequest.ioError) }
            guard outData > 0, outData % BlockRequest.segmentSize == 0 else {
                s.record("\(tag): \(name) data length \(outData) is not a non-zero multiple of 16 (§5.2.6.1)")
                return finish(BlockRequest.ioError)
            }
            let count = outData / BlockRequest.segmentSize
            let maxSegments = discard ? model.block.maxDiscardSegments : model.block.maxWriteZeroesSegments
            let maxSectors = discard ? model.block.maxDiscardSectors : model.block.maxWriteZeroesSectors
            if maxSegments > 0 && count > Int(maxSegments) {
                s.record("\(tag): \(name) with \(count) segments, more than \(maxSegments) (§5.2.6.1)")
                return finish(BlockRequest.ioError)
            }
            // Validate every segment before touching storage.
            var ranges: [(UInt64, UInt64)] = []
            for i in 0..<count {
                var segment = (UInt64(0), UInt64(0))
                withUnsafeMutableBytes(of: &segment) {
                    chain.gather(BlockRequest.headerSize + i * BlockRequest.segmentSize, BlockRequest.segmentSize, into: $0.baseAddress!)
                }
                let first = UInt64(littleEndian: segment.0)
                let word = UInt64(littleEndian: segment.1)
                let sectors = UInt64(UInt32(truncatingIfNeeded: word))
                let flags = UInt32(truncatingIfNeeded: word >> 32)
                // §5.2.6.2: unknown flags, or unmap on a discard, are unsupported.
                if flags & ~1 != 0 || (discard && flags & 1 != 0) { return finish(BlockRequest.unsupported) }
                if maxSectors > 0 && sectors > UInt64(maxSectors) {
                    s.record("\(tag): \(name) segment of \(sectors) sectors, more than \(maxSectors) (§5.2.6.1)")
                    return finish(BlockRequest.ioError)
                }
                guard inRange(first, sectors) else {
                    s.record("\(tag): \(name) of \(sectors) sectors at \(first) beyond capacity \(capacity) (§5.2.6.1)")
                    return finish(BlockRequest.ioError)
                }
                ranges.append((first, sectors))
            }
            // Discarded sectors read back as zeroes here; write zeroes MUST (§5.2.6.2).
            for (first, sectors) in ranges {
                s.store.zero(first * UInt64(BlockRequest.sectorSize), sectors * UInt64(BlockRequest.sectorSize))
            }
            return finish(BlockRequest.ok)

        default:
            return finish(BlockRequest.unsupported)
        }
    }

    /// SEG_MAX and SIZE_MAX (spec 5.2.3), when negotiated and non-zero: data descriptors per
    /// request (all but the header's and the status byte's) and bytes per descriptor.
    private func segmentProblem(_ chain: DescriptorChain, _ features: Features) -> String? {
        let block = model.block
        if features.contains(BlockFeature.segMax), block.segMax > 0, chain.descriptors - 2 > Int(block.segMax) {
            return "\(chain.descriptors - 2) data segments, more than seg_max \(block.segMax) (§5.2.3)"
        }
        if features.contains(BlockFeature.sizeMax), block.sizeMax > 0 {
            for segment in chain.readable + chain.writable where segment.length > Int(block.sizeMax) {
                return "a segment of \(segment.length) bytes, more than size_max \(block.sizeMax) (§5.2.3)"
            }
        }
        return nil
    }

    /// `struct virtio_blk_config` (spec 5.2.4) up to `unused1`: 60 bytes, little-endian.
    func blockConfig(_ s: State) -> [UInt8] {
        let b = model.block
        var bytes: [UInt8] = []
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        put(s.capacitySectors)                        // 0 capacity
        put(b.sizeMax)                                // 8 size_max
        put(b.segMax)                                 // 12 seg_max
        put(b.cylinders); put(b.heads); put(b.sectorsPerTrack)  // 16 geometry
        put(b.blockSize)                              // 20 blk_size
        put(b.physicalBlockExponent); put(b.alignmentOffset); put(b.minIOSize); put(b.optIOSize)  // 24 topology
        put(UInt8(0)); put(UInt8(0))                  // 32 writeback, unused0
        put(UInt16(model.queueMaxSizes.count))        // 34 num_queues
        put(b.maxDiscardSectors); put(b.maxDiscardSegments); put(b.discardSectorAlignment)  // 36
        put(b.maxWriteZeroesSectors); put(b.maxWriteZeroesSegments)  // 48
        put(b.writeZeroesMayUnmap)                    // 56
        bytes += [0, 0, 0]                            // 57 unused1
        return bytes
    }
}
