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
