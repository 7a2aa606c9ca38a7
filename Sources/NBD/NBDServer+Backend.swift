extension NBDServer where B: ~Copyable {
    /// Changes the backend between two `run` calls (for example to bring its device back by reset
    /// after a failed upgrade). Requests in flight stay the backend's: `body` must keep them (a
    /// recovery gives them to the device again), so their completions still come from `poll`.
    public mutating func modifyBackend<E: Error>(_ body: (inout B) throws(E) -> Void) throws(E) {
        try body(&backend)
    }

    /// Adds a companion between two `run` calls (a successor attaches its ublk device once the
    /// hand-over is done and its predecessor gone).
    public mutating func attach(companion: any BackendCompanion) {
        configuration.companion = companion
    }
}
