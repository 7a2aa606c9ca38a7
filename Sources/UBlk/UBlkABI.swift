/// ublk's user-space ABI (Linux include/uapi/linux/ublk_cmd.h as of 6.12). Debian 12's headers
/// carry the 6.1 version of that file, without the ioctl-encoded commands this driver uses, so the
/// values are written here and pinned by UBlkTests against the numbers the 6.12 header gives.
public enum UBlkABI {
    /// `_IOC(direction, 'u', number, size)`: direction 2 read (_IOR), 3 read and write (_IOWR).
    static func encode(direction: UInt32, number: UInt32, size: UInt32) -> UInt32 {
        direction << 30 | size << 16 | UInt32(UInt8(ascii: "u")) << 8 | number
    }

    /// Control commands, on /dev/ublk-control, with a 32-byte `ublksrv_ctrl_cmd` payload
    /// (UBLK_U_CMD_*).
    public enum Command: UInt32, Sendable, CaseIterable {
        case getDeviceInfo = 0x8020_7502
        case addDevice = 0xC020_7504
        case deleteDevice = 0xC020_7505
        case startDevice = 0xC020_7506
        case stopDevice = 0xC020_7507
        case setParameters = 0xC020_7508
        case getParameters = 0x8020_7509
        case startUserRecovery = 0xC020_7510
        case endUserRecovery = 0xC020_7511
        case getFeatures = 0x8020_7513

        public var name: String {
            switch self {
            case .getDeviceInfo: return "GET_DEV_INFO"
            case .addDevice: return "ADD_DEV"
            case .deleteDevice: return "DEL_DEV"
            case .startDevice: return "START_DEV"
            case .stopDevice: return "STOP_DEV"
            case .setParameters: return "SET_PARAMS"
            case .getParameters: return "GET_PARAMS"
            case .startUserRecovery: return "START_USER_RECOVERY"
            case .endUserRecovery: return "END_USER_RECOVERY"
            case .getFeatures: return "GET_FEATURES"
            }
        }
    }

    /// I/O commands, on /dev/ublkcN, with a 16-byte `ublksrv_io_cmd` payload (UBLK_U_IO_*).
    public enum IOCommand: UInt32, Sendable, CaseIterable {
        case fetchRequest = 0xC010_7520
        case commitAndFetchRequest = 0xC010_7521
    }

    /// `ublksrv_ctrl_dev_info.flags` (UBLK_F_*).
    public enum Flag {
        public static let userRecovery: UInt64 = 1 << 3
        public static let userRecoveryReissue: UInt64 = 1 << 4
        public static let unprivileged: UInt64 = 1 << 5
        public static let commandIoctlEncode: UInt64 = 1 << 6
    }

    /// `ublksrv_ctrl_dev_info.state` (UBLK_S_DEV_*).
    public enum DeviceState: UInt16, Sendable {
        case dead = 0, live = 1, quiesced = 2
    }

    /// `ublksrv_io_desc.op_flags & 0xff` (UBLK_IO_OP_*).
    public enum Operation {
        public static let read: UInt8 = 0, write: UInt8 = 1, flush: UInt8 = 2, discard: UInt8 = 3
        public static let writeSame: UInt8 = 4, writeZeroes: UInt8 = 5
    }

    /// `ublksrv_io_desc.op_flags` bits above the operation (UBLK_IO_F_*).
    public enum RequestFlag {
        public static let fua: UInt32 = 1 << 13
        public static let noUnmap: UInt32 = 1 << 15
    }

    /// `ublk_param_basic.attrs` (UBLK_ATTR_*).
    public enum Attribute {
        public static let readOnly: UInt32 = 1, rotational: UInt32 = 2, volatileCache: UInt32 = 4, fua: UInt32 = 8
    }

    /// `ublk_params.types` (UBLK_PARAM_TYPE_*).
    public enum ParameterType {
        public static let basic: UInt32 = 1, discard: UInt32 = 2, deviceNumbers: UInt32 = 4
    }

    /// A FETCH or COMMIT completion's result that means: no more requests for this tag (the device
    /// is stopping or its server is being replaced), UBLK_IO_RES_ABORT = -ENODEV.
    public static let abortResult: Int32 = -19

    public static let maximumQueueDepth = 4096
    /// Each queue's descriptor array is mapped from /dev/ublkcN at queue × this (UBLKSRV_CMD_BUF_OFFSET
    /// + q × round_up(UBLK_MAX_QUEUE_DEPTH × 24, page)).
    public static func descriptorOffset(queue: Int, pageSize: Int) -> UInt64 {
        UInt64(queue) * UInt64((maximumQueueDepth * IODescriptor.size + pageSize - 1) / pageSize * pageSize)
    }
}

