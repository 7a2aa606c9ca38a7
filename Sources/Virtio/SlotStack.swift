/// A fixed-capacity stack of buffer slot numbers, allocated once: devices keep the slots of
/// completed requests here until they post them again, without allocating on the data path.
public struct SlotStack: ~Copyable {
    let storage: FixedArray<UInt32>
    public let capacity: Int
    public private(set) var count = 0

    public init(capacity: Int) {
        storage = FixedArray(repeating: 0, count: capacity)
        self.capacity = capacity
    }

    /// All slots `0..<capacity`, to start with.
    public init(filledTo capacity: Int) {
        self.init(capacity: capacity)
        for i in 0..<capacity { storage[i] = UInt32(i) }
        count = capacity
    }

    public mutating func push(_ slot: Int) {
        precondition(count < capacity, "slot stack overflow: a slot was freed twice")
        storage[count] = UInt32(truncatingIfNeeded: slot)
        count += 1
    }

    public mutating func pop() -> Int? {
        guard count > 0 else { return nil }
        count -= 1
        return Int(storage[count])
    }
}
