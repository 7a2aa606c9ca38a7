import Testing
@testable import PCI

@Suite("PCI capability list walk")
struct CapabilityListTests {
    @Test func walksTheListInOrder() throws {
        let caps = try ConfigSpaceFixture.qemuLike().config().capabilities()
        #expect(caps.map(\.offset) == [0x98, 0x84, 0x70, 0x60, 0x50, 0x40])
        #expect(caps.map(\.id) == [0x11, 0x09, 0x09, 0x09, 0x09, 0x09])
    }

    @Test func noCapabilitiesWhenTheStatusBitIsClear() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put16(0x06, 0)
        #expect(try f.config().capabilities().isEmpty)
    }

    @Test func ignoresTheReservedLowBitsOfPointers() throws {
        var f = ConfigSpaceFixture()
        f.setFirst(0x43)  // 0x40 with the two reserved bits set
        f.capability(at: 0x40, id: 0x05, next: 0x52)  // next = 0x50 | 0b10
        f.capability(at: 0x50, id: 0x11, next: 0)
        #expect(try f.config().capabilities().map(\.offset) == [0x40, 0x50])
    }

    @Test func refusesAPointerLoop() throws {
        var f = ConfigSpaceFixture()
        f.setFirst(0x40)
        f.capability(at: 0x40, id: 0x05, next: 0x50)
        f.capability(at: 0x50, id: 0x11, next: 0x40)
        #expect { try f.config().capabilities() } throws: { error in
            "\(error)".contains("loops back to 0x40")
        }
    }

    @Test func refusesASelfLoop() throws {
        var f = ConfigSpaceFixture()
        f.setFirst(0x40)
        f.capability(at: 0x40, id: 0x05, next: 0x40)
        #expect(throws: PCIError.self) { try f.config().capabilities() }
    }

    @Test func refusesACapabilityPastTheEndOfWhatWasRead() throws {
        // Unprivileged sysfs reads return only the 64-byte header: a pointer beyond it must not be followed.
        var f = ConfigSpaceFixture(size: 64)
        f.setFirst(0x40)
        #expect { try f.config().capabilities() } throws: { error in
            "\(error)".contains("past the end of config space")
        }
    }

    @Test func refusesAPointerIntoTheHeader() throws {
        var f = ConfigSpaceFixture()
        f.setFirst(0x10)
        #expect { try f.config().capabilities() } throws: { error in
            "\(error)".contains("outside 0x40..0xff")
        }
    }

    @Test func refusesAConfigSpaceShorterThanTheHeader() {
        #expect(throws: PCIError.self) { try PCIConfigSpace(bytes: [UInt8](repeating: 0, count: 32)) }
    }
}

@Suite("virtio structure capabilities (spec 4.1.4)")
struct VirtioCapabilityTests {
    func walk(_ f: ConfigSpaceFixture, bars: [UInt64] = ConfigSpaceFixture.qemuBARs) throws -> VirtioPCICapabilities {
        try VirtioPCICapabilities(config: f.config(), barSizes: bars)
    }

    @Test func findsEveryStructureOfAQEMUDevice() throws {
        let caps = try walk(.qemuLike())
        #expect(caps.common.bar == 4 && caps.common.offset == 0 && caps.common.length == 0x1000)
        #expect(caps.isr.offset == 0x1000)
        #expect(caps.device?.offset == 0x2000)
        #expect(caps.notify.offset == 0x3000 && caps.notify.notifyOffMultiplier == 4)
        #expect(caps.all.count == 5)
        #expect(caps.all.first?.type == .pciConfigAccess)
        #expect(caps.ignored.isEmpty)
    }

