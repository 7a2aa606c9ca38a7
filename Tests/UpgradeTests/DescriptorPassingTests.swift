import Testing
import Glibc
import Foundation
import Syscalls
@testable import Upgrade
import CVirtioShim

@Suite("descriptor passing over a UNIX socket")
struct DescriptorPassingTests {
    func inode(_ fd: Int32) -> UInt64 {
        var st = stat()
        fstat(fd, &st)
        return UInt64(st.st_ino)
    }

    @Test func recordAndDescriptorsArriveAndReferToTheSameFiles() throws {
        guard case .success(let (a, b)) = Syscall.socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue)) else {
            Issue.record("socketpair failed"); return
        }
        defer { close(a); close(b) }
        let memfd = CVirtioShim_memfd_create("test-dma", 0)
        let event = try EventFD()
        defer { close(memfd) }
        _ = "shared".withCString { write(memfd, $0, 6) }
        let record = sample.encoded()
        // The sender runs on another thread: the record is larger than the socket buffer may hold.
        let eventRaw = event.raw
        let sender = Thread { try? DescriptorPassing.send(socket: a, record: record, descriptors: [memfd, eventRaw]) }
        sender.start()
        let arrived = try DescriptorPassing.receive(socket: b)
        let received = arrived.record
        #expect(arrived.descriptors.count == 2)
        let fds = arrived.descriptors.release()
        defer { for fd in fds { close(fd) } }
        #expect(received == record)
        #expect(fds.count == 2)
        #expect(inode(fds[0]) == inode(memfd))
        #expect(fds[0] != memfd)
        var buffer = [UInt8](repeating: 0, count: 6)
        #expect(pread(fds[0], &buffer, 6, 0) == 6 && buffer == Array("shared".utf8))
        // The received eventfd is the same counter.
        event.signal()
        var count: UInt64 = 0
        #expect(read(fds[1], &count, 8) == 8 && count == 1)
        // Received descriptors are close-on-exec.
        #expect(fcntl(fds[0], F_GETFD) & FD_CLOEXEC != 0)
    }

    @Test func descriptorsLeftInTheSetAreClosedWithIt() throws {
        let a = try EventFD(), b = try EventFD()
        let rawA = dup(a.raw), rawB = dup(b.raw)
        do {
            var set = OwnedFDList(adopting: [rawA, rawB])
            guard let first = set.take(0) else { Issue.record("nothing at 0"); return }
            #expect(first.raw == rawA && set.peek(0) == -1 && set.remaining == 1)
            _ = first.take()  // the caller keeps rawA
        }
        #expect(fcntl(rawA, F_GETFD) >= 0, "a taken descriptor stays open")
        #expect(fcntl(rawB, F_GETFD) == -1 && errno == EBADF, "a descriptor left in the set is closed with it")
        close(rawA)
    }

    @Test func aPeerThatClosesEarlyIsAnErrorNotAHang() throws {
        guard case .success(let (a, b)) = Syscall.socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue)) else { return }
        var length = UInt32(1000).littleEndian
        _ = write(a, &length, 4)
        close(a)
        #expect(throws: DescriptorPassing.Failure.self) { try DescriptorPassing.receive(socket: b) }
        close(b)
    }
}
