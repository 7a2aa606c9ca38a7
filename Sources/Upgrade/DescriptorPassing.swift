import CVirtioShim
import Syscalls
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Hands a state record and the file descriptors it describes to another process over a UNIX
/// stream socket: the descriptors travel as SCM_RIGHTS with the first message, which also carries
/// the record's length; the record follows. The receiver gets its own descriptors for the same
/// open files (VFIO container, group, device, DMA memfd, eventfds, sockets).
public enum DescriptorPassing {
    /// SCM_MAX_FD: the kernel's limit of descriptors per message.
    public static let maxDescriptors = 253
    public static let maxRecordBytes = 16 << 20

    public enum Failure: Error, Equatable, CustomStringConvertible {
        case system(String, Errno)
        case protocolError(String)

        public var description: String {
            switch self {
            case .system(let what, let e): return "\(what): \(e)"
            case .protocolError(let why): return why
            }
        }
    }

    /// Sends `record` and `descriptors` (which stay open here: the sender keeps ownership until the
    /// successor reports healthy, so a failed upgrade can roll back).
    public static func send(socket: Int32, record: [UInt8], descriptors: [Int32]) throws(Failure) {
        guard descriptors.count <= maxDescriptors else { throw .protocolError("\(descriptors.count) descriptors exceed \(maxDescriptors)") }
        guard record.count <= maxRecordBytes else { throw .protocolError("record of \(record.count) bytes is too large") }
        var length = UInt32(record.count).littleEndian
        let result = withUnsafeBytes(of: &length) { SocketSyscall.sendWithRights(socket, $0, descriptors: descriptors) }
        switch result {
        case .failure(let e): throw .system("sendmsg with \(descriptors.count) descriptors", e)
        case .success(let n) where n != 4: throw .protocolError("short sendmsg: \(n) of 4 bytes")
        case .success: break
        }
        try writeAll(socket, record)
    }

    /// Receives a record and its descriptors, owned by the returned set from here on (closed with
    /// it unless taken out, e.g. when the caller refuses the record).
    public static func receive(socket: Int32) throws(Failure) -> Received {
        var length: UInt32 = 0
        let space = CVirtioShim_CMSG_SPACE(MemoryLayout<Int32>.size * maxDescriptors)
        let control = UnsafeMutableRawPointer.allocate(byteCount: space, alignment: 8)
        defer { control.deallocate() }
        var descriptors: [Int32] = []
        var truncated = false
        let result: Result<Int, Errno> = withUnsafeMutableBytes(of: &length) { lengthBytes in
            var iov = iovec(iov_base: lengthBytes.baseAddress, iov_len: 4)
            return withUnsafeMutablePointer(to: &iov) { iovPointer in
                var message = msghdr()
                message.msg_iov = iovPointer
                message.msg_iovlen = 1
                message.msg_control = control
                message.msg_controllen = space
                let r = Syscall.recvmsg(socket, &message, Int32(MSG_WAITALL))
                truncated = message.msg_flags & Int32(MSG_CTRUNC) != 0
                var header = CVirtioShim_CMSG_FIRSTHDR(&message)
                while let h = header {
                    if h.pointee.cmsg_level == SOL_SOCKET && h.pointee.cmsg_type == Int32(SCM_RIGHTS) {
                        let count = (Int(h.pointee.cmsg_len) - CVirtioShim_CMSG_LEN(0)) / 4
                        let data = UnsafeRawPointer(CVirtioShim_CMSG_DATA(h)!)
                        for i in 0..<count { descriptors.append(data.load(fromByteOffset: i * 4, as: Int32.self)) }
                    }
                    header = CVirtioShim_CMSG_NXTHDR(&message, h)
                }
                return r
            }
        }
        func closeReceived() { for fd in descriptors { Syscall.close(fd) } }
        switch result {
        case .failure(let e): closeReceived(); throw .system("recvmsg", e)
        case .success(let n) where n != 4: closeReceived(); throw .protocolError("peer closed before sending the record length (\(n) bytes)")
        case .success: break
        }
        if truncated { closeReceived(); throw .protocolError("descriptors were truncated (more than \(maxDescriptors) sent)") }
        let count = Int(UInt32(littleEndian: length))
        guard count <= maxRecordBytes else { closeReceived(); throw .protocolError("announced record of \(count) bytes is too large") }
        var record = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let r = record.withUnsafeMutableBytes { Syscall.read(socket, UnsafeMutableRawBufferPointer(rebasing: $0[got...])) }
            switch r {
            case .failure(let e): closeReceived(); throw .system("reading the state record", e)
            case .success(0): closeReceived(); throw .protocolError("peer closed after \(got) of \(count) record bytes")
            case .success(let n): got += n
            }
        }
        return Received(record: record, descriptors: OwnedFDList(adopting: descriptors))
    }

    /// A record and the descriptors that came with it.
    @frozen public struct Received: ~Copyable {
        public var record: [UInt8]
        public var descriptors: OwnedFDList
    }

    static func writeAll(_ socket: Int32, _ bytes: [UInt8]) throws(Failure) {
        var sent = 0
        while sent < bytes.count {
            let r = bytes.withUnsafeBytes { Syscall.write(socket, UnsafeRawBufferPointer(rebasing: $0[sent...])) }
            switch r {
            case .failure(let e): throw .system("writing the state record", e)
            case .success(let n): sent += n
            }
        }
    }
}
