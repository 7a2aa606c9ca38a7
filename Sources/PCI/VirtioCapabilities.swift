/// The virtio structure capabilities of a modern virtio-pci function (virtio 1.2 §4.1.4),
/// found by walking the vendor-specific capabilities of its config space.
///
/// Every capability is validated before it is used: a structure must lie inside an implemented BAR,
/// with the alignment and minimum length its section requires, and sharing no byte with a structure
/// of another type already chosen. Per §4.1.4.1 the driver ignores capabilities with a reserved
/// `cfg_type` or `bar`, and uses the first valid instance of each type; an overlapping one is not
/// valid, so the later of two overlapping structures is ignored (and, if no other instance of its
/// type is valid, the device is refused with the overlap named).
public struct VirtioPCICapabilities: Sendable, Equatable {
    /// `cfg_type` values (§4.1.4).
    public enum StructureType: UInt8, Sendable, CaseIterable {
        case common = 1, notify = 2, isr = 3, device = 4, pciConfigAccess = 5, sharedMemory = 8, vendorData = 9

        public var name: String {
            switch self {
            case .common: return "common"
            case .notify: return "notify"
            case .isr: return "isr"
            case .device: return "device"
            case .pciConfigAccess: return "pci-cfg"
            case .sharedMemory: return "shared-memory"
            case .vendorData: return "vendor-data"
            }
        }
    }

    /// One `struct virtio_pci_cap` as read from config space.
    public struct Structure: Sendable, Equatable {
        public var type: StructureType
        /// Offset of the capability in config space.
        public var capabilityOffset: Int
        public var capabilityLength: UInt8
        public var bar: Int
        public var id: UInt8
        /// Offset and length inside the BAR (64-bit for shared-memory capabilities).
        public var offset: UInt64
        public var length: UInt64
        /// `notify_off_multiplier` of the notify capability (§4.1.4.4), nil for the others.
        public var notifyOffMultiplier: UInt32?
    }

    /// A capability present but not used, and why.
    public struct Ignored: Sendable, Equatable {
        public var capabilityOffset: Int
        public var reason: String
    }

    public var common: Structure
    public var notify: Structure
    public var isr: Structure
    /// Device-specific configuration; absent for devices without one (§4.1.4.6).
    public var device: Structure?
    /// Every virtio capability in list order, including those not used.
    public var all: [Structure]
    public var ignored: [Ignored]

    /// The smallest common configuration structure this driver uses: through `queue_device` (0x38).
    public static let minimumCommonLength: UInt64 = 0x38
    /// Sizes of the six standard BARs; 0 for an unimplemented BAR.
    public typealias BARSizes = [UInt64]

    /// Walks the capabilities of `config`; `barSizes` gives the size of BARs 0-5 (0 = not implemented).
    public init(config: PCIConfigSpace, barSizes: BARSizes) throws(PCIError) {
        var all: [Structure] = []
        var ignored: [Ignored] = []
        var chosen: [StructureType: Structure] = [:]
        var firstProblem: [StructureType: String] = [:]

        for capability in try config.capabilities() where capability.id == PCICapability.vendorSpecific {
            let at = capability.offset
            let capLength = try config.u8(at + 2)
            // §4.1.4: struct virtio_pci_cap is 16 bytes; cap_len covers it and any extra fields.
            guard capLength >= 16 else {
                throw .malformedVirtioCapability("capability at 0x\(hex(at, width: 2)) has cap_len \(capLength), below the 16 bytes of struct virtio_pci_cap")
            }
            guard at + Int(capLength) <= config.bytes.count else {
                throw .malformedVirtioCapability("capability at 0x\(hex(at, width: 2)) with cap_len \(capLength) runs past the end of config space (\(config.bytes.count) bytes read)")
            }
            let rawType = try config.u8(at + 3)
            let bar = Int(try config.u8(at + 4))
            guard let type = StructureType(rawValue: rawType) else {
                ignored.append(Ignored(capabilityOffset: at, reason: "reserved cfg_type \(rawType)"))
                continue
            }
            guard bar <= 5 else {
                ignored.append(Ignored(capabilityOffset: at, reason: "\(type.name): reserved bar value \(bar)"))
                continue
            }
            var offset = UInt64(try config.u32(at + 8))
            var length = UInt64(try config.u32(at + 12))
            var multiplier: UInt32?
            if type == .notify {
                guard capLength >= 20 else {
                    throw .malformedVirtioCapability("notify capability at 0x\(hex(at, width: 2)) has cap_len \(capLength), below the 20 bytes of struct virtio_pci_notify_cap")
                }
                multiplier = try config.u32(at + 16)
            }
            if type == .sharedMemory {
                guard capLength >= 24 else {
                    throw .malformedVirtioCapability("shared-memory capability at 0x\(hex(at, width: 2)) has cap_len \(capLength), below the 24 bytes of struct virtio_pci_cap64")
                }
                offset |= UInt64(try config.u32(at + 16)) << 32
                length |= UInt64(try config.u32(at + 20)) << 32
            }
            let structure = Structure(type: type, capabilityOffset: at, capabilityLength: capLength, bar: bar,
                                      id: try config.u8(at + 5), offset: offset, length: length,
                                      notifyOffMultiplier: multiplier)
            all.append(structure)

            // Only the structures the driver maps are checked against their BAR; the PCI config
            // access capability's fields are a window the driver writes, not a location (§4.1.4.9).
            guard [.common, .notify, .isr, .device].contains(type) else { continue }
            if chosen[type] != nil {
                ignored.append(Ignored(capabilityOffset: at, reason: "\(type.name): an earlier \(type.name) capability is used (§4.1.4.1)"))
                continue
            }
            if let problem = VirtioPCICapabilities.problem(with: structure, barSizes: barSizes) {
                ignored.append(Ignored(capabilityOffset: at, reason: problem))
                if firstProblem[type] == nil { firstProblem[type] = problem }
                continue
            }
            // Structures of different types that share bytes of a BAR: the later one is treated
            // like any other invalid instance (ignored, the next valid one of its type is used).
            if let problem = VirtioPCICapabilities.overlap(of: structure, with: chosen) {
                ignored.append(Ignored(capabilityOffset: at, reason: problem))
                if firstProblem[type] == nil { firstProblem[type] = problem }
                continue
            }
            chosen[type] = structure
        }

        func required(_ type: StructureType) throws(PCIError) -> Structure {
            if let structure = chosen[type] { return structure }
            if let problem = firstProblem[type] { throw .malformedVirtioCapability(problem) }
            throw .malformedVirtioCapability("no \(type.name) configuration capability: not a modern (virtio 1.x) virtio-pci device "
                                             + "but a legacy-only one, which this driver does not drive (§4.1.2; QEMU: disable-modern=off)")
        }
        self.common = try required(.common)
        self.notify = try required(.notify)
        self.isr = try required(.isr)
        if chosen[.device] == nil, let problem = firstProblem[.device] {
            throw .malformedVirtioCapability(problem)
        }
        self.device = chosen[.device]
        self.all = all
        self.ignored = ignored
    }

