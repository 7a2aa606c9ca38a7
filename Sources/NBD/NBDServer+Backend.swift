extension NBDServer where B: ~Copyable {
    /// Changes the backend between two `run` calls (for example to bring its device back by reset
    /// after a failed upgrade); never while requests are in flight.
    public mutating func modifyBackend<E: Error>(_ body: (inout B) throws(E) -> Void) throws(E) {
        precondition(totalInFlight == 0, "the backend is modified only while nothing is in flight")
        try body(&backend)
    }
}
