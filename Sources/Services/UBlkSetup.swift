import NBD
import Syscalls
import SystemPackage
import UBlk
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// Adds the ublk device for a virtio-blk export, or recovers the one an earlier driver of the
/// same device left behind, and reserves its tags' buffers from the backend.
public enum UBlkSetup {
    public struct Options: Sendable {
        /// The ublk id to use (nil: the kernel picks, or the one found to recover).
        public var deviceID: UInt32?
        /// Only recover: refuse when there is no device left behind for this one.
        public var recoverOnly = false
        /// Tags (requests in flight) of the one queue.
        public var depth = 64
        /// Largest request, bytes (each tag's buffer).
        public var maxIOBytes = 128 << 10
        /// How long a recovery waits for the previous server to let go of the device.
        public var patience: Duration = .seconds(30)
        /// A successor after a hand-over: the device is still served by the predecessor, which is
        /// exiting; wait (up to `patience`) for the kernel to quiesce it, then recover it. (A disk
        /// whose server died is waited for the same way, whatever this says.)
        public var afterHandover = false
        /// Marks the device as this driver's for `key` (a PCI address), so the next driver finds it.
        public var key: UInt32
        /// The device's name in messages ("0000:00:05.0").
        public var name: String

        public init(key: UInt32, name: String) {
            self.key = key
            self.name = name
        }
    }

    /// The ublk parameters of a virtio-blk device: size, block sizes, largest request, discard
    /// and write-zeroes limits, read-only, and a volatile cache with FUA where it can flush.
    public static func parameters(_ config: BlockConfig, maxIOBytes: Int) -> UBlkABI.Parameters {
        var p = UBlkABI.Parameters()
        let shift = UInt8(max(9, min(12, UInt32(config.blockSize).trailingZeroBitCount)))
        p.logicalBlockShift = shift
        p.physicalBlockShift = shift
        p.minimumIOShift = shift
        p.optimalIOShift = shift
        p.maxSectors = UInt32(maxIOBytes >> 9)
        p.deviceSectors = config.capacitySectors
        if config.readOnly { p.attributes |= UBlkABI.Attribute.readOnly }
        // Without VIRTIO_BLK_F_FLUSH the device writes through (§5.2.6.2): no cache to declare.
        if config.flush { p.attributes |= UBlkABI.Attribute.volatileCache | UBlkABI.Attribute.fua }
        if config.maxDiscardSectors != nil || config.maxWriteZeroesSectors != nil {
            var d = UBlkABI.Parameters.Discard()
            d.granularity = max(512, config.blockSize)
            d.maxDiscardSectors = config.maxDiscardSectors ?? 0
            d.maxWriteZeroesSectors = config.maxWriteZeroesSectors ?? 0
            p.discard = d
        }
        return p
    }

