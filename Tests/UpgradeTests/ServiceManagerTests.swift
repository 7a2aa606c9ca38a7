import CVirtioShim
import Foundation
import Glibc
import Syscalls
import Testing

/// sd_notify without libsystemd: one datagram to `$NOTIFY_SOCKET`, a path or an abstract name.
@Suite("service manager notifications")
struct ServiceManagerTests {
    /// A datagram socket bound at `name` (a path, or "@..." for an abstract name); returns its fd.
    func listening(_ name: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(name.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            if name.hasPrefix("@") { raw[0] = 0 } else { raw[bytes.count] = 0 }
        }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + bytes.count + (name.hasPrefix("@") ? 0 : 1))
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        try #require(bound == 0, "bind \(name): errno \(errno)")
        return fd
    }

    func received(_ fd: Int32) -> String {
        var buffer = [UInt8](repeating: 0, count: 512)
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 2000) == 1 else { return "" }
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        return n > 0 ? String(decoding: buffer[..<n], as: UTF8.self) : ""
    }

    @Test func readyAndStatusReachAPathAndAnAbstractName() throws {
        let path = "/tmp/notify-test-\(getpid()).sock"
        unlink(path)
        defer { unlink(path) }
        for name in [path, "@virtio-vfio-notify-test-\(getpid())"] {
            let fd = try listening(name)
            defer { close(fd) }
            let sent = ServiceManager.notify(["READY=1", "MAINPID=42", "STATUS=serving 0000:00:05.0"], socket: name)
            guard case .success(true) = sent else { Issue.record("\(name): \(sent)"); continue }
            #expect(received(fd) == "READY=1\nMAINPID=42\nSTATUS=serving 0000:00:05.0", "\(name)")
        }
    }

    @Test func withoutAManagerNothingIsSentAndABadNameIsAnError() {
        guard case .success(false) = ServiceManager.notify(["READY=1"], socket: nil) else { Issue.record("sent without a socket"); return }
        guard case .failure = ServiceManager.notify(["READY=1"], socket: "relative/path") else { Issue.record("a relative path was accepted"); return }
        guard case .failure = ServiceManager.notify(["READY=1"], socket: "/tmp/nobody-listens-\(getpid())") else { Issue.record("no listener, no error"); return }
    }
}

/// The file descriptor store: descriptors sent with FDSTORE=1, and those passed back at start.
@Suite("service manager descriptor store")
struct DescriptorStoreTests {
    @Test("LISTEN_FDS/LISTEN_FDNAMES: only for this pid; descriptors from 3; missing names are 'unknown'")
    func passedDescriptors() {
        let mine = ServiceManager.passedDescriptors(pid: "42", count: "3", names: "vfio-container:msix", this: 42)
        #expect(mine.map(\.name) == ["vfio-container", "msix", "unknown"])
        #expect(mine.map(\.fd) == [3, 4, 5])
        #expect(ServiceManager.passedDescriptors(pid: "41", count: "3", names: "a:b:c", this: 42).isEmpty)
        #expect(ServiceManager.passedDescriptors(pid: "42", count: "x", names: nil, this: 42).isEmpty)
        #expect(ServiceManager.passedDescriptors(pid: nil, count: "1", names: nil, this: 42).isEmpty)
        #expect(ServiceManager.passedDescriptors(pid: "42", count: "2", names: ":nbd-unix", this: 42).map(\.name) == ["unknown", "nbd-unix"])
    }

    @Test("FDSTORE=1 with descriptors: the datagram carries them as SCM_RIGHTS")
    func storeSendsRights() throws {
        let path = "/tmp/notify-fdstore-\(getpid()).sock"
        unlink(path)
        defer { unlink(path) }
        let fd = try ServiceManagerTests().listening(path)
        defer { close(fd) }
        var pipe: [Int32] = [0, 0]
        try #require(Glibc.pipe(&pipe) == 0)
        defer { close(pipe[0]); close(pipe[1]) }
        guard case .success(true) = ServiceManager.notify(["FDSTORE=1", "FDNAME=test"], descriptors: [pipe[1]], socket: path) else {
            Issue.record("notify failed"); return
        }
        var buffer = [UInt8](repeating: 0, count: 256)
        let space = CVirtioShim_CMSG_SPACE(4 * 4)
        let control = UnsafeMutableRawPointer.allocate(byteCount: space, alignment: 8)
        defer { control.deallocate() }
        var received: [Int32] = []
        let n = buffer.withUnsafeMutableBytes { bytes -> Int in
            var iov = iovec(iov_base: bytes.baseAddress, iov_len: bytes.count)
            return withUnsafeMutablePointer(to: &iov) { iovPointer in
                var message = msghdr()
                message.msg_iov = iovPointer
                message.msg_iovlen = 1
                message.msg_control = control
                message.msg_controllen = space
                let r = recvmsg(fd, &message, 0)
                if r >= 0, let header = CVirtioShim_CMSG_FIRSTHDR(&message), header.pointee.cmsg_type == Int32(SCM_RIGHTS) {
                    let count = (Int(header.pointee.cmsg_len) - CVirtioShim_CMSG_LEN(0)) / 4
                    let data = UnsafeRawPointer(CVirtioShim_CMSG_DATA(header)!)
                    received = (0..<count).map { data.load(fromByteOffset: $0 * 4, as: Int32.self) }
                }
                return r
            }
        }
        #expect(String(decoding: buffer[..<max(n, 0)], as: UTF8.self) == "FDSTORE=1\nFDNAME=test")
        try #require(received.count == 1)
        defer { close(received[0]) }
        // The received descriptor is the pipe's write end: what goes in comes out of the read end.
        var byte: UInt8 = 0x5a
        #expect(write(received[0], &byte, 1) == 1)
        var got: UInt8 = 0
        #expect(read(pipe[0], &got, 1) == 1 && got == 0x5a)
    }
}
