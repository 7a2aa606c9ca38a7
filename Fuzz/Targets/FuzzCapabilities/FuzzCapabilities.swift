import FuzzSupport
import PCI

/// Fuzz target: the PCI capability list walk and the virtio structure capabilities (spec 4.1.4)
/// of a device-supplied config space (`PCIConfigSpace`, `VirtioPCICapabilities`).
///
/// Input: 1 byte BAR count (mod 7), 6 bytes BAR size selectors (0: not implemented, 1...64:
/// 2^(b-1), else b * 256), then the config space bytes as read from the device.
///
/// Asserts, beyond "no crash, no ASan report": the walk agrees with a reference walk written from
/// the PCI spec (same capabilities in the same order, or both refuse), and the virtio walk agrees
/// with a reference of spec 4.1.4 (both refuse, or both pick the same common/notify/isr/device
/// structure: the first valid one of each type, valid including not overlapping one of another
/// type already picked); every structure reported matches the bytes;
/// nothing is both used and ignored.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let barCount = Int(input.u8() % 7)
    var bars: [UInt64] = []
    for _ in 0..<6 { bars.append(barSize(input.u8())) }
    bars = Array(bars.prefix(barCount))
    let bytes = Array(input.rest())

    let config: PCIConfigSpace
    do {
        config = try PCIConfigSpace(bytes: bytes)
    } catch {
        require(bytes.count < 64, "a \(bytes.count)-byte config space was refused: \(error)")
        _ = "\(error)"
        return 0
    }
    require(bytes.count >= 64, "a \(bytes.count)-byte config space was accepted")

    // The standard list against the reference walk.
    let expected = Reference.capabilities(bytes)
    let walked: [PCICapability]?
    do { walked = try config.capabilities() } catch { _ = "\(error)"; walked = nil }
    switch (expected, walked) {
    case (nil, nil): break
    case (let e?, let w?):
        require(e.map(\.offset) == w.map(\.offset) && e.map(\.id) == w.map(\.id),
                "capability list \(w.map { ($0.offset, $0.id) }) differs from the reference \(e.map { ($0.offset, $0.id) })")
        for c in w { _ = c.name }
    default:
        require(false, "capability walk \(walked == nil ? "refused" : "accepted") what the reference \(expected == nil ? "refuses" : "accepts")")
    }

    // The virtio structures against the reference of spec 4.1.4.
    let reference = Reference.virtio(bytes, bars: bars)
    do {
        let caps = try VirtioPCICapabilities(config: config, barSizes: bars)
        guard case .accepted(let chosen, let all, let ignoredOffsets) = reference else {
            require(false, "virtio walk accepted what the reference refuses (\(reference))")
            return 0
        }
        check(caps, bytes: bytes, bars: bars, chosen: chosen, all: all, ignored: ignoredOffsets)
    } catch {
        _ = "\(error)"
        guard case .refused = reference else {
            require(false, "virtio walk refused what the reference accepts: \(error)")
            return 0
        }
    }
    return 0
}

func barSize(_ b: UInt8) -> UInt64 {
    switch b {
    case 0: return 0
    case 1...64: return 1 << UInt64(b - 1)
    default: return UInt64(b) * 256
    }
}

