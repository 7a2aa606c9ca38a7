/// One contiguous piece of a buffer, already translated to a CPU address and bounds-checked.
struct Segment {
    var pointer: UnsafeMutableRawPointer
    var length: Int
}

/// A descriptor chain as the device walked it (spec 2.7.5): the device-readable segments, then
/// the device-writable ones. The device makes no assumption about how a request is cut into
/// descriptors (spec 2.7.4.1), so requests are read and written as two byte streams.
/// Reused from chain to chain (the arrays keep their capacity).
struct DescriptorChain {
    var head: UInt16 = 0
    var readable: [Segment] = []
    var writable: [Segment] = []
    var readableLength = 0
    var writableLength = 0
    /// Buffer descriptors in the chain (not counting one that points to an indirect table).
    var descriptors = 0

    mutating func reset(head: UInt16) {
        self.head = head
        readable.removeAll(keepingCapacity: true)
        writable.removeAll(keepingCapacity: true)
        readableLength = 0
        writableLength = 0
        descriptors = 0
    }

    /// Calls `body` with each piece of `segments` covering stream bytes `[offset, offset + count)`.
    static func pieces(_ segments: [Segment], offset: Int, count: Int,
                       _ body: (UnsafeMutableRawPointer, Int) -> Void) {
        var skip = offset
        var left = count
        for s in segments where left > 0 {
            if skip >= s.length { skip -= s.length; continue }
            let n = min(s.length - skip, left)
            body(s.pointer + skip, n)
            left -= n
            skip = 0
        }
    }

    /// Copies readable bytes `[offset, offset + count)` to `destination`.
    func gather(_ offset: Int, _ count: Int, into destination: UnsafeMutableRawPointer) {
        var d = destination
        DescriptorChain.pieces(readable, offset: offset, count: count) { p, n in
            d.copyMemory(from: p, byteCount: n)
            d += n
        }
    }

    /// Copies `count` bytes from `source` to writable bytes `[offset, offset + count)`.
    func scatter(_ offset: Int, _ count: Int, from source: UnsafeRawPointer) {
        var s = source
        DescriptorChain.pieces(writable, offset: offset, count: count) { p, n in
            p.copyMemory(from: s, byteCount: n)
            s += n
        }
    }

    func writeByte(_ offset: Int, _ value: UInt8) {
        withUnsafeBytes(of: value) { scatter(offset, 1, from: $0.baseAddress!) }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, seedable, good enough for an emulated rng.
struct SplitMix64 {
    var state: UInt64

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func fill(_ p: UnsafeMutableRawPointer, _ count: Int) {
        var i = 0
        while i + 8 <= count {
            (p + i).storeBytes(of: next(), toByteOffset: 0, as: UInt64.self)
            i += 8
        }
        if i < count {
            var last = next()
            withUnsafeBytes(of: &last) { (p + i).copyMemory(from: $0.baseAddress!, byteCount: count - i) }
        }
    }
}
