/// A PCI function address (domain:bus:device.function), as sysfs and VFIO name it: `0000:00:05.0`.
public struct PCIAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let domain: UInt16
    public let bus: UInt8
    public let device: UInt8
    public let function: UInt8

    public init(domain: UInt16 = 0, bus: UInt8, device: UInt8, function: UInt8) throws(PCIError) {
        guard device < 32 else { throw .badAddress("device number \(device) is above 31") }
        guard function < 8 else { throw .badAddress("function number \(function) is above 7") }
        self.domain = domain
        self.bus = bus
        self.device = device
        self.function = function
    }

    /// Parses `DDDD:BB:dd.f` or `BB:dd.f` (hex, as lspci and sysfs print them).
    public init(parsing text: String) throws(PCIError) {
        let fail = PCIError.badAddress(
            "'\(text)' is not a PCI address; expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:00:05.0")
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2 || parts.count == 3 else { throw fail }
        let domainText = parts.count == 3 ? parts[0] : "0000"
        let busText = parts[parts.count - 2]
        let slotParts = parts[parts.count - 1].split(separator: ".", omittingEmptySubsequences: false)
        guard slotParts.count == 2,
              (1...4).contains(domainText.count), (1...2).contains(busText.count),
              (1...2).contains(slotParts[0].count), slotParts[1].count == 1,
              let domain = UInt16(domainText, radix: 16), let bus = UInt8(busText, radix: 16),
              let device = UInt8(slotParts[0], radix: 16), let function = UInt8(slotParts[1], radix: 16)
        else { throw fail }
        try self.init(domain: domain, bus: bus, device: device, function: function)
    }

    public var description: String {
        hex(domain, width: 4) + ":" + hex(bus, width: 2) + ":" + hex(device, width: 2) + "." + String(function)
    }

    public static func < (lhs: PCIAddress, rhs: PCIAddress) -> Bool {
        (lhs.domain, lhs.bus, lhs.device, lhs.function) < (rhs.domain, rhs.bus, rhs.device, rhs.function)
    }
}

/// Lower-case hex with leading zeros, as sysfs and lspci print ids.
@inlinable
public func hex<T: BinaryInteger>(_ value: T, width: Int) -> String {
    let digits = String(value, radix: 16)
    return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
}