/// Compares the library's result with the reference and with the raw bytes.
func check(_ caps: VirtioPCICapabilities, bytes: [UInt8], bars: [UInt64], chosen: [UInt8: Int], all: [Int], ignored: [Int]) {
    require(caps.all.map(\.capabilityOffset) == all, "structures at \(caps.all.map(\.capabilityOffset)), reference \(all)")
    require(caps.ignored.map(\.capabilityOffset) == ignored,
            "ignored \(caps.ignored.map(\.capabilityOffset)), reference \(ignored)")
    for s in caps.all {
        let at = s.capabilityOffset
        require(bytes[at] == 0x09, "structure at \(at) is not a vendor-specific capability")
        require(s.capabilityLength == bytes[at + 2] && Int(s.capabilityLength) >= 16 && at + Int(s.capabilityLength) <= bytes.count,
                "structure at \(at): cap_len \(s.capabilityLength) runs past the config space or is short")
        require(s.type.rawValue == bytes[at + 3] && s.bar == Int(bytes[at + 4]) && s.id == bytes[at + 5],
                "structure at \(at) does not match its bytes")
        var offset = UInt64(le32(bytes, at + 8)), length = UInt64(le32(bytes, at + 12))
        if s.type == .sharedMemory {
            offset |= UInt64(le32(bytes, at + 16)) << 32
            length |= UInt64(le32(bytes, at + 20)) << 32
        }
        require(s.offset == offset && s.length == length, "structure at \(at): offset/length differ from the bytes")
        require((s.notifyOffMultiplier != nil) == (s.type == .notify), "structure at \(at): multiplier on a \(s.type.name)")
        if let m = s.notifyOffMultiplier { require(m == le32(bytes, at + 16), "structure at \(at): wrong multiplier") }
        _ = s.type.name
    }
    let used: [(VirtioPCICapabilities.StructureType, VirtioPCICapabilities.Structure?)] =
        [(.common, caps.common), (.notify, caps.notify), (.isr, caps.isr), (.device, caps.device)]
    for (type, structure) in used {
        require(structure?.capabilityOffset == chosen[type.rawValue],
                "\(type.name): used the structure at \(structure.map { "\($0.capabilityOffset)" } ?? "none"), reference \(chosen[type.rawValue].map { "\($0)" } ?? "none")")
        if let s = structure {
            require(s.type == type, "\(type.name) slot holds a \(s.type.name) structure")
            require(Reference.problem(s.type.rawValue, bar: s.bar, offset: s.offset, length: s.length,
                                      multiplier: s.notifyOffMultiplier, bars: bars) == nil,
                    "\(type.name) structure at \(s.capabilityOffset) is used although it breaks spec 4.1.4")
            require(!caps.ignored.contains { $0.capabilityOffset == s.capabilityOffset },
                    "\(type.name) structure at \(s.capabilityOffset) is both used and ignored")
        }
    }
    let usedStructures = used.compactMap(\.1)
    for (i, a) in usedStructures.enumerated() {
        for b in usedStructures[(i + 1)...] where a.bar == b.bar && a.length > 0 && b.length > 0 {
            require(a.offset >= b.offset + b.length || b.offset >= a.offset + a.length,
                    "the \(a.type.name) and \(b.type.name) structures used share bytes of BAR \(a.bar)")
        }
    }
    for i in caps.ignored { _ = i.reason }
}

func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
    UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
}

/// The rules, written again from the specs rather than from the library.
enum Reference {
    /// PCI Local Bus Spec 6.7: the list starts at 0x34 if status bit 4 is set; pointers have their
    /// low two bits reserved, point at or past 0x40 and below 0x100; 0 ends the list. Refused: a
    /// pointer outside 0x40..0xff, an entry not fully read, a loop (more than 48 entries fit).
    static func capabilities(_ b: [UInt8]) -> [(offset: Int, id: UInt8)]? {
        guard (UInt16(b[6]) | UInt16(b[7]) << 8) & 0x10 != 0 else { return [] }
        var list: [(offset: Int, id: UInt8)] = []
        var pointer = Int(b[0x34] & 0xFC)
        while pointer != 0 {
            guard pointer >= 0x40, pointer < 0x100, pointer + 2 <= b.count else { return nil }
            guard !list.contains(where: { $0.offset == pointer }), list.count < 48 else { return nil }
            list.append((pointer, b[pointer]))
            pointer = Int(b[pointer + 1] & 0xFC)
        }
        return list
    }

    enum Outcome: CustomStringConvertible {
        /// cfg_type -> capability offset used; offsets of every structure; offsets ignored, in order.
        case accepted(chosen: [UInt8: Int], all: [Int], ignored: [Int])
        case refused(String)
        var description: String {
            switch self {
            case .accepted(let c, _, _): return "accepted \(c)"
            case .refused(let why): return "refused: \(why)"
            }
        }
    }

