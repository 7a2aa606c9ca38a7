import IOUring
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Why ublk refused or failed: always naming the command (or file) and, where there is one, the fix.
public enum UBlkError: Error, CustomStringConvertible {
    /// /dev/ublk-control could not be opened.
    case unavailable(Errno)
    /// A control command the kernel answered with an error.
    case command(UBlkABI.Command, deviceID: UInt32, Errno)
    /// Opening or mapping /dev/ublkcN.
    case characterDevice(String, Errno)
    case ring(IOUringError)
    /// The device is not what this driver can serve (a recovery of someone else's device, say).
    case refused(String)

    public var description: String {
        switch self {
        case .unavailable(let e) where e.rawValue == ENOENT || e.rawValue == ENODEV || e.rawValue == ENXIO:
            return "ublk is not available: no /dev/ublk-control (\(Self.text(e))). It needs the ublk_drv module "
                + "(CONFIG_BLK_DEV_UBLK, Linux 6.0 or later; Debian's 6.1 kernel does not have it, its 6.12 kernel does): "
                + "load it with `modprobe ublk_drv`, or export the device with --nbd, which works on every kernel"
        case .unavailable(let e) where e.rawValue == EACCES || e.rawValue == EPERM:
            return "cannot open /dev/ublk-control: \(Self.text(e)); ublk devices are added as root (CAP_SYS_ADMIN)"
        case .unavailable(let e):
            return "cannot open /dev/ublk-control: \(Self.text(e))"
        case .command(let command, let id, let e):
            let device = id == .max ? "a new device" : "device \(id)"
            var hint = ""
            switch (command, e.rawValue) {
            case (.addDevice, EEXIST): hint = ": ublk id \(id) is in use; pick another --ublk-id or leave it out"
            case (_, EPERM), (_, EACCES): hint = ": ublk control commands need CAP_SYS_ADMIN"
            case (.startUserRecovery, EBUSY): hint = ": the device's previous server still holds it (its process has not exited)"
            case (.startUserRecovery, EINVAL): hint = ": the device was not added with user recovery, or never started"
            case (_, ENODEV): hint = ": there is no ublk device \(id)"
            case (_, EOPNOTSUPP): hint = ": the kernel does not know this command (ublk's ioctl-encoded commands need Linux 6.3 or later)"
            default: break
            }
            return "ublk \(command.name) for \(device) failed: \(Self.text(e))\(hint)"
        case .characterDevice(let path, let e):
            return "\(path): \(Self.text(e))"
        case .ring(let e):
            return "ublk: \(e)"
        case .refused(let why):
            return why
        }
    }

    static func text(_ e: Errno) -> String { "\(e) (errno \(e.rawValue))" }
}
