/// What a running driver hands to its successor along with its file descriptors: a versioned,
/// checksummed record, validated field by field before anything in it is used (STYLE.md habit 7).
///
/// Layout (little-endian): magic "VVFIOUPG", format version u16, body length u32, body, FNV-1a 64
/// of the body. A reader refuses a format version it does not know before it looks at the body, so
/// an incompatible successor never touches the device.
public struct StateRecord: Sendable, Equatable {
    public static let magic = Array("VVFIOUPG".utf8)
    /// The format this build writes and the only one it reads.
    /// 2: `quiesceFinished` added after `quiesceStarted`.
    public static let formatVersion: UInt16 = 2
    /// Magic and version as the codec checks them (ByteCoding.swift).
    public static let format = BlobFormat(name: "virtio-vfio upgrade state record", magic: magic, version: formatVersion)
    public static let maxQueues = 64, maxInFlight = 65536, maxDescriptors = 253, maxString = 256
    /// The service's own state (for `serve blk`: the NBD connections), opaque here.
    public static let maxServiceState = 4 << 20

    /// A queue as the old driver left it.
    public struct Queue: Sendable, Equatable {
        public var index: UInt16
        public var size: UInt16
        public var descriptors: UInt64
        public var driver: UInt64
        public var device: UInt64
        /// The driver's shadow indices: next available slot to fill, next used element to consume.
        public var availIndex: UInt16
        public var lastUsedIndex: UInt16

        public init(index: UInt16, size: UInt16, descriptors: UInt64, driver: UInt64, device: UInt64,
                    availIndex: UInt16, lastUsedIndex: UInt16) {
            self.index = index; self.size = size; self.descriptors = descriptors; self.driver = driver
            self.device = device; self.availIndex = availIndex; self.lastUsedIndex = lastUsedIndex
        }
    }

    /// A request the device had not completed when the old driver stopped.
    public struct InFlight: Sendable, Equatable {
        public var queue: UInt16
        /// The descriptor chain head (live mode) / the slot holding the request's memory.
        public var head: UInt16
        public var slot: UInt32
        /// Which client connection (index into the handed-over client sockets) and its request tag.
        public var client: UInt32
        public var tag: UInt64
        public var operation: UInt8
        public var offset: UInt64
        public var length: UInt32

        public init(queue: UInt16, head: UInt16, slot: UInt32, client: UInt32, tag: UInt64, operation: UInt8,
                    offset: UInt64, length: UInt32) {
            self.queue = queue; self.head = head; self.slot = slot; self.client = client; self.tag = tag
            self.operation = operation; self.offset = offset; self.length = length
        }
    }

    /// What each handed-over file descriptor is, in the order they travel.
    public enum DescriptorRole: UInt8, Sendable, CaseIterable {
        case container = 1, group, device, dmaMemory, interrupt, listener, client
        /// A TAP interface's descriptor (`serve net`): the interface and the frames queued in it
        /// live on while it is open.
        case tap
    }

    public var driverVersion: String
    public var deviceAddress: String
    public var deviceType: UInt16
    public var features: UInt64
    public var dmaIOVA: UInt64
    public var dmaSize: UInt64
    public var queues: [Queue]
    public var inFlight: [InFlight]
    public var descriptors: [DescriptorRole]
    /// CLOCK_MONOTONIC (ns) when the old instance stopped taking new work: the successor reports
    /// the service gap from it (same machine, same clock).
    public var quiesceStarted: UInt64
    /// CLOCK_MONOTONIC (ns) when the old instance had quiesced (nothing in flight, every reply
    /// sent) and began to describe its state; 0 in the device part. Splits the gap's first phase.
    public var quiesceFinished: UInt64 = 0
    /// The service's state (opaque here, validated by the service): for `serve blk`, the NBD
    /// connections; empty for `serve rng`.
    public var serviceState: [UInt8]