    /// Spec 4.1.4: vendor capabilities (id 9) carry struct virtio_pci_cap (16 bytes; 20 for notify,
    /// 24 for shared memory); reserved cfg_type (not 1-5, 8, 9) and bar (> 5) are ignored; the
    /// first valid structure of each mapped type (common, notify, isr, device) is used, and one
    /// that shares bytes of its BAR with a structure already used is not valid; common,
    /// notify and isr are required, and a device structure present but never valid is an error.
    static func virtio(_ b: [UInt8], bars: [UInt64]) -> Outcome {
        guard let list = capabilities(b) else { return .refused("capability list") }
        var chosen: [UInt8: Int] = [:], firstProblem: [UInt8: String] = [:]
        var all: [Int] = [], ignored: [Int] = []
        var placed: [(at: Int, bar: Int, offset: UInt64, length: UInt64)] = []  // the chosen ones
        for (at, id) in list where id == 0x09 {
            guard at + 3 <= b.count else { return .refused("cap_len unreadable") }
            let capLength = Int(b[at + 2])
            guard capLength >= 16, at + capLength <= b.count else { return .refused("cap_len \(capLength)") }
            let type = b[at + 3], bar = Int(b[at + 4])
            guard [1, 2, 3, 4, 5, 8, 9].contains(type) else { ignored.append(at); continue }
            guard bar <= 5 else { ignored.append(at); continue }
            if type == 2 && capLength < 20 { return .refused("short notify capability") }
            if type == 8 && capLength < 24 { return .refused("short shared memory capability") }
            all.append(at)
            guard (1...4).contains(type) else { continue }
            if chosen[type] != nil { ignored.append(at); continue }
            let offset = UInt64(le32(b, at + 8)), length = UInt64(le32(b, at + 12))
            let multiplier: UInt32? = type == 2 ? le32(b, at + 16) : nil
            if let problem = problem(type, bar: bar, offset: offset, length: length, multiplier: multiplier, bars: bars) {
                ignored.append(at)
                if firstProblem[type] == nil { firstProblem[type] = problem }
                continue
            }
            // Sharing a byte of its BAR with a structure of another type already chosen makes it
            // invalid too (the library's rule since CapabilityOverlapTests: one register would
            // alias another's); empty ranges and ranges that only touch do not overlap.
            if let other = placed.first(where: { $0.bar == bar && length > 0 && $0.length > 0
                                                  && offset < $0.offset + $0.length && $0.offset < offset + length }) {
                ignored.append(at)
                if firstProblem[type] == nil { firstProblem[type] = "overlaps the structure at \(other.at)" }
                continue
            }
            chosen[type] = at
            placed.append((at, bar, offset, length))
        }
        for type: UInt8 in [1, 2, 3] where chosen[type] == nil { return .refused("no valid structure of type \(type)") }
        if chosen[4] == nil, firstProblem[4] != nil { return .refused("device structure never valid") }
        return .accepted(chosen: chosen, all: all, ignored: ignored)
    }

    /// Why a mapped structure is unusable (spec 4.1.4.1 and each structure's section), or nil.
    static func problem(_ type: UInt8, bar: Int, offset: UInt64, length: UInt64, multiplier: UInt32?, bars: [UInt64]) -> String? {
        let barSize = bar < bars.count ? bars[bar] : 0
        if barSize == 0 { return "BAR not implemented" }
        let (end, overflow) = offset.addingReportingOverflow(length)
        if overflow || end > barSize { return "outside the BAR" }
        switch type {
        case 1: if offset % 4 != 0 || length < 0x38 { return "common: alignment or length" }  // 4.1.4.3
        case 2:                                                                                // 4.1.4.4
            if offset % 2 != 0 || length < 2 { return "notify: alignment or length" }
            let m = multiplier ?? 0
            if m != 0 && (m.nonzeroBitCount != 1 || m == 1) { return "notify: multiplier" }
        case 3: if length < 1 { return "isr: length" }                                         // 4.1.4.5
        case 4: if offset % 4 != 0 { return "device: alignment" }                              // 4.1.4.6
        default: break
        }
        return nil
    }
}

// MARK: - Seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>?, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?) -> CInt {
    writeSeedsIfAsked(seeds)
    return 0
}

