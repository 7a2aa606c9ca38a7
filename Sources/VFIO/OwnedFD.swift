/// A file descriptor with exactly one owner. Closed when the owner goes away, unless it was
/// handed on with `take()` (e.g. to another process over SCM_RIGHTS during an upgrade).
public struct OwnedFD: ~Copyable {
    public let raw: Int32

    public init(adopting raw: Int32) {
        precondition(raw >= 0, "OwnedFD needs a valid descriptor")
        self.raw = raw
    }

    /// Gives up ownership without closing; the caller now owns the descriptor.
    public consuming func take() -> Int32 {
        let raw = self.raw
        discard self
        return raw
    }

    deinit {
        Syscall.close(raw)
    }
}