    public init(driverVersion: String, deviceAddress: String, deviceType: UInt16, features: UInt64, dmaIOVA: UInt64,
                dmaSize: UInt64, queues: [Queue], inFlight: [InFlight], descriptors: [DescriptorRole],
                quiesceStarted: UInt64 = 0, serviceState: [UInt8] = []) {
        self.driverVersion = driverVersion; self.deviceAddress = deviceAddress; self.deviceType = deviceType
        self.features = features; self.dmaIOVA = dmaIOVA; self.dmaSize = dmaSize; self.queues = queues
        self.inFlight = inFlight; self.descriptors = descriptors; self.quiesceStarted = quiesceStarted
        self.serviceState = serviceState
    }

    /// The record's bytes. `format` is for tests of the refusal path only: a successor must refuse
    /// any format but `formatVersion` before it touches the device.
    public func encoded(format: UInt16 = StateRecord.formatVersion) -> [UInt8] {
        var body = ByteWriter(capacity: 256 + 40 * inFlight.count + serviceState.count)
        body.string(driverVersion)
        body.string(deviceAddress)
        body.u16(deviceType)
        body.u64(features)
        body.u64(dmaIOVA)
        body.u64(dmaSize)
        body.u16(UInt16(queues.count))
        for q in queues {
            body.u16(q.index); body.u16(q.size); body.u64(q.descriptors); body.u64(q.driver); body.u64(q.device)
            body.u16(q.availIndex); body.u16(q.lastUsedIndex)
        }
        body.u32(UInt32(inFlight.count))
        for r in inFlight {
            body.u16(r.queue); body.u16(r.head); body.u32(r.slot); body.u32(r.client); body.u64(r.tag)
            body.u8(r.operation); body.u64(r.offset); body.u32(r.length)
        }
        body.u16(UInt16(descriptors.count))
        for d in descriptors { body.u8(d.rawValue) }
        body.u64(quiesceStarted)
        body.u64(quiesceFinished)
        body.u32(UInt32(serviceState.count))
        body.raw(serviceState)
        var out = ByteWriter(capacity: body.bytes.count + 24)
        out.header(StateRecord.format, version: format)
        out.lengthPrefixed { $0.raw(body.bytes) }
        out.u64(fnv1a(body.bytes[...]))
        return out.bytes
    }

    /// Which descriptors a record may describe. A handover sends two records: first the device
    /// part (for VFIO: container, group, device, DMA memory, interrupts) while the old driver still
    /// serves, then, once it has quiesced, the service part (listening and client sockets, a TAP).
    public enum Part: Sendable, Equatable {
        /// Exactly one descriptor of each role in `requiring`, any interrupts, no sockets.
        case device(requiring: [DescriptorRole])
        /// Sockets only.
        case service
        /// Both in one record: exactly one of each VFIO device role, anything else.
        case whole

        /// The device part of a VFIO-driven device.
        public static let vfioDevice = Part.device(requiring: vfioRoles)
    }

    /// The descriptors that make a VFIO device: what a successor needs to drive it.
    public static let vfioRoles: [DescriptorRole] = [.container, .group, .device, .dmaMemory]

