import NBD
import UBlk
#if canImport(Glibc)
import Glibc
#endif

/// What a ublk request becomes: a backend request (and the result to commit when it succeeds),
/// or an answer given at once. Every field of the kernel's descriptor is checked against the
/// export before anything is submitted.
public enum UBlkRequestMapping: Equatable, Sendable {
    case submit(BackendOperation, offset: UInt64, length: Int, answer: Int32)
    /// Commit this result without touching the device (-errno for a request refused).
    case answer(Int32)

    /// The export a request is checked against.
    public struct Export: Sendable, Equatable {
        public var sectors: UInt64
        public var bufferBytes: Int
        public var readOnly: Bool
        public var canFlush: Bool
        public var canTrim: Bool
        public var canWriteZeroes: Bool

        public init(sectors: UInt64, bufferBytes: Int, readOnly: Bool, canFlush: Bool, canTrim: Bool, canWriteZeroes: Bool) {
            self.sectors = sectors
            self.bufferBytes = bufferBytes
            self.readOnly = readOnly
            self.canFlush = canFlush
            self.canTrim = canTrim
            self.canWriteZeroes = canWriteZeroes
        }
    }

    public static func map(_ d: UBlkABI.IODescriptor, _ export: Export) -> UBlkRequestMapping {
        let sectors = UInt64(d.sectors)
        let inRange = d.startSector <= export.sectors && sectors <= export.sectors - d.startSector
        let offset = d.startSector << 9
        switch d.operation {
        case UBlkABI.Operation.read, UBlkABI.Operation.write:
            let write = d.operation == UBlkABI.Operation.write
            guard sectors > 0, sectors << 9 <= UInt64(export.bufferBytes) else { return .answer(-EINVAL) }
            guard inRange else { return .answer(-EIO) }
            if write && export.readOnly { return .answer(-EROFS) }
            let operation: BackendOperation = !write ? .read : d.flags & UBlkABI.RequestFlag.fua != 0 ? .writeFUA : .write
            // READ and WRITE are committed with every byte done: the kernel re-sends a shortfall.
            return .submit(operation, offset: offset, length: Int(sectors << 9), answer: Int32(sectors << 9))
        case UBlkABI.Operation.flush:
            // Without VIRTIO_BLK_F_FLUSH the device writes through: nothing to flush.
            return export.canFlush ? .submit(.flush, offset: 0, length: 0, answer: 0) : .answer(0)
        case UBlkABI.Operation.discard, UBlkABI.Operation.writeZeroes:
            let trim = d.operation == UBlkABI.Operation.discard
            guard trim ? export.canTrim : export.canWriteZeroes else { return .answer(-EOPNOTSUPP) }
            guard sectors > 0 else { return .answer(-EINVAL) }
            guard inRange else { return .answer(-EIO) }
            if export.readOnly { return .answer(-EROFS) }
            return .submit(trim ? .trim : .writeZeroes, offset: offset, length: Int(sectors << 9), answer: 0)
        default:
            return .answer(-EOPNOTSUPP)
        }
    }
}
