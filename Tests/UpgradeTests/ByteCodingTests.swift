import Testing
@testable import Upgrade

/// The one codec for handover blobs: byte order, the versioned header, the length, and errors
/// that name the field.
@Suite("handover codec")
struct ByteCodingTests {
    let format = BlobFormat(name: "test blob", magic: Array("TEST".utf8), version: 3)

    func blob(version: UInt16? = nil, _ body: (inout ByteWriter) -> Void) -> [UInt8] {
        var w = ByteWriter()
        w.header(format, version: version)
        w.lengthPrefixed(body)
        return w.bytes
    }

    @Test func littleEndianHeaderAndLength() throws {
        let bytes = blob { $0.u16(0x0102); $0.u32(0x0304_0506); $0.u64(7); $0.string("ab") }
        #expect(bytes == Array("TEST".utf8) + [3, 0] + [18, 0, 0, 0] + [2, 1] + [6, 5, 4, 3] + [7, 0, 0, 0, 0, 0, 0, 0]
                         + [2, 0] + Array("ab".utf8))
        var r = ByteReader(bytes)
        try r.header(format)
        #expect(try r.length("length") == 18)
        #expect(try r.u16("a") == 0x0102 && r.u32("b") == 0x0304_0506 && r.u64("c") == 7 && r.string("d", max: 2) == "ab")
        #expect(r.remaining == 0)
    }

    @Test func refusalsNameTheBlobAndTheField() throws {
        var other = ByteReader(Array("NOPE".utf8) + [3, 0])
        #expect(throws: StateRecordError.badMagic(blob: "test blob", found: Array("NOPE".utf8))) { try other.header(format) }
        var newer = ByteReader(blob(version: 4) { _ in })
        #expect(throws: StateRecordError.unsupportedVersion(found: 4, supported: 3)) { try newer.header(format) }
        var longer = ByteReader(blob { $0.u8(1) } + [0])
        try longer.header(format)
        #expect(throws: StateRecordError.lengthMismatch(field: "length", declared: 1, actual: 2)) { try longer.length("length") }
        var checksummed = ByteReader(blob { $0.u8(1) } + [0, 0])
        try checksummed.header(format)
        #expect(try checksummed.length("length", leaving: 2) == 1)
        var short = ByteReader([1, 2, 3])
        #expect(throws: StateRecordError.truncated(field: "count", at: 0)) { try short.u32("count") }
        #expect("\(StateRecordError.badMagic(blob: "test blob", found: [0x4e, 0x0a]))" == "not a test blob (bad magic 4e 0a)")
    }
}