extension UBlkABI {
    /// `struct ublksrv_ctrl_cmd` (32 bytes), the payload of every control command.
    public struct ControlCommand: Sendable, Equatable {
        public var deviceID: UInt32
        /// 0xFFFF when the command is about no queue (ADD_DEV insists).
        public var queueID: UInt16 = 0xFFFF
        public var length: UInt16 = 0
        public var address: UInt64 = 0
        public var data: UInt64 = 0

        public init(deviceID: UInt32, length: UInt16 = 0, address: UInt64 = 0, data: UInt64 = 0) {
            self.deviceID = deviceID
            self.length = length
            self.address = address
            self.data = data
        }

        public static let size = 32

        public func write(to p: UnsafeMutableRawBufferPointer) {
            precondition(p.count >= Self.size)
            p.storeBytes(of: deviceID.littleEndian, toByteOffset: 0, as: UInt32.self)
            p.storeBytes(of: queueID.littleEndian, toByteOffset: 4, as: UInt16.self)
            p.storeBytes(of: length.littleEndian, toByteOffset: 6, as: UInt16.self)
            p.storeBytes(of: address.littleEndian, toByteOffset: 8, as: UInt64.self)
            p.storeBytes(of: data.littleEndian, toByteOffset: 16, as: UInt64.self)
            for i in 24..<32 { p[i] = 0 }  // dev_path_len, pad, reserved
        }
    }

    /// `struct ublksrv_ctrl_dev_info` (64 bytes): what ADD_DEV asks for and GET_DEV_INFO reports.
    public struct DeviceInfo: Sendable, Equatable {
        public var queues: UInt16 = 1
        public var depth: UInt16 = 0
        public var state: UInt16 = 0
        public var maxIOBytes: UInt32 = 0
        /// UInt32.max: the kernel picks.
        public var deviceID: UInt32 = .max
        public var serverPID: Int32 = -1
        public var flags: UInt64 = 0
        /// Ignored by the kernel: this driver writes its mark (`UBlkMark`) here.
        public var serverFlags: UInt64 = 0
        public var ownerUID: UInt32 = 0
        public var ownerGID: UInt32 = 0

        public init() {}
        public static let size = 64

        public func write(to p: UnsafeMutableRawBufferPointer) {
            precondition(p.count >= Self.size)
            for i in 0..<Self.size { p[i] = 0 }
            p.storeBytes(of: queues.littleEndian, toByteOffset: 0, as: UInt16.self)
            p.storeBytes(of: depth.littleEndian, toByteOffset: 2, as: UInt16.self)
            p.storeBytes(of: state.littleEndian, toByteOffset: 4, as: UInt16.self)
            p.storeBytes(of: maxIOBytes.littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: deviceID.littleEndian, toByteOffset: 12, as: UInt32.self)
            p.storeBytes(of: serverPID.littleEndian, toByteOffset: 16, as: Int32.self)
            p.storeBytes(of: flags.littleEndian, toByteOffset: 24, as: UInt64.self)
            p.storeBytes(of: serverFlags.littleEndian, toByteOffset: 32, as: UInt64.self)
            p.storeBytes(of: ownerUID.littleEndian, toByteOffset: 40, as: UInt32.self)
            p.storeBytes(of: ownerGID.littleEndian, toByteOffset: 44, as: UInt32.self)
        }

