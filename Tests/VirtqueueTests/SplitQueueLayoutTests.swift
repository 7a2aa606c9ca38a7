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

    @Test func needsEventIsVringNeedEvent() {
        // vring_need_event(event_idx, new_idx, old): (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)
        #expect(SplitQueueLayout.needsEvent(event: 4, new: 5, old: 4))
        #expect(!SplitQueueLayout.needsEvent(event: 5, new: 5, old: 4))
        #expect(SplitQueueLayout.needsEvent(event: 0xFFFF, new: 1, old: 0xFFFE))  // across the wrap
        #expect(!SplitQueueLayout.needsEvent(event: 3, new: 3, old: 3))           // nothing moved
    }
}
