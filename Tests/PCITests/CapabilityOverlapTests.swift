import Testing
@testable import PCI

/// Virtio structures of different types that share bytes of a BAR (§4.1.4): the later one in the
/// capability list is not a valid instance; the next valid instance of its type is used, and a
/// device left without one is refused with the overlap named.
@Suite("overlapping virtio structures")
struct CapabilityOverlapTests {
    func walk(_ f: ConfigSpaceFixture, bars: [UInt64] = ConfigSpaceFixture.qemuBARs) throws -> VirtioPCICapabilities {
        try VirtioPCICapabilities(config: f.config(), barSizes: bars)
    }

    /// QEMU's layout with the notify structure (listed before common) moved into the last 256
    /// bytes of the common structure's page.
    func notifyInsideCommon() -> ConfigSpaceFixture {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x70, next: 0x60, type: 2, bar: 4, offset: 0x0F00, length: 0x100, multiplier: 4)
        return f
    }

    @Test func refusesACommonStructureOverlappingAnEarlierNotifyStructure() throws {
        #expect { try walk(notifyInsideCommon()) } throws: { error in
            "\(error)".contains("common capability at 0x40 overlaps the notify structure in BAR 4: 0x0+0x1000 and 0xf00+0x100 (capability at 0x70, used)")
        }
    }

    @Test func aLaterInstanceThatOverlapsNothingIsUsedInstead() throws {
        var f = notifyInsideCommon()
        f.put8(0x41, 0xB0)  // common (0x40) -> a second common capability at 0xB0, in the free page 0x3000
        f.virtio(at: 0xB0, next: 0, type: 1, bar: 4, offset: 0x3000, length: 0x1000)
        let caps = try walk(f)
        #expect(caps.common.capabilityOffset == 0xB0 && caps.common.offset == 0x3000)
        #expect(caps.notify.offset == 0x0F00)
        #expect(caps.ignored.contains { $0.capabilityOffset == 0x40 && $0.reason.contains("overlaps the notify structure") })
    }

    @Test func refusesAnOverlappingDeviceStructureEvenThoughItIsOptional() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x60, next: 0x50, type: 4, bar: 4, offset: 0x3800, length: 0x100)  // inside notify's page
        #expect { try walk(f) } throws: { error in
            "\(error)".contains("device capability at 0x60 overlaps the notify structure in BAR 4")
        }
    }

    /// One shared byte is an overlap; structures that only touch are not.
    @Test(arguments: [(UInt32(0x0FFF), false), (0x1000, true)])
    func boundaries(_ isrOffset: UInt32, _ accepted: Bool) throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x50, next: 0x40, type: 3, bar: 4, offset: isrOffset, length: 1)  // listed before common at 0
        if accepted {
            let caps = try walk(f)
            #expect(caps.isr.offset == 0x1000 && caps.common.offset == 0 && caps.ignored.isEmpty)
        } else {
            #expect { try walk(f) } throws: { error in
                "\(error)".contains("common capability at 0x40 overlaps the isr structure in BAR 4")
            }
        }
    }

    @Test func theSameOffsetsInDifferentBARsDoNotOverlap() throws {
        var f = ConfigSpaceFixture.qemuLike()
        f.virtio(at: 0x60, next: 0x50, type: 4, bar: 2, offset: 0, length: 0x1000)
        let caps = try walk(f, bars: [0, 0x1000, 0x4000, 0, 0x4000, 0])
        #expect(caps.device?.bar == 2 && caps.device?.offset == 0 && caps.common.offset == 0)
        #expect(caps.ignored.isEmpty)
    }

    @Test func twoInstancesOfTheSameTypeAreNotAnOverlap() throws {
        // The second common capability at the same place is ignored as a later instance, as before.
        var f = ConfigSpaceFixture.qemuLike()
        f.put8(0x41, 0xB0)
        f.virtio(at: 0xB0, next: 0, type: 1, bar: 4, offset: 0, length: 0x1000)
        let caps = try walk(f)
        #expect(caps.common.capabilityOffset == 0x40)
        #expect(caps.ignored.contains { $0.capabilityOffset == 0xB0 && $0.reason.contains("earlier") })
    }
}
