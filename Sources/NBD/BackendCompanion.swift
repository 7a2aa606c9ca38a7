/// Another source of requests that an `NBDServer` serves from the same backend, on the same
/// thread and in the same loop as its NBD clients: a ublk device in front of the same virtio-blk
/// device (`NBDServerConfiguration.companion`). The server polls its descriptor with the
/// sockets, calls `service` once per round, routes completions whose tag has `companionTagBit`
/// set to `completed`, and on a stop waits for `finished` as it waits for its clients. While the
/// server quiesces for a hand-over the companion takes no new requests (`holding`) and the
/// quiesce waits until none of its requests is in the backend: they cannot be carried over.
///
/// Called from the server's thread only (some kernel interfaces, ublk's among them, insist on
/// one thread); `Sendable` only so that it can sit in the configuration.
public protocol BackendCompanion: AnyObject, Sendable {
    /// Polled for POLLIN; nil when there is nothing to wait for.
    var descriptor: Int32? { get }
    /// Requests submitted to the backend and not yet completed.
    var inFlight: Int { get }
    /// Takes what arrived (unless `holding`), submits new requests to `backend` (tags with
    /// `companionTagBit`), and passes on the answers prepared by `completed`. `failed`: the
    /// backend cannot serve (answer EIO). Throwing stops the server: the companion cannot go on.
    func service<B: BlockBackend & ~Copyable>(_ backend: inout B, failed: Bool, holding: Bool) throws(BackendError)
    /// A request of the companion's finished with `result` (0 or an errno).
    func completed(tag: UInt64, result: Int32)
    /// The server stops: take no new requests, answer what is in flight, then report `finished`.
    func beginStop()
    /// Stopped as `beginStop` asked (or never started).
    var finished: Bool { get }
}

/// Companion tags have the top bit set; the server's own never do (`NBDServer.tag`).
public let companionTagBit: UInt64 = 1 << 63
