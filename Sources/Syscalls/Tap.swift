#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import SystemPackage

/// The TUN/TAP ioctls (linux/if_tun.h), one wrapper each; the request codes come from the C shim
/// and are pinned by `TunIoctlNumberTests`. EINTR is retried (by `Syscall.ioctl`).
extension Syscall {
    /// TUNSETIFF: attaches the fd to interface `name` (created if missing; "" lets the kernel pick
    /// a name) with `flags` (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR ...). Returns the interface's name.
    @inline(never)
    public static func tunSetInterface(_ fd: Int32, name: String, flags: UInt32) -> Result<String, Errno> {
        var request = ifreq(interfaceName: name)
        request.ifr_ifru.ifru_flags = Int16(truncatingIfNeeded: flags)
        let result = withUnsafeMutablePointer(to: &request) { Syscall.ioctl(fd, CVirtioShim_TUNSETIFF, UnsafeMutableRawPointer($0)) }
        switch result {
        case .failure(let e): return .failure(e)
        case .success:
            return .success(request.interfaceName)
        }
    }

    /// TUNGETIFF: the name and IFF_* flags of the interface `fd` is attached to (EBADFD when
    /// it is attached to none).
    @inline(never)
    public static func tunGetInterface(_ fd: Int32) -> Result<(name: String, flags: UInt32), Errno> {
        var request = ifreq()
        let result = withUnsafeMutablePointer(to: &request) { Syscall.ioctl(fd, CVirtioShim_TUNGETIFF, UnsafeMutableRawPointer($0)) }
        switch result {
        case .failure(let e): return .failure(e)
        case .success:
            return .success((request.interfaceName, UInt32(UInt16(bitPattern: request.ifr_ifru.ifru_flags))))
        }
    }

    /// TUNGETVNETHDRSZ: the virtio-net header size `fd` reads and writes frames with.
    @inline(never)
    public static func tunGetVnetHeaderSize(_ fd: Int32) -> Result<Int32, Errno> {
        var value: Int32 = 0
        return withUnsafeMutablePointer(to: &value) { Syscall.ioctl(fd, CVirtioShim_TUNGETVNETHDRSZ, UnsafeMutableRawPointer($0)) }.map { _ in value }
    }

    /// TUNSETVNETHDRSZ: the virtio-net header in front of every frame read or written is `size`
    /// bytes (10 by default; 12 for the VERSION_1 header with num_buffers).
    @inline(never)
    public static func tunSetVnetHeaderSize(_ fd: Int32, _ size: Int32) -> Result<Void, Errno> {
        var value = size
        return withUnsafeMutablePointer(to: &value) { Syscall.ioctl(fd, CVirtioShim_TUNSETVNETHDRSZ, UnsafeMutableRawPointer($0)) }.map { _ in () }
    }

    /// TUNSETOFFLOAD: the TUN_F_* offloads the reader accepts (TUN_F_CSUM: frames may carry a
    /// partial checksum, flagged NEEDS_CSUM in their header). 0 = every frame fully checksummed.
    @inline(never)
    public static func tunSetOffload(_ fd: Int32, _ offloads: UInt32) -> Result<Void, Errno> {
        Syscall.ioctl(fd, CVirtioShim_TUNSETOFFLOAD, value: UInt(offloads)).map { _ in () }
    }

    /// SIOCSIFHWADDR on a TUN/TAP descriptor (tun handles it itself): the interface's Ethernet
    /// address becomes `mac`.
    @inline(never)
    public static func tunSetHardwareAddress(_ fd: Int32, name: String, mac: [UInt8]) -> Result<Void, Errno> {
        precondition(mac.count == 6)
        var request = ifreq(interfaceName: name)
        request.ifr_ifru.ifru_hwaddr.sa_family = 1  // ARPHRD_ETHER (net/if_arp.h)
        withUnsafeMutableBytes(of: &request.ifr_ifru.ifru_hwaddr.sa_data) { $0.copyBytes(from: mac) }
        return withUnsafeMutablePointer(to: &request) { Syscall.ioctl(fd, CVirtioShim_SIOCSIFHWADDR, UnsafeMutableRawPointer($0)) }.map { _ in () }
    }

