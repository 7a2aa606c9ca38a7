import Testing
import Glibc
@testable import VFIO
import Syscalls

@Suite("MMIO access layer")
struct MMIOWindowTests {
    @Test func loadsAndStoresLittleEndianAtEachWidth() {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 8)
        defer { memory.deallocate() }
        memset(memory, 0, 16)
        let w = MMIOWindow(base: memory, length: 16)
        w.store32(0, 0x1122_3344)
        #expect(memory.load(as: UInt8.self) == 0x44)
        #expect(w.load16(2) == 0x1122)
        w.store8(4, 0xAB)
        #expect(w.load8(4) == 0xAB)
        w.store64Split(8, 0x0102_0304_0506_0708)
        #expect(w.load32(8) == 0x0506_0708 && w.load32(12) == 0x0102_0304)
        #expect(w.load64Split(8) == 0x0102_0304_0506_0708)
    }
}

@Suite("descriptor ownership")
struct OwnedFDTests {
    func isOpen(_ fd: Int32) -> Bool { fcntl(fd, F_GETFD) != -1 }

    @Test func closesWhenTheOwnerGoesAway() {
        var raw: Int32 = -1
        do {
            let fd = OwnedFD(adopting: open("/dev/null", O_RDONLY))
            raw = fd.raw
            #expect(isOpen(raw))
        }
        #expect(!isOpen(raw))
    }

    @Test func takeHandsOwnershipOn() {
        let fd = OwnedFD(adopting: open("/dev/null", O_RDONLY))
        let raw = fd.take()
        #expect(isOpen(raw))
        close(raw)
    }
}
