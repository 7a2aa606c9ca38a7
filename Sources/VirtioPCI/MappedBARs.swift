import VFIO

/// The BARs a virtio function's capabilities point into, each mapped once.
/// (Swift arrays cannot hold `~Copyable` values, hence one optional per BAR.)
struct MappedBARs: ~Copyable {
    var bar0: MappedRegion?
    var bar1: MappedRegion?
    var bar2: MappedRegion?
    var bar3: MappedRegion?
    var bar4: MappedRegion?
    var bar5: MappedRegion?

    init() {}

    func isMapped(_ bar: Int) -> Bool {
        switch bar {
        case 0: return bar0 != nil
        case 1: return bar1 != nil
        case 2: return bar2 != nil
        case 3: return bar3 != nil
        case 4: return bar4 != nil
        case 5: return bar5 != nil
        default: return false
        }
    }

    mutating func set(_ bar: Int, _ region: consuming MappedRegion) {
        switch bar {
        case 0: bar0 = .some(region)
        case 1: bar1 = .some(region)
        case 2: bar2 = .some(region)
        case 3: bar3 = .some(region)
        case 4: bar4 = .some(region)
        case 5: bar5 = .some(region)
        default: preconditionFailure("BAR index \(bar) out of range")
        }
    }

    /// A window into one BAR; nil if that BAR is not mapped or the range does not fit.
    func window(bar: Int, offset: UInt64, length: UInt64) -> MMIOWindow? {
        switch bar {
        case 0: return bar0?.window(offset: offset, length: length)
        case 1: return bar1?.window(offset: offset, length: length)
        case 2: return bar2?.window(offset: offset, length: length)
        case 3: return bar3?.window(offset: offset, length: length)
        case 4: return bar4?.window(offset: offset, length: length)
        case 5: return bar5?.window(offset: offset, length: length)
        default: return nil
        }
    }
}
