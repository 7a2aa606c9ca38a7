/// Descriptors received together (SCM_RIGHTS), owned as one set until each is taken out: whatever
/// is still in the set when it goes away is closed, so no path that refuses or fails leaks one.
public struct OwnedFDList: ~Copyable {
    /// The descriptors in arrival order; -1 where one was taken out.
    private var slots: [Int32]

    /// Takes ownership of `descriptors` (each must be open, or -1 for an empty place).
    public init(adopting descriptors: [Int32]) { slots = descriptors }

    public init() { slots = [] }

    /// How many places the set has (taken ones included).
    public var count: Int { slots.count }
    /// How many descriptors are still owned here.
    public var remaining: Int { slots.reduce(0) { $0 + ($1 >= 0 ? 1 : 0) } }

    /// The raw descriptor at `index` without taking it (-1 if taken), for checks (fstat, getsockopt).
    public func peek(_ index: Int) -> Int32 { slots.indices.contains(index) ? slots[index] : -1 }

    /// Takes the descriptor at `index` out of the set; nil if there is none or it was taken.
    public mutating func take(_ index: Int) -> OwnedFD? {
        guard slots.indices.contains(index), slots[index] >= 0 else { return nil }
        defer { slots[index] = -1 }
        return OwnedFD(adopting: slots[index])
    }

    /// Moves the descriptors at `indices` (in that order) into a set of their own.
    public mutating func split(_ indices: [Int]) -> OwnedFDList {
        var moved: [Int32] = []
        for i in indices where slots.indices.contains(i) && slots[i] >= 0 {
            moved.append(slots[i])
            slots[i] = -1
        }
        return OwnedFDList(adopting: moved)
    }

    /// Appends a descriptor this set owns from now on.
    public mutating func append(_ fd: consuming OwnedFD) { slots.append(fd.take()) }

    /// Gives every remaining descriptor to the caller, who must close or hand each on.
    public consuming func release() -> [Int32] {
        let owned = slots.filter { $0 >= 0 }
        slots = []
        return owned
    }

    deinit {
        for fd in slots where fd >= 0 { Syscall.close(fd) }
    }
}
