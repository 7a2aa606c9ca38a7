import Testing
import Virtio

@Suite struct FixedArrayTests {
    @Test func elementsStartAsGivenAndKeepWhatIsWritten() {
        let a = FixedArray(repeating: UInt16(7), count: 5)
        #expect(a.count == 5)
        #expect((0..<5).allSatisfy { a[$0] == 7 })
        a[2] = 9  // through a `let` owner, like a `let` pointer
        #expect(a[2] == 9 && a[1] == 7 && a[3] == 7)
        let b = FixedArray(count: 4) { UInt32($0 * 10) }
        #expect(Array(b.unsafeElements) == [0, 10, 20, 30])
        b.unsafeElements[1] = 11
        #expect(b[1] == 11)
    }

    @Test func fieldsOfAStructElementAreWrittenInPlace() {
        struct Slot { var held = false; var sequence: UInt64 = 0 }
        let slots = FixedArray(repeating: Slot(), count: 3)
        slots[1].held = true
        slots[1].sequence += 5
        #expect(slots[1].held && slots[1].sequence == 5 && !slots[0].held && slots[2].sequence == 0)
    }

    @Test func anEmptyArrayIsValid() {
        let a = FixedArray(repeating: 0, count: 0)
        #expect(a.count == 0 && a.unsafeElements.isEmpty)
    }

    @Test func theOwnerReleasesItsElementsOnce() {
        final class Tracked {
            let released: UnsafeMutablePointer<Int>
            init(_ released: UnsafeMutablePointer<Int>) { self.released = released }
            deinit { released.pointee += 1 }
        }
        let released = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        defer { released.deallocate() }
        released.pointee = 0
        func use() {
            let a = FixedArray(count: 3) { _ in Tracked(released) }
            a[0] = Tracked(released)  // the element it replaces is released at once
            #expect(released.pointee == 1 && a.count == 3)
        }
        use()
        #expect(released.pointee == 4)  // and the rest with the array
    }
}
