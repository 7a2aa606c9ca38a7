import CVirtioShim
import Testing
@testable import UBlk

/// ublk's UAPI as Linux 6.12 defines it (include/uapi/linux/ublk_cmd.h): the command numbers are
/// the _IOR/_IOWR encodings the header computes, the structs have the header's sizes and offsets.
/// Debian 12's own header is the 6.1 one, so these are pinned here instead of compared with it.
@Suite("ublk ABI")
struct UBlkABITests {
    @Test func controlCommandNumbersAreTheHeadersEncodings() {
        let pinned: [(UBlkABI.Command, UInt32, UInt32, UInt32)] = [
            // (command, value from the 6.12 header, _IOC direction, number)
            (.getDeviceInfo, 0x8020_7502, 2, 0x02), (.addDevice, 0xC020_7504, 3, 0x04), (.deleteDevice, 0xC020_7505, 3, 0x05),
            (.startDevice, 0xC020_7506, 3, 0x06), (.stopDevice, 0xC020_7507, 3, 0x07), (.setParameters, 0xC020_7508, 3, 0x08),
            (.getParameters, 0x8020_7509, 2, 0x09), (.startUserRecovery, 0xC020_7510, 3, 0x10),
            (.endUserRecovery, 0xC020_7511, 3, 0x11), (.getFeatures, 0x8020_7513, 2, 0x13),
        ]
        #expect(pinned.count == UBlkABI.Command.allCases.count)
        for (command, value, direction, number) in pinned {
            #expect(command.rawValue == value, "\(command.name)")
            #expect(UBlkABI.encode(direction: direction, number: number, size: UInt32(UBlkABI.ControlCommand.size)) == value, "\(command.name)")
        }
        #expect(UBlkABI.IOCommand.fetchRequest.rawValue == UBlkABI.encode(direction: 3, number: 0x20, size: 16))
        #expect(UBlkABI.IOCommand.commitAndFetchRequest.rawValue == UBlkABI.encode(direction: 3, number: 0x21, size: 16))
        #expect(UBlkABI.IOCommand.fetchRequest.rawValue == 0xC010_7520)
        #expect(UBlkABI.IOCommand.commitAndFetchRequest.rawValue == 0xC010_7521)
    }

    @Test func flagsAndOperationsAreTheHeaders() {
        #expect(UBlkABI.Flag.userRecovery == 0x08)
        #expect(UBlkABI.Flag.userRecoveryReissue == 0x10)
        #expect(UBlkABI.Flag.commandIoctlEncode == 0x40)
        #expect(UBlkABI.Operation.read == 0 && UBlkABI.Operation.write == 1 && UBlkABI.Operation.flush == 2)
        #expect(UBlkABI.Operation.discard == 3 && UBlkABI.Operation.writeZeroes == 5)
        #expect(UBlkABI.RequestFlag.fua == 0x2000)
        #expect(UBlkABI.abortResult == -19)
        #expect(UBlkABI.DeviceState.quiesced.rawValue == 2)
        // The descriptor array of queue q is at q × round_up(4096 × 24, page).
        #expect(UBlkABI.descriptorOffset(queue: 0, pageSize: 4096) == 0)
        #expect(UBlkABI.descriptorOffset(queue: 1, pageSize: 4096) == 98304)
        #expect(UBlkABI.descriptorOffset(queue: 3, pageSize: 65536) == 3 * 131072)
    }

    /// The system header's structs that did not change from 6.1 to 6.12 check our offsets.
    @Test func structLayoutsMatchTheSystemHeader() {
        #expect(MemoryLayout<io_uring_sqe>.size == 64)
        #expect(MemoryLayout<io_uring_sqe>.offset(of: \.opcode) == SubmissionEntryOffsets.opcode)
        #expect(MemoryLayout<io_uring_sqe>.offset(of: \.fd) == SubmissionEntryOffsets.fd)
        #expect(MemoryLayout<io_uring_sqe>.offset(of: \.len) == SubmissionEntryOffsets.length)
        #expect(MemoryLayout<io_uring_sqe>.offset(of: \.user_data) == SubmissionEntryOffsets.userData)
        #expect(MemoryLayout<io_uring_cqe>.size == 16)
        #expect(MemoryLayout<io_uring_cqe>.offset(of: \.res) == 8)
    }

