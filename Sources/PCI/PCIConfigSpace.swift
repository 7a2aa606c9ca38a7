/// A snapshot of a function's PCI configuration space, parsed without trusting any of it.
///
/// The bytes are copied once (from VFIO's config region or sysfs) and every later read is
/// bounds-checked against that copy, so a device cannot change what we validated.
public struct PCIConfigSpace: Sendable {
    public let bytes: [UInt8]

    /// Offsets of the standard header fields (PCI Local Bus Spec 6.1).
    public enum Offset {
        public static let vendorID = 0x00, deviceID = 0x02, command = 0x04, status = 0x06
        public static let revision = 0x08, classCode = 0x09, headerType = 0x0E
        public static let bar0 = 0x10, subsystemVendorID = 0x2C, subsystemID = 0x2E
        public static let capabilitiesPointer = 0x34
    }

    /// Command register bits the driver sets (PCI Local Bus Spec 6.2.2).
    public enum Command {
        public static let memorySpace: UInt16 = 1 << 1
        public static let busMaster: UInt16 = 1 << 2
        public static let interruptDisable: UInt16 = 1 << 10
    }

    /// Status register: the function has a capability list.
    static let statusCapabilitiesList: UInt16 = 1 << 4
    /// The standard capability list lives in the first 256 bytes, after the 64-byte header.
    static let standardSpaceEnd = 256, headerEnd = 0x40
    /// At most this many capabilities fit in 192 bytes of 4-byte aligned, 2-byte minimum entries.
    static let maxCapabilities = (256 - 0x40) / 4

    public init(bytes: [UInt8]) throws(PCIError) {
        guard bytes.count >= PCIConfigSpace.headerEnd else {
            throw .malformedConfigSpace("only \(bytes.count) bytes; the PCI header alone is 64")
        }
        self.bytes = bytes
    }

    public func u8(_ offset: Int) throws(PCIError) -> UInt8 {
        guard offset >= 0, offset < bytes.count else {
            throw .malformedConfigSpace("read of 1 byte at 0x\(hex(offset, width: 2)) past the end (\(bytes.count) bytes)")
        }
        return bytes[offset]
    }

    public func u16(_ offset: Int) throws(PCIError) -> UInt16 {
        guard offset >= 0, offset + 2 <= bytes.count else {
            throw .malformedConfigSpace("read of 2 bytes at 0x\(hex(offset, width: 2)) past the end (\(bytes.count) bytes)")
        }
        return UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
    }

    public func u32(_ offset: Int) throws(PCIError) -> UInt32 {
        guard offset >= 0, offset + 4 <= bytes.count else {
            throw .malformedConfigSpace("read of 4 bytes at 0x\(hex(offset, width: 2)) past the end (\(bytes.count) bytes)")
        }
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * $1) }
    }

    public var vendorID: UInt16 { (try? u16(Offset.vendorID)) ?? 0xFFFF }
    public var deviceID: UInt16 { (try? u16(Offset.deviceID)) ?? 0xFFFF }
    public var command: UInt16 { (try? u16(Offset.command)) ?? 0 }
    public var status: UInt16 { (try? u16(Offset.status)) ?? 0 }
    public var headerType: UInt8 { ((try? u8(Offset.headerType)) ?? 0) & 0x7F }

    /// The standard capability list: (offset, capability ID) in list order.
    ///
    /// Refuses pointers into the header, past the end of what was read, and loops.
    public func capabilities() throws(PCIError) -> [PCICapability] {
        guard status & PCIConfigSpace.statusCapabilitiesList != 0 else { return [] }
        var result: [PCICapability] = []
        var visited = Set<Int>()
        // The bottom two bits of every pointer are reserved (PCI Local Bus Spec 6.7).
        var pointer = Int(try u8(Offset.capabilitiesPointer) & 0xFC)
        while pointer != 0 {
            guard pointer >= PCIConfigSpace.headerEnd, pointer < PCIConfigSpace.standardSpaceEnd else {
                throw .malformedConfigSpace("capability pointer 0x\(hex(pointer, width: 2)) is outside 0x40..0xff")
            }
            guard pointer + 2 <= bytes.count else {
                throw .malformedConfigSpace(
                    "capability at 0x\(hex(pointer, width: 2)) is past the end of config space (\(bytes.count) bytes read)")
            }
            guard visited.insert(pointer).inserted, result.count < PCIConfigSpace.maxCapabilities else {
                throw .malformedConfigSpace("capability list loops back to 0x\(hex(pointer, width: 2)) after \(result.count) entries")
            }
            result.append(PCICapability(offset: pointer, id: bytes[pointer]))
            pointer = Int(bytes[pointer + 1] & 0xFC)
        }
        return result
    }
}

/// One entry of the standard capability list.
public struct PCICapability: Sendable, Equatable {
    public var offset: Int
    public var id: UInt8

    public static let vendorSpecific: UInt8 = 0x09
    public static let msix: UInt8 = 0x11
    public static let pciExpress: UInt8 = 0x10
    public static let powerManagement: UInt8 = 0x01
    public static let msi: UInt8 = 0x05

    public var name: String {
        switch id {
        case 0x01: return "Power Management"
        case 0x05: return "MSI"
        case 0x09: return "Vendor Specific"
        case 0x10: return "PCI Express"
        case 0x11: return "MSI-X"
        default: return "0x" + hex(id, width: 2)
        }
    }
}
