import Testing
@testable import Virtio

@Suite("feature names")
struct FeatureTests {
    @Test func decodesTransportAndDeviceBits() {
        // Transport bits 28, 29, 32-35 and 40.
        let rng = Features(rawValue: 0x0000_010F_3000_0000)
        #expect(rng.names(for: .entropy) == ["RING_INDIRECT_DESC", "RING_EVENT_IDX", "VERSION_1", "ACCESS_PLATFORM",
                                              "RING_PACKED", "IN_ORDER", "RING_RESET"])
        let blk: Features = [Features(bit: 9), Features(bit: 2), .version1]
        #expect(blk.names(for: .block) == ["SEG_MAX", "FLUSH", "VERSION_1"])
        let net: Features = [Features(bit: 5), Features(bit: 15), Features(bit: 17)]
        #expect(net.names(for: .net) == ["MAC", "MRG_RXBUF", "CTRL_VQ"])
    }

    @Test func deviceBitsDependOnTheDeviceType() {
        #expect(Features.name(ofBit: 5, for: .net) == "MAC")
        #expect(Features.name(ofBit: 5, for: .block) == "RO")
        #expect(Features.name(ofBit: 5, for: .entropy) == "bit 5")
        #expect(Features.name(ofBit: 5, for: nil) == "bit 5")
    }

    @Test func unknownBitsAreNamedByNumber() {
        #expect(Features(bit: 50).names(for: .block) == ["bit 50"])
        #expect(Features(bit: 63).names(for: .net) == ["SPEED_DUPLEX"])
    }

    @Test func parsesNamesAndNumbers() {
        #expect(Features.parse("RING_EVENT_IDX", for: .entropy) == .ringEventIdx)
        #expect(Features.parse("ring_indirect_desc", for: nil) == .ringIndirectDesc)
        #expect(Features.parse("FLUSH", for: .block) == Features(bit: 9))
        #expect(Features.parse("FLUSH", for: .net) == nil)
        #expect(Features.parse("29", for: nil) == .ringEventIdx)
        #expect(Features.parse("bit 40", for: nil) == .ringReset)
        #expect(Features.parse("64", for: nil) == nil)
        #expect(Features.parse("NOPE", for: .block) == nil)
    }
}

@Suite("device status and type")
struct StatusAndTypeTests {
    @Test func describesStatus() {
        #expect(DeviceStatus([]).description == "0 (reset)")
        #expect(DeviceStatus([.acknowledge, .driver, .featuresOK]).description == "ACKNOWLEDGE|DRIVER|FEATURES_OK")
        #expect(DeviceStatus(rawValue: 0x40 | 0x10).description == "DEVICE_NEEDS_RESET|0x10")
    }

    @Test func typeFromPCIIdentity() {
        #expect(DeviceType(pciVendor: 0x1AF4, pciDevice: 0x1044, subsystemDevice: 0) == .entropy)
        #expect(DeviceType(pciVendor: 0x1AF4, pciDevice: 0x1041, subsystemDevice: 0) == .net)
        // Transitional IDs carry the type in the subsystem device ID (spec 4.1.2.1).
        #expect(DeviceType(pciVendor: 0x1AF4, pciDevice: 0x1001, subsystemDevice: 2) == .block)
        #expect(DeviceType(pciVendor: 0x1AF4, pciDevice: 0x1100, subsystemDevice: 2) == nil)
        #expect(DeviceType(pciVendor: 0x8086, pciDevice: 0x1041, subsystemDevice: 1) == nil)
        #expect(DeviceType.entropy.description == "rng" && DeviceType(rawValue: 99).description == "type-99")
    }
}