    /// Why `s` cannot be used beside the structures already `chosen`: it shares bytes of its BAR
    /// with one of them, so a write to one register would change another's (§4.1.4 gives each
    /// structure its own location; a device that maps two onto the same bytes is broken). Empty
    /// ranges overlap nothing; ranges that only touch do not overlap.
    static func overlap(of s: Structure, with chosen: [StructureType: Structure]) -> String? {
        for type in [StructureType.common, .notify, .isr, .device] {
            guard let other = chosen[type], other.bar == s.bar, s.length > 0, other.length > 0 else { continue }
            // Both ranges were checked to end inside the BAR, so the sums do not overflow.
            guard s.offset < other.offset + other.length, other.offset < s.offset + s.length else { continue }
            return "\(s.type.name) capability at 0x\(hex(s.capabilityOffset, width: 2)) overlaps the \(other.type.name) structure in BAR \(s.bar): 0x\(hex(s.offset, width: 1))+0x\(hex(s.length, width: 1)) and 0x\(hex(other.offset, width: 1))+0x\(hex(other.length, width: 1)) (capability at 0x\(hex(other.capabilityOffset, width: 2)), used)"
        }
        return nil
    }

    /// Why a structure cannot be used, or nil if it can.
    static func problem(with s: Structure, barSizes: BARSizes) -> String? {
        let name = "\(s.type.name) capability at 0x\(hex(s.capabilityOffset, width: 2))"
        let barSize = s.bar < barSizes.count ? barSizes[s.bar] : 0
        guard barSize > 0 else { return "\(name) points at BAR \(s.bar), which is not implemented" }
        let (end, overflow) = s.offset.addingReportingOverflow(s.length)
        guard !overflow, end <= barSize else {
            return "\(name) points outside its BAR: 0x\(hex(s.offset, width: 1))+0x\(hex(s.length, width: 1)) in BAR \(s.bar) of 0x\(hex(barSize, width: 1)) bytes"
        }
        switch s.type {
        case .common:
            // §4.1.4.3.1: offset 4-byte aligned.
            if s.offset % 4 != 0 { return "\(name): offset 0x\(hex(s.offset, width: 1)) is not 4-byte aligned (§4.1.4.3)" }
            if s.length < minimumCommonLength {
                return "\(name): length \(s.length) is below the \(minimumCommonLength) bytes of struct virtio_pci_common_cfg"
            }
        case .notify:
            // §4.1.4.4.1: offset 2-byte aligned, length at least 2, multiplier 0 or an even power of 2.
            if s.offset % 2 != 0 { return "\(name): offset 0x\(hex(s.offset, width: 1)) is not 2-byte aligned (§4.1.4.4)" }
            if s.length < 2 { return "\(name): length \(s.length) is below 2 (§4.1.4.4)" }
            let m = s.notifyOffMultiplier ?? 0
            if m != 0 && (m & (m - 1) != 0 || m < 2) {
                return "\(name): notify_off_multiplier \(m) is neither 0 nor an even power of 2 (§4.1.4.4)"
            }
        case .isr:
            if s.length < 1 { return "\(name): length 0 (§4.1.4.5)" }
        case .device:
            // §4.1.4.6: offset 4-byte aligned.
            if s.offset % 4 != 0 { return "\(name): offset 0x\(hex(s.offset, width: 1)) is not 4-byte aligned (§4.1.4.6)" }
        default:
            break
        }
        return nil
    }
}