        public init(reading p: UnsafeRawBufferPointer) {
            precondition(p.count >= Self.size)
            queues = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt16.self))
            depth = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            state = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
            maxIOBytes = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            deviceID = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
            serverPID = Int32(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: Int32.self))
            flags = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
            serverFlags = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 32, as: UInt64.self))
            ownerUID = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 40, as: UInt32.self))
            ownerGID = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 44, as: UInt32.self))
        }
    }

    /// `struct ublk_params` (112 bytes) with its basic and discard parts, as SET_PARAMS takes it.
    public struct Parameters: Sendable, Equatable {
        public var attributes: UInt32 = 0
        public var logicalBlockShift: UInt8 = 9
        public var physicalBlockShift: UInt8 = 9
        public var optimalIOShift: UInt8 = 9
        public var minimumIOShift: UInt8 = 9
        public var maxSectors: UInt32 = 0
        public var chunkSectors: UInt32 = 0
        public var deviceSectors: UInt64 = 0
        public var virtualBoundaryMask: UInt64 = 0
        /// nil: the device has no discard or write-zeroes (then the DISCARD part is left out).
        public var discard: Discard?

        public struct Discard: Sendable, Equatable {
            public var alignment: UInt32 = 0
            public var granularity: UInt32 = 512
            public var maxDiscardSectors: UInt32 = 0
            public var maxWriteZeroesSectors: UInt32 = 0
            /// The kernel wants 1 whenever `maxDiscardSectors` is non-zero.
            public var maxDiscardSegments: UInt16 = 1
            public init() {}
        }

        public init() {}
        public static let size = 112

        public var types: UInt32 { ParameterType.basic | (discard != nil ? ParameterType.discard : 0) }

        public func write(to p: UnsafeMutableRawBufferPointer) {
            precondition(p.count >= Self.size)
            for i in 0..<Self.size { p[i] = 0 }
            p.storeBytes(of: UInt32(Self.size).littleEndian, toByteOffset: 0, as: UInt32.self)
            p.storeBytes(of: types.littleEndian, toByteOffset: 4, as: UInt32.self)
            // ublk_param_basic at 8.
            p.storeBytes(of: attributes.littleEndian, toByteOffset: 8, as: UInt32.self)
            p[12] = logicalBlockShift
            p[13] = physicalBlockShift
            p[14] = optimalIOShift
            p[15] = minimumIOShift
            p.storeBytes(of: maxSectors.littleEndian, toByteOffset: 16, as: UInt32.self)
            p.storeBytes(of: chunkSectors.littleEndian, toByteOffset: 20, as: UInt32.self)
            p.storeBytes(of: deviceSectors.littleEndian, toByteOffset: 24, as: UInt64.self)
            p.storeBytes(of: virtualBoundaryMask.littleEndian, toByteOffset: 32, as: UInt64.self)
            // ublk_param_discard at 40 (20 bytes: devt and zoned after it are only 4-aligned).
            if let d = discard {
                p.storeBytes(of: d.alignment.littleEndian, toByteOffset: 40, as: UInt32.self)
                p.storeBytes(of: d.granularity.littleEndian, toByteOffset: 44, as: UInt32.self)
                p.storeBytes(of: d.maxDiscardSectors.littleEndian, toByteOffset: 48, as: UInt32.self)
                p.storeBytes(of: d.maxWriteZeroesSectors.littleEndian, toByteOffset: 52, as: UInt32.self)
                p.storeBytes(of: d.maxDiscardSegments.littleEndian, toByteOffset: 56, as: UInt16.self)
            }
        }

        /// The block device's numbers from GET_PARAMS (`ublk_param_devt` at 60: disk major, minor at 68, 72).
        public static func diskNumbers(reading p: UnsafeRawBufferPointer) -> (major: UInt32, minor: UInt32)? {
            guard p.count >= Self.size,
                  UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)) & ParameterType.deviceNumbers != 0 else { return nil }
            return (UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 68, as: UInt32.self)),
                    UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 72, as: UInt32.self)))
        }
    }

    /// `struct ublksrv_io_cmd` (16 bytes): FETCH_REQ and COMMIT_AND_FETCH_REQ.
    public struct IOCommandPayload: Sendable, Equatable {
        public var queue: UInt16
        public var tag: UInt16
        public var result: Int32
        public var address: UInt64

        public init(queue: UInt16, tag: UInt16, result: Int32, address: UInt64) {
            self.queue = queue
            self.tag = tag
            self.result = result
            self.address = address
        }

        public static let size = 16

        public func write(to p: UnsafeMutableRawBufferPointer) {
            precondition(p.count >= Self.size)
            p.storeBytes(of: queue.littleEndian, toByteOffset: 0, as: UInt16.self)
            p.storeBytes(of: tag.littleEndian, toByteOffset: 2, as: UInt16.self)
            p.storeBytes(of: result.littleEndian, toByteOffset: 4, as: Int32.self)
            p.storeBytes(of: address.littleEndian, toByteOffset: 8, as: UInt64.self)
        }
    }

    /// `struct ublksrv_io_desc` (24 bytes, in the read-only array mapped per queue): what the kernel
    /// asks of a tag.
    public struct IODescriptor: Sendable, Equatable {
        public var operationFlags: UInt32
        public var sectors: UInt32
        public var startSector: UInt64
        public var address: UInt64

        public static let size = 24

        public init(operationFlags: UInt32, sectors: UInt32, startSector: UInt64, address: UInt64) {
            self.operationFlags = operationFlags
            self.sectors = sectors
            self.startSector = startSector
            self.address = address
        }

        /// Each field read once (the kernel does not change a tag's descriptor while the request is
        /// the server's, but nothing here relies on it).
        public init(reading p: UnsafeRawPointer) {
            operationFlags = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
            sectors = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
            startSector = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            address = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        }

        public var operation: UInt8 { UInt8(truncatingIfNeeded: operationFlags) }
        public var flags: UInt32 { operationFlags & ~0xFF }
    }
}