    public static func attach<B: BlockBackend & ~Copyable>(
        control: inout UBlkControl, backend: inout B, config: BlockConfig, options: Options,
        log: @escaping @Sendable (String) -> Void, ready: @escaping @Sendable (UBlkExport) -> Void
    ) throws(UBlkError) -> UBlkExport {
        let began = monotonicNanoseconds()
        // A device this driver's predecessor for the same function left behind?
        var found: UBlkABI.DeviceInfo?
        for id in UBlkControl.deviceIDs() where options.deviceID == nil || options.deviceID == id {
            guard let info = try? control.info(id) else { continue }
            if UBlkMark.key(of: info.serverFlags) == options.key { found = info; break }
            if options.deviceID == id {
                throw .refused("ublk device \(id) exists and is not \(options.name)'s (pick another --ublk-id, or leave it out)")
            }
        }
        if var old = found, old.state == UBlkABI.DeviceState.live.rawValue {
            let pid = old.serverPID
            let serverAlive = pid > 0 && (kill(pid, 0) == 0 || errno == EPERM)
            if serverAlive && !options.afterHandover {
                throw .refused("/dev/ublkb\(old.deviceID) of \(options.name) is served by pid \(pid); stop that driver first")
            }
            // Its server is gone (a crash), or going (the predecessor of a hand-over exits once it
            // has told the successor to go): the kernel quiesces the disk when that server's
            // rings are released, asynchronously. Wait for it; never take a live disk for a leftover.
            let deadline = monotonicNanoseconds() + UInt64(options.patience.nanoseconds)
            while old.state == UBlkABI.DeviceState.live.rawValue && monotonicNanoseconds() < deadline {
                var pause = timespec(tv_sec: 0, tv_nsec: 1_000_000)
                _ = nanosleep(&pause, nil)
                old = try control.info(old.deviceID)
            }
            guard old.state != UBlkABI.DeviceState.live.rawValue else {
                throw .refused("/dev/ublkb\(old.deviceID) of \(options.name) is still live \(options.patience) after its server (pid \(pid)) went away; the kernel did not quiesce it")
            }
            found = old
        }
        let info: UBlkABI.DeviceInfo
        let start: UBlkABI.Command
        var recovered: UInt64 = 0
        if let old = found, old.state == UBlkABI.DeviceState.quiesced.rawValue {
            guard old.flags & UBlkABI.Flag.userRecovery != 0 else {
                throw .refused("ublk device \(old.deviceID) was added without user recovery: it cannot be taken over")
            }
            guard old.queues == 1, old.depth > 0, Int(old.maxIOBytes) >= 4096 else {
                throw .refused("ublk device \(old.deviceID) has \(old.queues) queues of depth \(old.depth) and \(old.maxIOBytes)-byte requests; this driver serves one queue")
            }
            log("ublk: recovering /dev/ublkb\(old.deviceID), left quiesced by pid \(old.serverPID) (its I/O is held until this driver serves it)")
            try control.startRecovery(old.deviceID, patience: options.patience)
            recovered = monotonicNanoseconds()
            info = old
            start = .endUserRecovery
        } else {
            if let old = found {
                // Stopped (DEAD): a leftover of a driver that did not delete it.
                log("ublk: removing the leftover ublk device \(old.deviceID) of \(options.name) (state \(old.state))")
                try? control.stop(old.deviceID)
                try control.delete(old.deviceID)
            }
            if options.recoverOnly {
                throw .refused("there is no ublk device of \(options.name) to recover (none left quiesced by an earlier driver)")
            }
            var wanted = UBlkABI.DeviceInfo()
            wanted.queues = 1
            wanted.depth = UInt16(options.depth)
            wanted.maxIOBytes = UInt32(options.maxIOBytes)
            wanted.deviceID = options.deviceID ?? .max
            wanted.flags = UBlkABI.Flag.userRecovery | UBlkABI.Flag.userRecoveryReissue | UBlkABI.Flag.commandIoctlEncode
            wanted.serverFlags = UBlkMark.mark(key: options.key)
            let added = try control.add(wanted)
            do throws(UBlkError) {
                if added.flags & UBlkABI.Flag.userRecovery == 0 {
                    log("ublk: warning: the kernel did not grant user recovery to device \(added.deviceID): a crash of this driver ends /dev/ublkb\(added.deviceID)")
                }
                try control.setParameters(added.deviceID, parameters(config, maxIOBytes: Int(added.maxIOBytes)))
            } catch {
                try? control.delete(added.deviceID)
                throw error
            }
            info = added
            start = .startDevice
        }
        let depth = Int(info.depth), bytes = Int(info.maxIOBytes)
        do throws(UBlkError) {
            var buffers: [BackendBuffer] = []
            var addresses: [UnsafeMutableRawPointer] = []
            for _ in 0..<depth {
                guard let b = backend.reserve(length: bytes) else {
                    throw .refused("the device's memory has no room for \(depth) ublk buffers of \(bytes) bytes")
                }
                buffers.append(b)
                addresses.append(backend.memory(of: b).baseAddress!)
            }
            let queue = try UBlkQueue(deviceID: info.deviceID, queue: 0, depth: depth, buffers: addresses, control: control.fd)
            let export = UBlkRequestMapping.Export(sectors: backend.size >> 9, bufferBytes: bytes, readOnly: backend.readOnly,
                                                   canFlush: backend.canFlush, canTrim: backend.canTrim, canWriteZeroes: backend.canWriteZeroes)
            let exported = UBlkExport(deviceID: info.deviceID, depth: depth, export: export, startCommand: start, queue: queue,
                                      buffers: buffers, log: log, ready: ready)
            if start == .endUserRecovery { exported.letGoAfter = recovered - began }
            return exported
        } catch {
            if start == .startDevice { try? control.delete(info.deviceID) }
            throw error
        }
    }
}