    /// Decodes and validates. `descriptorCount` is how many fds actually arrived with the record.
    public init(decoding bytes: [UInt8], descriptorCount: Int, part: Part = .whole) throws(StateRecordError) {
        var r = ByteReader(bytes)
        try r.header(StateRecord.format)
        let length = try r.length("body length", leaving: 8)
        let bodyStart = r.offset
        _ = try r.take(length, "body")
        let checksum = try r.u64("checksum")
        guard checksum == fnv1a(bytes[bodyStart..<(bodyStart + length)]) else { throw .checksumMismatch }

        var b = ByteReader(Array(bytes[bodyStart..<(bodyStart + length)]))
        driverVersion = try b.string("driver version", max: StateRecord.maxString)
        deviceAddress = try b.string("device address", max: StateRecord.maxString)
        deviceType = try b.u16("device type")
        features = try b.u64("features")
        guard features & (1 << 32) != 0 else { throw .invalid(field: "features", "VERSION_1 is not set") }
        let iova = try b.u64("DMA IOVA")
        let size = try b.u64("DMA size")
        guard size > 0, iova.addingReportingOverflow(size).overflow == false else {
            throw .invalid(field: "DMA region", "IOVA 0x\(String(iova, radix: 16)) + \(size) bytes")
        }
        dmaIOVA = iova
        dmaSize = size
        func inDMA(_ address: UInt64, _ length: UInt64, _ field: String) throws(StateRecordError) {
            guard address >= iova, address - iova <= size, length <= size - (address - iova) else {
                throw .invalid(field: field, "0x\(String(address, radix: 16))+\(length) is outside the DMA region")
            }
        }
        let queueCount = Int(try b.u16("queue count"))
        guard queueCount <= StateRecord.maxQueues else { throw .invalid(field: "queue count", "\(queueCount) queues") }
        var queues: [Queue] = []
        var seen = Set<UInt16>()
        for i in 0..<queueCount {
            let q = Queue(index: try b.u16("queue \(i) index"), size: try b.u16("queue \(i) size"),
                          descriptors: try b.u64("queue \(i) descriptor table"), driver: try b.u64("queue \(i) driver area"),
                          device: try b.u64("queue \(i) device area"), availIndex: try b.u16("queue \(i) avail index"),
                          lastUsedIndex: try b.u16("queue \(i) last used index"))
            guard seen.insert(q.index).inserted else { throw .invalid(field: "queue \(i) index", "queue \(q.index) appears twice") }
            guard q.size > 0, q.size & (q.size &- 1) == 0 else {
                throw .invalid(field: "queue \(i) size", "\(q.size) is not a power of two")
            }
            let n = UInt64(q.size)
            try inDMA(q.descriptors, 16 * n, "queue \(i) descriptor table")
            try inDMA(q.driver, 6 + 2 * n, "queue \(i) driver area")
            try inDMA(q.device, 6 + 8 * n, "queue \(i) device area")
            // The driver cannot have more outstanding than the ring holds.
            guard q.availIndex &- q.lastUsedIndex <= q.size else {
                throw .invalid(field: "queue \(i) indices", "avail \(q.availIndex) is more than \(q.size) ahead of used \(q.lastUsedIndex)")
            }
            queues.append(q)
        }
        let inFlightCount = Int(try b.u32("in-flight count"))
        // Each request takes 33 bytes (u16 queue, u16 head, u32 slot, u32 client, u64 tag, u8
        // operation, u64 offset, u32 length): a count the remaining bytes cannot hold is a lie.
        guard inFlightCount <= StateRecord.maxInFlight, inFlightCount <= b.remaining / 33 else {
            throw .invalid(field: "in-flight count", "\(inFlightCount) requests")
        }
        var requests: [InFlight] = []
        for i in 0..<inFlightCount {
            let request = InFlight(queue: try b.u16("request \(i) queue"), head: try b.u16("request \(i) head"),
                                   slot: try b.u32("request \(i) slot"), client: try b.u32("request \(i) client"),
                                   tag: try b.u64("request \(i) tag"), operation: try b.u8("request \(i) operation"),
                                   offset: try b.u64("request \(i) offset"), length: try b.u32("request \(i) length"))
            guard let queue = queues.first(where: { $0.index == request.queue }) else {
                throw .invalid(field: "request \(i) queue", "queue \(request.queue) is not in the record")
            }
            guard request.head < queue.size else { throw .invalid(field: "request \(i) head", "\(request.head) ≥ queue size \(queue.size)") }
            requests.append(request)
        }
        let descriptorTotal = Int(try b.u16("descriptor count"))
        guard descriptorTotal <= StateRecord.maxDescriptors else { throw .invalid(field: "descriptor count", "\(descriptorTotal)") }
        guard descriptorTotal == descriptorCount else {
            throw .invalid(field: "descriptor count", "the record lists \(descriptorTotal) descriptors, \(descriptorCount) arrived")
        }
        var roles: [DescriptorRole] = []
        for i in 0..<descriptorTotal {
            let raw = try b.u8("descriptor \(i) role")
            guard let role = DescriptorRole(rawValue: raw) else { throw .invalid(field: "descriptor \(i) role", "unknown role \(raw)") }
            roles.append(role)
        }
        let deviceRoles: [DescriptorRole] = StateRecord.vfioRoles
        func requireOnce(_ required: [DescriptorRole]) throws(StateRecordError) {
            for role in required where roles.filter({ $0 == role }).count != 1 {
                throw .invalid(field: "descriptors", "exactly one \(role) descriptor is needed")
            }
        }
        switch part {
        case .whole:
            try requireOnce(deviceRoles)
        case .device(let required):
            try requireOnce(required)
            if let socket = roles.first(where: { $0 == .listener || $0 == .client || $0 == .tap }) {
                throw .invalid(field: "descriptors", "a \(socket) socket in the device part")
            }
        case .service:
            if let device = roles.first(where: { deviceRoles.contains($0) || $0 == .interrupt }) {
                throw .invalid(field: "descriptors", "a \(device) descriptor in the service part")
            }
        }
        for (i, r) in requests.enumerated() where r.client != UInt32.max {
            let clients = roles.filter { $0 == .client }.count
            guard Int(r.client) < clients else {
                throw .invalid(field: "request \(i) client", "client \(r.client) but \(clients) client sockets were handed over")
            }
        }
        quiesceStarted = try b.u64("quiesce start")
        quiesceFinished = try b.u64("quiesce end")
        guard quiesceFinished == 0 || quiesceFinished >= quiesceStarted else {
            throw .invalid(field: "quiesce end", "\(quiesceFinished) is before the quiesce start \(quiesceStarted)")
        }
        let serviceBytes = Int(try b.u32("service state length"))
        guard serviceBytes <= StateRecord.maxServiceState else {
            throw .invalid(field: "service state length", "\(serviceBytes) bytes is above \(StateRecord.maxServiceState)")
        }
        serviceState = Array(try b.take(serviceBytes, "service state"))
        guard b.remaining == 0 else { throw .invalid(field: "body", "\(b.remaining) unexpected bytes at the end") }
        self.queues = queues
        self.inFlight = requests
        self.descriptors = roles
    }
}

