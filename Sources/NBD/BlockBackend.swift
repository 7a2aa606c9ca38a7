/// The block device an NBD export serves: the contract between the NBD server and a driver.
///
/// Requests are asynchronous and in flight together: the server asks for a buffer, (for writes)
/// fills it, submits, and later collects completions by polling. The backend owns the data memory
/// (for virtio-blk: DMA slots), so nothing is copied between server and device beyond the socket
/// reads and writes, and nothing is allocated per request.
public protocol BlockBackend: ~Copyable {
    /// Export size in bytes.
    var size: UInt64 { get }
    var readOnly: Bool { get }
    var canFlush: Bool { get }
    var canTrim: Bool { get }
    var canWriteZeroes: Bool { get }
    /// Smallest unit of I/O (bytes); requests need not be aligned to it, but should be.
    var minimumBlockSize: Int { get }
    var preferredBlockSize: Int { get }
    /// Largest payload of one READ or WRITE the backend can hold in flight at once.
    var maxPayload: Int { get }
    /// An fd that becomes readable when completions may be ready (an interrupt eventfd), or nil if
    /// the backend must be polled (then the server calls `poll` whenever it is idle).
    var completionDescriptor: Int32? { get }

    /// Reserves room for a payload of `length` bytes (0 for requests without data). Returns nil if
    /// the backend has no room until some request completes; never nil when nothing is in flight.
    mutating func reserve(length: Int) -> BackendBuffer?
    /// The memory of a reserved buffer, contiguous (writes are read into it from the socket; reads
    /// are sent from it once complete).
    func memory(of buffer: BackendBuffer) -> UnsafeMutableRawBufferPointer
    /// Starts `operation` on `[offset, offset + length)` with `buffer`; `tag` comes back on completion.
    mutating func submit(_ operation: BackendOperation, offset: UInt64, length: Int, buffer: BackendBuffer, tag: UInt64) throws(BackendError)
    /// Reports finished requests as (tag, errno-style result: 0 ok, EIO, ENOTSUP, EPERM...).
    /// Returns how many were reported.
    mutating func poll(_ body: (UInt64, Int32) -> Void) throws(BackendError) -> Int
    /// Returns a buffer's room once the server is done with it (after sending a read's data).
    mutating func release(_ buffer: BackendBuffer)
    /// Whether requests in flight can go to a successor as they are (a hot upgrade then does not
    /// wait for them); false: a quiesce completes them first.
    var handsOverInFlight: Bool { get }
    /// Recoveries so far and whether the device answers (default: none, answering).
    var health: BackendHealth { get }
}

extension BlockBackend where Self: ~Copyable {
    public var handsOverInFlight: Bool { false }
    public var health: BackendHealth { BackendHealth() }
}

/// How a backend is doing, for status reports (not per request).
public struct BackendHealth: Sendable, Equatable {
    /// Times the device was brought back (by reset) since the backend started.
    public var recoveries = 0
    /// False while the device needs a recovery or stopped answering.
    public var answering = true
    public init(recoveries: Int = 0, answering: Bool = true) {
        self.recoveries = recoveries
        self.answering = answering
    }
}

public enum BackendOperation: UInt8, Sendable, Equatable {
    case read = 0, write, flush, trim, writeZeroes
    /// A write that must be on stable storage before it completes (NBD_CMD_FLAG_FUA).
    case writeFUA
}

/// A reservation: which part of the backend's memory a request owns. Opaque to the server.
public struct BackendBuffer: Sendable, Equatable {
    public let first: Int
    public let count: Int
    public let length: Int
    public init(first: Int, count: Int, length: Int) { self.first = first; self.count = count; self.length = length }
}

/// A backend that can no longer serve (the device broke); the server fails requests with EIO.
public struct BackendError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