    /// writev(2) of `count` iovecs; EINTR retried. Returns the bytes written (a TAP takes a whole
    /// frame or nothing).
    @inline(never)
    public static func writev(_ fd: Int32, _ vectors: UnsafePointer<iovec>, _ count: Int32) -> Result<Int, Errno> {
        while true {
            let n = Glibc.writev(fd, vectors, count)
            if n >= 0 { return .success(n) }
            let e = errno
            if e != EINTR { return .failure(Errno(rawValue: e)) }
        }
    }

    /// ppoll(2) with a nanosecond timeout (negative: forever) and no signal mask change. Returns
    /// the number of ready descriptors; EINTR is returned as 0 so the caller re-checks its flags.
    @inline(never)
    public static func poll(_ fds: UnsafeMutablePointer<pollfd>, _ count: Int, timeoutNanoseconds: Int64) -> Result<Int, Errno> {
        let r = CVirtioShim_ppoll(fds, UInt(count), timeoutNanoseconds)
        if r >= 0 { return .success(Int(r)) }
        return r == -EINTR ? .success(0) : .failure(Errno(rawValue: -r))
    }
}

/// What opening or configuring a TAP interface failed at, with the errno and a hint.
public struct TapError: Error, CustomStringConvertible, Equatable {
    public let operation: String
    public let name: String
    public let errno: Errno

    public var description: String {
        var hint = ""
        switch errno.rawValue {
        case ENOENT, ENODEV: hint = " (is the tun module loaded? modprobe tun)"
        case EPERM, EACCES: hint = " (needs CAP_NET_ADMIN, or a persistent TAP owned by this user: ip tuntap add NAME mode tap user USER)"
        case EBUSY: hint = " (another process is attached to \(name))"
        case EINVAL where operation == "TUNSETIFF": hint = " (\(name) exists as a TUN, or with other flags such as multi_queue)"
        default: break
        }
        return "\(operation) on TAP \(name): \(errno) (errno \(errno.rawValue))\(hint)"
    }
}

/// A TAP interface attached to a non-blocking descriptor of /dev/net/tun, with one owner: the
/// descriptor is closed when the owner goes away (a non-persistent interface then disappears).
///
/// Every read returns one frame and every write sends one, each behind a `vnetHeaderSize`-byte
/// virtio-net header when `vnetHeader` (IFF_VNET_HDR), plain Ethernet frames otherwise
/// (IFF_NO_PI: no packet-information prefix either way).
public struct TapInterface: ~Copyable {
    public let fd: OwnedFD
    /// The interface's name as the kernel reports it.
    public let name: String
    /// Bytes of virtio-net header in front of each frame: 0 (plain frames) or 12.
    public let vnetHeaderSize: Int

    /// Opens /dev/net/tun and creates or attaches to `name` as IFF_TAP | IFF_NO_PI, plus
    /// IFF_VNET_HDR with a `vnetHeaderSize`-byte header when it is not 0, and sets the TUN_F_*
    /// `offloads` (only meaningful with the header).
    public init(name: String, vnetHeaderSize: Int = 0, offloads: UInt32 = 0, path: String = "/dev/net/tun") throws(TapError) {
        let raw: Int32
        switch Syscall.open(path, O_RDWR | O_NONBLOCK) {
        case .success(let fd): raw = fd
        case .failure(let e): throw TapError(operation: "open \(path)", name: name, errno: e)
        }
        let fd = OwnedFD(adopting: raw)
        var flags = CVirtioShim_IFF_TAP | CVirtioShim_IFF_NO_PI
        if vnetHeaderSize > 0 { flags |= CVirtioShim_IFF_VNET_HDR }
        let actual: String
        switch Syscall.tunSetInterface(fd.raw, name: name, flags: flags) {
        case .success(let n): actual = n
        case .failure(let e): throw TapError(operation: "TUNSETIFF", name: name, errno: e)
        }
        if vnetHeaderSize > 0 {
            if case .failure(let e) = Syscall.tunSetVnetHeaderSize(fd.raw, Int32(vnetHeaderSize)) {
                throw TapError(operation: "TUNSETVNETHDRSZ \(vnetHeaderSize)", name: name, errno: e)
            }
        }
        // Always set, so a persistent interface does not keep offloads a previous user enabled.
        if case .failure(let e) = Syscall.tunSetOffload(fd.raw, vnetHeaderSize > 0 ? offloads : 0) {
            throw TapError(operation: "TUNSETOFFLOAD 0x\(String(offloads, radix: 16))", name: name, errno: e)
        }
        self.name = actual
        self.vnetHeaderSize = vnetHeaderSize
        self.fd = fd
    }

