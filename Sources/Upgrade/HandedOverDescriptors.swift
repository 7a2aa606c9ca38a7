import Syscalls

/// The descriptors that arrived with one part of a state record, each with the role the record
/// gives it. Owned here until taken out by role; what is left is closed with the set, so a
/// successor that refuses or fails half-way leaks none.
public struct HandedOverDescriptors: ~Copyable {
    public let roles: [StateRecord.DescriptorRole]
    private var owned: OwnedFDList

    /// `descriptors` must be as many as `roles` (the record's decoder checked that they are).
    public init(roles: [StateRecord.DescriptorRole], descriptors: consuming OwnedFDList) {
        precondition(roles.count == descriptors.count, "\(roles.count) roles for \(descriptors.count) descriptors")
        self.roles = roles
        owned = descriptors
    }

    public init() {
        roles = []
        owned = OwnedFDList()
    }

    /// How many descriptors of `role` are still here.
    public func count(_ role: StateRecord.DescriptorRole) -> Int {
        roles.indices.reduce(0) { $0 + (roles[$1] == role && owned.peek($1) >= 0 ? 1 : 0) }
    }

    /// How many descriptors are still here.
    public var remaining: Int { owned.remaining }

    /// The first descriptor of `role` still here, taken out.
    public mutating func take(_ role: StateRecord.DescriptorRole) -> OwnedFD? {
        guard let i = roles.indices.first(where: { roles[$0] == role && owned.peek($0) >= 0 }) else { return nil }
        return owned.take(i)
    }

    /// Every descriptor of `role` still here, in order, taken out as a set of their own.
    public mutating func takeAll(_ role: StateRecord.DescriptorRole) -> OwnedFDList {
        owned.split(roles.indices.filter { roles[$0] == role })
    }
}
