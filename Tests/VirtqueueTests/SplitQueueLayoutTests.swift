import Testing
import Virtio

/// `SplitQueueLayout` against the spec's numbers, written out here as the spec gives them: the
/// driver, the emulator, the test drivers and the fuzz targets all take their offsets from it,
/// so this is where a wrong offset is caught.
@Suite struct SplitQueueLayoutTests {
    @Test func descriptorFieldsAreThoseOfVirtqDesc() {
        // struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (§2.7.5)
        #expect(SplitQueueLayout.descriptorSize == 16 && SplitQueueLayout.descriptorAlignment == 16)
        #expect(SplitQueueLayout.descriptorAddress == 0 && SplitQueueLayout.descriptorLength == 8)
        #expect(SplitQueueLayout.descriptorFlags == 12 && SplitQueueLayout.descriptorNext == 14)
        #expect(SplitQueueLayout.descriptor(0) == 0 && SplitQueueLayout.descriptor(5) == 80)
        #expect(SplitQueueLayout.descriptorTableSize(256) == 4096)
        #expect(SplitQueueLayout.flagNext == 1 && SplitQueueLayout.flagWrite == 2 && SplitQueueLayout.flagIndirect == 4)
    }

    @Test func availableRingFieldsAreThoseOfVirtqAvail() {
        // struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; } (§2.7.6)
        #expect(SplitQueueLayout.availAlignment == 2)
        #expect(SplitQueueLayout.availFlags == 0 && SplitQueueLayout.availIndex == 2)
        #expect(SplitQueueLayout.availRing(0) == 4 && SplitQueueLayout.availRing(7) == 18)
        #expect(SplitQueueLayout.usedEvent(8) == 20 && SplitQueueLayout.usedEvent(256) == 516)
        #expect(SplitQueueLayout.availSize(8) == 22 && SplitQueueLayout.availSize(256) == 6 + 2 * 256)
        #expect(SplitQueueLayout.availNoInterrupt == 1)
    }

    @Test func usedRingFieldsAreThoseOfVirtqUsed() {
        // struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem { le32 id; le32 len; } ring[N];
        //                     le16 avail_event; } (§2.7.8)
        #expect(SplitQueueLayout.usedAlignment == 4 && SplitQueueLayout.usedElementSize == 8)
        #expect(SplitQueueLayout.usedFlags == 0 && SplitQueueLayout.usedIndex == 2)
        #expect(SplitQueueLayout.usedElement(0) == 4 && SplitQueueLayout.usedElement(3) == 28)
        #expect(SplitQueueLayout.usedElementID == 0 && SplitQueueLayout.usedElementLength == 4)
        #expect(SplitQueueLayout.availEvent(8) == 68 && SplitQueueLayout.availEvent(256) == 2052)
        #expect(SplitQueueLayout.usedSize(8) == 70 && SplitQueueLayout.usedSize(256) == 6 + 8 * 256)
        #expect(SplitQueueLayout.usedNoNotify == 1)
    }

    /// No single write of the device's to the used ring may cross a page (`usedPageOffset`: QEMU
    /// before 9.0 sends the part past the boundary to a wrong IOVA). For every queue size, the
    /// carved used ring is 4-byte aligned (§2.7) and each 8-byte element and `avail_event` lie
    /// within one page.
    @Test func noUsedElementCrossesAPage() throws {
        let bytes = 2 << 20
        let block = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
        defer { block.deallocate() }
        let arena = DMAArena(memory: DMASlice(pointer: block, deviceAddress: 0x40000, size: bytes))
        for shift in 0...15 {
            arena.reset()
            let n = 1 << shift
            let memory = try SplitQueueMemory(arena: arena, size: UInt16(n), zeroed: false)
            let base = Int(memory.used.deviceAddress)
            #expect(base % SplitQueueLayout.usedAlignment == 0)
            let page = { (offset: Int, width: Int) in (base + offset) / 4096 == (base + offset + width - 1) / 4096 }
            let crossing = (0..<n).filter { !page(SplitQueueLayout.usedElement($0), SplitQueueLayout.usedElementSize) }
            #expect(crossing.isEmpty, "size \(n): used elements \(crossing.prefix(4)) cross a page")
            #expect(page(SplitQueueLayout.usedIndex, 2) && page(SplitQueueLayout.availEvent(n), 2))
        }
    }

    @Test func needsEventIsVringNeedEvent() {
        // vring_need_event(event_idx, new_idx, old): (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)
        #expect(SplitQueueLayout.needsEvent(event: 4, new: 5, old: 4))
        #expect(!SplitQueueLayout.needsEvent(event: 5, new: 5, old: 4))
        #expect(SplitQueueLayout.needsEvent(event: 0xFFFF, new: 1, old: 0xFFFE))  // across the wrap
        #expect(!SplitQueueLayout.needsEvent(event: 3, new: 3, old: 3))           // nothing moved
    }
}
