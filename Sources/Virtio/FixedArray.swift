/// A run-time-sized array allocated once and owned by one value: per-slot shadow state of a queue
/// or a device (the slot count is known when the queue is built and never changes).
///
/// `~Copyable`, so exactly one owner frees it (in `deinit`); a struct over an unsafe pointer, so
/// reading or writing an element is a load or a store, with no allocation, no reference count and
/// no exclusivity check. Writes are `nonmutating`, like those through a `let` pointer: an owner
/// that keeps the array in a `let` may still change the elements. Indices are checked in debug
/// builds only (`assert`): callers index with slot numbers they own or validated, as the raw
/// pointers this replaces did.
public struct FixedArray<Element>: ~Copyable {
    @usableFromInline let base: UnsafeMutablePointer<Element>
    public let count: Int

    /// `count` copies of `value`.
    @inlinable public init(repeating value: Element, count: Int) {
        precondition(count >= 0, "FixedArray count \(count) is negative")
        base = .allocate(capacity: Swift.max(count, 1))
        base.initialize(repeating: value, count: count)
        self.count = count
    }

    /// Element `i` is `element(i)`.
    @inlinable public init(count: Int, _ element: (Int) -> Element) {
        precondition(count >= 0, "FixedArray count \(count) is negative")
        base = .allocate(capacity: Swift.max(count, 1))
        for i in 0..<count { (base + i).initialize(to: element(i)) }
        self.count = count
    }

    @inlinable deinit {
        base.deinitialize(count: count)
        base.deallocate()
    }

    @inlinable public subscript(i: Int) -> Element {
        @inline(__always) unsafeAddress {
            assert(i >= 0 && i < count, "FixedArray index out of range")
            return UnsafePointer(base + i)
        }
        @inline(__always) nonmutating unsafeMutableAddress {
            assert(i >= 0 && i < count, "FixedArray index out of range")
            return base + i
        }
    }

    /// The elements' memory, valid only while this array lives. For a closure handed to a
    /// mutating call on the owner's other properties (it cannot capture the owner then), and for
    /// APIs that take a buffer.
    @inlinable public var unsafeElements: UnsafeMutableBufferPointer<Element> {
        UnsafeMutableBufferPointer(start: base, count: count)
    }
}
