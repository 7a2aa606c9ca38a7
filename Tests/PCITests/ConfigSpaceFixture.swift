@testable import PCI

/// Builds PCI config-space byte fixtures: a header plus a capability chain placed where a test says.
struct ConfigSpaceFixture {
    var bytes: [UInt8]

    init(size: Int = 256, vendor: UInt16 = 0x1AF4, device: UInt16 = 0x1044) {
        bytes = [UInt8](repeating: 0, count: size)
        put16(0x00, vendor)
        put16(0x02, device)
        put16(0x06, 1 << 4)  // status: capabilities list
    }

    mutating func put8(_ at: Int, _ v: UInt8) { bytes[at] = v }
    mutating func put16(_ at: Int, _ v: UInt16) { bytes[at] = UInt8(v & 0xFF); bytes[at + 1] = UInt8(v >> 8) }
    mutating func put32(_ at: Int, _ v: UInt32) { for i in 0..<4 { bytes[at + i] = UInt8((v >> (8 * UInt32(i))) & 0xFF) } }

    mutating func setFirst(_ pointer: UInt8) { put8(0x34, pointer) }

    /// A plain capability header.
    mutating func capability(at: Int, id: UInt8, next: UInt8) {
        put8(at, id)
        put8(at + 1, next)
    }

    /// A `struct virtio_pci_cap` (plus the notify multiplier for cfg_type 2).
    mutating func virtio(at: Int, next: UInt8, type: UInt8, bar: UInt8, offset: UInt32, length: UInt32,
                         multiplier: UInt32? = nil, capLength: UInt8? = nil, id: UInt8 = 0) {
        capability(at: at, id: 0x09, next: next)
        put8(at + 2, capLength ?? (multiplier == nil ? 16 : 20))
        put8(at + 3, type)
        put8(at + 4, bar)
        put8(at + 5, id)
        put32(at + 8, offset)
        put32(at + 12, length)
        if let multiplier { put32(at + 16, multiplier) }
    }

    /// The layout QEMU gives a modern virtio-pci function: MSI-X at 0x98, then vendor capabilities
    /// for pci-cfg, notify, device, ISR and common config, all in BAR 4 (16 KiB).
    static func qemuLike() -> ConfigSpaceFixture {
        var f = ConfigSpaceFixture()
        f.setFirst(0x98)
        f.capability(at: 0x98, id: 0x11, next: 0x84)
        f.virtio(at: 0x84, next: 0x70, type: 5, bar: 0, offset: 0, length: 0, capLength: 20)
        f.virtio(at: 0x70, next: 0x60, type: 2, bar: 4, offset: 0x3000, length: 0x1000, multiplier: 4)
        f.virtio(at: 0x60, next: 0x50, type: 4, bar: 4, offset: 0x2000, length: 0x1000)
        f.virtio(at: 0x50, next: 0x40, type: 3, bar: 4, offset: 0x1000, length: 0x1000)
        f.virtio(at: 0x40, next: 0x00, type: 1, bar: 4, offset: 0x0000, length: 0x1000)
        return f
    }

    /// BAR sizes matching `qemuLike()`: BAR1 holds the MSI-X table, BAR4 the virtio structures.
    static let qemuBARs: [UInt64] = [0, 0x1000, 0, 0, 0x4000, 0]

    func config() throws -> PCIConfigSpace { try PCIConfigSpace(bytes: bytes) }
}
