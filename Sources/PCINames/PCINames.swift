import CPCINames
import PCI

/// Human-readable vendor, device and class names from libpci (pci.ids / udev hwdb).
/// Names are a convenience: every lookup returns nil when libpci or its database is missing.
public final class PCINames {
    private let handle: OpaquePointer?

    public init() {
        handle = CPCINames_open()
    }

    deinit {
        CPCINames_close(handle)
    }

    public func vendor(_ vendor: UInt16) -> String? {
        lookup { CPCINames_lookup_vendor(handle, vendor, $0, $1) }
    }

    public func device(vendor: UInt16, device: UInt16) -> String? {
        lookup { CPCINames_lookup_device(handle, vendor, device, $0, $1) }
    }

    /// Class name from the base class and subclass (the top 16 bits of the 24-bit class code).
    public func className(classCode: UInt32) -> String? {
        lookup { CPCINames_lookup_class(handle, UInt16(truncatingIfNeeded: classCode >> 8), $0, $1) }
    }

    /// "Vendor Device" as lspci prints it, or nil if either is unknown.
    public func fullName(of function: PCIFunction) -> String? {
        guard let device = device(vendor: function.vendorID, device: function.deviceID) else { return nil }
        guard let vendor = vendor(function.vendorID) else { return device }
        return vendor + " " + device
    }

    private func lookup(_ body: (UnsafeMutablePointer<CChar>, Int32) -> Int32) -> String? {
        guard handle != nil else { return nil }
        var buffer = [CChar](repeating: 0, count: 256)
        let found = buffer.withUnsafeMutableBufferPointer { body($0.baseAddress!, Int32($0.count)) }
        guard found == 0 else { return nil }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}