/// A config space with a header and the capabilities placed where the seed says (the same
/// layout as Tests/PCITests/ConfigSpaceFixture.swift).
struct ConfigBuilder {
    var bytes = [UInt8](repeating: 0, count: 256)
    init(size: Int = 256) {
        bytes = [UInt8](repeating: 0, count: size)
        put16(0, 0x1AF4); put16(2, 0x1044); put16(6, 1 << 4)
    }
    mutating func put16(_ at: Int, _ v: UInt16) { bytes[at] = UInt8(v & 0xFF); bytes[at + 1] = UInt8(v >> 8) }
    mutating func put32(_ at: Int, _ v: UInt32) { for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    mutating func cap(_ at: Int, id: UInt8, next: UInt8) { bytes[at] = id; bytes[at + 1] = next }
    mutating func virtio(_ at: Int, next: UInt8, type: UInt8, bar: UInt8, offset: UInt32, length: UInt32,
                         multiplier: UInt32? = nil, capLength: UInt8? = nil) {
        cap(at, id: 0x09, next: next)
        bytes[at + 2] = capLength ?? (multiplier == nil ? 16 : 20)
        bytes[at + 3] = type
        bytes[at + 4] = bar
        put32(at + 8, offset)
        put32(at + 12, length)
        if let multiplier { put32(at + 16, multiplier) }
    }
    /// QEMU's modern virtio-pci layout: MSI-X at 0x98, then pci-cfg, notify, device, ISR, common.
    static func qemuLike() -> ConfigBuilder {
        var f = ConfigBuilder()
        f.bytes[0x34] = 0x98
        f.cap(0x98, id: 0x11, next: 0x84)
        f.virtio(0x84, next: 0x70, type: 5, bar: 0, offset: 0, length: 0, capLength: 20)
        f.virtio(0x70, next: 0x60, type: 2, bar: 4, offset: 0x3000, length: 0x1000, multiplier: 4)
        f.virtio(0x60, next: 0x50, type: 4, bar: 4, offset: 0x2000, length: 0x1000)
        f.virtio(0x50, next: 0x40, type: 3, bar: 4, offset: 0x1000, length: 0x1000)
        f.virtio(0x40, next: 0x00, type: 1, bar: 4, offset: 0x0000, length: 0x1000)
        return f
    }
}

/// BAR header of a seed: count 6, BAR1 4 KiB (MSI-X), BAR4 16 KiB (the virtio structures).
let qemuBARHeader: [UInt8] = [6, 0, 13, 0, 0, 15, 0]

func seeds() -> [(name: String, bytes: [UInt8])] {
    var result: [(name: String, bytes: [UInt8])] = []
    let qemu = ConfigBuilder.qemuLike()
    result.append(("qemu-virtio-rng", qemuBARHeader + qemu.bytes))
    // The same in a 4 KiB (PCIe) config space read through VFIO.
    result.append(("qemu-pcie-4k", qemuBARHeader + qemu.bytes + [UInt8](repeating: 0, count: 4096 - 256)))
    // Only the 64-byte header (an unprivileged sysfs read) with the pointer set.
    result.append(("header-only", qemuBARHeader + Array(qemu.bytes.prefix(64))))
    // A second, invalid common structure before the valid one; a reserved cfg_type; a bar of 7.
    var dup = ConfigBuilder.qemuLike()
    dup.bytes[0x34] = 0xB0
    dup.virtio(0xB0, next: 0xC0, type: 1, bar: 4, offset: 0x3FF0, length: 0x1000)   // outside BAR4
    dup.virtio(0xC0, next: 0xD0, type: 7, bar: 4, offset: 0, length: 0x10)           // reserved type
    dup.virtio(0xD0, next: 0x98, type: 3, bar: 7, offset: 0, length: 0x10)           // reserved bar
    result.append(("ignored-and-invalid", qemuBARHeader + dup.bytes))
    // A 64-bit shared memory capability (virtio-fs / virtio-gpu style) and a vendor-data one.
    var shm = ConfigBuilder.qemuLike()
    shm.bytes[0x34] = 0xB0
    shm.virtio(0xB0, next: 0xC8, type: 8, bar: 2, offset: 0, length: 0, capLength: 24)
    shm.put32(0xB0 + 16, 1); shm.put32(0xB0 + 20, 2)
    shm.virtio(0xC8, next: 0x98, type: 9, bar: 0, offset: 0, length: 0)
    result.append(("shared-memory-64bit", [6, 0, 13, 64, 0, 15, 0] + shm.bytes))
    // A vendor capability whose header is the last two bytes read: cap_len is past the end.
    var end = ConfigBuilder(size: 0x42)
    end.bytes[0x34] = 0x40
    end.cap(0x40, id: 0x09, next: 0)
    result.append(("cap-len-past-the-end", qemuBARHeader + end.bytes))
    // A loop, and a pointer into the header.
    var loop = ConfigBuilder()
    loop.bytes[0x34] = 0x40
    loop.cap(0x40, id: 0x05, next: 0x50)
    loop.cap(0x50, id: 0x11, next: 0x40)
    result.append(("pointer-loop", qemuBARHeader + loop.bytes))
    var header = ConfigBuilder()
    header.bytes[0x34] = 0x10
    result.append(("pointer-into-header", qemuBARHeader + header.bytes))
    // Notify multipliers: 0 (all queues share one address) and an odd one (refused).
    var m0 = ConfigBuilder.qemuLike()
    m0.put32(0x70 + 16, 0)
    result.append(("notify-multiplier-0", qemuBARHeader + m0.bytes))
    var m3 = ConfigBuilder.qemuLike()
    m3.put32(0x70 + 16, 3)
    result.append(("notify-multiplier-3", qemuBARHeader + m3.bytes))
    return result
}