/// Why a state record, or any blob read with `ByteReader`, was refused. Each names the field, so
/// the log says what to fix.
public enum StateRecordError: Error, Equatable, CustomStringConvertible {
    /// Not the blob it should be: which, and the magic it had.
    case badMagic(blob: String, found: [UInt8])
    case unsupportedVersion(found: UInt16, supported: UInt16)
    case truncated(field: String, at: Int)
    /// A length field that does not match the bytes present.
    case lengthMismatch(field: String, declared: Int, actual: Int)
    case checksumMismatch
    case invalid(field: String, String)

    public var description: String {
        switch self {
        case .badMagic(let blob, let found):
            let hex = found.map { $0 < 16 ? "0" + String($0, radix: 16) : String($0, radix: 16) }
            return "not a \(blob) (bad magic \(hex.joined(separator: " ")))"
        case .lengthMismatch(let field, let declared, let actual):
            return "state record field '\(field)' is invalid: \(declared) bytes announced, \(actual) present"
        case .unsupportedVersion(let found, let supported):
            return "state record format \(found) is not supported by this build (it reads format \(supported)); upgrade refused before touching the device"
        case .truncated(let field, let at): return "state record truncated at byte \(at) (\(field))"
        case .checksumMismatch: return "state record checksum mismatch: damaged in transit"
        case .invalid(let field, let why): return "state record field '\(field)' is invalid: \(why)"
        }
    }
}