    /// Takes over a TAP descriptor another process handed over (hot upgrade): it must be attached
    /// to a TAP (TUNGETIFF: IFF_TAP and IFF_NO_PI) and read and write frames behind a header of
    /// `vnetHeaderSize` bytes (IFF_VNET_HDR and TUNGETVNETHDRSZ, or neither for 0). Nothing is
    /// changed on the interface, so frames queued in it are kept. A mismatch is refused by name.
    public init(adopting fd: consuming OwnedFD, vnetHeaderSize: Int) throws(TapError) {
        let attached: (name: String, flags: UInt32)
        switch Syscall.tunGetInterface(fd.raw) {
        case .success(let a): attached = a
        case .failure(let e): throw TapError(operation: "TUNGETIFF on the handed-over descriptor", name: "?", errno: e)
        }
        let wanted = CVirtioShim_IFF_TAP | CVirtioShim_IFF_NO_PI
        guard attached.flags & wanted == wanted else {
            throw TapError(operation: "adopting: flags 0x\(String(attached.flags, radix: 16)) are not IFF_TAP | IFF_NO_PI",
                           name: attached.name, errno: Errno(rawValue: EINVAL))
        }
        let hasHeader = attached.flags & CVirtioShim_IFF_VNET_HDR != 0
        if hasHeader != (vnetHeaderSize > 0) {
            throw TapError(operation: "adopting: the TAP \(hasHeader ? "carries" : "does not carry") a virtio-net header, this driver needs \(vnetHeaderSize) bytes",
                           name: attached.name, errno: Errno(rawValue: EINVAL))
        }
        if hasHeader {
            switch Syscall.tunGetVnetHeaderSize(fd.raw) {
            case .success(let n) where Int(n) == vnetHeaderSize: break
            case .success(let n):
                throw TapError(operation: "adopting: the virtio-net header is \(n) bytes, this driver needs \(vnetHeaderSize)",
                               name: attached.name, errno: Errno(rawValue: EINVAL))
            case .failure(let e): throw TapError(operation: "TUNGETVNETHDRSZ", name: attached.name, errno: e)
            }
        }
        self.name = attached.name
        self.vnetHeaderSize = vnetHeaderSize
        self.fd = fd
    }

    public var raw: Int32 { fd.raw }

    /// Gives the interface the Ethernet address `mac` (the device's, so the stack behind the TAP
    /// answers for the address the device filters on).
    public func setHardwareAddress(_ mac: [UInt8]) throws(TapError) {
        if case .failure(let e) = Syscall.tunSetHardwareAddress(fd.raw, name: name, mac: mac) {
            throw TapError(operation: "SIOCSIFHWADDR", name: name, errno: e)
        }
    }
}

extension ifreq {
    /// A zeroed request naming interface `name` (cut to IFNAMSIZ - 1 bytes, NUL-terminated).
    init(interfaceName name: String) {
        self.init()
        let bytes = Array(name.utf8.prefix(Int(IFNAMSIZ) - 1))
        withUnsafeMutableBytes(of: &ifr_ifrn) { p in
            p.initializeMemory(as: UInt8.self, repeating: 0)
            p.copyBytes(from: bytes)
        }
    }

    /// The interface name the kernel wrote back (up to the first NUL).
    var interfaceName: String {
        withUnsafeBytes(of: ifr_ifrn) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
    }
}
