/// The block device's storage: sparse 4 KiB pages, allocated on first write, zero when absent,
/// so a device can report any capacity (including absurd ones) without reserving it.
/// It outlives device resets, as a disk does. Only used under the device's state lock.
final class BlockStore {
    static let pageSize = 4096
    private var pages: [UInt64: UnsafeMutableRawPointer] = [:]

    deinit {
        for p in pages.values { p.deallocate() }
    }

    var allocatedPages: Int { pages.count }

    private func page(_ n: UInt64, create: Bool) -> UnsafeMutableRawPointer? {
        if let p = pages[n] { return p }
        guard create else { return nil }
        let p = UnsafeMutableRawPointer.allocate(byteCount: BlockStore.pageSize, alignment: 64)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: BlockStore.pageSize)
        pages[n] = p
        return p
    }

    /// Calls `body(page number, offset in page, destination/source offset, length)` per page piece.
    private func walk(_ offset: UInt64, _ count: Int, _ body: (UInt64, Int, Int, Int) -> Void) {
        var done = 0
        while done < count {
            let at = offset + UInt64(done)
            let n = at / UInt64(BlockStore.pageSize)
            let inPage = Int(at % UInt64(BlockStore.pageSize))
            let len = min(BlockStore.pageSize - inPage, count - done)
            body(n, inPage, done, len)
            done += len
        }
    }

    func read(_ offset: UInt64, _ count: Int, into destination: UnsafeMutableRawPointer) {
        walk(offset, count) { n, inPage, at, len in
            if let p = page(n, create: false) {
                (destination + at).copyMemory(from: p + inPage, byteCount: len)
            } else {
                (destination + at).initializeMemory(as: UInt8.self, repeating: 0, count: len)
            }
        }
    }

    func write(_ offset: UInt64, _ count: Int, from source: UnsafeRawPointer) {
        walk(offset, count) { n, inPage, at, len in
            page(n, create: true)!.advanced(by: inPage).copyMemory(from: source + at, byteCount: len)
        }
    }

    /// Zeroes `[offset, offset + count)`: drops whole pages, clears the partial ones at the ends.
    func zero(_ offset: UInt64, _ count: UInt64) {
        guard count > 0 else { return }
        let size = UInt64(BlockStore.pageSize)
        let end = offset + count
        let firstWhole = (offset + size - 1) / size
        let endWhole = end / size
        if firstWhole < endWhole {
            // Walk whichever is smaller: the range or the pages that exist.
            if endWhole - firstWhole > UInt64(pages.count) {
                for n in pages.keys where n >= firstWhole && n < endWhole { pages.removeValue(forKey: n)?.deallocate() }
            } else {
                for n in firstWhole..<endWhole { pages.removeValue(forKey: n)?.deallocate() }
            }
        }
        func clear(_ from: UInt64, _ to: UInt64) {
            guard from < to, let p = page(from / size, create: false) else { return }
            (p + Int(from % size)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(to - from))
        }
        if firstWhole >= endWhole {
            // Inside one page, or straddling one page boundary with no whole page between.
            let boundary = min(end, (offset / size + 1) * size)
            clear(offset, boundary)
            clear(boundary, end)
        } else {
            clear(offset, firstWhole * size)
            clear(endWhole * size, end)
        }
    }
}
