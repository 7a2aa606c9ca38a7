import Testing
@testable import Upgrade

let sample = StateRecord(
    driverVersion: "0.1.0", deviceAddress: "0000:00:05.0", deviceType: 2,
    features: 0x3_3000_0200, dmaIOVA: 0x10_0000, dmaSize: 40 << 20,
    queues: [.init(index: 0, size: 256, descriptors: 0x10_0000, driver: 0x10_1000, device: 0x10_2000,
                   availIndex: 1000, lastUsedIndex: 990)],
    inFlight: [.init(queue: 0, head: 3, slot: 3, client: 0, tag: 0xABCD, operation: 1, offset: 4096, length: 8192),
               .init(queue: 0, head: 7, slot: 7, client: 1, tag: 0xEF01, operation: 0, offset: 0, length: 512)],
    descriptors: [.container, .group, .device, .dmaMemory, .interrupt, .listener, .client, .client])

@Suite("upgrade state record")
struct StateRecordTests {
    @Test func roundTrips() throws {
        var record = sample
        record.quiesceStarted = 1_000
        record.quiesceFinished = 2_500
        let decoded = try StateRecord(decoding: record.encoded(), descriptorCount: 8)
        #expect(decoded == record)
    }

    @Test func refusesAnotherFormatVersionBeforeTheBody() throws {
        var bytes = sample.encoded()
        bytes[8] = 1  // format version 1: before quiesceFinished
        #expect(throws: StateRecordError.unsupportedVersion(found: 1, supported: 2)) {
            try StateRecord(decoding: bytes, descriptorCount: 8)
        }
    }

    @Test func refusesWrongMagicTruncationAndDamage() throws {
        var bytes = sample.encoded()
        bytes[0] = 0x58
        #expect(throws: StateRecordError.badMagic(blob: "virtio-vfio upgrade state record", found: Array("XVFIOUPG".utf8))) {
            try StateRecord(decoding: bytes, descriptorCount: 8)
        }
        let full = sample.encoded()
        for cut in [0, 5, 9, 13, 40, full.count - 1] {
            #expect(throws: StateRecordError.self) { try StateRecord(decoding: Array(full.prefix(cut)), descriptorCount: 8) }
        }
        var damaged = full
        damaged[30] ^= 0x40
        #expect(throws: StateRecordError.checksumMismatch) { try StateRecord(decoding: damaged, descriptorCount: 8) }
    }

    @Test func refusesADescriptorCountThatDoesNotMatchWhatArrived() throws {
        #expect { try StateRecord(decoding: sample.encoded(), descriptorCount: 7) } throws: {
            "\($0)".contains("8 descriptors, 7 arrived")
        }
    }

    func refuses(_ change: (inout StateRecord) -> Void, _ fragment: String) {
        var record = sample
        change(&record)
        #expect { try StateRecord(decoding: record.encoded(), descriptorCount: record.descriptors.count) } throws: {
            "\($0)".contains(fragment)
        }
    }

    @Test func aTapTravelsOnlyInTheServicePart() throws {
        var record = sample
        record.descriptors = [.tap]
        record.inFlight = []
        let decoded = try StateRecord(decoding: record.encoded(), descriptorCount: 1, part: .service)
        #expect(decoded.descriptors == [.tap])
        record.descriptors = [.container, .group, .device, .dmaMemory, .tap]
        #expect { try StateRecord(decoding: record.encoded(), descriptorCount: 5, part: .vfioDevice) } throws: {
            "\($0)".contains("a tap socket in the device part")
        }
    }

    @Test func validatesEachField() {
        refuses({ $0.features = 0x200 }, "VERSION_1")
        refuses({ $0.quiesceStarted = 100; $0.quiesceFinished = 50 }, "'quiesce end' is invalid: 50 is before the quiesce start 100")
        refuses({ $0.queues[0].size = 100 }, "not a power of two")
        refuses({ $0.queues[0].device = 0x500_0000 }, "outside the DMA region")
        refuses({ $0.queues[0].descriptors = 0x1000 }, "outside the DMA region")
        refuses({ $0.queues[0].availIndex = 2000 }, "ahead of used")
        refuses({ $0.queues.append($0.queues[0]) }, "appears twice")
        refuses({ $0.inFlight[0].queue = 4 }, "queue 4 is not in the record")
        refuses({ $0.inFlight[0].head = 256 }, "queue size 256")
        refuses({ $0.inFlight[1].client = 2 }, "2 client sockets")
        refuses({ $0.descriptors.removeAll { $0 == .dmaMemory } }, "dmaMemory")
        refuses({ $0.dmaSize = 0 }, "DMA region")
    }

    @Test func randomDamageNeverCrashesAndIsRefused() {
        let full = sample.encoded()
        var seed: UInt64 = 42
        for _ in 0..<5000 {
            var bytes = full
            seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17
            let position = Int(seed % UInt64(bytes.count))
            bytes[position] ^= UInt8(truncatingIfNeeded: seed >> 32) | 1
            // Any single-byte change is caught (magic, version, length, checksum or a field).
            #expect(throws: StateRecordError.self) { try StateRecord(decoding: bytes, descriptorCount: 8) }
        }
    }
}

@Suite("state record regressions found by fuzzing")
struct StateRecordRegressionTests {
    /// The in-flight bound divided the remaining bytes by 35 instead of the 33 a request takes, so
    /// a valid record with many requests and few descriptors was refused (Fuzz/Regressions/FuzzStateRecord).
    @Test func manyRequestsWithFewDescriptorsRoundTrip() throws {
        var record = sample
        record.inFlight = (0..<40).map { i in
            .init(queue: 0, head: UInt16(i), slot: UInt32(i), client: UInt32.max, tag: UInt64(i), operation: 0, offset: 0, length: 512)
        }
        record.descriptors = [.container, .group, .device, .dmaMemory]
        #expect(try StateRecord(decoding: record.encoded(), descriptorCount: 4) == record)
    }
}