    @Test func deviceConfigurationIsOptional() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put8(0x71, 0x50)  // notify -> isr, skipping the device capability at 0x60
        let caps = try walk(f)
        #expect(caps.device == nil)
    }

    @Test func refusesACapabilityPointingOutsideItsBAR() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x40, next: 0, type: 1, bar: 4, offset: 0x3800, length: 0x1000)  // ends at 0x4800 > 0x4000
        #expect { try walk(f) } throws: { error in
            "\(error)".contains("common capability at 0x40 points outside its BAR")
        }
    }

    @Test func refusesOffsetPlusLengthThatOverflows() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x50, next: 0x40, type: 3, bar: 4, offset: 0xFFFF_FFFF, length: 0xFFFF_FFFF)
        #expect { try walk(f) } throws: { error in "\(error)".contains("points outside its BAR") }
    }

    @Test func refusesACapabilityInAnUnimplementedBAR() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x70, next: 0x60, type: 2, bar: 2, offset: 0, length: 0x1000, multiplier: 4)
        #expect { try walk(f) } throws: { error in "\(error)".contains("BAR 2, which is not implemented") }
    }

    @Test func ignoresAReservedBARValue() throws {
        var f = ConfigSpaceFixture.qemuLike()
        // An extra, broken common capability first in the list with bar = 7: ignored, the valid one used.
        f.setFirst(0xB0)
        f.virtio(at: 0xB0, next: 0x98, type: 1, bar: 7, offset: 0, length: 0x1000)
        let caps = try walk(f)
        #expect(caps.common.capabilityOffset == 0x40)
        #expect(caps.ignored.contains { $0.capabilityOffset == 0xB0 && $0.reason.contains("reserved bar value 7") })
    }

    @Test func ignoresAReservedStructureType() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.setFirst(0xB0)
        f.virtio(at: 0xB0, next: 0x98, type: 42, bar: 4, offset: 0, length: 0x10)
        let caps = try walk(f)
        #expect(caps.ignored.contains { $0.reason == "reserved cfg_type 42" })
    }

    @Test func usesTheFirstValidInstanceOfEachType() throws {
        var f = ConfigSpaceFixture.qemuLike()
        // A bad common capability (outside the BAR) ahead of the good one: the good one is used.
        f.setFirst(0xB0)
        f.virtio(at: 0xB0, next: 0xC0, type: 1, bar: 4, offset: 0x8000, length: 0x1000)
        // A second good common capability after the first good one would be ignored as well.
        f.virtio(at: 0xC0, next: 0x98, type: 1, bar: 4, offset: 0x0000, length: 0x1000)
        let caps = try walk(f)
        #expect(caps.common.capabilityOffset == 0xC0)
        #expect(caps.ignored.contains { $0.capabilityOffset == 0xB0 })
        #expect(caps.ignored.contains { $0.capabilityOffset == 0x40 && $0.reason.contains("earlier") })
    }

    @Test func refusesACapLengthBelowTheStructure() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put8(0x42, 8)
        #expect { try walk(f) } throws: { error in "\(error)".contains("cap_len 8") }
    }

    @Test func refusesANotifyCapabilityWithoutItsMultiplier() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put8(0x72, 16)
        #expect { try walk(f) } throws: { error in "\(error)".contains("virtio_pci_notify_cap") }
    }

    @Test func refusesAVirtioCapabilityRunningPastConfigSpace() throws {
        var f = ConfigSpaceFixture.qemuLike()
        // cap_len 20 at 0xf0 ends at 0x104, past the 256 bytes of conventional config space.
        f.setFirst(0xF0)
        f.virtio(at: 0xF0, next: 0x98, type: 1, bar: 4, offset: 0, length: 0x1000, capLength: 20)
        #expect { try walk(f) } throws: { error in
            "\(error)".contains("past the end of config space")
        }
    }

    @Test(arguments: [UInt32(3), 1, 6, 0x8000_0001])
    func refusesANotifyMultiplierThatIsNotAnEvenPowerOfTwo(_ multiplier: UInt32) throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put32(0x70 + 16, multiplier)
        #expect { try walk(f) } throws: { error in "\(error)".contains("notify_off_multiplier \(multiplier)") }
    }

    @Test(arguments: [UInt32(0), 2, 4, 0x1000])
    func acceptsValidNotifyMultipliers(_ multiplier: UInt32) throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put32(0x70 + 16, multiplier)
        #expect(try walk(f).notify.notifyOffMultiplier == multiplier)
    }

    @Test func refusesAMisalignedCommonStructure() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x40, next: 0, type: 1, bar: 4, offset: 0x2, length: 0x100)
        #expect { try walk(f) } throws: { error in "\(error)".contains("not 4-byte aligned") }
    }

    @Test func refusesATooShortCommonStructure() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x40, next: 0, type: 1, bar: 4, offset: 0, length: 0x20)
        #expect { try walk(f) } throws: { error in "\(error)".contains("below the 56 bytes") }
    }

    @Test func saysWhenARequiredStructureIsMissing() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.put8(0x51, 0)  // the list ends at the ISR capability: no common configuration
        #expect { try walk(f) } throws: { error in "\(error)".contains("no common configuration capability") }
    }

    @Test func readsTheSixtyFourBitFieldsOfSharedMemoryCapabilities() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.setFirst(0xB0)
        f.virtio(at: 0xB0, next: 0x98, type: 8, bar: 2, offset: 0x1000, length: 0x2000, capLength: 24)
        f.put32(0xB0 + 16, 0x1)  // offset_hi
        f.put32(0xB0 + 20, 0x2)  // length_hi
        let caps = try walk(f)
        let shm = try #require(caps.all.first { $0.type == .sharedMemory })
        #expect(shm.offset == 0x1_0000_1000 && shm.length == 0x2_0000_2000)
    }
}