    @Test func deviceInfoRoundTripsAtTheHeadersOffsets() {
        var info = UBlkABI.DeviceInfo()
        info.queues = 1; info.depth = 64; info.maxIOBytes = 131072; info.deviceID = 7; info.serverPID = 1234
        info.flags = 0x58; info.serverFlags = UBlkMark.mark(key: 0x0000_0028); info.state = 2
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { p.deallocate() }
        info.write(to: p)
        #expect(p.load(fromByteOffset: 2, as: UInt16.self) == 64)
        #expect(p.load(fromByteOffset: 8, as: UInt32.self) == 131072)
        #expect(p.load(fromByteOffset: 12, as: UInt32.self) == 7)
        #expect(p.load(fromByteOffset: 16, as: Int32.self) == 1234)
        #expect(p.load(fromByteOffset: 24, as: UInt64.self) == 0x58)
        #expect(UBlkABI.DeviceInfo(reading: UnsafeRawBufferPointer(p)) == info)
        #expect(UBlkMark.key(of: info.serverFlags) == 0x28)
        #expect(UBlkMark.key(of: 0x28) == nil)
    }

    @Test func parametersAreLaidOutAsUblkParams() {
        var params = UBlkABI.Parameters()
        params.attributes = UBlkABI.Attribute.volatileCache | UBlkABI.Attribute.fua
        params.logicalBlockShift = 9; params.physicalBlockShift = 12; params.maxSectors = 256; params.deviceSectors = 131072
        var d = UBlkABI.Parameters.Discard()
        d.granularity = 4096; d.maxDiscardSectors = 8192; d.maxWriteZeroesSectors = 4096
        params.discard = d
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 112, alignment: 8)
        defer { p.deallocate() }
        params.write(to: p)
        #expect(p.load(fromByteOffset: 0, as: UInt32.self) == 112)  // len
        #expect(p.load(fromByteOffset: 4, as: UInt32.self) == 3)  // types: BASIC | DISCARD
        #expect(p.load(fromByteOffset: 8, as: UInt32.self) == 12)  // basic.attrs
        #expect(p[12] == 9 && p[13] == 12)
        #expect(p.load(fromByteOffset: 16, as: UInt32.self) == 256)  // max_sectors
        #expect(p.load(fromByteOffset: 24, as: UInt64.self) == 131072)  // dev_sectors
        #expect(p.load(fromByteOffset: 44, as: UInt32.self) == 4096)  // discard.discard_granularity
        #expect(p.load(fromByteOffset: 48, as: UInt32.self) == 8192)  // max_discard_sectors
        #expect(p.load(fromByteOffset: 52, as: UInt32.self) == 4096)  // max_write_zeroes_sectors
        #expect(p.load(fromByteOffset: 56, as: UInt16.self) == 1)  // max_discard_segments
        // GET_PARAMS' answer: ublk_param_devt at 60 (disk major at 68, minor at 72).
        p.storeBytes(of: UInt32(7), toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: UInt32(259), toByteOffset: 68, as: UInt32.self)
        p.storeBytes(of: UInt32(3), toByteOffset: 72, as: UInt32.self)
        let numbers = UBlkABI.Parameters.diskNumbers(reading: UnsafeRawBufferPointer(p))
        #expect(numbers?.major == 259 && numbers?.minor == 3)
    }

    @Test func ioCommandAndDescriptor() {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 24, alignment: 8)
        defer { p.deallocate() }
        UBlkABI.IOCommandPayload(queue: 2, tag: 17, result: -5, address: 0x1234_5678_9000).write(to: p)
        #expect(p.load(fromByteOffset: 0, as: UInt16.self) == 2)
        #expect(p.load(fromByteOffset: 2, as: UInt16.self) == 17)
        #expect(p.load(fromByteOffset: 4, as: Int32.self) == -5)
        #expect(p.load(fromByteOffset: 8, as: UInt64.self) == 0x1234_5678_9000)
        p.storeBytes(of: UInt32(0x2001), toByteOffset: 0, as: UInt32.self)  // WRITE | FUA
        p.storeBytes(of: UInt32(8), toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: UInt64(2048), toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: UInt64(0xABC000), toByteOffset: 16, as: UInt64.self)
        let d = UBlkABI.IODescriptor(reading: p.baseAddress!)
        #expect(d.operation == UBlkABI.Operation.write && d.flags == UBlkABI.RequestFlag.fua)
        #expect(d.sectors == 8 && d.startSector == 2048 && d.address == 0xABC000)
    }
}

import IOUring
typealias SubmissionEntryOffsets = SubmissionEntry.Offset
