#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Per-connection state of the NBD server: plain structs in memory allocated once, when the server
/// starts, so that serving a request allocates nothing.

/// Where one request is in its life.
enum RequestState: UInt8 {
    case free
    /// Parsed, waiting for the backend to have room (`reserve` returned nil).
    case waitingForRoom
    /// Buffer reserved, the WRITE payload is being read into it.
    case receivingPayload
    /// An error reply is due once the WRITE payload behind the header has been read and dropped.
    case discardingPayload
    /// Submitted to the backend.
    case submitted
    /// Completed; the flush that makes a TRIM / WRITE_ZEROES with FUA durable is submitted.
    case flushing
    /// Reply queued (in the client's ready list).
    case ready
}

/// One request of one client: the slot index is part of the backend tag.
struct RequestSlot {
    var state: RequestState = .free
    var operation: BackendOperation = .read
    var flushAfter = false
    var command: UInt16 = 0
    var cookie: UInt64 = 0
    var offset: UInt64 = 0
    var length = 0
    /// CLOCK_MONOTONIC (ns) when its header was read (0: carried over from an earlier server).
    var received: UInt64 = 0
    /// NBD error value of the reply.
    var error: UInt32 = 0
    /// The backend buffer, while reserved.
    var buffer = BackendBuffer(first: 0, count: 0, length: 0)
    var hasBuffer = false
    /// A successful READ: `length` bytes of the buffer follow the reply header.
    var sendsData = false
    /// Free list or ready list link (-1: end).
    var next: Int32 = -1
}

enum ClientPhase: UInt8 {
    /// The slot holds no connection.
    case free
    /// Greeting sent or being sent; client flags and options are read.
    case handshake
    case transmission
    /// The socket is closed, but requests of this connection are still in the backend: their
    /// buffers are released as they complete, then the slot is free again.
    case closed
}

/// What the input side is reading now.
enum ClientInput: Equatable {
    case clientFlags
    case optionHeader
    /// Option data that is kept and parsed once complete.
    case optionData(option: UInt32, length: Int)
    /// Option data too long to keep: read and dropped, then answered without it.
    case optionDiscard(option: UInt32, length: UInt32, remaining: Int)
    case requestHeader
    /// A request slot not yet able to go on: payload being read or dropped, or waiting for room.
    case request(Int32)
}

struct ClientState {
    var fd: Int32 = -1
    var phase: ClientPhase = .free
    /// Bumped for each connection in this slot; part of the backend tag, so a completion can never
    /// be credited to a later connection.
    var generation: UInt32 = 0
    var isTCP = false
    /// Past the server's client limit: every option is answered with why (NBD_REP_ERR_POLICY).
    var refusing = false
    var input: ClientInput = .clientFlags
    /// False once nothing more is read: after NBD_CMD_DISC, NBD_OPT_ABORT, end of stream, or when
    /// the server is stopping. The connection closes when what is in flight is answered.
    var inputOpen = false
    var clientFlags: NBDProtocol.ClientFlags = []
    /// The transmission flags this connection was promised (NBD_OPT_GO / EXPORT_NAME): its
    /// requests are checked against these. The export's own flags, unless the connection was
    /// handed over from an earlier server whose backend could do more (see `NBDServer.init(adopting:)`).
    var promisedFlags: NBDProtocol.TransmissionFlags = []

    /// Received bytes not yet consumed: `inStart..<inEnd` of `inBase`.
    let inBase: UnsafeMutableRawPointer
    let inCapacity: Int
    var inStart = 0
    var inEnd = 0
    /// Handshake replies not yet sent: `outStart..<outEnd` of `outBase`.
    let outBase: UnsafeMutableRawPointer
    let outCapacity: Int
    var outStart = 0
    var outEnd = 0

    /// Request slots, a free list through them, and the FIFO of replies ready to send.
    let requests: UnsafeMutablePointer<RequestSlot>
    let depth: Int
    var freeHead: Int32 = -1
    var readyHead: Int32 = -1
    var readyTail: Int32 = -1
    /// Slots not free.
    var used = 0
    /// Submitted to the backend and not completed.
    var inFlight = 0
    /// Bytes of the ready list's head already sent.
    var sendOffset = 0
    /// Payload bytes of the current request already read (or dropped).
    var payloadDone = 0
    /// The last send stopped short: wait for POLLOUT.
    var waitingToSend = false
    /// Input should be processed again this round without waiting for POLLIN (budget used up,
    /// or a request slot or backend room was freed).
    var pumpAgain = false
    var connectedAt: UInt64 = 0
    var lastActivity: UInt64 = 0

