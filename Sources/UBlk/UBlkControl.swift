#if canImport(Glibc)
import Glibc
#endif
import IOUring
import Syscalls
import SystemPackage

/// /dev/ublk-control and a small ring for its commands, issued one at a time and waited for
/// (ADD_DEV, SET_PARAMS, GET_DEV_INFO, START_USER_RECOVERY, DEL_DEV...). The commands that wait
/// for the device's server to run (START_DEV, END_USER_RECOVERY, STOP_DEV) go on the queue's own
/// ring instead (`UBlkQueue.send`), so the thread that serves requests never blocks on them.
public struct UBlkControl: ~Copyable {
    public static let path = "/dev/ublk-control"
    public let fd: OwnedFD
    var ring: IOUring
    /// Room for the largest payload a command reads or writes (ublk_params).
    let scratch: UnsafeMutableRawBufferPointer

    public init() throws(UBlkError) {
        let raw: Int32
        switch Syscall.open(Self.path, O_RDWR) {
        case .success(let fd): raw = fd
        case .failure(let e): throw .unavailable(e)
        }
        let fd = OwnedFD(adopting: raw)
        // Control commands carry a 32-byte payload: the kernel wants 128-byte entries (SQE128).
        do { ring = try IOUring(entries: 4, bigEntries: true) } catch { throw .ring(error) }
        self.fd = fd
        scratch = .allocate(byteCount: 128, alignment: 8)
    }

    deinit { scratch.deallocate() }

    /// Writes one control command into `entry` (IORING_OP_URING_CMD on `controlFD`).
    public static func prepare(_ entry: SubmissionEntry, controlFD: Int32, _ command: UBlkABI.Command,
                               payload: UBlkABI.ControlCommand, userData: UInt64) {
        entry.set(opcode: IOUringOpcode.uringCommand, fd: controlFD, userData: userData)
        entry.setCommand(command.rawValue)
        payload.write(to: entry.command)
    }

    /// Issues `command` and waits for its answer: the result (≥ 0) or the errno, as `UBlkError`.
    @discardableResult
    mutating func run(_ command: UBlkABI.Command, deviceID: UInt32, length: Int = 0, data: UInt64 = 0) throws(UBlkError) -> Int32 {
        guard let entry = ring.next() else { throw .ring(IOUringError(.enter, Errno(rawValue: EBUSY))) }
        let payload = UBlkABI.ControlCommand(deviceID: deviceID, length: UInt16(length),
                                             address: length > 0 ? UInt64(UInt(bitPattern: scratch.baseAddress)) : 0, data: data)
        Self.prepare(entry, controlFD: fd.raw, command, payload: payload, userData: UInt64(command.rawValue))
        do { try ring.submit(waitFor: 1) } catch { throw .ring(error) }
        var result: Int32 = 0
        ring.drainCompletions { _, r, _ in result = r }
        guard result >= 0 else { throw .command(command, deviceID: deviceID, Errno(rawValue: -result)) }
        return result
    }

    /// UBLK_F_* the kernel supports.
    public mutating func features() throws(UBlkError) -> UInt64 {
        try run(.getFeatures, deviceID: .max, length: 8)
        return UInt64(littleEndian: scratch.loadUnaligned(as: UInt64.self))
    }

    /// Adds a device (not started: no /dev/ublkbN yet). Returns what the kernel made of `info`:
    /// its id, the flags it granted, the queues and I/O size it allows.
    public mutating func add(_ info: UBlkABI.DeviceInfo) throws(UBlkError) -> UBlkABI.DeviceInfo {
        info.write(to: scratch)
        try run(.addDevice, deviceID: info.deviceID, length: UBlkABI.DeviceInfo.size)
        return UBlkABI.DeviceInfo(reading: UnsafeRawBufferPointer(scratch))
    }

    public mutating func setParameters(_ deviceID: UInt32, _ parameters: UBlkABI.Parameters) throws(UBlkError) {
        parameters.write(to: scratch)
        try run(.setParameters, deviceID: deviceID, length: UBlkABI.Parameters.size)
    }

    public mutating func info(_ deviceID: UInt32) throws(UBlkError) -> UBlkABI.DeviceInfo {
        try run(.getDeviceInfo, deviceID: deviceID, length: UBlkABI.DeviceInfo.size)
        return UBlkABI.DeviceInfo(reading: UnsafeRawBufferPointer(scratch))
    }

    /// The block device's major and minor, once started.
    public mutating func diskNumbers(_ deviceID: UInt32) throws(UBlkError) -> (major: UInt32, minor: UInt32)? {
        for i in 0..<UBlkABI.Parameters.size { scratch[i] = 0 }
        scratch.storeBytes(of: UInt32(UBlkABI.Parameters.size).littleEndian, toByteOffset: 0, as: UInt32.self)
        try run(.getParameters, deviceID: deviceID, length: UBlkABI.Parameters.size)
        return UBlkABI.Parameters.diskNumbers(reading: UnsafeRawBufferPointer(scratch))
    }

    /// START_USER_RECOVERY, retried while the kernel answers EBUSY (the previous server's
    /// descriptors, mappings and rings are still going away, or the device is still quiescing)
    /// until `patience` has passed.
    public mutating func startRecovery(_ deviceID: UInt32, patience: Duration) throws(UBlkError) {
        let deadline = monotonicNanoseconds() + UInt64(patience.nanoseconds)
        while true {
            do {
                try run(.startUserRecovery, deviceID: deviceID)
                return
            } catch {
                guard case .command(_, _, let e) = error, e.rawValue == EBUSY, monotonicNanoseconds() < deadline else { throw error }
                var pause = timespec(tv_sec: 0, tv_nsec: 5_000_000)
                _ = nanosleep(&pause, nil)
            }
        }
    }

    /// STOP_DEV (the disk goes away; requests not served fail) — for a device nobody serves.
    public mutating func stop(_ deviceID: UInt32) throws(UBlkError) { try run(.stopDevice, deviceID: deviceID) }

    /// DEL_DEV: waits until nothing holds /dev/ublkcN (its server closed it, unmapped it, and its
    /// rings are gone), then removes the device.
    public mutating func delete(_ deviceID: UInt32) throws(UBlkError) { try run(.deleteDevice, deviceID: deviceID) }

    /// The ids of the ublk devices that exist (from /sys/class/ublk-char: ublkcN).
    public static func deviceIDs() -> [UInt32] {
        guard let dir = opendir("/sys/class/ublk-char") else { return [] }
        defer { closedir(dir) }
        var ids: [UInt32] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasPrefix("ublkc"), let id = UInt32(name.dropFirst(5)) { ids.append(id) }
        }
        return ids.sorted()
    }
}

/// What this driver writes in `DeviceInfo.serverFlags` (which the kernel keeps and ignores), so
/// the next driver for the same device finds the ublk device to recover: the tag "VVFI" in the
/// upper half, the caller's key (a PCI address) in the lower.
public enum UBlkMark {
    static let tag: UInt64 = 0x5656_4649 << 32  // "VVFI"

    public static func mark(key: UInt32) -> UInt64 { tag | UInt64(key) }

    public static func key(of serverFlags: UInt64) -> UInt32? {
        serverFlags & 0xFFFF_FFFF_0000_0000 == tag ? UInt32(truncatingIfNeeded: serverFlags) : nil
    }
}
