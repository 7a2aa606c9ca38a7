import Testing
import Foundation
import Glibc
@testable import VFIO

/// `/proc/self/pagemap` as the no-IOMMU backend reads it (Documentation/admin-guide/mm/pagemap.rst):
/// entries are checked before an address is used, and a hugepage must be physically contiguous.
@Suite struct PageMapTests {
    let page = Int(sysconf(Int32(_SC_PAGESIZE)))

    @Test func anEntryGivesItsFrameOrSaysWhyNot() throws {
        #expect(try PageMap.physicalAddress(entry: 1 << 63 | 0x12345, pageSize: 4096) == 0x12345 * 4096)
        // Bits 55-62 are flags (soft-dirty, exclusive, file/shared...), not the frame.
        #expect(try PageMap.physicalAddress(entry: 1 << 63 | 1 << 61 | 1 << 55 | 7, pageSize: 4096) == 7 * 4096)
        #expect(throws: VFIOError.self) { try PageMap.physicalAddress(entry: 0x12345, pageSize: 4096) }  // not present
        #expect { try PageMap.physicalAddress(entry: 1 << 63, pageSize: 4096) } throws: { error in
            "\(error)".contains("needs CAP_SYS_ADMIN")  // present, frame hidden
        }
    }

    /// A pagemap of our own making (a sparse file with entries where the kernel puts them, for a
    /// made-up virtual address): contiguous pieces give their first page's address, a piece
    /// whose pages are not consecutive frames is refused.
    @Test func eachPieceMustBePhysicallyContiguous() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("pagemap-\(getpid())").path
        defer { unlink(path) }
        let virtual = 0x4000_0000, chunk = 4 * page
        let fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0o600)
        try #require(fd >= 0)
        defer { close(fd) }
        func put(_ pages: [UInt64]) {
            var entries = pages.map { (1 << 63 | $0).littleEndian }
            _ = entries.withUnsafeMutableBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(virtual / page * 8)) }
        }
        let base = UnsafeRawPointer(bitPattern: virtual)!
        put([100, 101, 102, 103, 900, 901, 902, 903])
        #expect(try PageMap.physicalAddresses(of: base, size: 2 * chunk, chunk: chunk, path: path) == [100 * UInt64(page), 900 * UInt64(page)])
        put([100, 101, 102, 103, 900, 902, 903, 904])
        #expect { try PageMap.physicalAddresses(of: base, size: 2 * chunk, chunk: chunk, path: path) } throws: { error in
            "\(error)".contains("not physically contiguous")
        }
        // Short of entries (a range past the end of the file): an error, not zeros.
        #expect(throws: VFIOError.self) { try PageMap.physicalAddresses(of: base, size: 4 * chunk, chunk: chunk, path: path) }
    }

    /// This process's own memory: as root the frames show (as a user they read 0, and the refusal
    /// says why). Anonymous pages are not contiguous in general, so one page per piece.
    @Test func ownMemoryHasPhysicalAddressesOrARefusalThatSaysWhy() throws {
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4 * page, alignment: page)
        defer { memory.deallocate() }
        memory.initializeMemory(as: UInt8.self, repeating: 1, count: 4 * page)
        do {
            let addresses = try PageMap.physicalAddresses(of: memory, size: 4 * page, chunk: page)
            #expect(geteuid() == 0 && addresses.count == 4 && addresses.allSatisfy { $0 != 0 && $0 % UInt64(page) == 0 })
        } catch {
            #expect(geteuid() != 0 && "\(error)".contains("needs CAP_SYS_ADMIN"), "\(error)")
        }
    }
}