    /// Room for received bytes: the largest option kept plus its header, at least 16 KiB. Also the
    /// most unconsumed input a handed-over connection may bring (`NBDHandoverState`).
    static var inputCapacity: Int { max(16384, NBDHandshake.maximumOptionData + NBDProtocol.optionHeaderSize) }

    init(inCapacity: Int, outCapacity: Int, depth: Int) {
        self.inCapacity = inCapacity
        self.outCapacity = outCapacity
        self.depth = depth
        inBase = .allocate(byteCount: inCapacity, alignment: 16)
        outBase = .allocate(byteCount: outCapacity, alignment: 16)
        requests = .allocate(capacity: depth)
        requests.initialize(repeating: RequestSlot(), count: depth)
    }

    func deallocate() {
        inBase.deallocate()
        outBase.deallocate()
        requests.deinitialize(count: depth)
        requests.deallocate()
    }

    var buffered: Int { inEnd - inStart }
    var hasHandshakeOutput: Bool { outEnd > outStart }
    var hasOutput: Bool { outEnd > outStart || readyHead >= 0 }

    /// Resets the slot for a new connection on `fd`.
    mutating func open(fd: Int32, isTCP: Bool, now: UInt64) {
        self.fd = fd
        self.isTCP = isTCP
        phase = .handshake
        generation &+= 1
        input = .clientFlags
        inputOpen = true
        clientFlags = []
        promisedFlags = []
        inStart = 0; inEnd = 0; outStart = 0; outEnd = 0
        for i in 0..<depth {
            requests[i] = RequestSlot()
            requests[i].next = i + 1 < depth ? Int32(i + 1) : -1
        }
        freeHead = depth > 0 ? 0 : -1
        readyHead = -1; readyTail = -1
        used = 0; inFlight = 0; sendOffset = 0; payloadDone = 0
        waitingToSend = false
        pumpAgain = false
        connectedAt = now
        lastActivity = now
    }

    /// Resets the slot for a connection handed over by an earlier server: at a message boundary
    /// (`input`), with the bytes it had received and not consumed, parsed first.
    /// Its requests in flight (`inFlight`: request slot and request) keep their slots, and the
    /// connection keeps its `generation`: the backend's tags for them stay valid.
    mutating func adopt(fd: Int32, isTCP: Bool, phase: ClientPhase, input: ClientInput, clientFlags: NBDProtocol.ClientFlags,
                        promisedFlags: NBDProtocol.TransmissionFlags, pending: [UInt8], generation: UInt32,
                        inFlight: [(Int, RequestSlot)], now: UInt64) {
        precondition(pending.count <= inCapacity)
        open(fd: fd, isTCP: isTCP, now: now)
        self.generation = generation
        for (r, request) in inFlight {
            requests[r] = request
            used += 1
            self.inFlight += 1
        }
        // The free list: every other slot, in order.
        freeHead = -1
        for r in stride(from: depth - 1, through: 0, by: -1) where requests[r].state == .free {
            requests[r].next = freeHead
            freeHead = Int32(r)
        }
        self.phase = phase
        self.input = input
        self.clientFlags = clientFlags
        self.promisedFlags = promisedFlags
        pending.withUnsafeBytes { if $0.count > 0 { inBase.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        inEnd = pending.count
        pumpAgain = true
    }

    mutating func allocateSlot() -> Int32 {
        let index = freeHead
        precondition(index >= 0)
        freeHead = requests[Int(index)].next
        requests[Int(index)].next = -1
        used += 1
        return index
    }

    mutating func freeSlot(_ index: Int32) {
        requests[Int(index)].state = .free
        requests[Int(index)].hasBuffer = false
        requests[Int(index)].sendsData = false
        requests[Int(index)].next = freeHead
        freeHead = index
        used -= 1
    }

    mutating func appendReady(_ index: Int32) {
        requests[Int(index)].state = .ready
        requests[Int(index)].next = -1
        if readyTail >= 0 { requests[Int(readyTail)].next = index } else { readyHead = index }
        readyTail = index
    }

    mutating func popReady() -> Int32 {
        let index = readyHead
        readyHead = requests[Int(index)].next
        if readyHead < 0 { readyTail = -1 }
        return index
    }

    /// Marks `n` buffered bytes consumed.
    mutating func consume(_ n: Int) {
        inStart += n
        if inStart == inEnd { inStart = 0; inEnd = 0 }
    }

    /// Moves unconsumed input to the front so that `n` bytes fit.
    mutating func compact(toFit n: Int) {
        guard inStart > 0, inStart + n > inCapacity else { return }
        let count = buffered
        if count > 0 { memmove(inBase, inBase + inStart, count) }
        inStart = 0
        inEnd = count
    }
}
